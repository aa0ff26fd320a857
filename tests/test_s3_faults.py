"""S3 faults end to end: a writer SIGKILLed mid-upload, and server errors, throttling, dropped connections
and bytes damaged in transit, injected by a proxy (tests/s3proxy.py) in front of the local S3 server.

What must hold (format_spec/README.md §11.2): a save either commits or leaves nothing committed (``latest``
unchanged, the objects as before); retries are bounded; a load returns the committed bytes or names the
damaged object.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
import s3proxy
import s3server
import torch
from torch import nn

from portable_ckpt import (
    CheckpointCorruptedError,
    CheckpointError,
    CheckpointManager,
    CheckpointWriteError,
    load_checkpoint,
    save_checkpoint,
)
from portable_ckpt.format import names
from portable_ckpt.storage import FsspecStorage

s3fs = pytest.importorskip("s3fs")
s3_endpoint, s3_bucket = s3server.s3_endpoint, s3server.s3_bucket  # the fixtures
options = s3server.options

PART = 5 << 20  # the smallest part S3 takes
RETRIES = 3  # botocore's retries per request in these tests (``max_attempts`` counts retries: 4 requests)
ATTEMPTS = RETRIES + 1
S3FS_RETRIES = 2  # s3fs's own tries of what botocore gave up on (SlowDown, dropped connections); default 5
CHILD_TIMEOUT = 120


def raw_fs(endpoint: str) -> Any:
    """A client of its own that goes straight to the server, to look at the objects."""
    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **options(endpoint))


def objects(fs: Any, bucket: str) -> dict[str, bytes]:
    return {k.removeprefix(f"{bucket}/run/"): fs.cat_file(k) for k in fs.find(f"{bucket}/run")}


def model_for(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[s3proxy.FaultProxy]:
    with s3proxy.FaultProxy(s3_endpoint) as p:
        yield p


def through(proxy: s3proxy.FaultProxy, bucket: str, *, block_size: int = PART) -> FsspecStorage:
    """The run's root, every request through the proxy, with few retries (for test speed)."""
    config = {"retries": {"max_attempts": RETRIES, "mode": "standard"}, "connect_timeout": 2, "read_timeout": 10}
    root = FsspecStorage.from_location(
        f"s3://{bucket}/run",
        storage_options=options(proxy.endpoint, config_kwargs=config, skip_instance_cache=True),
        block_size=block_size,
    )
    root.fs.retries = S3FS_RETRIES  # a class attribute of s3fs, not an option
    return root


# --- a writer killed mid-upload -------------------------------------------------------------------------

CHILD = """
import asyncio, sys
import s3fs, torch
from torch import nn
from portable_ckpt import CheckpointManager
from portable_ckpt.storage import FsspecStorage

endpoint, bucket, key, secret = sys.argv[1:5]
call = s3fs.S3FileSystem._call_s3

async def slow_call(self, method, *args, **kwargs):  # a slow link: the parts in flight land one by one
    if method == "upload_part":
        await asyncio.sleep(0.4 * kwargs["PartNumber"])
    return await call(self, method, *args, **kwargs)

s3fs.S3FileSystem._call_s3 = slow_call
root = FsspecStorage.from_location(
    f"s3://{bucket}/run",
    storage_options={"endpoint_url": endpoint, "key": key, "secret": secret},
    block_size=5 << 20,
)
torch.manual_seed(2)
model = nn.Linear(1024, 2048)  # 8 MiB of weights, 16 MiB of AdamW state
opt = torch.optim.AdamW(model.parameters())
model(torch.ones(1, 1024)).sum().backward()
opt.step()
CheckpointManager(root).save(model, opt, {"step": 2}, None, 2)
print("saved")
"""


