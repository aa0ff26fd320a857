"""Incremental saves (format_version 3, format_spec §21) under fault injection.

:class:`IncModel` has frozen tensors (a parameter with ``requires_grad=False`` and a buffer, the same at
every step), a "slow" trainable layer (its value changes every :data:`SLOW` steps) and a "fast" one (value
== step), split by :data:`PART_BYTES` into four model parts: two frozen, one fast, one slow. So an
incremental save reuses (hard link, server-side copy) two or three parts of the previous checkpoint and
writes the others. :func:`inc_problems` says what in a loaded checkpoint is not what its step saved.

- :func:`inc_crash_trial`: a child saving steps through CheckpointManager(incremental=True, keep_last=2) is
  SIGKILLed before its k-th I/O call (``os.link`` included) or after a random delay; then every committed
  checkpoint must load verified with its step's values, the newest reported commit must be there, the next
  manager must clear every temporary, and saving must resume, reusing parts again;
- :func:`link_failure_problems`, :func:`io_sweep_problems`, :func:`memory_fault_problems`: ``os.link``
  failing (EXDEV, EPERM, EMLINK, ENOSPC: the save writes the part), every I/O call of an incremental save
  failing in turn (CheckpointWriteError, the root as before), the n-th operation of the in-memory backend
  failing (``copy`` included) under both commit strategies;
- :func:`behind_the_back_problems`: a reused (hard-linked) part changed, truncated, removed or replaced
  behind the checkpoints' back, and the source checkpoint retired right after the writer opened the part
  it is about to link (:func:`faults.inject.after_open`);
- :func:`race_round`: an incremental writer, a process running retention (keep_last=1) and ``drop_after``
  on the same root, and verifying readers; then every checkpoint loads whole with its step's values;
- :func:`s3_reuse_problems`, :func:`s3_inc_crash_trial`: the same on S3 (moto): parts reused by CopyObject
  (few bytes uploaded), the source object deleted or replaced right before the copy, kill trials.

The child roles (``inc-writer``, ``inc-pruner``, ``inc-reader``, ``inc-s3-writer``) are registered with the
fork server's command line by :func:`add_roles`.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import random
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

import portable_ckpt as pc
from faults.crash import TrialResult
from faults.inject import IO_ERRNO, Injector, after_open, retire
from faults.states import STEP_DIR, VOCAB, leftovers, preserved_rng

PART_BYTES = 300  # frozen.weight (512 B) | table (256 B) | fast.bias + fast.weight (288 B) | slow.* (288 B)
SLOW = 3  # the slow layer's value is step // SLOW
PARTS = tuple(f"model-{i:05d}-of-00004.safetensors" for i in range(4))
FROZEN_PARTS, FAST_PART, SLOW_PART = PARTS[:2], PARTS[2], PARTS[3]  # the state's names sorted, frozen first
LINK_ERRNOS = (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOSPC)
REPLY_SECONDS = 120.0


class IncModel(nn.Module):
    """A frozen embedding (parameter, requires_grad False), a frozen buffer, a slow and a fast linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Embedding(16, 8)
        self.frozen.weight.requires_grad_(False)
        self.register_buffer("table", torch.zeros(64))
        self.slow = nn.Linear(8, 8)
        self.fast = nn.Linear(8, 8)


def expected(step: int) -> dict[str, torch.Tensor]:
    """The model state :func:`inc_state` gives ``step``."""
    slow, fast = float(step // SLOW), float(step)
    return {
        "frozen.weight": torch.arange(128, dtype=torch.float32).reshape(16, 8) / 8,
        "table": torch.full((64,), 0.5),
        "slow.weight": torch.full((8, 8), slow),
        "slow.bias": torch.full((8,), slow),
        "fast.weight": torch.full((8, 8), fast),
        "fast.bias": torch.full((8,), fast),
    }


def inc_state(step: int) -> tuple[IncModel, torch.optim.Optimizer]:
    model = IncModel()
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            t.copy_(expected(step)[name])
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.1, momentum=0.9)
    for p in trainable:
        opt.state[p]["momentum_buffer"] = torch.full_like(p, float(step))
    return model, opt


def inc_config(step: int) -> dict[str, Any]:
    return {"step": step, "kind": "incremental"}


def inc_manager(root: Any, keep_last: int | None = 2) -> pc.CheckpointManager:
    return pc.CheckpointManager(root, incremental=True, part_bytes=PART_BYTES, keep_last=keep_last)


def inc_save(target: Any, step: int, **options: Any) -> Any:
    """Save ``step`` incrementally, through a manager or into a root (save_checkpoint)."""
    model, opt = inc_state(step)
    with preserved_rng():
        if isinstance(target, pc.CheckpointManager):
            return target.save(model, opt, inc_config(step), VOCAB, step)
        return pc.save_checkpoint(
            model, opt, inc_config(step), VOCAB, step, target, incremental=True, part_bytes=PART_BYTES, **options
        )


def inc_problems(ckpt: pc.Checkpoint) -> list[str]:
    """What in ``ckpt`` is not what :func:`inc_save` saved for its step."""
    step = ckpt.step
    if ckpt.config != inc_config(step):
        return [f"config {ckpt.config!r} does not describe step {step}"]
    want = expected(step)
    problems = []
    if set(ckpt.model_state) != set(want):
        problems.append(f"model tensors {sorted(ckpt.model_state)}")
    problems += [
        f"model {k}" for k, v in want.items() if k in ckpt.model_state and not torch.equal(ckpt.model_state[k], v)
    ]
    buffers = [s.get("momentum_buffer") for s in (ckpt.optimizer_state or {}).get("state", {}).values()]
    if len(buffers) != 4 or not all(isinstance(b, torch.Tensor) and bool((b == step).all()) for b in buffers):
        problems.append("optimizer momentum buffers")
    if ckpt.vocab != VOCAB:
        problems.append("vocab")
    return problems


