"""Sharded checkpoints under a process group (issue 11): FSDP2, tensor-parallel and DDP jobs on 1 to 4
CPU ranks over gloo save one checkpoint through DCP with our storage; any world size loads it.

Every rank is a separate process forked from a forkserver that imported torch once (a rank costs a
fork, not an interpreter start); it runs jobs of ``tests/dist_job.py`` and writes what the test
compares: full tensors (``torch.save``) and a JSON report per job. Every launch has a hard deadline
(the processes still alive then are SIGKILLed and the test fails), and every collective a timeout.
One 2-rank launch saves what several tests check (a module-scoped fixture).
"""

from __future__ import annotations

import errno
import json
import math
import multiprocessing as mp
import shutil
import signal
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import dist_job
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import portable_ckpt as pc
from portable_ckpt.dcp import PortableStorageReader, PortableStorageWriter

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="needs gloo"
)

CTX = mp.get_context("forkserver")
# imported once by the forkserver, inherited by every rank it forks
CTX.set_forkserver_preload(
    ["torch", "torch.distributed.checkpoint", "torch.distributed.fsdp", "portable_ckpt", "dist_job"]
)

LAUNCH_SECONDS = 180.0  # a launch's hard deadline: a slow shared machine, not a hang, should fit in it
PG_SECONDS = 60.0  # every collective's timeout inside the ranks
Job = tuple[str, str, dict[str, Any]]  # (label, job name in dist_job.JOBS, keyword arguments)


# -- launching ranks -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Ranks:
    """What one launch left: exit codes (-9: SIGKILL), the ranks the deadline killed, the reports."""

    out: Path
    world: int
    exitcodes: list[int | None]
    hung: list[int]

    def report(self, label: str, rank: int) -> dict[str, Any] | None:
        path = self.out / f"{label}-{rank}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def describe(self) -> str:
        """Every report's outcome (the traceback of a failed job)."""
        lines = []
        for path in sorted(self.out.glob("*.json")):
            rep = json.loads(path.read_text())
            lines.append(f"{path.stem}: {'ok' if rep['ok'] else rep['traceback']}")
        return "\n".join(lines) or "no reports"

    def values(self, label: str) -> list[Any]:
        """Each rank's return value of job ``label``; fails the test, with the ranks' tracebacks, otherwise."""
        reports = [self.report(label, r) for r in range(self.world)]
        if self.hung or any(rep is None or not rep["ok"] for rep in reports):
            shown = "\n".join(
                f"rank {r}: {rep['traceback'] if rep and not rep['ok'] else rep}" for r, rep in enumerate(reports)
            )
            pytest.fail(f"{label}: exit codes {self.exitcodes}, killed at the deadline {self.hung}\n{shown}")
        return [rep["value"] for rep in reports if rep is not None]

    def load(self, name: str) -> Any:
        return torch.load(self.out / name, weights_only=True)


def launch(
    out: Path,
    world: int,
    jobs: Sequence[Job],
    *,
    deadline: float = LAUNCH_SECONDS,
    pg_timeout: float = PG_SECONDS,
    kill_point: Connection | None = None,
) -> Ranks:
    """Run ``jobs`` on ``world`` fresh rank processes and wait for them, at most ``deadline`` seconds.

    kill_point: the reading end of a pipe on which every rank sends its rank when it reaches the point
    where the test SIGKILLs every rank (the jobs get the writing end)."""
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs = [
        CTX.Process(target=dist_job.rank_main, args=(rank, world, port, str(out), list(jobs), pg_timeout), daemon=True)
        for rank in range(world)
    ]
    for p in procs:
        p.start()
    end = time.monotonic() + deadline
    killed: list[int] = []
    try:
        if kill_point is not None:
            waiting = set(range(world))
            while waiting and time.monotonic() < end:
                ready = wait([kill_point, *(p.sentinel for p in procs)], timeout=max(0.0, end - time.monotonic()))
                if kill_point in ready:
                    waiting.discard(kill_point.recv())
                elif ready:
                    break  # a rank exited before it reached the kill point: its report says why
            for p in procs:
                p.kill()
            killed = list(range(world)) if not waiting else []
        for p in procs:
            p.join(max(0.0, end - time.monotonic()))
    finally:
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(10)
    if kill_point is not None and not killed:
        pytest.fail(f"the ranks did not all reach the kill point: {Ranks(out, world, [], []).describe()}")
    return Ranks(out, world, [p.exitcode for p in procs], hung if kill_point is None else [])


