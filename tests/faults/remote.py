"""Remote roots under fault injection: S3 (moto's server on loopback) and ``memory://``.

- :func:`s3_crash_trial`: a process saving one step into an S3 root is SIGKILLed just before a random one
  of its S3 API calls (every phase: the pending marker, each PUT or multipart part, the manifest, ``latest``,
  retention's deletes) or after a random delay (inside a request: mid-upload). Then: ``latest`` is unchanged
  or names the new step, complete; the committed steps a save may not touch are unchanged; every
  committed step loads with its values; the root loads a committed step no older than ``latest`` was; the
  next CheckpointManager removes every leftover (pending markers, manifest-less steps).
- :func:`read_fault_problems`: an object of the newest checkpoint truncated, replaced or deleted between
  the listing and the reading (hooked at the directory listing, at the open of the file, at its first
  ranged GET), and :func:`latest_fault_problems`: a ``latest`` that names a step without a manifest (a
  partial upload, a missing step, a step whose manifest retention already deleted) or is garbage. The
  promise: a CheckpointError naming the object (or ``latest``), or the values of a committed step, never a
  silent load of anything else; ``restore(fall_back=True)`` falls back to the previous committed step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import signal
import socket
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import portable_ckpt as pc
from faults.crash import TrialResult
from faults.processes import ForkServer
from faults.states import FILES, load_values, make_state, preserved_rng, save_step, state_problems
from portable_ckpt.format import names
from portable_ckpt.storage import MemoryStorage
from portable_ckpt.storage.memory import STORE, MemoryDir

KEY = SECRET = "testing"
S3_MODULES = ("s3fs", "aiobotocore.client", "portable_ckpt.storage.remote")  # preloaded by the fork server


# --------------------------------------------------------------------------------------------------
# the S3 server
# --------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _options(endpoint: str) -> dict[str, Any]:
    return {
        "endpoint_url": endpoint,
        "key": KEY,
        "secret": SECRET,
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 5, "read_timeout": 30},
    }


@dataclass
class S3:
    """A running local S3: its endpoint, a bucket, and a raw client of its own (no listing cache)."""

    endpoint: str
    bucket: str
    fs: Any

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def objects(self, prefix: str) -> dict[str, str]:
        """Every object under ``prefix``: relative key -> ETag."""
        try:
            found = self.fs.find(f"{self.bucket}/{prefix}", detail=True)
        except FileNotFoundError:
            return {}
        start = len(f"{self.bucket}/{prefix}/")
        return {k[start:]: str(v.get("ETag")) for k, v in found.items()}

    def read(self, prefix: str, name: str) -> bytes | None:
        try:
            data: bytes = self.fs.cat_file(f"{self.bucket}/{prefix}/{name}")
            return data
        except FileNotFoundError:
            return None


@contextlib.contextmanager
def s3_server() -> Iterator[S3]:
    """moto's S3 on 127.0.0.1 at a free port, configured for fsspec (plain ``s3://`` URLs reach it), with a
    fresh bucket; stopped on exit."""
    import fsspec
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved_env = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    saved_conf = fsspec.config.conf.get("s3")
    try:
        endpoint = f"http://127.0.0.1:{port}"
        os.environ.update(AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET, AWS_DEFAULT_REGION="us-east-1")
        fsspec.config.conf["s3"] = _options(endpoint)
        fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **_options(endpoint))
        bucket = f"stress-{uuid.uuid4().hex[:12]}"
        fs.mkdir(bucket)
        yield S3(endpoint, bucket, fs)
    finally:
        server.stop()
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if saved_conf is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = saved_conf


# --------------------------------------------------------------------------------------------------
# kill trials
# --------------------------------------------------------------------------------------------------


def _step_of_latest(data: bytes | None) -> int | None:
    return names.step_of(data.decode("ascii", "replace").strip()) if data else None


def _committed(objects: dict[str, str]) -> list[int]:
    return sorted(
        s for k in objects if k.endswith("/" + names.MANIFEST) and (s := names.step_of(k.split("/")[0])) is not None
    )


def s3_writer_job(s3: S3, prefix: str, step: int, *, kill_op: int = 0, kill_after: float = 0.0) -> list[str]:
    return [
        "s3-writer",
        s3.url(prefix),
        "--endpoint",
        s3.endpoint,
        "--step",
        str(step),
        "--kill-op",
        str(kill_op),
        "--kill-after",
        f"{kill_after:.4f}",
    ]


def s3_save_calls(server: ForkServer, s3: S3, prefix: str, step: int, workdir: Path) -> list[str]:
    """The S3 API calls of one whole save of ``step`` (through a writer that is not killed)."""
    [(status, lines)] = server.run([s3_writer_job(s3, prefix, step)], workdir)
    if status != 0:
        raise RuntimeError(f"the S3 writer failed ({status}): {server.errors()}")
    calls: list[str] = json.loads(lines[-1])
    return calls


def s3_crash_trial(
    server: ForkServer, s3: S3, prefix: str, rng: random.Random, *, calls: int, seconds: float, workdir: Path
) -> TrialResult:
    """One kill trial against the S3 root ``prefix`` (which holds the steps earlier trials left)."""
    before = s3.objects(prefix)
    latest_before = _step_of_latest(s3.read(prefix, names.LATEST))
    committed_before = _committed(before)
    step = (committed_before[-1] if committed_before else 0) + 1
    if rng.random() < 0.5:
        kill_op, kill_after = rng.randint(1, calls), 0.0
        mode = f"kill@call{kill_op}"
    else:
        kill_op, kill_after = 0, rng.uniform(0.0, seconds)
        mode = f"kill@{kill_after:.3f}s"
    [(status, _)] = server.run([s3_writer_job(s3, prefix, step, kill_op=kill_op, kill_after=kill_after)], workdir)
    result = TrialResult(mode, [step] if status == 0 else [], None)
    if status not in (0, -signal.SIGKILL):
        result.other.append(f"the writer failed ({status}): {server.errors()}")
    check_after_kill(
        s3,
        prefix,
        result,
        step=step,
        saved=status == 0,
        before=before,
        latest_before=latest_before,
        load=load_values,
        reopen=lambda url: pc.CheckpointManager(url, keep_last=2),
    )
    return result


def check_after_kill(
    s3: S3,
    prefix: str,
    result: TrialResult,
    *,
    step: int,
    saved: bool,
    before: dict[str, str],
    latest_before: int | None,
    load: Callable[[str], tuple[int, list[str]]],
    reopen: Callable[[str], object],
) -> None:
    """The S3 root ``prefix`` after a writer of ``step`` was killed (or, ``saved``, returned): ``latest`` names
    the old or the new step and a committed one; the steps committed before are untouched (but for retention,
    keep_last=2); every committed step loads verified with the values ``load`` expects, and so does the root,
    no older than ``latest`` was; the next manager (``reopen``) removes every leftover. Adds to ``result``."""
    after = s3.objects(prefix)
    latest_after = _step_of_latest(s3.read(prefix, names.LATEST))
    committed_before = _committed(before)
    if latest_after not in (latest_before, step):
        result.other.append(f"latest went from {latest_before} to {latest_after} (saving step {step})")
    if saved and latest_after != step:
        result.lost.append(f"the save of step {step} returned, but latest names {latest_after}")
    if latest_after is not None and latest_after not in _committed(after):
        result.other.append(f"latest names step {latest_after}, which has no manifest")
    for old in (s for s in committed_before if s >= step - 1):  # retention (keep_last=2) may delete older ones
        mine = f"{names.step_name(old)}/"
        if {k: v for k, v in after.items() if k.startswith(mine)} != {
            k: v for k, v in before.items() if k.startswith(mine)
        }:
            result.lost.append(f"step {old}, committed before the save, changed")
    for s in _committed(after):
        try:
            _, problems = load(f"{s3.url(prefix)}/{names.step_name(s)}")
            result.silent += [f"step {s}: {p}" for p in problems]
        except pc.CheckpointError as e:
            result.silent.append(f"step {s} is committed but does not load: {type(e).__name__}: {e}")
        except Exception as e:  # anything else is a finding
            result.unexpected.append(f"step {s}: {type(e).__module__}.{type(e).__qualname__}: {e}")
    try:
        loaded, problems = load(s3.url(prefix))
        result.loaded = loaded
        result.silent += [f"the root loaded step {loaded}: {p}" for p in problems]
        if loaded not in _committed(after):
            result.silent.append(f"the root loaded step {loaded}, which is not committed")
        if latest_before is not None and loaded < latest_before:
            result.lost.append(f"the root loaded step {loaded}; latest named {latest_before} before the save")
    except pc.CheckpointNotFoundError as e:
        if _committed(after):
            result.lost.append(f"loading the root: {e}")
    except pc.CheckpointError as e:
        result.lost.append(f"loading the root: {type(e).__name__}: {e}")
    except Exception as e:  # anything else is a finding
        result.unexpected.append(f"loading the root: {type(e).__module__}.{type(e).__qualname__}: {e}")
    try:
        reopen(s3.url(prefix))  # the next run opens the root: it cleans up
        now = s3.objects(prefix)
        kept = _committed(now)
        # a pending marker (".pending-..."), or an object of a step directory without a manifest
        left = [k for k in now if k.startswith(".") or ("/" in k and names.step_of(k.split("/")[0]) not in kept)]
        if left:
            result.other.append(f"leftovers after CheckpointManager opened the root: {sorted(left)[:6]}")
    except pc.CheckpointError as e:
        result.other.append(f"CheckpointManager failed to open the root: {type(e).__name__}: {e}")


# --------------------------------------------------------------------------------------------------
# objects changed between listing and reading, and a latest naming a step without a manifest
# --------------------------------------------------------------------------------------------------


class Objects:
    """Raw access to the objects of a root, past the library (what another client does behind its back)."""

    def get(self, name: str) -> bytes | None: ...
    def put(self, name: str, data: bytes) -> None: ...
    def delete(self, name: str) -> None: ...


class MemoryObjects(Objects):
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def get(self, name: str) -> bytes | None:
        return STORE.objects.get(f"{self.prefix}/{name}")

    def put(self, name: str, data: bytes) -> None:
        STORE.objects[f"{self.prefix}/{name}"] = data

    def delete(self, name: str) -> None:
        STORE.objects.pop(f"{self.prefix}/{name}", None)


class S3Objects(Objects):
    def __init__(self, s3: S3, prefix: str) -> None:
        self.s3, self.prefix = s3, prefix

    def get(self, name: str) -> bytes | None:
        return self.s3.read(self.prefix, name)

    def put(self, name: str, data: bytes) -> None:
        self.s3.fs.pipe_file(f"{self.s3.bucket}/{self.prefix}/{name}", data)

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.s3.fs.rm_file(f"{self.s3.bucket}/{self.prefix}/{name}")


# mutation name -> (the object's bytes, the same file of the previous step, a generator) -> new bytes or None
MUTATIONS: dict[str, Callable[[bytes, bytes, random.Random], bytes | None]] = {
    "truncated to half": lambda b, prev, r: b[: len(b) // 2],
    "truncated to 0 bytes": lambda b, prev, r: b"",
    "last byte cut": lambda b, prev, r: b[:-1],
    "extended by 16 bytes": lambda b, prev, r: b + bytes(16),
    "replaced by the previous step's": lambda b, prev, r: prev,
    "replaced by random bytes": lambda b, prev, r: r.randbytes(len(b)),
    "one byte flipped": lambda b, prev, r: _flip(b, r),
    "deleted": lambda b, prev, r: None,
}


def _flip(blob: bytes, rng: random.Random) -> bytes:
    at = rng.randrange(len(blob))
    return blob[:at] + bytes([blob[at] ^ rng.randrange(1, 256)]) + blob[at + 1 :]


# where the change lands: just before the checkpoint directory is listed, just before a file is opened
# (after the listing), just before its first ranged GET (after its size was read; object stores only)
HOOKS = {"memory": ("listing", "open"), "s3": ("listing", "open", "first-read")}


@contextlib.contextmanager
def _hooked(backend: str, hook: str, target: str, change: Callable[[], None]) -> Iterator[list[bool]]:
    """Run ``change`` once, at ``hook``, on the way to reading ``target`` of step 2."""
    fired = [False]

    def fire() -> None:
        if not fired[0]:
            fired[0] = True
            change()

    from portable_ckpt.storage.remote import FsspecDir, FsspecFile, FsspecStorage

    patches: list[tuple[Any, str, Any]] = []
    step_dir = names.step_name(2)
    if hook == "listing":
        cls: Any = MemoryStorage if backend == "memory" else FsspecStorage
        real = cls.open_dir

        def open_dir(self: Any) -> Any:
            if self.location.endswith(step_dir):
                fire()
            return real(self)

        patches.append((cls, "open_dir", open_dir))
    elif hook == "open":
        dcls: Any = MemoryDir if backend == "memory" else FsspecDir
        real_open = dcls.open

        def open_file(self: Any, name: str) -> Any:
            if name == target and self.location.endswith(step_dir):
                fire()
            return real_open(self, name)

        patches.append((dcls, "open", open_file))
    else:
        real_get = FsspecFile.get  # every ranged GET of an object read starts here

        def get(self: Any, start: int, end: int) -> Any:
            if self.key.endswith(f"{step_dir}/{target}"):
                fire()
            return real_get(self, start, end)

        patches.append((FsspecFile, "get", get))
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in patches]
    try:
        for obj, attr, new in patches:
            setattr(obj, attr, new)
        yield fired
    finally:
        for obj, attr, old in saved:
            setattr(obj, attr, old)


def _names_it(e: BaseException, *needles: str) -> bool:
    return any(n in str(e) for n in needles)


def _load_problems(
    root: Any, where: str, needles: tuple[str, ...], *, allow: tuple[int, ...]
) -> tuple[str, dict[str, list[str]]]:
    """Load ``root``: a CheckpointError naming one of ``needles``, or the values of a step in ``allow``."""
    found: dict[str, list[str]] = {"silent corruptions": [], "unexpected exceptions": [], "other broken promises": []}
    try:
        step, problems = load_values(root)
    except pc.CheckpointError as e:
        if not _names_it(e, *needles):
            found["other broken promises"].append(
                f"{where}: {type(e).__name__} names none of {list(needles)}: {str(e)[:300]}"
            )
        return type(e).__name__, found
    except Exception as e:  # anything else is a finding
        found["unexpected exceptions"].append(f"{where}: {type(e).__module__}.{type(e).__qualname__}: {str(e)[:300]}")
        return "unexpected", found
    if step not in allow:
        found["silent corruptions"].append(f"{where}: loaded step {step}, expected one of {list(allow)} or an error")
    found["silent corruptions"] += [f"{where}: step {step}: {p}" for p in problems]
    return f"step {step}", found


def _fall_back_problems(root: Any, where: str, allow: tuple[int, ...]) -> dict[str, list[str]]:
    """``restore(fall_back=True)`` on the root as it is now: the values of a committed step in ``allow``."""
    found: dict[str, list[str]] = {"silent corruptions": [], "unexpected exceptions": [], "other broken promises": []}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            manager = pc.CheckpointManager(root)
            model, opt, sched = make_state(0)
            with preserved_rng():
                ckpt = manager.restore(model, opt, scheduler=sched, fall_back=True, restore_rng=False)
        if ckpt is None or ckpt.step not in allow:
            found["silent corruptions"].append(
                f"{where}: restore(fall_back=True) gave {ckpt and ckpt.step}, expected {list(allow)}"
            )
        elif state_problems(ckpt):
            found["silent corruptions"].append(
                f"{where}: restore(fall_back=True) step {ckpt.step}: {state_problems(ckpt)}"
            )
    except pc.CheckpointError as e:
        found["other broken promises"].append(
            f"{where}: restore(fall_back=True) raised {type(e).__name__}: {str(e)[:300]}"
        )
    except Exception as e:  # anything else is a finding
        found["unexpected exceptions"].append(
            f"{where}: restore(fall_back=True): {type(e).__module__}.{type(e).__qualname__}: {e}"
        )
    return found


def _merge(a: dict[str, list[str]], b: dict[str, list[str]]) -> dict[str, list[str]]:
    return {k: a.get(k, []) + b.get(k, []) for k in set(a) | set(b)}


@dataclass
class RemoteRoot:
    """A root with steps 1 and 2 committed, on ``memory://`` or S3: what loads it, and raw access."""

    backend: str
    root: Any  # a Storage, or a URL
    objects: Objects
    label: str  # how messages name it


