"""A local S3 for the tests: moto's server on 127.0.0.1 at a free port, with dummy credentials.

``s3_endpoint`` (one server per test session) yields its URL; ``s3_bucket`` creates a new bucket for one
test and yields its name. Nothing leaves the machine: the endpoint and credentials are always explicit.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("s3fs", reason="the s3 extra is not installed")
moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed")

KEY, SECRET, REGION = "testing", "testing", "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def options(endpoint: str, **more: Any) -> dict[str, Any]:
    """Storage options for the local server: its endpoint, dummy credentials, no retry waits."""
    return {
        "endpoint_url": endpoint,
        "key": KEY,
        "secret": SECRET,
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 10},
        **more,
    }


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    import fsspec
    import s3fs

    for name, value in (
        ("AWS_ACCESS_KEY_ID", KEY),
        ("AWS_SECRET_ACCESS_KEY", SECRET),
        ("AWS_DEFAULT_REGION", REGION),
    ):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    # plain s3:// URLs get the endpoint through fsspec's configuration, as users set it
    monkeypatch.setitem(fsspec.config.conf, "s3", options(s3_endpoint))
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **options(s3_endpoint))
    fs.mkdir(bucket)
    yield bucket
