"""Disk full and failing I/O during a save: the save raises CheckpointWriteError carrying the OS error,
and the root is left as it was: earlier checkpoints and ``latest`` intact and loadable, no temporary left.

Faults come from three places: a real per-file size limit (RLIMIT_FSIZE, in a child process, so writes
fail with EFBIG), failing ``os.write``/``os.fsync``/``os.open``/``os.mkdir``/``os.rename``/``os.replace``
calls injected at named points of the commit protocol, and a sweep that fails every such call of a save
in turn.
"""

from __future__ import annotations

import errno
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import faults
import pytest

import portable_ckpt as pc

TMP = r"/\.tmp-step-[^/]+"


@dataclass(frozen=True)
class Point:
    id: str
    op: str
    match: str
    nth: int = 1
    errno: int | None = None
    partial: bool = False


POINTS = [
    Point("mkdir-temporary-directory", "mkdir", TMP + "$"),
    Point("create-model.safetensors", "open", TMP + r"/model\.safetensors$"),
    *[Point(f"write-{name}", "write", f"{TMP}/{name.replace('.', '[.]')}$") for name in faults.FILES],
    Point("write-model.safetensors-short-then-ENOSPC", "write", TMP + r"/model\.safetensors$", partial=True),
    Point("write-model.safetensors-EDQUOT", "write", TMP + r"/model\.safetensors$", errno=errno.EDQUOT),
    Point("write-optimizer.pt-EFBIG", "write", TMP + r"/optimizer\.pt$", errno=errno.EFBIG),
    Point("write-optimizer.pt-3rd-call", "write", TMP + r"/optimizer\.pt$", nth=3),
    *[
        Point(f"fsync-{name}", "fsync", f"{TMP}/{name.replace('.', '[.]')}$")
        for name in ("model.safetensors", "optimizer.pt", "rng.json", "manifest.json")
    ],
    Point("fsync-temporary-directory", "fsync", TMP + "$"),
    Point("rename-commit", "rename", TMP + r" -> .*/step-[0-9]+$"),
    Point("write-latest", "write", r"/\.tmp-latest-[^/]+$"),
    Point("replace-latest", "replace", r"/\.tmp-latest-[^/]+ -> .*/latest$"),
    # one fsync of the root makes the commit rename and the new `latest` durable together
    Point("fsync-root-after-commit-and-latest", "fsync", r"/root$", nth=1),
]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root holding steps 1 and 2 (latest -> step 2), saved through CheckpointManager(keep_last=2)."""
    root = tmp_path_factory.mktemp("template") / "root"
    manager = pc.CheckpointManager(root, keep_last=2)
    faults.save_step(manager, 1)
    faults.save_step(manager, 2)
    manager.close()
    return root


def prepared_root(template: Path, where: Path) -> tuple[Path, pc.CheckpointManager]:
    """A copy of the template root at ``where/root``, opened by a manager."""
    root = where / "root"
    shutil.copytree(template, root)
    return root, pc.CheckpointManager(root, keep_last=2)


def attempt(manager: pc.CheckpointManager, step: int) -> BaseException | None:
    try:
        faults.save_step(manager, step)
    except Exception as e:  # its type is what the test checks
        return e
    return None


def root_problems(root: Path) -> list[str]:
    """How ``root`` differs from its state before the failed save of step 3 (steps 1, 2; latest -> 2)."""
    problems = []
    if faults.leftovers(root):
        problems.append(f"temporaries left behind: {faults.leftovers(root)}")
    steps = sorted(int(p.name[5:]) for p in root.glob("step-*") if (p / "manifest.json").is_file())
    if steps != [1, 2]:
        problems.append(f"committed steps are {steps}, expected [1, 2] (nothing committed)")
    if faults.latest_name(root) != "step-00000002":
        problems.append(f"latest is {faults.latest_name(root)!r}, expected 'step-00000002'")
    for path, step in ((root, 2), (root / "step-00000001", 1)):
        try:
            loaded = faults.load_values(path)
            if loaded != (step, []):
                problems.append(f"checkpoint lost: {path.name}: loaded {loaded}")
        except pc.CheckpointError as e:
            problems.append(f"checkpoint lost: {path.name}: {type(e).__name__}: {e}")
    return problems


@pytest.mark.parametrize("point", POINTS, ids=lambda p: p.id)
def test_failed_save_leaves_the_root_as_it_was(point: Point, template: Path, tmp_path: Path) -> None:
    root, manager = prepared_root(template, tmp_path)
    inj = faults.Injector(
        ops=(point.op,), match=point.match, fail_at=point.nth, errno=point.errno, partial=point.partial
    )
    with inj.installed():
        error = attempt(manager, 3)
    assert inj.failed, f"the fault was never injected; calls seen: {inj.calls}"
    code = point.errno or faults.IO_ERRNO[point.op]
    assert isinstance(error, pc.CheckpointWriteError), f"{type(error).__module__}.{type(error).__qualname__}: {error}"
    assert isinstance(error, OSError) and error.errno == code, (error.errno, code)
    assert errno.errorcode[code] in str(error) and "nothing was committed" in str(error)
    assert root_problems(root) == []
    # the root is usable: the same step saves now, and retention goes on
    assert attempt(manager, 3) is None
    assert manager.steps() == [2, 3]
    assert faults.load_values(root) == (3, [])


def test_failed_retention_after_a_commit_is_a_checkpoint_error(template: Path, tmp_path: Path) -> None:
    """Deleting the oldest checkpoint fails (EIO on the rename to .trash-): step 3 is committed; the error,
    if any, must be a CheckpointWriteError, and every checkpoint stays loadable."""
    root, manager = prepared_root(template, tmp_path)
    inj = faults.Injector(ops=("rename",), match=r"/step-[0-9]+ -> .*/\.trash-[^/]+$", fail_at=1)
    with inj.installed():
        error = attempt(manager, 3)
    assert inj.failed, inj.calls
    assert error is None or isinstance(error, pc.CheckpointWriteError), (
        f"{type(error).__module__}.{type(error).__qualname__}: {error}"
    )
    assert faults.latest_name(root) == "step-00000003"
    assert faults.leftovers(root) == []
    for step in manager.steps():
        assert faults.load_values(root / f"step-{step:08d}") == (step, [])


def test_failed_async_save_reports_through_its_handle(template: Path, tmp_path: Path) -> None:
    root, manager = prepared_root(template, tmp_path)
    inj = faults.Injector(ops=("write",), match=TMP + r"/model\.safetensors$", fail_at=1)
    model, opt, sched = faults.make_state(3)
    with inj.installed():
        handle = manager.save(model, opt, faults.config_for(3), faults.VOCAB, 3, scheduler=sched, blocking=False)
        with pytest.raises(pc.CheckpointWriteError) as info:
            handle.wait()
    assert info.value.errno == errno.ENOSPC
    assert root_problems(root) == []
    assert attempt(manager, 3) is None  # the failure was delivered once, through the handle
    assert manager.steps() == [2, 3]
    manager.close()


def sample(calls: list[str]) -> list[int]:
    """1-based numbers of the calls worth failing in the default suite: every call but the repeats of a
    write to one file (torch.save writes a .pt file in dozens of small pieces)."""
    return [i + 1 for i, call in enumerate(calls) if not (call.startswith("write") and i and calls[i - 1] == call)]


def sweep_problems(template: Path, tmp_path: Path, *, every: bool = False) -> tuple[int, list[str]]:
    """Fail the I/O calls of one save of step 3 into a copy of ``template`` in turn (``every`` call, or a
    :func:`sample`); (calls failed, what went wrong)."""
    _, manager = prepared_root(template, tmp_path / "count")
    with faults.Injector().installed() as counter:
        faults.save_step(manager, 3)
    problems = []
    numbers = range(1, len(counter.calls) + 1) if every else sample(counter.calls)
    for n in numbers:
        root, manager = prepared_root(template, tmp_path / f"n{n}")
        inj = faults.Injector(fail_at=n)
        with inj.installed():
            error = attempt(manager, 3)
        call = inj.failed[-1].replace(f"{tmp_path}/", "") if inj.failed else f"call {n} (never reached)"
        where = f"failing {call}"
        committed = (root / "step-00000003" / "manifest.json").is_file()
        if error is None:
            if not committed:
                problems.append(f"{where}: the save reported success but step 3 is not committed")
        elif not isinstance(error, pc.CheckpointWriteError):
            problems.append(f"{where}: raised {type(error).__module__}.{type(error).__qualname__}: {str(error)[:100]}")
        elif not inj.failed or error.errno != faults.IO_ERRNO[call.split()[0]]:
            problems.append(f"{where}: errno {error.errno}")
        elif committed and "nothing was committed" in str(error):
            problems.append(f"{where}: says nothing was committed, but step 3 is committed")
        elif not committed:
            problems += [f"{where}: {p}" for p in root_problems(root)]
        if faults.leftovers(root):
            problems.append(f"{where}: temporaries left behind: {faults.leftovers(root)}")
        shutil.rmtree(root.parent)
    return len(numbers), problems


def test_every_io_call_of_a_save_failing_in_turn(template: Path, tmp_path: Path) -> None:
    swept, problems = sweep_problems(template, tmp_path)
    assert swept > 30  # the writes of each file, every fsync, create, mkdir and rename of a save
    assert not problems, "\n".join(problems)


def test_disk_full_from_a_real_file_size_limit(tmp_path: Path) -> None:
    """RLIMIT_FSIZE in a child (SIGXFSZ ignored, so write fails with EFBIG) at limits that stop the save in
    model.safetensors, optimizer.pt, scheduler.pt and rng.safetensors, at their start and midway."""
    server = faults.fork_server()
    [(status, lines)] = server.run([["rlimit-writer", str(tmp_path / "roots")]], tmp_path)
    assert status == 0, server.errors()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert lines[-1] == "done" and len(records) >= 8
    problems = []
    for r in records:
        if r["outcome"] != "CheckpointWriteError" or r.get("errno") != errno.EFBIG or "EFBIG" not in r["message"]:
            problems.append(f"limit {r['limit']}: {r['outcome']} (errno {r.get('errno')}): {r['message']}")
        elif r["message"].endswith(": None"):  # write(2) errors carry no file name; OSError then prints "None"
            problems.append(f"limit {r['limit']}: the message ends in ': None': {r['message']}")
        if (r["steps"], r["latest"], r["leftovers"], r["loaded"], r["problems"]) != (
            [1, 2],
            "step-00000002",
            [],
            2,
            [],
        ):
            problems.append(f"limit {r['limit']}: root not as before: {r}")
    assert not problems, "\n".join(problems)
