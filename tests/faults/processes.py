"""Child processes: a fork server that imports torch and the library once and forks the workers of the
crash, disk-full and concurrency tests on request, and the command line that starts it and its roles.

    python tests/faults ROLE ...      (or, with tests/ on sys.path, python -m faults ROLE ...)

Every reply of the server is awaited for at most :data:`REPLY_SECONDS`; a server that goes silent is
killed with all its workers (its own process group), so a hung worker fails a test instead of hanging it.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from faults.roles import (
    crash_writer,
    role_kill_writer,
    role_reader,
    role_rewinder,
    role_rlimit_writer,
    role_s3_writer,
    role_writer,
    say,
)
from faults.states import WRITER_OFFSETS, load_values, save_step

PACKAGE_DIR = Path(__file__).resolve().parent  # run as a script: python tests/faults ROLE ...
REPLY_SECONDS = 300.0  # the longest a request may take (a concurrency round takes seconds)


def spawn(*args: str, stderr: Any = subprocess.PIPE) -> subprocess.Popen[bytes]:
    """Start ``python tests/faults ARGS`` in a session of its own, so it and every process it forks can be
    killed together (one thread per BLAS/OpenMP pool: the tests run many at once). Works from any working
    directory: the package is found by its absolute path."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(PACKAGE_DIR), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
        env=env,
        start_new_session=True,
    )