# -- comparing values ----------------------------------------------------------------------------


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_same(got: Any, want: Any, where: str = "") -> None:
    """Equal nested values; tensors equal bit for bit, with the same dtype and shape."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"{where}: {type(got).__name__}, expected a tensor"
        assert (got.dtype, tuple(got.shape)) == (want.dtype, tuple(want.shape)), f"{where}: dtype/shape"
        assert torch.equal(bits(got), bits(want)), f"{where}: values differ:\n{got}\n{want}"
    elif isinstance(want, Mapping):
        assert isinstance(got, Mapping), f"{where}: {type(got).__name__}, expected a mapping"
        assert set(got) == set(want), f"{where}: keys {sorted(map(str, got))} != {sorted(map(str, want))}"
        for k in want:
            assert_same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), f"{where}: {got!r} != {want!r}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{where}[{i}]")
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def assert_snapshot(got: Mapping[str, Any], want: Mapping[str, Any], what: str) -> None:
    """Parameters, optimizer moments (exp_avg, exp_avg_sq, step) and hyperparameters equal bitwise."""
    assert_same(got["model"], want["model"], f"{what}: model")
    assert_same(got["optim_state"], want["optim_state"], f"{what}: optimizer state")
    assert_same(got["param_groups"], want["param_groups"], f"{what}: param_groups")
    assert set(want["optim_state"][0]) == {"step", "exp_avg", "exp_avg_sq"}  # AdamW: what was compared


def plain(opt: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, Any]:
    sd = opt.state_dict()
    return {"model": dict(model.state_dict()), "optim_state": sd["state"], "param_groups": sd["param_groups"]}


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def manifest(path: Path) -> dict[str, Any]:
    return json.loads((path / "manifest.json").read_text())


def sharding(path: Path) -> dict[str, Any]:
    return json.loads((path / "sharding.json").read_text())


def leftovers(root: Path) -> list[str]:
    """Temporaries of saves (and deletions) in a root; ``.lock``, the root's lock file, stays."""
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".") and p.name != ".lock")


def latest_name(root: Path) -> str:
    return (root / "latest").read_text().strip()


# -- the shared 2-rank launch --------------------------------------------------------------------


@dataclass
class Main:
    ranks: Ranks
    roots: dict[str, Path]
    format1: Path
    format1_ref: dict[str, Any]
    format3: Path


@pytest.fixture(scope="module")
def main(tmp_path_factory: pytest.TempPathFactory) -> Main:
    """One 2-rank launch: the FSDP2 save, a format-1 checkpoint into FSDP2, TP and DDP round trips, the
    DCP pair used directly, a non-blocking save, and an uninterrupted training run for the resume test."""
    base = tmp_path_factory.mktemp("main")
    # a format-1 checkpoint, saved by this process without a process group
    model = dist_job.build_mlp(5)
    opt = dist_job.adamw(model)
    for step in range(1, 4):
        dist_job.train_step(model, opt, *dist_job.batch(step, 0, 1))
    format1 = Path(pc.save_checkpoint(model, opt, dist_job.CONFIG, dist_job.VOCAB, 3, base / "format1"))
    format3 = Path(  # incremental: the model state in parts of at most 1 KiB
        pc.save_checkpoint(
            model, opt, dist_job.CONFIG, dist_job.VOCAB, 3, base / "format3", incremental=True, part_bytes=1024
        )
    )
    format1_ref = plain(opt, model)  # this model is not trained further
    roots = {n: base / n for n in ("fsdp", "tp", "ddp", "dcp", "async", "full")}
    jobs: list[Job] = [
        ("fsdp_save", "fsdp_save", {"root": str(roots["fsdp"])}),
        ("format1", "format1_into_fsdp", {"path": str(format1)}),
        ("format3", "format1_into_fsdp", {"path": str(format3), "name": "format3"}),
        ("tp", "tp_roundtrip", {"root": str(roots["tp"])}),
        ("ddp", "ddp_roundtrip", {"root": str(roots["ddp"])}),
        ("dcp", "dcp_direct", {"root": str(roots["dcp"])}),
        ("async", "nonblocking_save", {"root": str(roots["async"])}),
        ("full", "train", {"root": str(roots["full"]), "name": "full", "total": 6, "every": 2}),
    ]
    return Main(launch(base / "out", 2, jobs), roots, format1, format1_ref, format3)


