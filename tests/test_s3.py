"""Checkpoints in S3 (moto's server on 127.0.0.1): the fsspec backend end to end, manifest-last.

The same checks as the memory backend's (tests/test_storage.py), through a real S3 protocol: bitwise round
trips, the manager, lazy reads that fetch one tensor's bytes, the CLI on s3:// URLs, and failures that
commit nothing.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import s3server
import torch
from torch import nn

from portable_ckpt import (
    CheckpointCorruptedError,
    CheckpointError,
    CheckpointInputError,
    CheckpointManager,
    CheckpointNotFoundError,
    CheckpointWriteError,
    load_checkpoint,
    open_checkpoint,
    save_checkpoint,
)
from portable_ckpt.cli import main
from portable_ckpt.format import names
from portable_ckpt.storage import FsspecStorage, remote, storage_for

s3fs = pytest.importorskip("s3fs")
s3_endpoint, s3_bucket = s3server.s3_endpoint, s3server.s3_bucket  # the fixtures
free_port, options = s3server.free_port, s3server.options
botocore_exceptions = pytest.importorskip("botocore.exceptions")


def model_for(step: int) -> nn.Module:
    torch.manual_seed(step)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def optimizer_for(model: nn.Module) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    return opt


def raw_fs(endpoint: str) -> Any:
    """A client of its own, to look at (and damage) objects behind the backend's back."""
    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **options(endpoint))


