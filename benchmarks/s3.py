"""The s3 section: portable-ckpt against raw s3fs on a local S3 (moto's server, its own process, loopback).

    python -m benchmarks.s3 --size-mib 512 --reps 5 [--lazy-size-mib 1024] [--json]

Same run, same bytes, same part size, same concurrency: ``save.ours`` (``save_checkpoint`` to ``s3://``)
alternates with ``save.raw`` (the same bytes through s3fs's own concurrent multipart upload,
``fs.pipe_file(..., chunksize=PART, max_concurrency=CONCURRENCY)``), ``load.ours`` (``load_checkpoint``,
verified) with ``load.raw`` (s3fs's own concurrent ranged GETs of the same bytes, ``fs.cat_file(...,
chunksize=GET, max_concurrency=CONCURRENCY)``). Each rep runs both, in AB then BA order, and gives one ratio;
the report gives the median ratio and its spread. ``lazy`` saves a second checkpoint (``--lazy-size-mib``,
default twice ``--size-mib``: 1 GiB at the default size) and reads one tensor of it through
``open_checkpoint``, counting the bytes every GET returned, per object.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import struct
import subprocess
import sys
import time
import uuid
from typing import Any, ClassVar

import torch

from portable_ckpt.storage import remote

PART = remote.BLOCK_SIZE  # the backend's part size
GET = remote.GET_SIZE  # the backend's ranged GET of a large read
CONCURRENCY = remote.CONCURRENCY  # the backend's parts (or GETs) in flight per file
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


def _state(size_mib: float, seed: int) -> dict[str, torch.Tensor]:
    numel = int(size_mib * (1 << 20) / 4 / TENSORS)
    gen = torch.Generator().manual_seed(seed)
    return {f"t{i:02d}": torch.randn(numel, generator=gen) for i in range(TENSORS)}


def run(size_mib: float, reps: int, lazy_size_mib: float | None = None) -> dict[str, Any]:
    import s3fs

    from portable_ckpt import load_checkpoint, open_checkpoint, save_checkpoint
    from portable_ckpt.storage import FsspecStorage

    class Counting(s3fs.S3FileSystem):
        fetched: ClassVar[dict[str, int]] = {}

        async def _cat_file(self, path: str, *args: Any, **kwargs: Any) -> bytes:
            data: bytes = await super()._cat_file(path, *args, **kwargs)
            name = path.rsplit("/", 1)[-1]
            self.fetched[name] = self.fetched.get(name, 0) + len(data)
            return data

    server, endpoint = _server()
    try:
        fs = Counting(use_listings_cache=False, **_options(endpoint))
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        fs.mkdir(bucket)
        state = _state(size_mib, 0)
        nbytes = sum(t.numel() * 4 for t in state.values())
        data = b"".join(t.numpy().tobytes() for t in state.values())  # untimed: raw's one buffer
        root = FsspecStorage(fs, f"{bucket}/run", block_size=PART, concurrency=CONCURRENCY)
        raw_key = f"{bucket}/raw.bin"

        def save_raw() -> None:
            fs.pipe_file(raw_key, data, chunksize=PART, max_concurrency=CONCURRENCY)

        step = 0

        def save_ours() -> None:
            nonlocal step
            step += 1
            save_checkpoint(state, None, {}, None, step, root)

        def load_raw() -> None:
            got = fs.cat_file(raw_key, chunksize=GET, max_concurrency=CONCURRENCY)
            if len(got) != nbytes:
                raise RuntimeError("load.raw returned other bytes")

        def load_ours() -> None:
            got = load_checkpoint(root, verify=True).model_state
            if not torch.equal(got["t00"], state["t00"]):
                raise RuntimeError("load.ours returned other bytes")

        samples: dict[str, list[float]] = {k: [] for k in ("save.raw", "save.ours", "load.raw", "load.ours")}
        ratios: dict[str, list[float]] = {"save.ours": [], "load.ours": []}
        pairs = [("save.raw", save_raw, "save.ours", save_ours), ("load.raw", load_raw, "load.ours", load_ours)]
        for a, fa, b, fb in pairs:
            fa(), fb()  # warm-up (and the objects the loads read)
            for i in range(reps):
                took = {}
                for name, fn in ((a, fa), (b, fb)) if i % 2 == 0 else ((b, fb), (a, fa)):
                    t0 = time.perf_counter()
                    fn()
                    took[name] = time.perf_counter() - t0
                    print(f"[s3] {name} rep {i}: {took[name]:.3f} s", file=sys.stderr, flush=True)
                    samples[name].append(took[name])
                    if name == "save.ours" and step > 2:
                        root.remove(f"step-{step - 2:08d}")  # untimed: keep two checkpoints at most
                ratios[b].append(took[b] / took[a])
        data = b""  # the lazy read needs the memory
        rows = {k: _stats(v, nbytes) for k, v in samples.items()}
        for ours, rs in ratios.items():
            rows[ours].update(
                ratio=statistics.median(rs), min_ratio=min(rs), max_ratio=max(rs), ratios=[round(r, 4) for r in rs]
            )
        try:
            rows["lazy"] = _lazy(fs, bucket, lazy_size_mib or 2 * size_mib, open_checkpoint, save_checkpoint)
        except (OSError, MemoryError) as e:  # moto holds every object in memory: say so rather than lose the run
            rows["lazy"] = {"skipped": f"{type(e).__name__}: {e}"}
        return {
            "size_mib": nbytes / (1 << 20),
            "reps": reps,
            "part": PART,
            "get": GET,
            "concurrency": CONCURRENCY,
            "rows": rows,
        }
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)


def _lazy(fs: Any, bucket: str, size_mib: float, open_checkpoint: Any, save_checkpoint: Any) -> dict[str, Any]:
    """One tensor of a checkpoint of ``size_mib``: the bytes fetched, per object."""
    from portable_ckpt.storage import FsspecStorage

    state = _state(size_mib, 1)
    root = FsspecStorage(fs, f"{bucket}/lazy", block_size=PART, concurrency=CONCURRENCY)
    save_checkpoint(state, None, {}, None, 1, root)
    want = state["t07"].clone()
    nbytes = sum(t.numel() * 4 for t in state.values())
    del state
    fs.fetched.clear()
    t0 = time.perf_counter()
    with open_checkpoint(root) as reader:
        one = reader.tensor("t07")
    took = time.perf_counter() - t0
    (length,) = struct.unpack("<Q", fs.cat_file(f"{bucket}/lazy/step-00000001/model.safetensors", start=0, end=8))
    if not torch.equal(one, want):
        raise RuntimeError("lazy returned other bytes")
    return {
        "median_s": took,
        "fetched": sum(fs.fetched.values()),
        "fetched_by_object": dict(sorted(fs.fetched.items())),
        "tensor_bytes": one.numel() * 4,
        "header_bytes": 8 + length,
        "bytes": nbytes,
    }


def markdown(section: dict[str, Any]) -> str:
    if "skipped" in section:
        return f"## s3\n\nskipped: {section['skipped']}\n"
    lines = [
        "## s3",
        "",
        f"moto's server on loopback (its own process), {section['size_mib']:g} MiB in {TENSORS} fp32 tensors, "
        f"parts of {section['part'] >> 20} MiB, ranged GETs of {section['get'] >> 20} MiB, "
        f"{section['concurrency']} in flight, {section['reps']} reps (AB/BA alternated, one ratio per rep)",
        "",
    ]
    rows = section["rows"]
    for name in ("save.raw", "save.ours", "load.raw", "load.ours"):  # a list: the report's tables are the cases'
        r = rows[name]
        ratio = (
            f", {r['ratio']:.2f}× raw (median of per-rep ratios; {r['min_ratio']:.2f}–{r['max_ratio']:.2f})"
            if "ratio" in r
            else ""
        )
        lines.append(
            f"- {name}: {r['median_s']:.3f} s median ({r['min_s']:.3f}–{r['max_s']:.3f} s), {r['gbps']:.3f} GB/s{ratio}"
        )
    lazy = rows["lazy"]
    if "skipped" in lazy:
        return "\n".join([*lines, "", f"lazy: not measured ({lazy['skipped']})"]) + "\n"
    by_object = ", ".join(f"{k} {v:,}" for k, v in lazy["fetched_by_object"].items())
    lines += [
        "",
        f"lazy: one tensor of {lazy['tensor_bytes']:,} bytes in {lazy['median_s']:.3f} s, "
        f"{lazy['fetched']:,} bytes fetched of a {lazy['bytes'] >> 20} MiB checkpoint ({by_object}; "
        f"its header is {lazy['header_bytes']:,} bytes)",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.s3", description=__doc__.splitlines()[0])
    p.add_argument("--size-mib", type=float, default=512.0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--lazy-size-mib", type=float, help="the lazy read's checkpoint (default: twice --size-mib)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if not available():
        section: dict[str, Any] = {"skipped": "moto[server] and s3fs are not installed"}
    else:
        section = run(args.size_mib, args.reps, args.lazy_size_mib)
    print(json.dumps(section, sort_keys=True) if args.json else markdown(section))
    return 0


if __name__ == "__main__":
    sys.exit(main())