def remote_root(backend: str, s3: S3 | None, tag: str) -> RemoteRoot:
    if backend == "memory":
        prefix = f"/stress-remote-{tag}"
        STORE.delete_tree(prefix)
        root: Any = MemoryStorage.from_location(f"memory://{prefix.lstrip('/')}")
        objects: Objects = MemoryObjects(prefix)
        label = root.location
    else:
        assert s3 is not None
        prefix = f"remote-{tag}"
        root = s3.url(prefix)
        objects = S3Objects(s3, prefix)
        label = root
    for step in (1, 2):
        save_step(root, step)
    return RemoteRoot(backend, root, objects, label)


def drop(rr: RemoteRoot) -> None:
    if rr.backend == "memory":
        STORE.delete_tree(rr.root.prefix)
    else:
        s3: S3 = rr.objects.s3  # type: ignore[attr-defined]
        with contextlib.suppress(FileNotFoundError):
            s3.fs.rm(f"{s3.bucket}/{rr.objects.prefix}", recursive=True)  # type: ignore[attr-defined]


def read_fault_cases(backend: str) -> list[tuple[str, str, str]]:
    """(hook, file, mutation) for every file of the newest checkpoint."""
    return [(h, f, m) for h in HOOKS[backend] for f in FILES for m in MUTATIONS]