def fsdp_ckpt(main: Main) -> Path:
    (path,) = set(main.ranks.values("fsdp_save"))
    assert Path(path) == step_dir(main.roots["fsdp"], dist_job.TRAIN_STEPS)
    return Path(path)


# -- 1. FSDP2 saved on 2 ranks, loaded on 1, 3, 4 ------------------------------------------------


def test_fsdp2_sharded_layout(main: Main) -> None:
    path = fsdp_ckpt(main)
    assert sorted(p.name for p in path.iterdir()) == sorted(
        [
            "config.json",
            "manifest.json",
            "sharding.json",
            "vocab.json",
            *(f"{kind}-{r:05d}-of-00002.safetensors" for kind in ("model", "optimizer", "rng") for r in (0, 1)),
            *(f"rng-{r:05d}-of-00002.json" for r in (0, 1)),
        ]
    )
    doc = manifest(path)
    assert (doc["format_version"], doc["step"], doc["extra"]) == (2, dist_job.TRAIN_STEPS, {"run": "fsdp"})
    table = sharding(path)
    assert table["world_size"] == 2
    saved = main.ranks.load("fsdp-saved.pt")
    # FSDP2 shards dim 0: each rank's chunk in its own file, the chunks together the global shape
    for name, value in saved["model"].items():
        entry = table["entries"][f"model.{name}"]
        assert (entry["dtype"], entry["shape"]) == ("F32", list(value.shape))
        half = math.ceil(value.shape[0] / 2)
        assert [(c["file"], c["offsets"][0], c["sizes"][0]) for c in entry["chunks"]] == [
            ("model-00000-of-00002.safetensors", 0, half),
            ("model-00001-of-00002.safetensors", half, value.shape[0] - half),
        ]
    assert pc.validate_checkpoint(path).valid


@pytest.mark.parametrize("world", [1, 3, 4])
def test_fsdp2_saved_on_2_loads_bitwise_on(main: Main, world: int, tmp_path: Path) -> None:
    path = fsdp_ckpt(main)
    ranks = launch(tmp_path, world, [("load", "fsdp_load", {"root": str(main.roots["fsdp"]), "name": "loaded"})])
    infos = ranks.values("load")
    assert (
        infos
        == [
            {
                "step": dist_job.TRAIN_STEPS,
                "config": dist_job.CONFIG,
                "vocab": dist_job.VOCAB,
                "extra": {"run": "fsdp"},
                "version": 2,
            }
        ]
        * world
    )
    assert_snapshot(ranks.load("loaded.pt"), main.ranks.load("fsdp-saved.pt"), f"2 -> {world} ranks from {path}")


# -- 2. tensor parallel and DDP ------------------------------------------------------------------


def test_tensor_parallel_round_trip(main: Main) -> None:
    (path,) = {Path(p) for p in main.ranks.values("tp")}
    saved = main.ranks.load("tp-saved.pt")
    assert_snapshot(main.ranks.load("tp-loaded.pt"), saved, "TP 2 -> 2")
    entries = sharding(path)["entries"]
    # column-wise: the first weight split by rows; row-wise: the second by columns, its bias replicated
    assert [(c["offsets"], c["sizes"]) for c in entries["model.0.weight"]["chunks"]] == [
        ([0, 0], [8, 8]),
        ([8, 0], [8, 8]),
    ]
    assert [(c["offsets"], c["sizes"]) for c in entries["model.3.weight"]["chunks"]] == [
        ([0, 0], [10, 8]),
        ([0, 8], [10, 8]),
    ]
    assert [(c["offsets"], c["sizes"]) for c in entries["model.3.bias"]["chunks"]] == [([0], [10])]
    # and without a process group: full tensors, into a plain module
    model = dist_job.build_mlp(99)
    opt = dist_job.adamw(model)
    ck = pc.load_checkpoint(path, model, opt)
    assert_snapshot(plain(opt, model), saved, "TP checkpoint into a plain model")
    assert_same(ck.model_state, saved["model"], "TP checkpoint's full tensors")