def inc_load(path: Any, *, verify: bool = True) -> tuple[int, list[str]]:
    """Load ``path`` (a checkpoint or a root): (its step, what is wrong with its values)."""
    ckpt = pc.load_checkpoint(path, verify=verify, restore_rng=False)
    return ckpt.step, inc_problems(ckpt)


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def committed(root: Path) -> list[int]:
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    return sorted(int(n[5:]) for n in names if STEP_DIR.match(n) and (root / n / "manifest.json").is_file())


def same_file(a: Path, b: Path) -> bool:
    """``a`` and ``b`` are one file (a hard link: same inode and device)."""
    try:
        sa, sb = a.stat(), b.stat()
    except FileNotFoundError:
        return False
    return (sa.st_ino, sa.st_dev) == (sb.st_ino, sb.st_dev)


def shared_parts(root: Path, old: int, new: int) -> list[str]:
    """The model parts ``new`` holds as hard links to the same file as ``old``'s."""
    return [p for p in PARTS if same_file(step_dir(root, old) / p, step_dir(root, new) / p)]


def reusable(old: int, new: int) -> list[str]:
    """The parts of step ``new`` whose tensors are those of step ``old`` (what an incremental save reuses)."""
    return [*FROZEN_PARTS, *([SLOW_PART] if old // SLOW == new // SLOW else []), *([FAST_PART] if old == new else [])]


def check_all(root: Path, where: str = "") -> tuple[list[str], list[str], list[str]]:
    """Every committed checkpoint of ``root`` loaded verified: (lost, silent, unexpected) findings."""
    lost, silent, unexpected = [], [], []
    for step in committed(root):
        name = f"{where}step-{step:08d}"
        try:
            got, problems = inc_load(step_dir(root, step))
            silent += [f"{name}: {p}" for p in problems] + ([f"{name} holds step {got}"] if got != step else [])
        except FileNotFoundError:  # removed by retention while we looked: not a finding
            continue
        except pc.CheckpointNotFoundError:
            continue
        except pc.CheckpointError as e:
            lost.append(f"{name}: {type(e).__name__}: {e}")
        except Exception as e:  # anything else is a finding
            unexpected.append(f"{name}: {type(e).__module__}.{type(e).__qualname__}: {e}")
    return lost, silent, unexpected


# --------------------------------------------------------------------------------------------------
# child roles
# --------------------------------------------------------------------------------------------------


def say(line: str) -> None:
    print(line, flush=True)


def _arm(kill_op: int, kill_after: float, match: str) -> contextlib.AbstractContextManager[Any]:
    if kill_after > 0:
        timer = threading.Timer(kill_after, lambda: os.kill(os.getpid(), signal.SIGKILL))
        timer.daemon = True
        timer.start()
    return Injector(kill_at=kill_op, match=match).installed() if kill_op else contextlib.nullcontext()


@contextlib.contextmanager
def counted_reuse() -> Iterator[list[bool]]:
    """Record what each ``LocalStaging.reuse`` (hard link of a part) of this process returned."""
    from portable_ckpt.storage.local import LocalStaging

    results: list[bool] = []
    real = LocalStaging.reuse

    def reuse(self: Any, *args: Any, **kwargs: Any) -> bool:
        ok: bool = real(self, *args, **kwargs)
        results.append(ok)
        return ok

    LocalStaging.reuse = reuse  # type: ignore[method-assign]
    try:
        yield results
    finally:
        LocalStaging.reuse = real  # type: ignore[method-assign]


def role_inc_writer(args: argparse.Namespace) -> None:
    """Saves ``--count`` steps after the newest through CheckpointManager(incremental=True, keep_last), once the
    parent says go (``--wait``); SIGKILLs itself before its ``--kill-op``-th I/O call on the root or after
    ``--kill-after`` seconds (and at its end if it is to die). Prints "begin N" / "committed N" / JSON."""
    root = Path(args.root)
    if args.wait:
        from faults.roles import wait_for_go

        wait_for_go()
    dying = bool(args.kill_op or args.kill_after)
    with _arm(args.kill_op, args.kill_after, re.escape(str(root))), counted_reuse() as reused:
        manager = inc_manager(root, args.keep_last or None)
        done = manager.steps()
        first = done[-1] + 1 if done else 1
        for step in range(first, first + args.count):
            say(f"begin {step}")
            try:
                del reused[:]
                inc_save(manager, step)
                say(f"committed {step} {sum(reused)}")  # how many parts it reused
            except pc.CheckpointError as e:
                say(json.dumps({"step": step, "outcome": type(e).__name__, "message": str(e)}))
            except Exception as e:  # reported to the parent, which fails the test
                say(json.dumps({"step": step, "outcome": f"unexpected {type(e).__qualname__}", "message": str(e)}))
        manager.close()
    if args.done_file:
        Path(args.done_file).touch()
    if dying:
        os.kill(os.getpid(), signal.SIGKILL)  # the kill point lay past the end: die now
    say("done")


def role_inc_pruner(args: argparse.Namespace) -> None:
    """Until ``--done-file`` appears (at most ``--seconds``): retention keep_last=1 on the root and, every
    ``--drop-every`` rounds, ``drop_after`` the step before the newest (deleting the newest: the checkpoint
    an incremental save in flight reuses). Prints JSON counts."""
    from faults.roles import wait_for_go
    from portable_ckpt import root as _root

    root = Path(args.root)
    wait_for_go()
    manager = pc.CheckpointManager(root)
    counts: dict[str, Any] = {"retained": 0, "dropped": [], "errors": []}
    end = time.monotonic() + args.seconds
    n = 0
    while time.monotonic() < end and not os.path.exists(args.done_file):
        n += 1
        try:
            if n % args.drop_every == 0:
                steps = manager.steps()
                if steps:  # the newest, the source of an incremental save in flight, deleted
                    counts["dropped"] += manager.drop_after(steps[-1] - 1)
            else:
                _root.retain(manager.storage, keep_last=1, keep_every=None)
                counts["retained"] += 1
        except pc.CheckpointError as e:
            counts["errors"].append(f"{type(e).__name__}: {e}")
        except Exception as e:  # reported to the parent, which fails the test
            counts["errors"].append(f"unexpected {type(e).__module__}.{type(e).__qualname__}: {e}")
        time.sleep(args.pause)
    say(json.dumps(counts))


def role_inc_reader(args: argparse.Namespace) -> None:
    """Loads the root verified in a loop until the stop file appears; prints JSON counts (complete loads,
    CheckpointNotFoundError, a checkpoint deleted under the load, and everything else: "bad")."""
    from faults.roles import wait_for_go

    root = Path(args.root)
    counts: dict[str, Any] = {"loaded": 0, "not_found": 0, "vanished": 0, "bad": []}
    wait_for_go()
    while not os.path.exists(args.stop_file):
        try:
            step, problems = inc_load(root)
            counts["loaded"] += 1
            counts["bad"] += [f"step {step}: {p}" for p in problems]
        except pc.CheckpointNotFoundError:
            counts["not_found"] += 1
        except pc.CheckpointError as e:
            # retention deleting the checkpoint being read: the loader must name that, never load damage
            if "removed" in str(e) or "deleted" in str(e) or "no longer" in str(e):
                counts["vanished"] += 1
            else:
                counts["bad"].append(f"{type(e).__name__}: {e}")
        except Exception as e:  # every other failure is a finding
            counts["bad"].append(f"{type(e).__module__}.{type(e).__qualname__}: {e}")
    say(json.dumps(counts))


def _s3_options(endpoint: str) -> dict[str, Any]:
    return {
        "endpoint_url": endpoint,
        "key": "testing",
        "secret": "testing",
        "skip_instance_cache": True,
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 5, "read_timeout": 30},
    }


@contextlib.contextmanager
def counted_s3_calls(before: Callable[[str, Any], None] = lambda op, params: None) -> Iterator[list[str]]:
    """Record every S3 API call this process makes (operation names); ``before`` runs ahead of each."""
    import aiobotocore.client

    calls: list[str] = []
    real = aiobotocore.client.AioBaseClient._make_api_call

    async def counted(self: Any, operation_name: str, api_params: Any) -> Any:
        calls.append(operation_name)
        before(operation_name, api_params)
        return await real(self, operation_name, api_params)

    setattr(aiobotocore.client.AioBaseClient, "_make_api_call", counted)  # noqa: B010 -- a patch, undone below
    try:
        yield calls
    finally:
        setattr(aiobotocore.client.AioBaseClient, "_make_api_call", real)  # noqa: B010


def role_inc_s3_writer(args: argparse.Namespace) -> None:
    """Saves the step after the newest into an S3 root through CheckpointManager(incremental=True,
    keep_last=2), SIGKILLing itself before its ``--kill-op``-th S3 call or ``--kill-after`` seconds after it
    began; prints the API calls (JSON) if it lives to the end."""
    from portable_ckpt.storage import FsspecStorage

    state = {"n": 0}

    def before(op: str, params: Any) -> None:
        state["n"] += 1
        if state["n"] == args.kill_op:
            os.kill(os.getpid(), signal.SIGKILL)

    with counted_s3_calls(before) as calls, _arm(0, args.kill_after, ""):
        root = FsspecStorage.from_location(args.root, storage_options=_s3_options(args.endpoint))
        manager = inc_manager(root)
        done = manager.steps()
        inc_save(manager, (done[-1] if done else 0) + 1)
        manager.close()
    say(json.dumps(calls))


def add_roles(sub: Any) -> None:
    """Register the roles with the child command line (:func:`faults.processes.main`)."""
    p = sub.add_parser("inc-writer")
    p.add_argument("root")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--kill-op", type=int, default=0)
    p.add_argument("--kill-after", type=float, default=0.0)
    p.add_argument("--wait", action="store_true")
    p.add_argument("--done-file", default="")
    p.set_defaults(run=role_inc_writer)
    p = sub.add_parser("inc-pruner")
    p.add_argument("root")
    p.add_argument("--done-file", required=True)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--drop-every", type=int, default=5)
    p.add_argument("--pause", type=float, default=0.01)
    p.set_defaults(run=role_inc_pruner)
    p = sub.add_parser("inc-reader")
    p.add_argument("root")
    p.add_argument("--stop-file", required=True)
    p.set_defaults(run=role_inc_reader)
    p = sub.add_parser("inc-s3-writer")
    p.add_argument("root")
    p.add_argument("--endpoint", required=True)
    p.add_argument("--kill-op", type=int, default=0)
    p.add_argument("--kill-after", type=float, default=0.0)
    p.set_defaults(run=role_inc_s3_writer)


# --------------------------------------------------------------------------------------------------
# kill trials
# --------------------------------------------------------------------------------------------------


def count_inc_ops(root: Path, steps: int) -> tuple[list[str], float]:
    """The I/O calls (links included) of ``steps`` incremental saves into a fresh root, and the seconds they
    took (run here; fsync counted but skipped)."""
    real_fsync = os.fsync
    os.fsync = lambda fd: None
    start = time.monotonic()
    try:
        with Injector(match=re.escape(str(root))).installed() as inj:
            manager = inc_manager(root)
            for step in range(1, steps + 1):
                inc_save(manager, step)
            manager.close()
    finally:
        os.fsync = real_fsync
    return inj.calls, time.monotonic() - start


def inc_crash_trial(
    root: Path,
    rng: random.Random,
    *,
    kind: str,
    steps: int,
    ops_per_run: int,
    seconds: float = 1.0,
    kill_op: int = 0,
) -> TrialResult:
    """One kill trial: a child saves ``steps`` steps after the newest of ``root`` and is killed before a random
    I/O call (``kind`` "op"; that call, ``kill_op``, when given) or after a random delay ("time"); then
    :func:`check_after_crash`."""
    from faults.processes import fork_server

    server = fork_server()
    kill_op = kill_op or (rng.randint(1, ops_per_run) if kind == "op" else 0)
    kill_after = 0.0 if kind == "op" else rng.uniform(0.02, 2 * seconds + 0.2)  # fsync: the child is slower
    mode = f"kill@op{kill_op}" if kind == "op" else f"kill@{kill_after:.3f}s"
    job = ["inc-writer", str(root), "--count", str(steps), "--kill-op", str(kill_op), "--kill-after", f"{kill_after}"]
    before = committed(root)
    [(status, lines)] = server.run([job], root.parent / f"{root.name}.out")
    result = TrialResult(mode, [int(x.split()[1]) for x in lines if x.startswith("committed")], None)
    if status != -signal.SIGKILL:
        result.other.append(f"writer ended with status {status}, not SIGKILL: {server.errors()} {lines[-3:]}")
    result.other += [f"the writer said {x}" for x in lines if x.startswith("{")]
    check_after_crash(root, result, before)
    return result


def check_after_crash(root: Path, result: TrialResult, before: list[int]) -> None:
    """The promises after a killed incremental writer (see the module docstring)."""
    last = result.committed[-1] if result.committed else (before[-1] if before else 0)
    lost, silent, unexpected = check_all(root)
    result.lost += lost
    result.silent += silent
    result.unexpected += unexpected
    if last and last not in committed(root):
        result.lost.append(f"step {last} was committed but is not in the root: {committed(root)}")
    try:
        step, problems = inc_load(root)
        result.loaded = step
        if step < last:
            result.lost.append(f"the root loads step {step}, but step {last} had been committed")
        result.silent += [f"the root (step {step}): {p}" for p in problems]
    except pc.CheckpointNotFoundError as e:
        if last:
            result.lost.append(f"step {last} had been committed, but loading the root says: {e}")
    except pc.CheckpointError as e:
        result.lost.append(f"loading the root: {type(e).__name__}: {e}")
    except Exception as e:  # anything else is a finding
        result.unexpected.append(f"loading the root: {type(e).__module__}.{type(e).__qualname__}: {e}")
    try:
        manager = inc_manager(root)
        if leftovers(root):
            result.other.append(f"temporaries left after CheckpointManager opened the root: {leftovers(root)}")
        steps = manager.steps()
        nxt = (steps[-1] if steps else 0) + 1
        inc_save(manager, nxt)
        got, problems = inc_load(root)
        if got != nxt or problems:
            result.other.append(f"resume: saved {nxt}, loaded {got} {problems}")
        if steps and (missing := set(reusable(steps[-1], nxt)) - set(shared_parts(root, steps[-1], nxt))):
            result.other.append(f"resume: step {nxt} did not reuse {sorted(missing)} of step {steps[-1]}")
        manager.close()
    except pc.CheckpointError as e:
        result.other.append(f"resume failed: {type(e).__name__}: {e}")


# --------------------------------------------------------------------------------------------------
# I/O faults
# --------------------------------------------------------------------------------------------------


def template(where: Path, steps: int = 2) -> Path:
    """A root holding incremental steps 1..``steps`` (keep_last=2)."""
    root = where / "template"
    if not root.exists():
        manager = inc_manager(root)
        for step in range(1, steps + 1):
            inc_save(manager, step)
        manager.close()
    return root


def copy_root(source: Path, dest: Path) -> Path:
    """A copy of a root in which the hard links between its checkpoints stay hard links."""
    shutil.rmtree(dest, ignore_errors=True)  # what an earlier attempt left
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, dest, copy_function=os.link)  # the files themselves are never written in place
    return dest


