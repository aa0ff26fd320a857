"""What the child processes of the fault tests do: the roles the fork server's workers run (writers,
readers, the disk-full writer, a writer that kills itself mid-save) and a crash trial's writer. Each
reports on stdout, one line (mostly JSON) per result; :mod:`faults.processes` starts them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import portable_ckpt as pc
from faults.inject import Injector
from faults.states import FILES, latest_name, leftovers, load_values, save_step, writer_loop


def say(line: str) -> None:
    print(line, flush=True)


def wait_for_go() -> None:
    """Block until the fork server releases every worker of a run at once."""
    if sys.stdin.readline().strip() != "go":
        raise SystemExit(3)


def crash_writer(root: Path, steps: int, kill_op: int, fifo: str) -> None:
    """A crash trial's writer: :func:`writer_loop` reporting each step on the named pipe ``fifo``; with
    ``kill_op`` it SIGKILLs itself just before that I/O call on the root, else it waits to be killed."""
    with open(fifo, "w", encoding="utf-8") as progress:

        def report(line: str) -> None:
            progress.write(line + "\n")
            progress.flush()

        kill = Injector(kill_at=kill_op, match=re.escape(str(root))).installed()  # calls on the root only
        with kill if kill_op else contextlib.nullcontext():
            writer_loop(root, steps, report=report)
        if kill_op:
            os.kill(os.getpid(), signal.SIGKILL)  # the kill point lay past the last save: die now
        report("finished")
        signal.pause()  # "begin" mode: wait for the parent's SIGKILL


def role_rlimit_writer(args: argparse.Namespace) -> None:
    """For each per-file size limit, in a fresh copy of a root holding steps 1 and 2: save step 3 with the
    limit in force (so some write fails with EFBIG), then report what the root looks like."""
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills us instead of failing write
    base = Path(args.root)
    pristine = base / "pristine"
    manager = pc.CheckpointManager(pristine, keep_last=2)
    for step in (1, 2):
        save_step(manager, step)
    sizes = {n: (pristine / "step-00000002" / n).stat().st_size for n in FILES}
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    limits = sorted({0, 1, 7, 8, 100} | {s - 1 for s in sizes.values()} | {s // 2 for s in sizes.values()})
    for limit in (x for x in limits if x < max(sizes.values())):
        root = base / f"limit-{limit}"
        shutil.copytree(pristine, root)
        manager = pc.CheckpointManager(root, keep_last=2)
        record: dict[str, Any] = {"limit": limit}
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        try:
            save_step(manager, 3)
            record["outcome"] = "saved"
        except pc.CheckpointWriteError as e:
            record.update(outcome="CheckpointWriteError", errno=e.errno, message=str(e))
        except Exception as e:  # reported to the parent, which fails the test
            record.update(outcome=f"{type(e).__module__}.{type(e).__qualname__}", message=str(e)[:300])
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        record["steps"] = manager.steps()
        record["latest"] = latest_name(root)
        record["leftovers"] = leftovers(root)
        try:
            record["loaded"], record["problems"] = load_values(root)
        except pc.CheckpointError as e:
            record["loaded"], record["problems"] = None, [f"{type(e).__name__}: {e}"]
        say(json.dumps(record))
    say("done")


def role_writer(args: argparse.Namespace) -> None:
    """Saves the given steps (save_checkpoint, or a manager with retention) once the parent says go."""
    root = Path(args.root)
    steps = [int(s) for s in args.steps.split(",")]
    manager = pc.CheckpointManager(root, keep_last=args.keep_last) if args.keep_last else None
    wait_for_go()
    for step in steps:
        try:
            save_step(manager if manager is not None else root, step, args.name, overwrite=args.overwrite)
            say(json.dumps({"step": step, "outcome": "saved"}))
        except pc.CheckpointError as e:
            say(json.dumps({"step": step, "outcome": type(e).__name__, "message": str(e)}))
        except Exception as e:  # reported to the parent, which fails the test
            say(
                json.dumps(
                    {
                        "step": step,
                        "outcome": f"unexpected {type(e).__module__}.{type(e).__qualname__}",
                        "message": str(e),
                    }
                )
            )
    say("done")


def role_kill_writer(args: argparse.Namespace) -> None:
    """Saves one step (save_checkpoint) and SIGKILLs itself just before its ``--kill-op``-th I/O call."""
    root = Path(args.root)
    with Injector(kill_at=args.kill_op, match=re.escape(str(root))).installed() as inj:
        save_step(root, args.step, args.name, overwrite=args.overwrite)
    say(json.dumps(inj.calls))


def role_s3_writer(args: argparse.Namespace) -> None:
    """Saves one step into an S3 root through CheckpointManager(keep_last=2), SIGKILLing itself just before
    its ``--kill-op``-th S3 API call (0: never), or ``--kill-after`` seconds after it began (a moment inside
    any request: mid-upload); prints the API calls it made (one JSON list) if it lives to the end."""
    import threading

    import aiobotocore.client

    from portable_ckpt.storage import FsspecStorage

    calls: list[str] = []
    real = aiobotocore.client.AioBaseClient._make_api_call

    async def counted(self: Any, operation_name: str, api_params: Any) -> Any:
        calls.append(operation_name)
        if len(calls) == args.kill_op:
            os.kill(os.getpid(), signal.SIGKILL)
        return await real(self, operation_name, api_params)

    setattr(aiobotocore.client.AioBaseClient, "_make_api_call", counted)  # noqa: B010 -- a patch, in this process only
    options = {
        "endpoint_url": args.endpoint,
        "key": "testing",
        "secret": "testing",
        "skip_instance_cache": True,
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 5, "read_timeout": 30},
    }
    root = FsspecStorage.from_location(args.root, storage_options=options, block_size=args.block_size)
    if args.kill_after > 0:
        timer = threading.Timer(args.kill_after, lambda: os.kill(os.getpid(), signal.SIGKILL))
        timer.daemon = True
        timer.start()
    manager = pc.CheckpointManager(root, keep_last=2)
    save_step(manager, args.step)
    manager.close()
    say(json.dumps(calls))


def role_rewinder(args: argparse.Namespace) -> None:
    """Saves steps 1..--steps through a manager with retention, and every ``--rewind-every`` steps drops the
    newest half of them (``drop_after``) and saves them again: readers race saves, retention and rewinds."""
    root = Path(args.root)
    manager = pc.CheckpointManager(root, keep_last=args.keep_last or None)
    wait_for_go()
    step, saved = 1, 0
    while step <= args.steps:
        try:
            save_step(manager, step)
            say(json.dumps({"step": step, "outcome": "saved"}))
        except pc.CheckpointError as e:
            say(json.dumps({"step": step, "outcome": type(e).__name__, "message": str(e)}))
        except Exception as e:  # reported to the parent, which fails the test
            say(
                json.dumps(
                    {
                        "step": step,
                        "outcome": f"unexpected {type(e).__module__}.{type(e).__qualname__}",
                        "message": str(e),
                    }
                )
            )
        saved += 1
        if saved % args.rewind_every == 0 and saved < 3 * args.steps:
            back = max(0, step - args.rewind_every // 2)
            manager.drop_after(back)
            step = back + 1
        else:
            step += 1
    manager.close()
    say("done")


def role_reader(args: argparse.Namespace) -> None:
    """Loads ``root`` (a root, or one checkpoint) in a loop until it sees ``--until-step`` or the stop file
    appears; prints counts: complete loads, CheckpointNotFoundError, and everything else ("bad")."""
    root = Path(args.root)
    counts: dict[str, Any] = {"loaded": 0, "not_found": 0, "latest_checked": 0, "bad": [], "steps": []}
    wait_for_go()
    while True:
        if args.check_latest:  # without retention, `latest` must always name a complete checkpoint
            name = latest_name(root)
            if name:
                counts["latest_checked"] += 1
                try:
                    _, problems = load_values(root / name)
                    if problems:
                        counts["bad"].append(f"latest -> {name}: {'; '.join(problems)}")
                except Exception as e:  # every failure here is a finding
                    counts["bad"].append(f"latest -> {name}: {type(e).__module__}.{type(e).__qualname__}: {e}")
        try:
            step, problems = load_values(root, verify=not args.no_verify)
            counts["loaded"] += 1
            counts["steps"].append(step)
            if problems:  # one entry per load
                counts["bad"].append(f"step {step}: {'; '.join(problems)}")
            if args.until_step is not None and step >= args.until_step:
                break
        except pc.CheckpointNotFoundError:
            counts["not_found"] += 1
        except Exception as e:  # every other failure is a finding
            counts["bad"].append(f"{type(e).__module__}.{type(e).__qualname__}: {e}")
        if os.path.exists(args.stop_file):
            break
    counts["distinct_steps"] = len(set(counts.pop("steps")))
    say(json.dumps(counts))
