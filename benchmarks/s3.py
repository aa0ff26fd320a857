"""The s3 section: portable-ckpt against raw s3fs on a local S3 (moto's server, its own process, loopback).

    python -m benchmarks.s3 --size-mib 128 --reps 3 [--json]

Same run, same bytes, same part size: ``save.ours`` (``save_checkpoint`` to ``s3://``) alternates with
``save.raw`` (the tensors' bytes through ``fs.open(path, "wb", block_size=PART)``), ``load.ours``
(``load_checkpoint``, verified) with ``load.raw`` (``fs.cat_file`` ranges of the same object), and ``lazy``
reads one tensor of the checkpoint, counting the bytes GET returned.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any

import torch

PART = 16 << 20  # the backend's default part (portable_ckpt.storage.remote.BLOCK_SIZE)
GET = 64 << 20  # the backend's largest ranged GET (remote.MAX_GET)
KEY = SECRET = "testing"
TENSORS = 16


def available() -> bool:
    try:
        import moto.server  # noqa: F401
        import s3fs  # noqa: F401
    except ImportError:
        return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _server(timeout: float = 30) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    proc.wait(timeout=10)
    raise TimeoutError(f"moto's server did not start within {timeout} s")


def _options(endpoint: str) -> dict[str, Any]:
    return {"endpoint_url": endpoint, "key": KEY, "secret": SECRET, "skip_instance_cache": True}


def _stats(samples: list[float], nbytes: int) -> dict[str, Any]:
    return {
        "samples": samples,
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "max_s": max(samples),
        "gbps": nbytes / statistics.median(samples) / 1e9,
        "bytes": nbytes,
    }


def run(size_mib: float, reps: int) -> dict[str, Any]:
    import s3fs

    from portable_ckpt import load_checkpoint, open_checkpoint, save_checkpoint
    from portable_ckpt.storage import FsspecStorage

    class Counting(s3fs.S3FileSystem):  # type: ignore[misc]
        fetched = 0

        async def _cat_file(self, path: str, version_id: Any = None, start: Any = None, end: Any = None) -> bytes:
            data: bytes = await super()._cat_file(path, version_id=version_id, start=start, end=end)
            self.fetched += len(data)
            return data

    server, endpoint = _server()
    try:
        fs = Counting(use_listings_cache=False, **_options(endpoint))
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        fs.mkdir(bucket)
        numel = int(size_mib * (1 << 20) / 4 / TENSORS)
        gen = torch.Generator().manual_seed(0)
        state = {f"t{i:02d}": torch.randn(numel, generator=gen) for i in range(TENSORS)}
        nbytes = sum(t.numel() * 4 for t in state.values())
        root = FsspecStorage(fs, f"{bucket}/run", block_size=PART)
        raw_key = f"{bucket}/raw.bin"

        def save_raw() -> None:
            with fs.open(raw_key, "wb", block_size=PART) as f:
                for t in state.values():
                    f.write(memoryview(t.numpy()).cast("B"))

        step = 0

        def save_ours() -> None:
            nonlocal step
            step += 1
            save_checkpoint(state, None, {}, None, step, root)

        def load_raw() -> None:
            out = bytearray(nbytes)
            for start in range(0, nbytes, GET):
                piece = fs.cat_file(raw_key, start=start, end=min(start + GET, nbytes))
                out[start : start + len(piece)] = piece

        def load_ours() -> None:
            got = load_checkpoint(root, verify=True).model_state
            if not torch.equal(got["t00"], state["t00"]):
                raise RuntimeError("load.ours returned other bytes")

        samples: dict[str, list[float]] = {k: [] for k in ("save.raw", "save.ours", "load.raw", "load.ours")}
        pairs = [("save.raw", save_raw, "save.ours", save_ours), ("load.raw", load_raw, "load.ours", load_ours)]
        for a, fa, b, fb in pairs:
            fa(), fb()  # warm-up (and the objects the loads read)
            for i in range(reps):
                for name, fn in ((a, fa), (b, fb)) if i % 2 == 0 else ((b, fb), (a, fa)):
                    t0 = time.perf_counter()
                    fn()
                    samples[name].append(time.perf_counter() - t0)
                    if name == "save.ours" and step > 2:
                        root.remove(f"step-{step - 2:08d}")  # untimed: keep two checkpoints at most
        fs.fetched = 0
        t0 = time.perf_counter()
        with open_checkpoint(root) as reader:
            one = reader.tensor("t07")
        lazy_s = time.perf_counter() - t0
        if not torch.equal(one, state["t07"]):
            raise RuntimeError("lazy returned other bytes")
        rows = {k: _stats(v, nbytes) for k, v in samples.items()}
        for ours, raw in (("save.ours", "save.raw"), ("load.ours", "load.raw")):
            rows[ours]["ratio"] = rows[ours]["median_s"] / rows[raw]["median_s"]
            rows[ours]["min_ratio"] = rows[ours]["min_s"] / rows[raw]["min_s"]
        rows["lazy"] = {
            "median_s": lazy_s,
            "fetched": fs.fetched,
            "tensor_bytes": one.numel() * 4,
            "bytes": nbytes,
        }
        return {"size_mib": nbytes / (1 << 20), "reps": reps, "part": PART, "rows": rows}
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)


def markdown(section: dict[str, Any]) -> str:
    if "skipped" in section:
        return f"## s3\n\nskipped: {section['skipped']}\n"
    lines = [
        "## s3",
        "",
        f"moto's server on loopback (its own process), {section['size_mib']:g} MiB in {TENSORS} fp32 tensors, "
        f"parts of {section['part'] >> 20} MiB, {section['reps']} reps (AB/BA alternated)",
        "",
    ]
    rows = section["rows"]
    for name in ("save.raw", "save.ours", "load.raw", "load.ours"):  # a list: the report's tables are the cases'
        r = rows[name]
        ratio = f", {r['ratio']:.2f}× raw (min ratio {r['min_ratio']:.2f})" if "ratio" in r else ""
        lines.append(
            f"- {name}: {r['median_s']:.3f} s median ({r['min_s']:.3f}–{r['max_s']:.3f} s), {r['gbps']:.3f} GB/s{ratio}"
        )
    lazy = rows["lazy"]
    lines += [
        "",
        f"lazy: one tensor of {lazy['tensor_bytes'] >> 10} KiB in {lazy['median_s']:.3f} s, "
        f"{lazy['fetched']:,} bytes fetched of a {lazy['bytes'] >> 20} MiB checkpoint",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.s3", description=__doc__.splitlines()[0])
    p.add_argument("--size-mib", type=float, default=512.0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if not available():
        section: dict[str, Any] = {"skipped": "moto[server] and s3fs are not installed"}
    else:
        section = run(args.size_mib, args.reps)
    print(json.dumps(section, sort_keys=True) if args.json else markdown(section))
    return 0


if __name__ == "__main__":
    sys.exit(main())