def test_ddp_round_trip_saves_replicated_tensors_once(main: Main) -> None:
    (path,) = {Path(p) for p in main.ranks.values("ddp")}
    saved = main.ranks.load("ddp-saved.pt")
    assert_snapshot(main.ranks.load("ddp-loaded.pt"), saved, "DDP 2 -> 2")
    table = sharding(path)["entries"]
    files = manifest(path)["files"]
    tensors = [e for e in table.values() if "chunks" in e]
    # every replicated tensor is one whole chunk, in exactly one shard file
    for entry in tensors:
        (chunk,) = entry["chunks"]
        assert (chunk["offsets"], chunk["sizes"]) == ([0] * len(entry["shape"]), entry["shape"])
    listed = [k for name, f in files.items() if name.startswith(("model-", "optimizer-")) for k in f.get("tensors", {})]
    assert sorted(listed) == sorted(c["key"] for e in tensors for c in e["chunks"])
    assert len(listed) == len(set(listed))
    model_paths = [e["path"] for e in tensors if e["path"][0] == "model"]
    assert sorted(model_paths) == sorted(
        ["model", name] for name in saved["model"]
    )  # DDP's "module." prefix is not part of the saved names
    plain_model = dist_job.build_mlp(99)
    plain_opt = dist_job.adamw(plain_model)
    pc.load_checkpoint(path, plain_model, plain_opt)
    assert_snapshot(plain(plain_opt, plain_model), saved, "DDP checkpoint into a plain model")


# -- 3. no process group -------------------------------------------------------------------------


def test_sharded_checkpoint_loads_without_process_group(main: Main) -> None:
    path = fsdp_ckpt(main)
    saved = main.ranks.load("fsdp-saved.pt")
    ck = pc.load_checkpoint(path)
    assert (ck.step, ck.format_version, ck.config, ck.vocab) == (
        dist_job.TRAIN_STEPS,
        2,
        dist_job.CONFIG,
        dist_job.VOCAB,
    )
    assert_same(ck.model_state, saved["model"], "full model tensors")
    assert ck.optimizer_state is not None
    assert_same(ck.optimizer_state["state"], saved["optim_state"], "optimizer state by index")
    assert_same(ck.optimizer_state["param_groups"], saved["param_groups"], "param_groups")
    # into a plain model and optimizer: as if an unsharded job had these values
    model = dist_job.build_mlp(99)
    opt = dist_job.adamw(model)
    pc.load_checkpoint(main.roots["fsdp"], model, opt)
    assert_snapshot(plain(opt, model), saved, "sharded checkpoint into a plain model")
    # and it trains on from there
    dist_job.train_step(model, opt, *dist_job.batch(9, 0, 1))
    assert opt.state_dict()["state"][0]["step"].item() == dist_job.TRAIN_STEPS + 1


# -- 4. format 1 into FSDP2 ----------------------------------------------------------------------


def test_format1_checkpoint_loads_into_fsdp2(main: Main) -> None:
    assert manifest(main.format1)["format_version"] == 1
    assert main.ranks.values("format1") == [3, 3]
    assert_snapshot(main.ranks.load("format1-loaded.pt"), main.format1_ref, "format 1 -> 2-rank FSDP2")


def test_incremental_checkpoint_loads_into_fsdp2(main: Main) -> None:
    assert manifest(main.format3)["format_version"] == 3
    assert len([n for n in manifest(main.format3)["files"] if n.startswith("model-")]) >= 2
    assert main.ranks.values("format3") == [3, 3]
    assert_snapshot(main.ranks.load("format3-loaded.pt"), main.format1_ref, "format 3 -> 2-rank FSDP2")