def root_state(root: Path) -> dict[str, Any]:
    return {
        "steps": committed(root),
        "latest": (root / "latest").read_text().strip() if (root / "latest").exists() else None,
        "leftovers": leftovers(root),
    }


@contextlib.contextmanager
def links_fail(code: int) -> Iterator[list[str]]:
    """Every ``os.link`` of this process fails with ``code`` (a file system without hard links, ...)."""
    real = os.link
    tried: list[str] = []

    def link(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        tried.append(os.fspath(dst))
        raise OSError(code, os.strerror(code), os.fspath(dst))

    os.link = link
    try:
        yield tried
    finally:
        os.link = real


def link_failure_problems(tmpl: Path, where: Path, code: int, nth: int = 0) -> list[str]:
    """Save step 3 over ``tmpl`` (steps 1, 2) with ``os.link`` failing with ``code`` (the ``nth`` link only, or
    every one with 0): the save must succeed, write the parts it could not link, link the others."""
    root = copy_root(tmpl, where / "root")
    manager = inc_manager(root)
    problems = []
    label = f"link fails with {errno.errorcode[code]} ({'every link' if not nth else f'link {nth}'})"
    inj = Injector(ops=("link",), fail_at=nth, errno=code)
    with links_fail(code) if not nth else inj.installed() as tried:
        try:
            inc_save(manager, 3)
        except Exception as e:  # reuse is never a reason for a save to fail (§21.3)
            return [f"{label}: the save raised {type(e).__name__}: {e}"]
    tried = tried if not nth else inj.calls
    failed = [os.path.basename(c) for c in (tried if not nth else [f.split(" -> ")[-1] for f in inj.failed])]
    if not tried:
        problems.append(f"{label}: no link was tried")
    shared = shared_parts(root, 2, 3)
    if set(shared) & set(failed):
        problems.append(f"{label}: {sorted(set(shared) & set(failed))} shared though its link failed")
    if set(shared) | set(failed) != set(reusable(2, 3)):
        problems.append(f"{label}: linked {shared}, failed {failed}; expected {reusable(2, 3)} in all")
    for name in failed:
        if (step_dir(root, 3) / name).stat().st_nlink != 1:
            problems.append(f"{label}: {name} written, but has {(step_dir(root, 3) / name).stat().st_nlink} links")
    lost, silent, unexpected = check_all(root)
    problems += lost + silent + unexpected
    if committed(root) != [2, 3] or leftovers(root):
        problems.append(f"{label}: root {root_state(root)}")
    shutil.rmtree(where)
    return problems


def io_calls(tmpl: Path, where: Path) -> list[str]:
    root = copy_root(tmpl, where / "root")
    manager = inc_manager(root)
    with Injector(match=re.escape(str(root))).installed() as counter:
        inc_save(manager, 3)
    shutil.rmtree(where)
    return counter.calls


def io_sweep_problems(tmpl: Path, where: Path, n: int, *, partial: bool = False) -> list[str]:
    """Fail the ``n``-th I/O call of the incremental save of step 3 over ``tmpl`` (steps 1, 2; links
    included): a failed link means the part is written and the save succeeds; any other failure raises
    CheckpointWriteError, and the root is as before (steps 1, 2, latest -> 2, both loading) unless the
    save committed (a failing retention delete after the commit)."""
    root = copy_root(tmpl, where / "root")
    manager = inc_manager(root)
    before = root_state(root)
    inj = Injector(match=re.escape(str(root)), fail_at=n, partial=partial)
    error: BaseException | None = None
    with inj.installed():
        try:
            inc_save(manager, 3)
        except Exception as e:  # its type is what is checked
            error = e
    call = inj.failed[0].replace(f"{where}/", "") if inj.failed else f"call {n} (never reached)"
    where_ = f"failing {call}" + (" (short write)" if partial else "")
    problems = []
    done = 3 in committed(root)
    if inj.failed and inj.failed[0].startswith("link "):
        if error is not None:
            problems.append(f"{where_}: a failed link made the save raise {type(error).__name__}: {error}")
    elif error is None:
        if not done:
            problems.append(f"{where_}: the save returned, but step 3 is not committed")
    elif not isinstance(error, pc.CheckpointWriteError):
        problems.append(f"{where_}: raised {type(error).__module__}.{type(error).__qualname__}: {error}")
    elif error.errno not in {IO_ERRNO[f.split()[0]] for f in inj.failed}:  # a short write fails 2 calls
        problems.append(f"{where_}: errno {error.errno}")
    elif done and "nothing was committed" in str(error):
        problems.append(f"{where_}: says nothing was committed, but step 3 is committed")
    elif not done and (now := root_state(root)) != before:
        problems.append(f"{where_}: the root changed: {before} -> {now}")
    lost, silent, unexpected = check_all(root)
    problems += [f"{where_}: {p}" for p in lost + silent + unexpected]
    if leftovers(root):
        problems.append(f"{where_}: temporaries left behind: {leftovers(root)}")
    try:
        inc_manager(root)
        step, wrong = inc_load(root)
        if step != 3 if done else step != 2:
            problems.append(f"{where_}: the root loads step {step}")
        problems += [f"{where_}: the root: {p}" for p in wrong]
    except pc.CheckpointError as e:
        problems.append(f"{where_}: loading the root: {type(e).__name__}: {e}")
    shutil.rmtree(where)
    return problems


def memory_operations(strategy: str) -> list[str]:
    """The operations of the incremental save of step 2 into a memory root holding step 1."""
    from portable_ckpt.storage.memory import STORE, Faults

    STORE.reset()
    root = _memory_root(strategy)
    inc_save(root, 1)
    STORE.faults = Faults()
    inc_save(root, 2)
    calls = list(STORE.faults.calls)
    STORE.reset()
    return calls


def _memory_root(strategy: str) -> Any:
    from portable_ckpt.storage import MemoryStorage

    return MemoryStorage.from_location("memory://inc-root", commit=strategy)  # type: ignore[arg-type]


def memory_fault_problems(strategy: str, nth: int, code: int = errno.ENOSPC) -> list[str]:
    """Fail the ``nth`` operation of the incremental save of step 2 over step 1 in memory: a failed ``copy``
    means the part is written (the save succeeds, step 2 whole); any other failure raises
    CheckpointWriteError and leaves the store as it was."""
    from portable_ckpt.storage.memory import STORE, Faults

    STORE.reset()
    root = _memory_root(strategy)
    problems: list[str] = []
    try:
        inc_save(root, 1)
        before = dict(STORE.objects)
        STORE.faults = Faults(nth=nth, errno=code)
        error: BaseException | None = None
        try:
            inc_save(root, 2)
        except Exception as e:  # its type is what is checked
            error = e
        failed = STORE.faults.failed
        STORE.faults = Faults()
        label = f"{strategy} op {nth} {failed}"
        copy = bool(failed) and failed[0].startswith("copy ")
        if copy and error is not None:
            problems.append(f"{label}: a failed copy made the save raise {type(error).__name__}: {error}")
        elif error is not None and not isinstance(error, pc.CheckpointWriteError):
            problems.append(f"{label}: raised {type(error).__name__}: {error}")
        elif error is not None and (error.errno != code or "nothing was committed" not in str(error)):
            problems.append(f"{label}: wrong error: {error}")
        pc.CheckpointManager(root)  # cleans what a failed save left
        if error is not None and dict(STORE.objects) != before:
            changed = sorted(set(STORE.objects) ^ set(before))
            problems.append(f"{label}: the store changed: {changed}")
        ckpt = pc.load_checkpoint(root, restore_rng=False)
        if ckpt.step != (1 if error is not None else 2):
            problems.append(f"{label}: newest is step {ckpt.step}")
        problems += [f"{label}: {p}" for p in inc_problems(ckpt)]
        if error is None:
            step1 = pc.load_checkpoint(f"{root.location}/step-00000001", restore_rng=False)
            problems += [f"{label}: step 1: {p}" for p in inc_problems(step1)]
    finally:
        STORE.reset()
    return problems


# --------------------------------------------------------------------------------------------------
# changed behind the back
# --------------------------------------------------------------------------------------------------


def _flip_data(path: Path) -> None:
    """Flip one byte of the tensor data (the last byte) in place: the same inode, every link sees it."""
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        b = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([b[0] ^ 0x40]))