def read_fault_problems(
    backend: str, s3: S3 | None, hook: str, file: str, mutation: str, rng: random.Random, tag: str
) -> dict[str, list[str]]:
    """Change ``file`` of step 2 by ``mutation`` at ``hook`` while the root is loaded; check the promise."""
    rr = remote_root(backend, s3, tag)
    try:
        obj = f"{names.step_name(2)}/{file}"
        original = rr.objects.get(obj)
        previous = rr.objects.get(f"{names.step_name(1)}/{file}")
        assert original is not None and previous is not None
        new = MUTATIONS[mutation](original, previous, rng)

        def change() -> None:
            if new is None:
                rr.objects.delete(obj)
            else:
                rr.objects.put(obj, new)

        where = f"{backend} {file} {mutation} at {hook}"
        with _hooked(backend, hook, file, change) as fired:
            _, found = _load_problems(rr.root, where, (file, names.step_name(2)), allow=(2,))
        if not fired[0]:
            found["other broken promises"].append(f"{where}: the hook never fired (the test did not test)")
        # and afterwards, with the change in place: an error naming it or the right values; then fall back
        gone = file == names.MANIFEST and new is None  # step 2 is no longer committed: step 1 is the newest
        _, later = _load_problems(
            rr.root, f"{where}, loaded again", (file, names.step_name(2)), allow=(1, 2) if gone else (2,)
        )
        found = _merge(found, later)
        if file != names.MANIFEST or new is not None:
            found = _merge(found, _fall_back_problems(rr.root, where, allow=(1, 2)))
        return found
    finally:
        drop(rr)