# -- 5. exact resume -----------------------------------------------------------------------------


@dataclass
class Resumed:
    full: Ranks
    killed: Ranks
    killed_latest: str
    killed_steps: list[int]
    killed_leftovers: list[str]
    same: Ranks
    one: Ranks
    one_root: Path


@pytest.fixture(scope="module")
def resumed(main: Main, tmp_path_factory: pytest.TempPathFactory) -> Resumed:
    """The uninterrupted run is in ``main``; here the same run SIGKILLed on every rank after step 5 (its
    newest checkpoint: step 4), resumed on 2 ranks and, from a copy, on 1."""
    base = tmp_path_factory.mktemp("resume")
    root = base / "killed"
    reached, reached_w = CTX.Pipe(duplex=False)
    hold, hold_w = CTX.Pipe(duplex=False)
    job = {
        "root": str(root),
        "name": "killed",
        "total": 6,
        "every": 2,
        "stop_at": 5,
        "reached": reached_w,
        "hold": hold,
    }
    killed = launch(base / "out-killed", 2, [("train", "train", job)], kill_point=reached)
    hold_w.close()
    left = leftovers(root)  # before a manager's opening would clean them
    before = (latest_name(root), pc.CheckpointManager(root).steps(), left)
    one_root, norng_root = base / "killed-copy", base / "killed-copy-norng"
    shutil.copytree(root, one_root)
    shutil.copytree(root, norng_root)
    resume = {"total": 6, "every": 2, "resume": True}
    jobs: list[Job] = [
        ("train", "train", {"root": str(root), "name": "resumed", **resume}),
        # the control: the same resume without the saved RNG state must not reproduce the losses
        ("norng", "train", {"root": str(norng_root), "name": "norng", "restore_rng": False, **resume}),
    ]
    same = launch(base / "out-2", 2, jobs)
    one = launch(base / "out-1", 1, [("train", "train", {"root": str(one_root), "name": "resumed", **resume})])
    return Resumed(main.ranks, killed, *before, same, one, one_root)


def test_killed_job_left_its_last_checkpoint(resumed: Resumed) -> None:
    assert resumed.killed.exitcodes == [-signal.SIGKILL] * 2
    assert resumed.killed.report("train", 0) is None  # it never finished
    # before any resume: step 4 committed and latest, the retention of keep_last=2 applied, no temporaries
    assert (resumed.killed_latest, resumed.killed_steps, resumed.killed_leftovers) == ("step-00000004", [2, 4], [])


def test_resume_at_same_world_size_is_exact(resumed: Resumed) -> None:
    full = resumed.full.values("full")
    same = resumed.same.values("train")
    for rank in range(2):
        want = {str(s): v for s, v in full[rank]["losses"].items() if int(s) > 4}
        assert same[rank]["losses"] == want, f"rank {rank}: losses after the resume"
        assert same[rank]["lr"] == full[rank]["lr"]
    assert same[0]["steps"] == full[0]["steps"] == [4, 6]
    assert_snapshot(resumed.same.load("resumed-restored.pt"), resumed.full.load("full-step4.pt"), "restored step 4")
    assert_snapshot(resumed.same.load("resumed-final.pt"), resumed.full.load("full-final.pt"), "after step 6")
    # the comparison can tell: without the per-rank RNG state the dropout masks, so the losses, differ
    norng = resumed.same.values("norng")
    assert [r["losses"]["5"] for r in norng] != [r["losses"]["5"] for r in same]


def test_resume_at_world_size_one_continues_from_saved_values(resumed: Resumed) -> None:
    # The restored state is exactly what the 2 ranks saved at step 4, and the scheduler continues its
    # schedule. The losses after it are not the 2-rank run's, by design: the RNG state (dropout) was saved
    # per rank and is restored only at the same world size, and one rank computes the mean over the whole
    # batch where two averaged two half-batch means (another order of float additions).
    (one,) = resumed.one.values("train")
    full = resumed.full.values("full")
    assert_snapshot(resumed.one.load("resumed-restored.pt"), resumed.full.load("full-step4.pt"), "2 -> 1 at step 4")
    assert sorted(one["losses"]) == ["5", "6"]
    assert all(math.isfinite(float.fromhex(v)) for v in one["losses"].values())
    assert one["lr"] == full[0]["lr"]
    assert one["steps"] == [4, 6]
    after = resumed.one.load("resumed-final.pt")
    assert after["optim_state"][0]["step"].item() == 6.0
    ck = pc.load_checkpoint(resumed.one_root)  # what the 1-rank job saved at step 6 is what it held
    assert_same(ck.model_state, after["model"], "step 6 saved by one rank")