def _flip_header(path: Path) -> None:
    """Change the header in place, keeping its length (a dtype letter: F32 -> F16 would change sizes; a space
    of the JSON padding becomes a tab, still valid JSON)."""
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    at = data.rindex(b" ", 8, 8 + n) if b" " in data[8 : 8 + n] else 8 + n - 1
    data[at] = 0x09 if data[at] == 0x20 else data[at] ^ 0x01
    with open(path, "r+b") as f:
        f.write(bytes(data[: 8 + n]))


BEHIND_CASES = (
    "flip-data",
    "flip-header",
    "truncate",
    "unlink",
    "replace-copy",
    "symlink",
    "directory",
    "retire-source",
    "retire-at-open",
    "trash-at-open",
    "retire-at-link",
)


def behind_the_back(case: str, root: Path) -> dict[str, Any]:
    """Steps 1 and 2 saved incrementally (sharing the frozen part 0), then ``case`` done to step 2's part 0
    (the source of the next save), then step 3 saved. Returns what each checkpoint's verified load gave
    ("ok", "refused: <message>", or "wrong: <problems>") and whether step 3 shares part 0 with step 2."""
    manager = inc_manager(root, keep_last=None)
    inc_save(manager, 1)
    inc_save(manager, 2)
    part = PARTS[0]
    src, first = step_dir(root, 2) / part, step_dir(root, 1) / part
    assert same_file(src, first), "step 2 did not reuse step 1's frozen part"
    action: Callable[[], None] | None = None
    if case == "flip-data":
        _flip_data(src)
    elif case == "flip-header":
        _flip_header(src)
    elif case == "truncate":
        os.truncate(src, src.stat().st_size - 1)  # in place: step 1's entry is the same file
    elif case == "unlink":
        src.unlink()
    elif case == "replace-copy":  # a copy with a flipped data byte renamed over it (a new inode)
        tmp = src.with_name(".x")
        shutil.copyfile(src, tmp)
        _flip_data(tmp)
        os.replace(tmp, src)
    elif case == "symlink":  # a symbolic link to an intact copy in its place
        keep = root.parent / "intact.safetensors"
        shutil.copyfile(src, keep)
        src.unlink()
        src.symlink_to(keep)
    elif case == "directory":
        src.unlink()
        src.mkdir()
    elif case == "retire-source":  # the whole source checkpoint deleted before the save (latest stale)
        retire(step_dir(root, 2))
    elif case == "retire-at-open":  # deleted right after the writer opened the part it is about to link
        action = lambda: retire(step_dir(root, 2))  # noqa: E731
    elif case == "trash-at-open":  # renamed away (retention's first move) then, after the save, deleted
        action = lambda: os.rename(step_dir(root, 2), root / ".trash-step-00000002-x")  # noqa: E731
    elif case == "retire-at-link":  # deleted right before os.link (a last instant)
        real = os.link

        def link(*args: Any, **kwargs: Any) -> Any:
            if step_dir(root, 2).exists():
                retire(step_dir(root, 2))
            return real(*args, **kwargs)

        action = None
        os.link = link
    else:
        raise ValueError(case)
    try:
        hook = after_open(part, action, nth=1) if action is not None else contextlib.nullcontext([])
        with hook as opened:
            inc_save(manager, 3)
    finally:
        if case == "retire-at-link":
            os.link = real
    if case == "trash-at-open":
        shutil.rmtree(root / ".trash-step-00000002-x")
    out: dict[str, Any] = {"opened": list(opened), "shared": same_file(src, step_dir(root, 3) / part)}
    for step in (1, 2, 3):
        path = step_dir(root, step)
        if not (path / "manifest.json").is_file():
            out[step] = "absent"
            continue
        try:
            _, problems = inc_load(path)
            out[step] = "ok" if not problems else f"wrong: {problems}"
        except pc.CheckpointCorruptedError as e:
            out[step] = f"refused: {e}"
        except pc.CheckpointError as e:
            out[step] = f"refused ({type(e).__name__}): {e}"
    out["links"] = (step_dir(root, 3) / part).stat().st_nlink
    return out