# a latest naming a step without a manifest (and other bad latests): name -> edits of the root's objects
def _partial_step_3(files: tuple[str, ...]) -> Callable[[Objects], None]:
    """Step 3 holding copies of step 2's ``files`` (no manifest among them), and ``latest`` naming it."""

    def edit(o: Objects) -> None:
        for f in files:
            o.put(f"{names.step_name(3)}/{f}", o.get(f"{names.step_name(2)}/{f}") or b"")
        o.put(names.LATEST, b"step-00000003\n")

    return edit


def _cut_manifest_3(o: Objects) -> None:
    o.put(f"{names.step_name(3)}/{names.MANIFEST}", (o.get(f"{names.step_name(2)}/{names.MANIFEST}") or b"")[:40])
    o.put(names.LATEST, b"step-00000003\n")


# a latest naming a step without a manifest (and other bad latests): name -> edits of the root's objects
LATEST_CASES: dict[str, Callable[[Objects], None]] = {
    "latest names step 3, a partial upload (model.safetensors only)": _partial_step_3((names.MODEL,)),
    "latest names step 3, every file but the manifest": _partial_step_3(tuple(f for f in FILES if f != names.MANIFEST)),
    "latest names step 3, which does not exist": lambda o: o.put(names.LATEST, b"step-00000003\n"),
    "latest names step 2, whose manifest retention deleted": lambda o: o.delete(
        f"{names.step_name(2)}/{names.MANIFEST}"
    ),
    "latest is garbage": lambda o: o.put(names.LATEST, b"\xff\x00garbage"),
    "latest is empty": lambda o: o.put(names.LATEST, b""),
    "latest names '../step-00000001'": lambda o: o.put(names.LATEST, b"../step-00000001\n"),
    "latest is 1 MB": lambda o: o.put(names.LATEST, b"step-00000002" * 80_000),
    "latest deleted": lambda o: o.delete(names.LATEST),
    "latest names step 3, whose manifest is cut": _cut_manifest_3,
}