# -- 6. faults -----------------------------------------------------------------------------------


@dataclass
class Faults:
    ranks: Ranks
    base: Path
    corrupt_root: Path


# label -> (the faulty rank, a blocking save): rank 1's disk, the coordinator's, rank 1's in a background save
DISK_FULL = {"diskfull-rank1": (1, True), "diskfull-rank0": (0, True), "diskfull-async": (1, False)}


@pytest.fixture(scope="module")
def faults(main: Main, tmp_path_factory: pytest.TempPathFactory) -> Faults:
    """One 2-rank launch: a disk fills during the second of two saves (three ways), then a load of a
    corrupted shard."""
    base = tmp_path_factory.mktemp("faults")
    corrupt_root = base / "corrupt"
    shutil.copytree(main.roots["fsdp"], corrupt_root)
    flip_tensor_byte(step_dir(corrupt_root, dist_job.TRAIN_STEPS) / SHARD, TENSOR)
    jobs: list[Job] = [
        (
            label,
            "save_twice_with_fault",
            {"root": str(base / label), "name": label, "fault": "diskfull", "faulty": faulty, "blocking": blocking},
        )
        for label, (faulty, blocking) in DISK_FULL.items()
    ]
    jobs.append(("corrupt", "fsdp_load_corrupted", {"root": str(corrupt_root)}))
    jobs.append(("mismatch", "load_mismatched", {"root": str(main.roots["fsdp"])}))
    return Faults(launch(base / "out", 2, jobs), base, corrupt_root)


SHARD = "model-00001-of-00002.safetensors"
TENSOR = "model.3.weight"