def wait_for(what: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = what()
        if found:
            return found
        time.sleep(0.05)
    raise TimeoutError(f"not seen within {timeout} s")


def test_a_writer_killed_mid_upload_commits_nothing_and_is_cleaned(s3_bucket, s3_endpoint):
    url = f"s3://{s3_bucket}/run"
    before = model_for(1)
    save_checkpoint(before, None, {"step": 1}, None, 1, url)
    fs = raw_fs(s3_endpoint)
    committed = objects(fs, s3_bucket)

    def optimizer_parts() -> bool:
        for upload in fs.list_multipart_uploads(s3_bucket):
            if upload["Key"].endswith(f"step-00000002/{names.OPTIMIZER}"):
                parts = fs.call_s3("list_parts", Bucket=s3_bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                return bool(parts.get("Parts"))
        return False

    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, s3_endpoint, s3_bucket, s3server.KEY, s3server.SECRET],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        wait_for(lambda: optimizer_parts() or child.poll() is not None, CHILD_TIMEOUT)
        assert child.poll() is None, child.communicate(timeout=CHILD_TIMEOUT)
        child.send_signal(signal.SIGKILL)  # model.safetensors is up, optimizer.pt half way
    finally:
        child.kill()
        child.communicate(timeout=CHILD_TIMEOUT)
    assert child.returncode == -signal.SIGKILL

    left = sorted(set(objects(fs, s3_bucket)) - set(committed))
    assert left[0] == f".pending-step-00000002-{child.pid}-" + left[0].rsplit("-", 1)[1]
    # what completed of step 2 (model.safetensors, written alongside optimizer.pt, may be up), never its manifest
    assert set(left[1:]) <= {
        f"step-00000002/{n}" for n in (names.MODEL, names.CONFIG, names.RNG_JSON, names.RNG_TENSORS)
    }
    assert {k: v for k, v in objects(fs, s3_bucket).items() if k in committed} == committed  # latest unchanged
    assert fs.cat_file(f"{s3_bucket}/run/latest") == b"step-00000001\n"
    fresh = model_for(0)
    assert load_checkpoint(url, fresh).step == 1
    for k, v in before.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)

    manager = CheckpointManager(url)  # cleans the dead writer's leftovers
    assert manager.steps() == [1] and manager.latest() == f"{url}/step-00000001"
    assert objects(fs, s3_bucket) == committed
    assert fs.list_multipart_uploads(s3_bucket) == []  # the upload the writer had begun is aborted too


# --- server errors and dropped connections, through the proxy ---------------------------------------------

TRANSIENT: list[tuple[s3proxy.Action, str, str]] = [
    ("500", "PUT", names.MODEL),
    ("503", "PUT", names.MODEL),
    ("slowdown", "PUT", names.MODEL),
    ("drop", "PUT", names.MODEL),
    ("500", "PUT", "partNumber=2"),
    ("slowdown", "PUT", "partNumber=2"),
    ("drop", "PUT", "partNumber=2"),
    ("500", "POST", "uploadId="),  # CompleteMultipartUpload
    ("503", "PUT", names.MANIFEST),
    ("slowdown", "GET", names.MODEL),
    ("500", "GET", names.MODEL),
    ("drop", "GET", names.MODEL),
    ("503", "HEAD", names.MANIFEST),
]


@pytest.mark.parametrize(("action", "method", "path"), TRANSIENT, ids=["-".join(t) for t in TRANSIENT])
def test_a_transient_error_is_retried_and_the_save_commits(proxy, s3_bucket, s3_endpoint, action, method, path):
    root = through(proxy, s3_bucket)
    state = {"w": torch.randn(3 << 20), "b": torch.arange(10, dtype=torch.int64)}  # 12 MiB: three parts
    rule = proxy.fail(action, method=method, path=path, nth=1)
    save_checkpoint(state, None, {"a": 1}, None, 1, root)
    ckpt = load_checkpoint(root)
    assert rule.fired == 1  # the fault did happen, once
    assert ckpt.step == 1 and ckpt.config == {"a": 1}
    for k, v in state.items():
        assert torch.equal(ckpt.model_state[k], v)
    fs = raw_fs(s3_endpoint)
    assert fs.cat_file(f"{s3_bucket}/run/latest") == b"step-00000001\n"
    assert not [k for k in objects(fs, s3_bucket) if k.startswith(".")]
    assert fs.list_multipart_uploads(s3_bucket) == []


# (action, what is hit, most requests to it): botocore's attempts, times s3fs's retries where s3fs retries too,
# times the parts in flight when every part of model.safetensors fails (3 parts of 12 MiB: all in flight at once)
IN_FLIGHT = 3
PERSISTENT: list[tuple[s3proxy.Action, str, int]] = [
    ("500", names.MODEL, ATTEMPTS * IN_FLIGHT),
    ("503", names.MODEL, ATTEMPTS * IN_FLIGHT),
    ("slowdown", names.MODEL, ATTEMPTS * S3FS_RETRIES * IN_FLIGHT),
    ("drop", names.MODEL, 2 * ATTEMPTS * S3FS_RETRIES * IN_FLIGHT),  # measured: aiohttp retries a disconnect twice over
    ("500", "partNumber=2", ATTEMPTS),
    ("503", names.MANIFEST, ATTEMPTS),
]