class ForkServer:
    """A child process that imports torch and the library once, then forks worker processes on request, so
    that a worker costs a fork rather than an interpreter start and a torch import (seconds of CPU each).

    Workers are real, separate processes: they run the roles of :func:`main` (writers, readers, the
    disk-full writer) or a crash trial's writer, and die, or are killed, on their own.
    """

    def __init__(self) -> None:
        self.log = tempfile.TemporaryFile("w+", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.proc = spawn("fork-server", stderr=self.log)
        self._pending = b""
        self._expect("ready")

    def _send(self, request: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request).encode("utf-8") + b"\n")
        self.proc.stdin.flush()

    def _readline(self, timeout: float) -> str:
        """The server's next line ("" at its end); a server silent for ``timeout`` s is killed."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        end = time.monotonic() + timeout
        while b"\n" not in self._pending:
            left = end - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self.kill()
                raise TimeoutError(f"the fork server gave no answer in {timeout:.0f} s; killed: {self.errors()}")
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line.decode("utf-8").strip()

    def _expect(self, word: str) -> Any:
        line = self._readline(REPLY_SECONDS)
        if not line.startswith(word):
            raise RuntimeError(f"fork server said {line!r}, expected {word!r}: {self.errors()}")
        rest = line[len(word) :].strip()
        return json.loads(rest) if rest else None

    def errors(self) -> str:
        """What the server and its workers wrote to stderr (tracebacks)."""
        self.log.seek(0)
        return self.log.read()[-4000:]

    def run(
        self, jobs: Sequence[Sequence[str]], workdir: Path, *, stop_file: Path | None = None
    ) -> list[tuple[int, list[str]]]:
        """Fork one worker per job (a role of :func:`main` and its arguments), release them all at once, and
        wait for them; returns (exit status, output lines) per job. Readers are waited for last, after
        ``stop_file`` is created (so a reader ends even if it never sees what it waits for)."""
        workdir.mkdir(parents=True, exist_ok=True)
        outs = [workdir / f"worker{i}.out" for i in range(len(jobs))]
        self._send(
            {
                "jobs": [list(j) for j in jobs],
                "outs": [str(o) for o in outs],
                "stop": str(stop_file) if stop_file else None,
            }
        )
        statuses = self._expect("statuses")
        return [
            (status, out.read_text(encoding="utf-8").splitlines()) for status, out in zip(statuses, outs, strict=True)
        ]

    def start_crash_writer(self, root: Path, steps: int, kill_op: int, fifo: Path) -> int:
        """Fork a crash trial's writer (:func:`faults.roles.crash_writer`); its pid, for :meth:`wait`."""
        self._send({"trial": {"root": str(root), "steps": steps, "kill_op": kill_op, "fifo": str(fifo)}})
        pid: int = self._expect("pid")
        return pid

    def wait(self, pid: int) -> int:
        """The exit status of a crash trial's writer (negative: the signal that killed it)."""
        self._send({"wait": pid})
        status: int = self._expect("status")
        return status

    def preload(self, modules: Sequence[str]) -> None:
        """Import ``modules`` in the server, so that every worker forked after inherits them."""
        self._send({"preload": list(modules)})
        self._expect("preloaded")

    def kill(self) -> None:
        """SIGKILL the server and every worker it forked (they share its process group)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


_SERVER: list[ForkServer] = []


def fork_server() -> ForkServer:
    """The fork server of this process (started on first use, closed at exit)."""
    if not _SERVER or _SERVER[0].proc.poll() is not None:
        _SERVER[:] = [ForkServer()]
        atexit.register(_SERVER[0].close)
    return _SERVER[0]


def _worker(body: Callable[[], None], *, stdin_fd: int | None = None, stdout_path: str | None = None) -> None:
    """The life of a forked worker: rewire stdin/stdout, run ``body``, and exit without returning."""
    code = 0
    try:
        if stdin_fd is not None:
            os.dup2(stdin_fd, 0)
            sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115 - lives as long as the process
        if stdout_path is not None:
            fd = os.open(stdout_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            sys.stdout = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
        body()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # a worker reports every failure on stderr, then exits
        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _fork_jobs(request: dict[str, Any]) -> list[int]:
    """Fork the workers of a "jobs" request, release them together, wait; their exit statuses."""
    workers = []
    for argv, out in zip(request["jobs"], request["outs"], strict=True):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(w)
            _worker(lambda argv=argv: main(argv), stdin_fd=r, stdout_path=out)
        os.close(r)
        workers.append((pid, w, argv[0].endswith("reader")))  # "reader", "inc-reader"
    for _, w, _ in workers:  # every worker is forked and waits for this line: release them together
        os.write(w, b"go\n")
        os.close(w)
    statuses = {}
    for pid, _, reader in workers:
        if not reader:
            statuses[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if request["stop"]:
        Path(request["stop"]).touch()
    for pid, _, reader in workers:
        if reader:
            statuses[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    return [statuses[pid] for pid, _, _ in workers]


def role_fork_server(args: argparse.Namespace) -> None:
    # warm up: the first save and load of a process import and initialise parts of torch lazily (about a
    # second); done once here, every forked worker inherits them. No thread outlives this warm-up.
    with tempfile.TemporaryDirectory() as scratch:
        load_values(save_step(Path(scratch), 1))
    say("ready")
    for line in sys.stdin:
        request = json.loads(line)
        if "jobs" in request:
            say(f"statuses {json.dumps(_fork_jobs(request))}")
        elif "preload" in request:  # modules a kind of worker needs, imported once (no threads start)
            for module in request["preload"]:
                __import__(module)
            say("preloaded")
        elif "wait" in request:
            say(f"status {os.waitstatus_to_exitcode(os.waitpid(request['wait'], 0)[1])}")
        else:
            t = request["trial"]
            pid = os.fork()
            if pid == 0:
                _worker(lambda t=t: crash_writer(Path(t["root"]), t["steps"], t["kill_op"], t["fifo"]))
            say(f"pid {pid}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python tests/faults", description="child processes of the fault tests")
    sub = parser.add_subparsers(dest="role", required=True)
    p = sub.add_parser("fork-server")
    p.set_defaults(run=role_fork_server)
    p = sub.add_parser("rlimit-writer")
    p.add_argument("root")
    p.set_defaults(run=role_rlimit_writer)
    p = sub.add_parser("writer")
    p.add_argument("root")
    p.add_argument("--steps", required=True)
    p.add_argument("--name", default="main", choices=sorted(WRITER_OFFSETS))
    p.add_argument("--keep-last", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=role_writer)
    p = sub.add_parser("kill-writer")
    p.add_argument("root")
    p.add_argument("--step", type=int, required=True)
    p.add_argument("--name", default="main", choices=sorted(WRITER_OFFSETS))
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--kill-op", type=int, required=True)
    p.set_defaults(run=role_kill_writer)
    p = sub.add_parser("s3-writer")
    p.add_argument("root")
    p.add_argument("--endpoint", required=True)
    p.add_argument("--step", type=int, required=True)
    p.add_argument("--kill-op", type=int, default=0)
    p.add_argument("--kill-after", type=float, default=0.0)
    p.add_argument("--block-size", type=int, default=5 << 20)
    p.set_defaults(run=role_s3_writer)
    p = sub.add_parser("rewinder")
    p.add_argument("root")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--rewind-every", type=int, default=6)
    p.add_argument("--keep-last", type=int, default=0)
    p.set_defaults(run=role_rewinder)
    p = sub.add_parser("reader")
    p.add_argument("root")
    p.add_argument("--until-step", type=int, default=None)
    p.add_argument("--stop-file", required=True)
    p.add_argument("--check-latest", action="store_true")
    p.add_argument("--no-verify", action="store_true")
    p.set_defaults(run=role_reader)
    from faults.incremental import add_roles  # here: faults.incremental imports this module

    add_roles(sub)  # inc-writer, inc-pruner, inc-reader, inc-s3-writer
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