def flip_tensor_byte(path: Path, key: str) -> None:
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    start, end = json.loads(data[8 : 8 + n])[key]["data_offsets"]
    data[8 + n + (start + end) // 2] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("label", list(DISK_FULL))
def test_disk_full_on_one_rank_fails_every_rank_commits_nothing(faults: Faults, label: str) -> None:
    faulty, _ = DISK_FULL[label]
    root = faults.base / label
    for rank in range(2):
        rep = faults.ranks.report(label, rank)
        assert rep is not None and not rep["ok"], f"rank {rank}: {rep}"
        assert rep["type"] == "CheckpointWriteError", rep["traceback"]
        assert {"CheckpointError", "OSError"} <= set(rep["classes"])
        assert f"rank {faulty}" in rep["message"], rep["message"]
        assert "No space left on device (ENOSPC); nothing was committed" in rep["message"], rep["message"]
    assert faults.ranks.hung == []
    assert latest_name(root) == "step-00000001"
    mgr = pc.CheckpointManager(root)  # opening the root removes whatever the failed save left
    assert mgr.steps() == [1]
    assert leftovers(root) == []
    saved = faults.ranks.load(f"{label}-step1.pt")
    ck = pc.load_checkpoint(root)
    assert ck.step == 1
    assert_same(ck.model_state, saved["model"], "step 1 after the failed save")


def test_disk_full_on_one_rank_keeps_errno_enospc(faults: Faults) -> None:
    reports = [faults.ranks.report("diskfull-rank1", rank) for rank in range(2)]
    assert [r["errno"] if r else None for r in reports] == [errno.ENOSPC] * 2


def test_rank_killed_mid_save_commits_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    job = {"root": str(root), "name": "kill", "fault": "kill", "faulty": 1}
    ranks = launch(tmp_path / "out", 2, [("kill", "save_twice_with_fault", job)], deadline=90, pg_timeout=20)
    assert ranks.exitcodes[1] == -signal.SIGKILL
    survivor = ranks.report("kill", 0)
    # rank 0 gets an error (its peer's connection closes), or hangs and is killed at the deadline
    assert (survivor is not None and not survivor["ok"]) or ranks.hung == [0], (ranks.exitcodes, survivor)
    if survivor is not None:  # the library's error, not gloo's: the process group failed, nothing committed
        assert survivor["type"] == "CheckpointWriteError", survivor
        assert "the process group failed" in survivor["message"] and "nothing was committed" in survivor["message"]
    assert latest_name(root) == "step-00000001"
    mgr = pc.CheckpointManager(root)  # the dead coordinator's staging area goes now
    assert mgr.steps() == [1]
    assert leftovers(root) == []
    saved = ranks.load("kill-step1.pt")
    model = dist_job.build_mlp(99)
    opt = dist_job.adamw(model)
    mgr.restore(model, opt)
    assert_snapshot(plain(opt, model), saved, "step 1 after a rank died saving step 2")


def test_corrupted_shard_names_file_and_tensor(faults: Faults) -> None:
    ranks, root = faults.ranks, faults.corrupt_root
    path = step_dir(root, dist_job.TRAIN_STEPS)
    for rank in range(2):  # with a process group: every rank gets the error of the rank that read it
        rep = ranks.report("corrupt", rank)
        assert rep is not None and not rep["ok"], f"rank {rank}: {rep}"
        assert rep["type"] == "CheckpointCorruptedError", rep["traceback"]
        assert SHARD in rep["message"] and f'"{TENSOR}"' in rep["message"], rep["message"]
    with pytest.raises(pc.CheckpointCorruptedError) as err:  # without one
        pc.load_checkpoint(path)
    assert f"{path}/{SHARD}" in str(err.value) and f'"{TENSOR}"' in str(err.value)
    model = dist_job.build_mlp(99)
    with pytest.raises(pc.CheckpointCorruptedError, match=SHARD):
        pc.load_checkpoint(root, model)
    report = pc.validate_checkpoint(path)
    assert not report.valid
    assert any(p.file.endswith(SHARD) and p.error == "CheckpointCorruptedError" for p in report.problems), report


def test_mismatched_model_fails_every_rank_and_changes_nothing(faults: Faults) -> None:
    for rank in range(2):
        rep = faults.ranks.report("mismatch", rank)
        assert rep is not None and not rep["ok"], f"rank {rank}: {rep}"
        assert rep["type"] == "StateMismatchError", rep["traceback"]
        assert "missing ['4.bias', '4.weight']" in rep["message"], rep["message"]
    assert_same(faults.ranks.load("mismatch-after.pt"), faults.ranks.load("mismatch-before.pt"), "after the refusal")


# -- 7. the DCP storage pair, used directly ------------------------------------------------------


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_save_and_load_with_portable_storage(main: Main) -> None:
    values = main.ranks.values("dcp")
    saved = main.ranks.load("dcp-saved.pt")
    assert [v["extra_counter"] for v in values] == [5, 5]
    assert_snapshot(main.ranks.load("dcp-loaded.pt"), saved, "dcp.save/dcp.load on 2 ranks")
    path = Path(values[0]["path"])
    assert manifest(path)["format_version"] == 2
    assert sharding(path)["entries"]["extra_counter"]["path"] == ["extra_counter"]
    # in one process, no process group: DCP reassembles the two ranks' chunks into plain tensors
    model = dist_job.build_mlp(99)
    opt = dist_job.adamw(model)
    msd, osd = get_state_dict(model, opt)
    state: dict[str, Any] = {"model": msd, "optimizer": osd, "extra_counter": 0}
    dcp.load(state, storage_reader=PortableStorageReader(path))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    assert state["extra_counter"] == 5
    assert_snapshot(plain(opt, model), saved, "dcp.load in one process")


def test_dcp_save_of_a_value_json_cannot_hold_is_refused(main: Main) -> None:
    values = main.ranks.values("dcp")
    for rank, v in enumerate(values):
        bad = v["bad"]
        assert bad and not bad["ok"], f"rank {rank}: the save of an object() value did not fail"
        # DCP wraps what a rank raised in its own CheckpointException; the rank that wrote the value
        # raised CheckpointInputError naming it
        causes = bad.get("failures", {"self": [bad["type"], bad["message"]]})
        assert any(kind == "CheckpointInputError" and "handle" in msg for kind, msg in causes.values()), bad
    root = main.roots["dcp"]
    assert values[0]["steps"] == [3]  # nothing committed for step 4
    # DCP never calls the writer's abort: its staging area stays until its process is gone and a manager
    # opens the root
    pc.CheckpointManager(root)
    assert (latest_name(root), leftovers(root)) == ("step-00000003", [])


def refused_object_save(writer: PortableStorageWriter) -> pc.CheckpointInputError:
    with pytest.raises(CheckpointException) as err:  # DCP wraps what a step raised in its own exception
        dcp.save({"model": dist_job.build_mlp(0).state_dict(), "handle": object()}, storage_writer=writer)
    ((_, failure),) = err.value.failures.items()
    cause: BaseException = failure[0] if isinstance(failure, tuple) else failure
    assert isinstance(cause, pc.CheckpointInputError), cause
    return cause


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_save_in_one_process_refuses_a_value_json_cannot_hold(tmp_path: Path) -> None:
    cause = refused_object_save(PortableStorageWriter(tmp_path, step=1))
    assert str(cause) == (
        "handle is a builtins.object, which a checkpoint stores without pickle only as None, bool, int, float, "
        "str, list, tuple, dict or torch.Tensor; convert it in the object's state_dict()"
    )
    assert pc.CheckpointManager(tmp_path).steps() == []
    assert pc.CheckpointManager(tmp_path).latest() is None


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_writer_reused_after_a_refused_save_leaves_no_staging_area(tmp_path: Path) -> None:
    writer = PortableStorageWriter(tmp_path, step=1)
    refused_object_save(writer)
    model = dist_job.build_mlp(0)
    dcp.save({"model": model.state_dict()}, storage_writer=writer)
    assert_same(pc.load_checkpoint(tmp_path).model_state, dict(model.state_dict()), "the save after the refusal")
    assert leftovers(tmp_path) == []


# -- 8. non-blocking save ------------------------------------------------------------------------


def test_nonblocking_save_keeps_the_values_of_the_call(main: Main) -> None:
    values = main.ranks.values("async")
    root = main.roots["async"]
    assert values == [{"handle": "SaveHandle", "path": str(step_dir(root, 1)), "steps": [1]}] * 2
    before, after = main.ranks.load("async-before.pt"), main.ranks.load("async-after.pt")
    for name in before["model"]:  # the parameters did change right after the call
        assert not torch.equal(before["model"][name], after["model"][name])
    ck = pc.load_checkpoint(step_dir(root, 1))
    assert_same(ck.model_state, before["model"], "non-blocking save")
    assert ck.optimizer_state is not None
    assert_same(ck.optimizer_state["state"], before["optim_state"], "non-blocking save: optimizer")


def test_states_are_saved_and_restored_per_rank(tmp_path: Path) -> None:
    root = tmp_path / "root"
    ranks = launch(tmp_path / "out", 2, [("states", "states_per_rank", {"root": str(root)})])
    reports = [ranks.report("states", r) for r in range(2)]
    assert [r["value"]["seen"] for r in reports] == [100, 101], reports  # each rank its own
    names = sorted(p.name for p in step_dir(root, 1).iterdir() if p.name.startswith("states-"))
    assert names == [
        "states-00000-of-00002.json",
        "states-00000-of-00002.safetensors",
        "states-00001-of-00002.json",
        "states-00001-of-00002.safetensors",
    ]
    # one process is not the saved world: rank-local states are not handed to it as if they were its own
    with pytest.raises(pc.StateMismatchError, match="position"):
        pc.load_checkpoint(root, states={"position": dist_job.Position(0)}, restore_rng=False)
    single = pc.consolidate_checkpoint(root, tmp_path / "single")  # consolidate keeps rank 0's
    restored = dist_job.Position(0)
    pc.load_checkpoint(single, states={"position": restored}, restore_rng=False)
    assert restored.seen == 100
