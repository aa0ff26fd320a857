"""Helper threads that degrade to running inline.

A background save may still be running while the interpreter shuts down (it is allowed to finish);
from then on new threads cannot be started, so the work runs on the calling thread instead.
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

# Threads for the files of one save or load (and the pieces of a large file's read): half the cores, at
# most 4, since every writer has a hashing thread behind it and training goes on beside a background save
# (on 2 busy cores, 2 writers measured slower than 1); PORTABLE_CKPT_IO_THREADS overrides it (1: one file
# at a time, on the calling thread).
_ENV_THREADS = "PORTABLE_CKPT_IO_THREADS"


def io_threads() -> int:
    """How many threads a save or load may use for its files and pieces."""
    value = os.environ.get(_ENV_THREADS, "")
    if value.strip().isdigit() and int(value) > 0:
        return int(value)
    return max(1, min(4, (os.cpu_count() or 1) // 2))


def submit(pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> Future[T]:
    try:
        return pool.submit(fn, *args)
    except RuntimeError:  # "cannot schedule new futures after interpreter shutdown"
        done: Future[T] = Future()
        try:
            done.set_result(fn(*args))
        except BaseException as e:
            done.set_exception(e)
        return done


class Trailing:
    """Tasks run in order on one helper thread behind the caller, which never waits for it to wake up.

    ``put`` queues a task (or runs it at once when nothing is queued and ``inline``); ``finish`` runs
    whatever the helper has not reached yet on the calling thread. On a busy machine a woken thread can
    wait several milliseconds for a core: a caller that waited for each task's result paid that latency
    per task (3x a save's time when one core was taken), while here it pays none. Tasks run one at a
    time, in the order given, under one lock. Use as a context manager; leaving it unfinished drops the
    tasks not yet run.

    >>> with Trailing("hash") as behind:  # doctest: +SKIP
    ...     behind.put(h.update, view)
    ...     behind.finish()
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._tasks: collections.deque[tuple[Callable[..., Any], tuple[Any, ...]]] = collections.deque()
        self._run = threading.Lock()  # held while a task is taken and run: order and one at a time
        self._wake = threading.Condition(threading.Lock())
        self._closed = False
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def __enter__(self) -> Trailing:
        return self

    def __exit__(self, *exc: object) -> None:
        self._tasks.clear()
        self._close()

    def put(self, fn: Callable[..., Any], *args: Any, inline: bool = False) -> None:
        if inline and not self._tasks and self._run.acquire(blocking=False):
            try:  # nothing queued nor running: running it here keeps the order
                fn(*args)
            finally:
                self._run.release()
            return
        self._tasks.append((fn, args))
        if self._thread is None:
            thread = threading.Thread(target=self._helper, name=f"portable-ckpt-{self._name}", daemon=True)
            try:
                thread.start()
            except RuntimeError:  # interpreter shutdown: the caller runs everything in finish()
                self._closed = True
                return
            self._thread = thread
        with self._wake:
            self._wake.notify()

    def drain(self) -> None:
        """Run every queued task now (on this thread, or wait for the one the helper is running)."""
        while True:
            with self._run:
                if self._error is not None:
                    raise self._error
                try:
                    fn, args = self._tasks.popleft()
                except IndexError:
                    return
                fn(*args)

    def finish(self) -> None:
        """Run what is left and stop the helper; re-raises a task's error."""
        try:
            self.drain()
        finally:
            self._close()

    def _close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()

    def _helper(self) -> None:
        while True:
            with self._wake:
                while not self._tasks and not self._closed:
                    self._wake.wait()
                if not self._tasks:
                    return
            with self._run:
                if self._error is not None:
                    return
                try:
                    fn, args = self._tasks.popleft()
                except IndexError:
                    continue
                try:
                    fn(*args)
                except BaseException as e:  # re-raised on the caller's thread by drain()
                    self._error = e
                    return