# what a verified load of steps 1 and 2 must give after each case ("refused" names the damaged part)
BEHIND_EXPECT = {
    "flip-data": ("refused", "refused"),
    "flip-header": ("refused", "refused"),
    "truncate": ("refused", "refused"),
    "unlink": ("ok", "refused"),
    "replace-copy": ("ok", "refused"),
    "symlink": ("ok", "ok"),  # readers follow a symlink in place of a file (§4); the writer never links one
    "directory": ("ok", "refused"),
    "retire-source": ("ok", "absent"),
    "retire-at-open": ("ok", "absent"),
    "trash-at-open": ("ok", "absent"),
    "retire-at-link": ("ok", "absent"),
}
# cases where step 3 may share the damaged part (refused like its source, never loaded wrong): none on a
# local disk, where the writer re-hashes a source part before it links it (§21.3), so a data byte changed
# behind the back of a part whose size, header and manifest entry are intact is written afresh
PROPAGATES: tuple[str, ...] = ()


def behind_the_back_problems(case: str, root: Path) -> list[str]:
    """The promises for ``case`` (see :func:`behind_the_back`): nothing ever loads wrong values ("wrong:" in a
    finding: a silent corruption); a checkpoint whose part was damaged is refused naming the part; step 3 is
    whole and does not share the damaged or missing part, except in :data:`PROPAGATES`, where it may be
    refused too (naming the part), never loaded wrong."""
    got = behind_the_back(case, root)
    part = PARTS[0]
    problems = [f"{case}: step {s}: {got[s]}" for s in (1, 2, 3) if str(got[s]).startswith("wrong")]
    for s, want in zip((1, 2), BEHIND_EXPECT[case], strict=True):
        if not str(got[s]).startswith(want):
            problems.append(f"{case}: step {s}: expected {want}, got {got[s]}")
        elif want == "refused" and part not in str(got[s]):
            problems.append(f"{case}: step {s} refused without naming {part}: {got[s]}")
    if case in PROPAGATES and str(got[3]).startswith("refused"):
        if part not in str(got[3]):
            problems.append(f"{case}: step 3 refused without naming {part}: {got[3]}")
    elif got[3] != "ok":
        problems.append(f"{case}: step 3 is not whole: {got[3]}")
    elif got["shared"] and case not in PROPAGATES:
        problems.append(f"{case}: step 3 shares the damaged or missing part of step 2")
    return problems