def keys(fs: Any, bucket: str, prefix: str = "run") -> list[str]:
    return sorted(k.removeprefix(f"{bucket}/{prefix}/") for k in fs.find(f"{bucket}/{prefix}"))


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(argv, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_s3_urls_get_the_fsspec_backend(s3_bucket):
    root = storage_for(f"s3://{s3_bucket}/run")
    assert isinstance(root, FsspecStorage) and root.commit_strategy == "manifest-last"
    assert root.location == f"s3://{s3_bucket}/run"
    assert root.child("step-00000001").location == f"s3://{s3_bucket}/run/step-00000001"
    with pytest.raises(CheckpointInputError, match=r"nosuch://b: no storage backend for nosuch:// URLs"):
        storage_for("nosuch://b")


def test_round_trip_is_bitwise_and_equals_local_bytes(s3_bucket, s3_endpoint, tmp_path):
    model = model_for(1)
    opt = optimizer_for(model)
    url = f"s3://{s3_bucket}/run"
    where = save_checkpoint(model, opt, {"lr": 1e-3}, ["a", "b"], 7, url)
    assert where == f"{url}/step-00000007"
    local = save_checkpoint(model, opt, {"lr": 1e-3}, ["a", "b"], 7, tmp_path)
    fs = raw_fs(s3_endpoint)
    for name in (names.MODEL, names.CONFIG, names.VOCAB, names.OPTIMIZER):
        assert fs.cat_file(f"{s3_bucket}/run/step-00000007/{name}") == (local / name).read_bytes()
    assert fs.cat_file(f"{s3_bucket}/run/latest") == b"step-00000007\n"
    assert not [k for k in keys(fs, s3_bucket) if k.startswith(".")]  # the pending marker is gone
    fresh = model_for(2)
    fresh_opt = optimizer_for(fresh)
    ckpt = load_checkpoint(url, fresh, fresh_opt)
    assert ckpt.step == 7 and ckpt.path == f"{url}/step-00000007"
    assert ckpt.config == {"lr": 1e-3} and ckpt.vocab == ["a", "b"]
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_storage_options_through_an_explicit_storage(s3_bucket, s3_endpoint, monkeypatch):
    """Without fsspec's configuration, a Storage made with storage_options serves saves and loads."""
    import fsspec

    monkeypatch.delitem(fsspec.config.conf, "s3")
    root = FsspecStorage.from_location(f"s3://{s3_bucket}/run", storage_options=options(s3_endpoint))
    save_checkpoint(model_for(1), None, {"a": 1}, None, 1, root)
    assert load_checkpoint(root).config == {"a": 1}
    assert load_checkpoint(f"s3://{s3_bucket}/run").step == 1  # later URLs of the bucket reuse its options


def test_manager_retention_latest_restore_and_background_save(s3_bucket, s3_endpoint):
    url = f"s3://{s3_bucket}/run"
    with CheckpointManager(url, keep_last=2) as manager:
        for step in (1, 2, 3, 4):
            manager.save(model_for(step), None, {"step": step}, None, step)
        assert manager.steps() == [3, 4]
        assert manager.latest() == f"{url}/step-00000004"
        handle = manager.save(model_for(5), None, {"step": 5}, None, 5, blocking=False)
        assert handle.result() == f"{url}/step-00000005"
        fresh = model_for(0)
        ckpt = manager.restore(fresh)
        assert ckpt is not None and ckpt.step == 5 and ckpt.config == {"step": 5}
        for k, v in model_for(5).state_dict().items():
            assert torch.equal(fresh.state_dict()[k], v)
    assert sorted({k.split("/")[0] for k in keys(raw_fs(s3_endpoint), s3_bucket)}) == [
        "latest",
        "step-00000004",
        "step-00000005",
    ]


class CountingS3(s3fs.S3FileSystem):  # type: ignore[misc]
    """Records the byte range of every GET, the bytes each object returned, and the most GETs at once."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gets: list[tuple[str, int | None, int | None]] = []
        self.fetched: dict[str, int] = {}
        self.in_flight = self.most_in_flight = 0

    async def _cat_file(self, path: str, version_id: Any = None, start: Any = None, end: Any = None) -> bytes:
        name = path.rsplit("/", 1)[-1]
        self.gets.append((name, start, end))
        self.in_flight += 1  # the event loop's one thread: no lock needed
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            data: bytes = await super()._cat_file(path, version_id=version_id, start=start, end=end)
        finally:
            self.in_flight -= 1
        self.fetched[name] = self.fetched.get(name, 0) + len(data)
        return data


def test_lazy_read_fetches_only_that_tensor(s3_bucket, s3_endpoint):
    """One tensor of a remote checkpoint: ``latest``, the manifest, one GET of the header (with its read-ahead),
    and exactly that tensor's byte range; nothing else of model.safetensors."""
    big = torch.arange(512 * 1024, dtype=torch.float32).reshape(512, 1024)  # 2 MiB
    small = torch.linspace(-1, 1, 7)
    url = f"s3://{s3_bucket}/run"
    save_checkpoint({"big": big, "small": small}, None, {}, None, 1, url)
    fs = CountingS3(skip_instance_cache=True, use_listings_cache=False, **options(s3_endpoint))
    with open_checkpoint(FsspecStorage(fs, f"{s3_bucket}/run")) as reader:
        assert torch.equal(reader.tensor("small"), small)
    raw = raw_fs(s3_endpoint)
    key = f"{s3_bucket}/run/step-00000001/{names.MODEL}"
    (length,) = struct.unpack("<Q", raw.cat_file(key, start=0, end=8))
    start, end = json.loads(raw.cat_file(key, start=8, end=8 + length))["small"]["data_offsets"]
    model_gets = [(s, e) for name, s, e in fs.gets if name == names.MODEL]
    assert model_gets == [(0, 8 + remote.READAHEAD), (8 + length + start, 8 + length + end)]
    assert sorted({name for name, *_ in fs.gets}) == sorted({names.LATEST, names.MANIFEST, names.MODEL})
    assert sum(fs.fetched.values()) == (
        len(raw.cat_file(f"{s3_bucket}/run/latest"))
        + raw.size(f"{s3_bucket}/run/step-00000001/{names.MANIFEST}")
        + 8
        + remote.READAHEAD
        + small.numel() * 4
    )


def test_a_large_read_fetches_ranges_concurrently_and_in_bounded_memory(s3_bucket, s3_endpoint):
    """A verified load of a file larger than the read window: ranged GETs of ``get_size`` with at most
    ``concurrency`` in flight, in place, bitwise; a lazy read of a large tensor, its range exactly."""
    fs = CountingS3(skip_instance_cache=True, use_listings_cache=False, **options(s3_endpoint))
    root = FsspecStorage(fs, f"{s3_bucket}/run", block_size=BIG_BLOCK, concurrency=3, get_size=1 << 20)
    state = {"a": torch.randn(1 << 20), "b": torch.randn(3 << 19), "c": torch.arange(5, dtype=torch.int64)}  # 10 MiB
    save_checkpoint(state, None, {}, None, 1, root)
    fs.gets.clear()
    model = nn.ParameterDict({k: nn.Parameter(torch.zeros_like(v), requires_grad=False) for k, v in state.items()})
    own = {k: p.data_ptr() for k, p in model.items()}
    load_checkpoint(root, model, verify=True)
    for k, v in state.items():
        assert torch.equal(model[k], v) and model[k].data_ptr() == own[k]  # filled in place
    ranges = [(s, e) for name, s, e in fs.gets if name == names.MODEL]
    size = raw_fs(s3_endpoint).size(f"{s3_bucket}/run/step-00000001/{names.MODEL}")
    assert ranges[0] == (0, 8 + remote.READAHEAD)
    covered = sorted(ranges[1:])
    assert covered[0][0] <= 8 + remote.READAHEAD and covered[-1][1] == size
    assert all(e - s <= 1 << 20 for s, e in covered)  # ranges of get_size at most
    assert all(a[1] == b[0] for a, b in itertools.pairwise(covered))  # no byte fetched twice
    assert 2 <= fs.most_in_flight <= 3
    fs.gets.clear()
    with open_checkpoint(root) as reader:
        assert torch.equal(reader.tensor("a"), state["a"])
    tensor_gets = sorted((s, e) for name, s, e in fs.gets if name == names.MODEL)[1:]
    assert sum(e - s for s, e in tensor_gets) == 4 << 20 and len(tensor_gets) == 4


def test_reads_that_skip_or_go_back_get_the_right_bytes(s3_bucket, s3_endpoint):
    """Sequential reads, seeks past what the stream fetched ahead, back, and positional reads: the bytes asked."""
    fs = raw_fs(s3_endpoint)
    data = torch.randint(0, 256, (5 << 20,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    blob = data.numpy().tobytes()
    fs.pipe_file(f"{s3_bucket}/blob", blob)
    root = FsspecStorage(fs, s3_bucket, concurrency=2, get_size=1 << 20)
    f = remote.FsspecFile(root, f"{s3_bucket}/blob", len(blob))
    mib = 1 << 20

    def read_at(pos: int | None, n: int) -> bytes:
        if pos is not None:
            f.seek(pos)
        return f.read(n)

    try:
        assert read_at(None, mib) == blob[:mib]
        assert read_at(None, mib) == blob[mib : 2 * mib]  # the stream now runs two ranges ahead
        assert read_at(4 * mib, mib) == blob[4 * mib :]  # where the fetched-ahead ranges end
        assert read_at(mib + 5, 10) == blob[mib + 5 : mib + 15]  # back, a small read
        assert read_at(None, 2 * mib) == blob[mib + 15 : 3 * mib + 15]
        view = bytearray(3 * mib)
        assert f.pread_into(memoryview(view), mib // 2) == 3 * mib and bytes(view) == blob[mib // 2 : 7 * mib // 2]
        assert read_at(len(blob) - 3, 10) == blob[-3:] and f.read(1) == b""
    finally:
        f.close()


def test_cli_inspect_validate_list_on_an_s3_url(s3_bucket):
    url = f"s3://{s3_bucket}/run"
    for step in (1, 2):
        save_checkpoint(model_for(step), None, {"step": step}, None, step, url)
    code, out, err = run_cli(["validate", url])
    assert (code, err) == (0, "") and out == f"ok       {url}\n"
    code, out, err = run_cli(["inspect", "--json", url])
    assert (code, err) == (0, "") and json.loads(out)["step"] == 2
    code, out, err = run_cli(["list", "--json", url])
    assert code == 0 and [e["step"] for e in json.loads(out)["checkpoints"]] == [1, 2]


def test_a_missing_bucket_is_named(s3_bucket):
    url = f"s3://{s3_bucket}-missing/run"
    with pytest.raises(CheckpointNotFoundError, match=rf"{url}: the bucket '{s3_bucket}-missing' does not exist"):
        load_checkpoint(url)
    with pytest.raises(CheckpointNotFoundError, match="check the URL, endpoint_url and the credentials"):
        save_checkpoint(model_for(1), None, {}, None, 1, url)
    with pytest.raises(CheckpointNotFoundError, match="does not exist or these credentials cannot see it"):
        CheckpointManager(url)


def test_an_unreachable_endpoint_is_a_write_error(s3_bucket):
    root = FsspecStorage.from_location(
        f"s3://{s3_bucket}-offline/run", storage_options=options(f"http://127.0.0.1:{free_port()}")
    )
    with pytest.raises(CheckpointWriteError, match=r"check endpoint_url and the network.*nothing was committed"):
        save_checkpoint(model_for(1), None, {}, None, 1, root)


def test_a_corrupted_object_is_named(s3_bucket, s3_endpoint):
    url = f"s3://{s3_bucket}/run"
    save_checkpoint(model_for(1), None, {}, None, 1, url)
    fs = raw_fs(s3_endpoint)
    key = f"{s3_bucket}/run/step-00000001/{names.MODEL}"
    data = bytearray(fs.cat_file(key))
    data[-1] ^= 0xFF
    fs.pipe_file(key, bytes(data))
    with pytest.raises(CheckpointCorruptedError, match=rf"{url}/step-00000001/model.safetensors: checksum"):
        load_checkpoint(url, model_for(2))
    code, out, _ = run_cli(["validate", url])
    assert code == 1 and "model.safetensors" in out


class FailingS3(s3fs.S3FileSystem):  # type: ignore[misc]
    """Uploads of one object fail once more than ``fail_at`` of its bytes were sent, as a dropped
    connection does (the requests before go through)."""

    def __init__(self, *args: Any, fail_on: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fail_on, self.fail_at, self.sent = fail_on, 256, 0

    async def _call_s3(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if method in ("put_object", "upload_part") and str(kwargs.get("Key", "")).endswith(self.fail_on):
            self.sent += len(kwargs["Body"])
            if self.sent > self.fail_at:
                raise botocore_exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1")
        return await super()._call_s3(method, *args, **kwargs)


@pytest.mark.parametrize("fail_on", [names.MODEL, names.OPTIMIZER, names.MANIFEST])
def test_a_save_failing_mid_upload_commits_nothing(s3_bucket, s3_endpoint, fail_on):
    url = f"s3://{s3_bucket}/run"
    save_checkpoint(model_for(1), None, {"a": 1}, None, 1, url)
    fs = raw_fs(s3_endpoint)
    before = {k: fs.cat_file(f"{s3_bucket}/run/{k}") for k in keys(fs, s3_bucket)}
    failing = FailingS3(skip_instance_cache=True, use_listings_cache=False, fail_on=fail_on, **options(s3_endpoint))
    model = model_for(2)
    with pytest.raises(CheckpointWriteError, match=r"saving step 2 .*nothing was committed") as e:
        save_checkpoint(model, optimizer_for(model), {"a": 2}, None, 2, FsspecStorage(failing, f"{s3_bucket}/run"))
    assert "check endpoint_url and the network" in str(e.value)
    assert {k: fs.cat_file(f"{s3_bucket}/run/{k}") for k in keys(fs, s3_bucket)} == before
    assert load_checkpoint(url).step == 1
    assert fs.list_multipart_uploads(s3_bucket) == []  # no upload left open


def test_uncommitted_leftovers_are_never_loaded_and_are_cleaned(s3_bucket, s3_endpoint):
    url = f"s3://{s3_bucket}/run"
    save_checkpoint(model_for(1), None, {}, None, 1, url)
    fs = raw_fs(s3_endpoint)
    for name in (names.MODEL, names.CONFIG):  # step 2 as a writer leaves it when it dies before the manifest
        fs.copy(f"{s3_bucket}/run/step-00000001/{name}", f"{s3_bucket}/run/step-00000002/{name}")
    fs.pipe_file(f"{s3_bucket}/run/.pending-step-00000002-999999999-0123abcd", b"")  # its writer is gone
    assert load_checkpoint(url).step == 1
    with pytest.raises(CheckpointNotFoundError, match=r"manifest\.json is missing; the checkpoint is incomplete"):
        load_checkpoint(f"{url}/step-00000002")
    code, out, _ = run_cli(["list", "--json", url])
    assert code == 0 and [e["step"] for e in json.loads(out)["checkpoints"]] == [1]
    assert CheckpointManager(url).steps() == [1]
    assert keys(fs, s3_bucket) == [
        "latest",
        *sorted(
            f"step-00000001/{n}" for n in (names.MANIFEST, names.MODEL, names.CONFIG, names.RNG_JSON, names.RNG_TENSORS)
        ),
    ]


def test_clean_aborts_the_multipart_uploads_dead_writers_left_open(s3_bucket, s3_endpoint):
    """An open upload in a step directory without a manifest or a live writer is aborted; a live writer's is
    left alone unless it is older than ``abort_after``; nothing outside the root is touched."""
    url = f"s3://{s3_bucket}/run"
    save_checkpoint(model_for(1), None, {}, None, 1, url)
    fs = raw_fs(s3_endpoint)
    fs.pipe_file(f"{s3_bucket}/run/.pending-step-00000003-{os.getpid()}-0123abcd", b"")  # step 3: a live writer

    def begin(key: str) -> None:
        upload = fs.call_s3("create_multipart_upload", Bucket=s3_bucket, Key=key)
        fs.call_s3("upload_part", Bucket=s3_bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=b"x")

    for key in ("run/step-00000002/model.safetensors", "run/step-00000003/model.safetensors", "other/step-00000002/x"):
        begin(key)

    def still_open() -> list[str]:
        return sorted(u["Key"] for u in fs.list_multipart_uploads(s3_bucket))

    root = storage_for(url)
    assert isinstance(root, FsspecStorage)
    young = dataclasses.replace(root, abort_after=1e12)  # every upload younger than that
    assert young.clean() == ["step-00000002/model.safetensors (multipart upload)"]
    assert still_open() == ["other/step-00000002/x", "run/step-00000003/model.safetensors"]
    # moto dates every upload 2010-11-10: older than the default threshold, so even the live writer's goes
    assert root.clean() == ["step-00000003/model.safetensors (multipart upload)"]
    assert still_open() == ["other/step-00000002/x"]
    assert load_checkpoint(url).step == 1


def test_overwrite_is_refused_and_removal_deletes_the_manifest_first(s3_bucket):
    url = f"s3://{s3_bucket}/run"
    for step in (1, 2):
        save_checkpoint(model_for(step), None, {}, None, step, url)
    with pytest.raises(CheckpointInputError, match="overwrite=True needs a rename commit"):
        save_checkpoint(model_for(1), None, {}, None, 1, url, overwrite=True)
    with pytest.raises(CheckpointError, match="already exists; pass overwrite=True"):
        save_checkpoint(model_for(1), None, {}, None, 1, url)
    root = storage_for(url)
    assert root.child("step-00000001").kind(names.MANIFEST) == "file"
    root.remove("step-00000001")
    assert root.listdir() == ["latest", "step-00000002"]


def test_without_the_extra_s3_urls_name_it():
    """Where s3fs is not installed, an s3:// URL says which extra to install (a fresh interpreter)."""
    script = (
        "import sys; sys.modules['s3fs'] = None\n"
        "from portable_ckpt import CheckpointInputError, load_checkpoint\n"
        "try:\n"
        "    load_checkpoint('s3://bucket/run')\n"
        "except CheckpointInputError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120).stdout
    assert out.startswith("s3://bucket/run: s3:// URLs need an fsspec implementation that is not installed")
    assert out.rstrip().endswith("pip install 'portable-ckpt[s3]'")


def test_the_readme_example_runs(s3_bucket, s3_endpoint):
    """The README's S3 example, pointed at the local server."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Object stores (S3)", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    for theirs, ours in (
        ("my-bucket", s3_bucket),
        ("https://s3.example.com", s3_endpoint),
        ('"AKIA..."', f'"{s3server.KEY}"'),
        ('"..."', f'"{s3server.SECRET}"'),
    ):
        assert theirs in code
        code = code.replace(theirs, ours)
    model = model_for(3)
    namespace = {"model": model, "optimizer": optimizer_for(model), "step": 3}
    exec(compile(code, "README.md, Object stores (S3)", "exec"), namespace)
    assert namespace["ckpt"].step == 3 and namespace["ckpt"].path == f"s3://{s3_bucket}/runs/gpt-small/step-00000003"


BIG_BLOCK = 5 << 20  # the smallest part S3 takes


def test_large_files_stream_as_multipart_uploads(s3_bucket, s3_endpoint):
    """A file over the block size goes up part by part and reads back bitwise."""
    state = {"w": torch.randn(3 << 20)}  # 12 MiB: three parts
    root = FsspecStorage(raw_fs(s3_endpoint), f"{s3_bucket}/run", block_size=BIG_BLOCK)
    save_checkpoint(state, None, {}, None, 1, root)
    assert torch.equal(load_checkpoint(root).model_state["w"], state["w"])


def test_a_multipart_upload_failing_after_a_part_is_aborted(s3_bucket, s3_endpoint):
    fs = raw_fs(s3_endpoint)
    failing = FailingS3(skip_instance_cache=True, use_listings_cache=False, fail_on=names.MODEL, **options(s3_endpoint))
    failing.fail_at = 7 << 20  # after the first 5 MiB part went up
    root = FsspecStorage(failing, f"{s3_bucket}/run", block_size=BIG_BLOCK)
    with pytest.raises(CheckpointWriteError, match="nothing was committed"):
        save_checkpoint({"w": torch.randn(3 << 20)}, None, {}, None, 1, root)
    assert fs.find(f"{s3_bucket}/run") == []
    assert fs.list_multipart_uploads(s3_bucket) == []


class RacedS3(s3fs.S3FileSystem):  # type: ignore[misc]
    """Another writer's manifest lands just before ours (create-only writes let only one commit)."""

    async def _call_s3(self, method: str, *args: Any, **kwargs: Any) -> Any:
        key = str(kwargs.get("Key", ""))
        if method in ("put_object", "complete_multipart_upload") and "/step-" in key:
            assert ("IfNoneMatch" in kwargs) == key.endswith(names.MANIFEST)  # only the manifest is create-only
            if key.endswith(names.MANIFEST):
                await super()._call_s3(method, Bucket=kwargs["Bucket"], Key=key, Body=b"the other writer's manifest")
        return await super()._call_s3(method, *args, **kwargs)


def test_of_two_writers_racing_for_a_step_one_commits(s3_bucket, s3_endpoint):
    fs = RacedS3(skip_instance_cache=True, use_listings_cache=False, **options(s3_endpoint))
    with pytest.raises(CheckpointError, match=r"manifest\.json: another writer committed this step first"):
        save_checkpoint(model_for(1), None, {}, None, 1, FsspecStorage(fs, f"{s3_bucket}/run"))
    raw = raw_fs(s3_endpoint)
    assert raw.cat_file(f"{s3_bucket}/run/step-00000001/{names.MANIFEST}") == b"the other writer's manifest"
    assert not [k for k in keys(raw, s3_bucket) if k.startswith(".pending-")]  # our marker is gone