def latest_fault_problems(backend: str, s3: S3 | None, case: str, tag: str) -> dict[str, list[str]]:
    rr = remote_root(backend, s3, tag)
    try:
        LATEST_CASES[case](rr.objects)
        allow = (1,) if "manifest retention deleted" in case else (2,)
        where = f"{backend} {case}"
        _, found = _load_problems(rr.root, where, (names.LATEST, names.step_name(3), names.MANIFEST), allow=allow)
        steps = pc.CheckpointManager(rr.root).steps()  # opening the root cleans what is not committed
        if steps != sorted(allow + ((1,) if allow == (2,) else ())) and "cut" not in case:
            found["other broken promises"].append(f"{where}: the manager lists steps {steps}")
        if rr.objects.get(f"{names.step_name(3)}/{names.MODEL}") is not None:
            found["other broken promises"].append(f"{where}: the manifest-less step 3 was not cleaned up")
        found = _merge(found, _fall_back_problems(rr.root, where, allow=allow if "cut" not in case else (2,)))
        return found
    finally:
        drop(rr)


__all__ = [
    "HOOKS",
    "LATEST_CASES",
    "MUTATIONS",
    "S3",
    "S3_MODULES",
    "latest_fault_problems",
    "read_fault_cases",
    "read_fault_problems",
    "s3_crash_trial",
    "s3_save_calls",
    "s3_server",
]