# --------------------------------------------------------------------------------------------------
# retention racing an incremental writer
# --------------------------------------------------------------------------------------------------


def race_round(work: Path, steps: int, readers: int = 2, drop_every: int = 10) -> tuple[dict[str, int], TrialResult]:
    """An incremental writer (``steps`` saves, keep_last=2), a pruner (retention keep_last=1, drop_after the
    newest every ``drop_every`` rounds) and verifying readers on one root. Returns (counts, the findings by
    kind: ``lost``, ``silent``, ``unexpected``, ``other``)."""
    from faults.processes import fork_server

    server = fork_server()
    root, stop, done = work / "root", work / "stop", work / "done"
    jobs = [
        ["inc-writer", str(root), "--count", str(steps), "--wait", "--done-file", str(done)],
        ["inc-pruner", str(root), "--done-file", str(done), "--drop-every", str(drop_every), "--seconds", "60"],
        *[["inc-reader", str(root), "--stop-file", str(stop)]] * readers,
    ]
    root.mkdir(parents=True, exist_ok=True)
    results = server.run(jobs, work / "workers", stop_file=stop)  # readers last, once the stop file exists
    result = TrialResult("race", [], None)
    findings = result.other
    counts = {"loads": 0, "not_found": 0, "vanished": 0, "saves": 0, "reused": 0, "drops": 0, "retentions": 0}
    for (status, lines), job in zip(results, jobs, strict=True):
        if status != 0:
            findings.append(f"{job[0]} ended with status {status}: {lines[-3:]} {server.errors()[-1500:]}")
            continue
        if job[0] == "inc-writer":
            done_lines = [x.split() for x in lines if x.startswith("committed")]
            counts["saves"] += len(done_lines)
            counts["reused"] += sum(int(x[2]) for x in done_lines)  # parts hard-linked
            findings += [f"writer: {x}" for x in lines if x.startswith("{")]
        elif job[0] == "inc-pruner":
            r = json.loads(lines[-1])
            counts["drops"] += len(r["dropped"])
            counts["retentions"] += r["retained"]
            findings += [f"pruner: {e}" for e in r["errors"]]
        else:
            r = json.loads(lines[-1])
            counts["loads"] += r["loaded"]
            counts["not_found"] += r["not_found"]
            counts["vanished"] += r["vanished"]
            for b in r["bad"]:
                kind = (
                    result.silent
                    if re.match(r"step [0-9]+: ", b)
                    else result.unexpected
                    if b.startswith(("builtins.", "unexpected"))
                    else findings
                )
                kind.append(f"reader: {b}")
    lost, silent, unexpected = check_all(root)
    result.lost += lost
    result.silent += silent
    result.unexpected += unexpected
    if leftovers(root):
        findings.append(f"temporaries left once every process ended: {leftovers(root)}")
    try:
        manager = inc_manager(root)
        steps_now = manager.steps()
        nxt = (steps_now[-1] if steps_now else 0) + 1
        inc_save(manager, nxt)
        got, problems = inc_load(root)
        result.silent += [f"after the round, step {nxt}: {p}" for p in problems]
        if got != nxt:
            findings.append(f"after the round, saved {nxt} but the root loads {got}")
    except pc.CheckpointError as e:
        findings.append(f"after the round: {type(e).__name__}: {e}")
    return counts, result