@pytest.mark.parametrize(("action", "path", "most"), PERSISTENT, ids=[f"{a}-{p}" for a, p, _ in PERSISTENT])
def test_a_persistent_error_is_retried_a_bounded_number_of_times_and_commits_nothing(
    proxy, s3_bucket, s3_endpoint, action, path, most
):
    root = through(proxy, s3_bucket)
    save_checkpoint(model_for(1), None, {"a": 1}, None, 1, root)
    fs = raw_fs(s3_endpoint)
    before = objects(fs, s3_bucket)
    proxy.clear()
    proxy.fail(action, method="PUT", path=path)
    state = {"w": torch.randn(3 << 20)}
    started = time.monotonic()
    with pytest.raises(CheckpointWriteError, match=r"saving step 2 .*nothing was committed"):
        save_checkpoint(state, None, {"a": 2}, None, 2, root)
    elapsed = time.monotonic() - started
    tries = proxy.count("PUT", path)
    assert 2 <= tries <= most, proxy.requests  # retried, and not without end
    assert elapsed < 60
    assert objects(fs, s3_bucket) == before
    assert load_checkpoint(f"s3://{s3_bucket}/run").step == 1
    assert fs.list_multipart_uploads(s3_bucket) == []  # the upload begun was aborted


def test_a_persistent_read_error_fails_the_load_with_the_object_named(proxy, s3_bucket):
    root = through(proxy, s3_bucket)
    save_checkpoint(model_for(1), None, {}, None, 1, root)
    proxy.fail("500", method="GET", path=f"/step-00000001/{names.MODEL}")
    with pytest.raises(OSError, match=rf"s3://{s3_bucket}/run/step-00000001/{names.MODEL}"):
        load_checkpoint(root, model_for(2))
    assert (
        2 <= proxy.count("GET", f"/step-00000001/{names.MODEL}") <= ATTEMPTS * 2
    )  # the header read, and perhaps one more


@pytest.mark.parametrize("action", ["badkey", "badsig"])
def test_refused_credentials_name_the_location_and_how_to_pass_them(proxy, s3_bucket, s3_endpoint, action):
    root = through(proxy, s3_bucket)
    save_checkpoint(model_for(1), None, {}, None, 1, root)
    fs = raw_fs(s3_endpoint)
    before = objects(fs, s3_bucket)
    proxy.clear()
    proxy.fail(action)  # every request: InvalidAccessKeyId, or SignatureDoesNotMatch, as S3 answers them
    remedy = "pass the credentials as storage options (FsspecStorage.from_location(url, storage_options="
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(root)
    assert str(e.value).startswith(f"s3://{s3_bucket}/run: access denied (")
    assert remedy in str(e.value) and e.value.file == f"s3://{s3_bucket}/run"
    with pytest.raises(CheckpointWriteError, match=r"saving step 2 .*nothing was committed") as w:
        save_checkpoint(model_for(2), None, {}, None, 2, root)
    assert f"s3://{s3_bucket}/run" in str(w.value) and "access denied" in str(w.value) and remedy in str(w.value)
    assert proxy.count() <= 4  # refused credentials are not retried
    proxy.clear()
    assert objects(fs, s3_bucket) == before


def test_a_corrupted_object_is_named(proxy, s3_bucket, s3_endpoint):
    root = through(proxy, s3_bucket)
    save_checkpoint(model_for(1), None, {}, None, 1, root)
    fs = raw_fs(s3_endpoint)
    key = f"{s3_bucket}/run/step-00000001/{names.MODEL}"
    data = bytearray(fs.cat_file(key))
    data[-1] ^= 0x01  # one bit of the last tensor
    fs.pipe_file(key, bytes(data))
    with pytest.raises(CheckpointCorruptedError, match=rf"s3://{key}: checksum") as e:
        load_checkpoint(root, model_for(2))
    assert e.value.file == f"s3://{key}"