# --------------------------------------------------------------------------------------------------
# S3
# --------------------------------------------------------------------------------------------------


def s3_reuse_problems(s3: Any, prefix: str, case: str) -> tuple[dict[str, Any], list[str]]:
    """Steps 1 and 2 saved incrementally into ``s3``'s ``prefix``; step 2 must reuse the frozen parts by
    CopyObject (no PutObject/UploadPart of their bytes). ``case`` "deleted"/"replaced": the source object of
    the first copy deleted (or replaced by a copy with a flipped data byte) right before that CopyObject:
    the save must still succeed and step 2 load whole."""
    from portable_ckpt.storage import FsspecStorage

    url = s3.url(prefix)
    root = FsspecStorage.from_location(url, storage_options=_s3_options(s3.endpoint))
    manager = inc_manager(root)
    inc_save(manager, 1)
    import boto3  # a synchronous client: the hook runs inside s3fs's event loop

    client = boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id="testing", aws_secret_access_key="testing")
    state: dict[str, Any] = {"changed": None}

    def before(op: str, params: Any) -> None:
        if op not in ("CopyObject", "UploadPartCopy") or state["changed"] or case == "plain":
            return
        source = params["CopySource"]
        bucket, key = (source["Bucket"], source["Key"]) if isinstance(source, dict) else source.split("/", 1)
        state["changed"] = key.rsplit("/", 1)[-1]
        if case == "deleted":
            client.delete_object(Bucket=bucket, Key=key)
        else:
            data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
            data[-1] ^= 0x40
            client.put_object(Bucket=bucket, Key=key, Body=bytes(data))

    with counted_s3_calls(before) as calls:
        inc_save(manager, 2)
    manager.close()
    info: dict[str, Any] = {"calls": calls}
    problems = []
    copies = calls.count("CopyObject") + calls.count("UploadPartCopy")
    info["copies"] = copies
    obj = s3.objects(prefix)
    same = [p for p in PARTS if obj.get(f"step-00000001/{p}") == obj.get(f"step-00000002/{p}") is not None]
    info["same"] = same
    if case == "plain":
        if copies < len(reusable(1, 2)):
            problems.append(f"{copies} server-side copies for {len(reusable(1, 2))} unchanged parts: {calls}")
        for p in reusable(1, 2):
            a, b = s3.read(prefix, f"step-00000001/{p}"), s3.read(prefix, f"step-00000002/{p}")
            if a is None or a != b:
                problems.append(f"{p} of step 2 differs from step 1's")
        if calls.count("PutObject") > len(PARTS) - len(reusable(1, 2)) + 8:  # the other files, the marker, latest
            problems.append(f"too many uploads for a save that reuses {reusable(1, 2)}: {calls}")
    for step in (1, 2) if case == "plain" else (2,):
        try:
            _, wrong = inc_load(f"{url}/step-{step:08d}")
            problems += [f"{case}: step {step}: {p}" for p in wrong]
        except pc.CheckpointError as e:
            problems.append(f"{case}: step {step} does not load: {type(e).__name__}: {e}")
    info["changed"] = state["changed"]
    if case != "plain" and not state["changed"]:
        problems.append(f"{case}: no server-side copy was tried: {calls}")
    if case == "replaced" and state["changed"]:  # step 1's part really is damaged now: refused, naming it
        try:
            inc_load(f"{url}/step-00000001")
            problems.append("replaced: step 1 loads although its part was replaced with damaged bytes")
        except pc.CheckpointCorruptedError as e:
            if state["changed"] not in str(e):
                problems.append(f"replaced: step 1 refused without naming {state['changed']}: {e}")
    return info, problems


def s3_job(s3: Any, prefix: str, *, kill_op: int = 0, kill_after: float = 0.0) -> list[str]:
    """The fork server job of an incremental S3 writer (the step after the newest of ``prefix``)."""
    return [
        "inc-s3-writer",
        s3.url(prefix),
        "--endpoint",
        s3.endpoint,
        "--kill-op",
        str(kill_op),
        "--kill-after",
        f"{kill_after:.4f}",
    ]


def s3_inc_crash_trial(
    server: Any,
    s3: Any,
    prefix: str,
    rng: random.Random,
    *,
    calls: int,
    seconds: float,
    workdir: Path,
    kill_op: int = 0,
) -> TrialResult:
    """One kill trial of an incremental save into the S3 root ``prefix`` (holding the steps earlier trials
    left): killed before a random S3 call (``kill_op``, when given) or after a random delay. Then ``latest`` names the old or the new
    step, every committed step loads verified with its values, and the next manager removes every leftover."""
    from faults.remote import _committed, _step_of_latest, check_after_kill
    from portable_ckpt.format import names

    before = s3.objects(prefix)
    latest_before = _step_of_latest(s3.read(prefix, names.LATEST))
    step = (_committed(before)[-1] if _committed(before) else 0) + 1
    if kill_op or rng.random() < 0.5:
        kill_op, kill_after = kill_op or rng.randint(1, calls), 0.0
        mode = f"kill@call{kill_op}"
    else:
        kill_op, kill_after = 0, rng.uniform(0.0, seconds)
        mode = f"kill@{kill_after:.3f}s"
    [(status, _)] = server.run([s3_job(s3, prefix, kill_op=kill_op, kill_after=kill_after)], workdir)
    result = TrialResult(mode, [step] if status == 0 else [], None)
    if status not in (0, -signal.SIGKILL):
        result.other.append(f"the writer failed ({status}): {server.errors()[-1500:]}")
    check_after_kill(
        s3,
        prefix,
        result,
        step=step,
        saved=status == 0,
        before=before,
        latest_before=latest_before,
        load=inc_load,
        reopen=inc_manager,
    )
    return result
