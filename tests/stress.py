"""The long fault-tolerance run: many crash trials (local, and against a local S3 server), every I/O call of
a save failed in turn, the corruption catalog plus random byte flips, the importers fed damaged and hostile
sources, objects of remote roots changed between listing and reading, thousands of fuzz examples, rounds of
concurrent writers, retention and rewinds racing readers, and incremental saves (kill trials, failing links,
parts changed behind the back, retention racing a save that links, server-side copies on S3).

    python tests/stress.py [--trials 50] [--fuzz-examples 5000] [--seed N] [--workdir DIR]
    python tests/stress.py --preset full --seed N      (the documented run: see PRESETS)

Prints the figures (trials run, faults injected, corrupt inputs tried, fuzz examples run, checkpoints
lost, silent corruptions, unexpected exceptions, other broken promises) and the first findings of each
kind; exits 1 if any promise failed. The default test suite runs a small, fixed sample of the same.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import faults
import test_diskfull
import test_fuzz
from faults import importers, remote
from faults import incremental as inc

import portable_ckpt as pc

SECTIONS = [
    "crash",
    "overwrite-crash",
    "disk-full",
    "storage-faults",
    "corruption",
    "pipes",
    "importers",
    "fuzz",
    "s3-crash",
    "remote-reads",
    "concurrency",
    "incremental",
    "incremental-s3",
]
SLOW_SECTIONS = ("s3-crash", "remote-reads", "incremental-s3")  # need the local S3 server (moto)

# The documented runs: option -> value. "full" is the run the README's reliability table quotes. Sized from
# short runs (--trials 5..40, --s3-trials 8..20, --fuzz-examples 300..1000, --import-examples 400..1500) in
# CPU seconds, which do not depend on who else shares the machine: a local kill trial 0.22 s (+5 s to start),
# an S3 kill trial 0.81 s (+14 s), a hypothesis example 0.0065 s (7.6 per --fuzz-examples), an import
# mutation 0.012 s (+22 s for the catalog), a concurrency round 15 s, an S3 read fault 1.6 s (+9 s for the
# memory:// ones), the other sections about 45 s. "full": about 1,220 CPU seconds, 22 to 27 minutes of wall
# time on this machine (2 cores) with nobody else on it; 1,049 kill trials (930 local + 39 overwrite + 80
# S3), about 105,000 fuzz examples (95,000 hypothesis over every target + 10,000 import mutations), about
# 3,850 corrupt inputs and 2,500 concurrent loads. The incremental sections add about 150 CPU seconds (a local
# incremental kill trial 0.4 s, +10 s for the link, I/O, in-memory and behind-the-back sweeps, a race round
# 5 s; an S3 incremental kill trial 1.5 s, +12 s): 220 kill trials (200 local + 20 S3). Measured on
# 2026-12-01 with every section: 1,326 s wall (1,325 s CPU), 1,269 kill trials, 122,500 fuzz examples.
PRESETS: dict[str, dict[str, int]] = {
    "full": {
        "trials": 930,
        "s3_trials": 80,
        "fuzz_examples": 12500,
        "import_examples": 10000,
        "flips": 40,
        "concurrency_rounds": 4,
        "s3_reads": 40,
        "inc_trials": 200,
        "inc_rounds": 4,
        "inc_s3_trials": 20,
    },
}
KINDS = ("checkpoints lost", "silent corruptions", "unexpected exceptions", "other broken promises")


@dataclass
class Tally:
    trials: int = 0
    faults: int = 0
    corrupt_inputs: int = 0
    fuzz_examples: int = 0
    concurrent_loads: int = 0
    concurrent_not_found: int = 0
    findings: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in KINDS})
    seconds: dict[str, float] = field(default_factory=dict)
    per_section: dict[str, dict[str, int]] = field(default_factory=dict)  # section -> what it added
    cpu: dict[str, float] = field(default_factory=dict)  # section -> CPU seconds (see cpu_seconds)
    skipped: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {
            "trials": self.trials,
            "faults": self.faults,
            "corrupt inputs": self.corrupt_inputs,
            "fuzz examples": self.fuzz_examples,
            "concurrent loads": self.concurrent_loads,
            "findings": sum(len(v) for v in self.findings.values()),
        }

    def add(self, kind: str, where: str, items: list[str]) -> None:
        self.findings[kind] += [f"{where}: {item}" for item in items]

    @property
    def failed(self) -> bool:
        return any(self.findings.values())


def cpu_seconds() -> float:
    """CPU time of this process, its reaped children, and the live fork server with the workers it reaped
    (what the run costs a machine with nobody else on it, when its work runs one thing at a time)."""
    t = os.times()
    total = t.user + t.system + t.children_user + t.children_system
    for server in faults.processes._SERVER:
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{server.proc.pid}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime stime cutime cstime
    return total


class SkipSection(Exception):
    """A section that cannot run here (what it needs is not installed): reported, not a finding."""


@contextlib.contextmanager
def section(tally: Tally, name: str) -> Iterator[None]:
    start = time.monotonic()
    cpu = cpu_seconds()
    before = tally.counts()
    print(f"-- {name} ...", flush=True)
    try:
        yield
    except SkipSection as e:
        print(f"   skipped: {e}", flush=True)
        tally.skipped.append(f"{name}: {e}")
    except Exception as e:  # a section that breaks is itself a finding; the run goes on
        tally.add(
            "unexpected exceptions",
            name,
            [f"the section stopped: {type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"],
        )
    tally.seconds[name] = time.monotonic() - start
    tally.cpu[name] = cpu_seconds() - cpu
    tally.per_section[name] = {k: v - before[k] for k, v in tally.counts().items()}
    added = ", ".join(f"{v} {k}" for k, v in tally.per_section[name].items() if v)
    print(f"   {tally.seconds[name]:.1f} s ({tally.cpu[name]:.1f} s CPU): {added or 'nothing counted'}", flush=True)


def classify(problem: str) -> str:
    """The kind of a disk-full sweep finding (see test_diskfull.sweep_problems)."""
    if "checkpoint lost:" in problem:
        return "checkpoints lost"
    if ": raised " in problem:
        return "unexpected exceptions"
    return "other broken promises"


def crash_trials(tally: Tally, work: Path, trials: int, rng: random.Random) -> None:
    """SIGKILL a saving process at random moments; roots are reused, so later trials crash a root that has
    crashed before and been resumed."""
    steps = 4
    ops = faults.count_ops(work / "count", steps)
    roots = max(1, min(8, trials // 4))
    for i in range(trials):
        root = work / f"root{i % roots}"
        result = faults.crash_trial(root, rng, kind="op" if i % 2 == 0 else "begin", steps=steps, ops_per_run=ops)
        tally.trials += 1
        tally.faults += 1
        where = f"crash trial {i} ({result.mode}, committed {result.committed}, loaded {result.loaded})"
        add_result(tally, where, result)


def overwrite_crash(tally: Tally, work: Path) -> None:
    """save_checkpoint(overwrite=True) SIGKILLed before each one of its I/O calls in turn."""
    template = work / "template"
    for step in (1, 2):
        faults.save_step(template, step)
    calls = faults.overwrite_ops(template, work / "count")
    for k in range(1, len(calls) + 1):
        tally.trials += 1
        tally.faults += 1
        for p in faults.overwrite_kill_problems(template, work / f"kill{k}", k):
            kind = "checkpoints lost" if " lost" in p else "other broken promises"
            tally.add(kind, f"overwrite killed before call {k} ({calls[k - 1].split()[0]})", [p])
        shutil.rmtree(work / f"kill{k}")


def disk_full(tally: Tally, work: Path) -> None:
    """Every I/O call of a save failed in turn (in-process injection), then real EFBIG from RLIMIT_FSIZE."""
    template = work / "template" / "root"
    manager = pc.CheckpointManager(template, keep_last=2)
    faults.save_step(manager, 1)
    faults.save_step(manager, 2)
    manager.close()
    swept, problems = test_diskfull.sweep_problems(template, work / "sweep", every=True)
    tally.faults += swept
    for p in problems:
        tally.add(classify(p), "disk-full sweep", [p])
    server = faults.fork_server()
    [(status, lines)] = server.run([["rlimit-writer", str(work / "rlimit")]], work / "rlimit-out")
    if status != 0:
        tally.add("unexpected exceptions", "RLIMIT_FSIZE writer", [server.errors()])
    for line in lines:
        if not line.startswith("{"):
            continue
        r = json.loads(line)
        tally.faults += 1
        where = f"RLIMIT_FSIZE={r['limit']}"
        if r["outcome"] != "CheckpointWriteError":
            tally.add("unexpected exceptions", where, [f"{r['outcome']}: {r['message']}"])
        if (r["steps"], r["latest"], r["leftovers"], r["loaded"], r["problems"]) != (
            [1, 2],
            "step-00000002",
            [],
            2,
            [],
        ):
            tally.add("other broken promises", where, [f"root not as before: {r}"])


def storage_faults(tally: Tally, rng: random.Random) -> None:
    """Every operation of a save failed in turn through the in-memory storage backend, under both commit
    strategies (manifest-last, rename), with a random errno each time."""
    for strategy in faults.STRATEGIES:
        operations = faults.save_operations(strategy)
        for nth in range(1, len(operations) + 1):
            code = rng.choice(faults.storage.ERRNOS)
            _, problems = faults.fault_problems(strategy, nth, code)
            tally.faults += 1
            for p in problems:
                kind = "unexpected exceptions" if " raised " in p else "other broken promises"
                tally.add("checkpoints lost" if "newest is step" in p else kind, "storage faults", [p])


def random_flip_cases(rng: random.Random, pristine: Path, per_file: int) -> list[faults.Case]:
    cases = []
    for name in faults.FILES:
        size = (pristine / name).stat().st_size
        for _ in range(per_file):
            at, mask = rng.randrange(size), rng.randrange(1, 256)

            def edit(blob: bytes, at: int = at, mask: int = mask) -> bytes:
                return blob[:at] + bytes([blob[at] ^ mask]) + blob[at + 1 :]

            cases.append(
                faults.Case(
                    f"{name}:flip@{at}^{mask:02x}", name, faults.edit_bytes(name, edit), None, (name,), False, True
                )
            )
    return cases


def corruption(tally: Tally, work: Path, rng: random.Random, flips: int) -> None:
    pristine = {
        False: faults.save_step(work / "pristine" / "plain", 3),
        True: pc.save_checkpoint(faults.quantized_model(), None, {}, faults.VOCAB, 3, work / "pristine" / "quantized"),
    }
    cases = (
        faults.corruption_cases(["emb.weight"])
        + faults.corruption_cases(quantized=True)
        + random_flip_cases(rng, pristine[False], flips)
    )
    for case in cases:
        scratch = work / "case"
        if scratch.exists():
            shutil.rmtree(scratch)
        scratch.mkdir()
        for o in faults.run_case(case, pristine[case.quantized], scratch):
            tally.corrupt_inputs += 1
            if o.result == "silent" or o.result == "code-ran":
                tally.add("silent corruptions", o.variant, [o.detail])
            elif o.result == "unexpected":
                tally.add("unexpected exceptions", o.variant, [o.detail])
            elif not o.ok:
                tally.add("other broken promises", o.variant, [f"{o.result}: {o.detail}"])


def hostile_pipes(tally: Tally, work: Path) -> None:
    """Named pipes where a checkpoint's files (or `latest`) should be: refused, never waited on."""
    for name in ("config.json", "optimizer.pt", "manifest.json", "latest"):
        root = work / f"fifo-{name}"
        ckdir = faults.save_step(root, 3)
        target = root / "latest" if name == "latest" else ckdir / name
        target.unlink()
        os.mkfifo(target)
        tally.corrupt_inputs += 1
        try:
            with faults.deadline(2):
                pc.load_checkpoint(root if name == "latest" else ckdir, restore_rng=False)
            if name != "latest":
                tally.add("silent corruptions", f"FIFO as {name}", ["loaded"])
        except pc.CheckpointError:
            pass
        except faults.Hang as e:
            tally.add("other broken promises", f"FIFO as {name}", [f"load hung: {e}"])
        except Exception as e:  # anything else is a finding
            tally.add("unexpected exceptions", f"FIFO as {name}", [f"{type(e).__name__}: {e}"])


def add_findings(tally: Tally, where: str, found: dict[str, list[str]]) -> None:
    for kind, items in found.items():
        tally.add(kind, where, items)


def import_faults(tally: Tally, work: Path, examples: int, rng: random.Random) -> None:
    """import_checkpoint fed every damaged or hostile source of the catalog (tests/faults/importers.py), then
    ``examples`` random mutations (byte flips, insertions, truncations) of one file of a random source kind."""
    for case in importers.catalog():
        scratch = work / "case"
        if scratch.exists():
            shutil.rmtree(scratch)
        scratch.mkdir(parents=True)
        _, found = importers.run_import_case(case, scratch)
        tally.corrupt_inputs += 1
        add_findings(tally, f"import {case.name}", found)
    pristine = importers.fuzz_sources(work / "pristine")
    for i in range(examples):
        kind, file, found = importers.fuzz_example(rng, pristine, work / "fuzz")
        tally.fuzz_examples += 1
        add_findings(tally, f"import fuzz example {i} ({kind}, {file} mutated)", found)


def s3_crash(tally: Tally, work: Path, trials: int, rng: random.Random, s3: remote.S3) -> None:
    """A process saving into an S3 root SIGKILLed before a random one of its S3 API calls, or after a random
    delay (mid-request); roots are reused, so later trials save over what earlier kills left."""
    server = faults.fork_server()
    server.preload(remote.S3_MODULES)
    started = time.monotonic()
    calls = remote.s3_save_calls(server, s3, "count", 1, work / "count")
    seconds = time.monotonic() - started
    print(f"   a whole save makes {len(calls)} S3 calls in {seconds:.2f} s", flush=True)
    roots = max(1, min(4, trials // 5))
    for i in range(trials):
        result = remote.s3_crash_trial(
            server, s3, f"crash{i % roots}", rng, calls=len(calls), seconds=seconds, workdir=work / "worker"
        )
        tally.trials += 1
        tally.faults += 1
        where = f"s3 crash trial {i} ({result.mode}, loaded {result.loaded})"
        add_result(tally, where, result)


def add_result(tally: Tally, where: str, result: faults.TrialResult) -> None:
    tally.add("checkpoints lost", where, result.lost)
    tally.add("silent corruptions", where, result.silent)
    tally.add("unexpected exceptions", where, result.unexpected)
    tally.add("other broken promises", where, result.other)


def incremental(tally: Tally, work: Path, trials: int, rounds: int, rng: random.Random) -> None:
    """Incremental saves (format_spec §21.3): kill trials of CheckpointManager(incremental=True, keep_last=2)
    (before a random I/O call, links included, or after a random delay; roots reused), os.link failing with
    each errno (every link, one link), every I/O call of an incremental save failed in turn (and each model
    part's write cut short), every operation of the in-memory backend failed in turn ("copy" included) under
    both commit strategies, reused parts changed or removed behind the back (and the source retired right
    after the writer opened it), and rounds of retention and drop_after racing an incremental writer and
    verifying readers."""
    steps = 4
    calls, seconds = inc.count_inc_ops(work / "count", steps)
    print(
        f"   {steps} incremental saves make {len(calls)} I/O calls ({sum(c.startswith('link') for c in calls)} links)"
    )
    roots = max(1, min(8, trials // 4))
    for i in range(trials):
        root = work / "crash" / f"root{i % roots}"
        result = inc.inc_crash_trial(
            root, rng, kind="op" if i % 2 == 0 else "time", steps=steps, ops_per_run=len(calls), seconds=seconds
        )
        tally.trials += 1
        tally.faults += 1
        add_result(tally, f"incremental crash trial {i} ({result.mode}, committed {result.committed})", result)
    template = inc.template(work / "template")
    for code in inc.LINK_ERRNOS:
        for nth in (0, 1, 2):
            tally.faults += 1
            tally.add(
                "other broken promises", "link failure", inc.link_failure_problems(template, work / "l", code, nth)
            )
    io = inc.io_calls(template, work / "io-count")
    for n in range(1, len(io) + 1):
        for partial in (False, True) if io[n - 1].startswith("write ") else (False,):
            tally.faults += 1
            for p in inc.io_sweep_problems(template, work / "io", n, partial=partial):
                kind = "unexpected exceptions" if ": raised " in p else "other broken promises"
                lost = "the root changed" in p or "loading the root" in p or "loads step" in p
                tally.add("checkpoints lost" if lost else kind, "incremental io sweep", [p])
    for strategy in faults.STRATEGIES:
        operations = inc.memory_operations(strategy)
        for nth in range(1, len(operations) + 1):
            tally.faults += 1
            code = rng.choice(faults.storage.ERRNOS)
            for p in inc.memory_fault_problems(strategy, nth, code):
                kind = "unexpected exceptions" if ": raised " in p else "other broken promises"
                tally.add("checkpoints lost" if "newest is step" in p else kind, "memory faults", [p])
    for case in inc.BEHIND_CASES:
        tally.faults += 1
        tally.corrupt_inputs += 1
        for p in inc.behind_the_back_problems(case, work / "behind" / case / "root"):
            tally.add(
                "silent corruptions" if "wrong:" in p else "other broken promises", f"behind the back {case}", [p]
            )
    for r in range(rounds):
        counts, result = inc.race_round(work / f"race{r}", steps=20)
        tally.faults += 1
        tally.concurrent_loads += counts["loads"]
        tally.concurrent_not_found += counts["not_found"]
        print(f"   race round {r}: {json.dumps(counts)}", flush=True)
        add_result(tally, f"incremental race round {r}", result)


def incremental_s3(tally: Tally, work: Path, trials: int, rng: random.Random, s3: remote.S3) -> None:
    """Incremental saves on S3: unchanged parts reused by CopyObject, the source object deleted or replaced
    right before the copy, and kill trials of an incremental save (roots reused; prefixes of their own: the
    s3-crash section's roots in the same bucket hold other checkpoints)."""
    for case in ("plain", "deleted", "replaced"):
        info, problems = inc.s3_reuse_problems(s3, f"reuse-{case}", case)
        tally.faults += 1
        # moto ignores CopySourceIfMatch: a source replaced after its ETag was read is copied, and the new
        # checkpoint is then refused naming the part (on S3 itself the copy is refused and the part written)
        moto = [p for p in problems if case == "replaced" and "step 2 does not load" in p and info["changed"] in p]
        tally.add("other broken promises", f"s3 reuse {case}", [p for p in problems if p not in moto])
        print(f"   s3 reuse {case}: {info['copies']} server-side copies, same objects {len(info['same'])}", flush=True)
    server = faults.fork_server()
    server.preload(remote.S3_MODULES)
    server.run([inc.s3_job(s3, "inc-count")], work / "count0")
    started = time.monotonic()
    [(status, lines)] = server.run([inc.s3_job(s3, "inc-count")], work / "count1")
    seconds = time.monotonic() - started
    if status != 0:
        raise RuntimeError(f"the incremental S3 writer failed: {server.errors()}")
    calls = json.loads(lines[-1])
    print(f"   an incremental S3 save makes {len(calls)} calls ({calls.count('CopyObject')} copies) in {seconds:.2f} s")
    roots = max(1, min(4, trials // 5))
    for i in range(trials):
        result = inc.s3_inc_crash_trial(
            server, s3, f"inc-crash{i % roots}", rng, calls=len(calls), seconds=seconds, workdir=work / "worker"
        )
        tally.trials += 1
        tally.faults += 1
        add_result(tally, f"incremental s3 crash trial {i} ({result.mode}, loaded {result.loaded})", result)


def remote_reads(tally: Tally, rng: random.Random, s3: remote.S3 | None, s3_sample: int) -> None:
    """Objects of the newest checkpoint truncated, replaced or deleted between listing and reading, and a
    ``latest`` naming a step without a manifest: every case on ``memory://``, a sample of them on S3."""
    backends: list[tuple[str, remote.S3 | None, list[tuple[str, str, str]]]] = [
        ("memory", None, remote.read_fault_cases("memory"))
    ]
    if s3 is not None:
        cases = remote.read_fault_cases("s3")
        backends.append(("s3", s3, rng.sample(cases, min(s3_sample, len(cases)))))
    for backend, server, cases in backends:
        for i, (hook, file, mutation) in enumerate(cases):
            found = remote.read_fault_problems(backend, server, hook, file, mutation, rng, f"read{i}")
            tally.corrupt_inputs += 1
            add_findings(tally, f"{backend} read fault", found)
        for i, case in enumerate(remote.LATEST_CASES):
            found = remote.latest_fault_problems(backend, server, case, f"latest{i}")
            tally.corrupt_inputs += 1
            add_findings(tally, f"{backend} latest fault", found)


def fuzz(tally: Tally, work: Path, examples: int, rng: random.Random) -> None:
    for name in sorted(test_fuzz.TARGETS):
        n = examples // 5 if name in test_fuzz.SLOW else examples
        before = test_fuzz.EXAMPLES_RUN[name]
        try:
            test_fuzz.run_target(name, n, work / name, seed=rng.randrange(2**32))
        except Exception as e:  # hypothesis re-raises the (shrunk) failures
            for failure in getattr(e, "exceptions", [e]):  # an ExceptionGroup when it found several
                notes = "\n".join(getattr(failure, "__notes__", []))  # the falsifying example
                text = f"{type(failure).__module__}.{type(failure).__qualname__}: {str(failure)[-800:]}\n{notes}"
                kind = "other broken promises" if isinstance(failure, AssertionError) else "unexpected exceptions"
                tally.add(kind, f"fuzz {name}", [text])
        tally.fuzz_examples += test_fuzz.EXAMPLES_RUN[name] - before


def concurrency(tally: Tally, work: Path, rounds: int) -> None:
    server = faults.fork_server()
    for r in range(rounds):
        for scenario in (
            "different-steps",
            "same-steps",
            "retention-1",
            "retention-2",
            "overwrite",
            "overwrite-no-verify",
            "rewind",
        ):
            base = work / f"{scenario}-{r}"
            root, stop = base / "root", base / "stop"
            reader = ["reader", str(root), "--stop-file", str(stop)]
            if scenario == "different-steps":
                jobs = [
                    ["writer", str(root), "--name", "A", "--steps", ",".join(map(str, range(1, 20, 2)))],
                    ["writer", str(root), "--name", "B", "--steps", ",".join(map(str, range(2, 21, 2)))],
                    [*reader, "--until-step", "20", "--check-latest"],
                ]
            elif scenario == "same-steps":
                jobs = [
                    ["writer", str(root), "--name", w, "--steps", ",".join(map(str, range(1, 11)))] for w in ("A", "B")
                ] + [[*reader, "--until-step", "10", "--check-latest"]]
            elif scenario == "rewind":  # saves, retention and drop_after (branching back) racing two readers
                jobs = [
                    ["rewinder", str(root), "--steps", "20", "--rewind-every", "6", "--keep-last", "3"],
                    [*reader],
                    [*reader, "--no-verify"],
                ]
            elif scenario.startswith("overwrite"):
                faults.save_step(root, 5, "A")
                flags = ["--no-verify"] if scenario.endswith("no-verify") else []
                jobs = [
                    ["writer", str(root), "--name", w, "--overwrite", "--steps", ",".join(["5"] * 20)]
                    for w in ("A", "B")
                ]
                jobs += [[*reader, *flags], ["reader", str(root / "step-00000005"), "--stop-file", str(stop), *flags]]
            else:
                keep = scenario[-1]
                jobs = [
                    ["writer", str(root), "--keep-last", keep, "--steps", ",".join(map(str, range(1, 31)))],
                    [*reader, "--until-step", "30"],
                ]
            results = server.run(jobs, base / "workers", stop_file=stop)
            where = f"concurrency {scenario} round {r}"
            tally.faults += 1
            if any(status != 0 for status, _ in results):
                tally.add("unexpected exceptions", where, [server.errors()])
                continue
            check_concurrency(tally, where, scenario, root, [lines for _, lines in results])


def check_concurrency(tally: Tally, where: str, scenario: str, root: Path, outputs: list[list[str]]) -> None:
    readers = [json.loads(lines[-1]) for lines in outputs if lines and lines[-1].startswith("{")]
    for counts in readers:
        tally.concurrent_loads += counts["loaded"] + counts["latest_checked"]
        tally.concurrent_not_found += counts["not_found"]
        for bad in counts["bad"]:
            kind = (
                "unexpected exceptions"
                if bad.startswith("builtins.") or ": builtins." in bad
                else "other broken promises"
                if "CheckpointCorruptedError" in bad
                else "silent corruptions"
            )
            tally.add(kind, f"{where} reader", [bad])
    writers = [{r["step"]: r for r in map(json.loads, lines[:-1])} for lines in outputs[: len(outputs) - len(readers)]]
    saved: dict[int, list[str]] = {}
    for name, out in zip(("A", "B") if len(writers) == 2 else ("main",), writers, strict=True):
        for step, r in out.items():
            if r["outcome"] == "saved" and scenario.startswith("overwrite"):
                continue  # every round of both writers saves over step 5: no single owner to record
            if r["outcome"] == "saved":
                saved.setdefault(step, []).append(name)
            elif not (scenario == "same-steps" and r["outcome"] == "CheckpointExistsError"):
                tally.add(
                    "unexpected exceptions" if r["outcome"].startswith("unexpected") else "other broken promises",
                    where,
                    [f"step {step}: {r['outcome']}: {r.get('message')}"],
                )
    if scenario == "same-steps":
        tally.add("other broken promises", where, [f"step {s}: saved by {w}" for s, w in saved.items() if len(w) != 1])
    for path in sorted(root.glob("step-*")):
        try:
            ckpt = pc.load_checkpoint(path, restore_rng=False)
        except pc.CheckpointError as e:
            tally.add("checkpoints lost", where, [f"{path.name}: {type(e).__name__}: {e}"])
            continue
        problems = faults.state_problems(ckpt)
        if saved.get(ckpt.step) and ckpt.config.get("writer") not in saved[ckpt.step]:
            problems.append(f"holds writer {ckpt.config.get('writer')}'s state, saved by {saved[ckpt.step]}")
        tally.add("silent corruptions", f"{where} {path.name}", problems)
    if faults.leftovers(root):  # the writers have finished: nothing of theirs may be left, .replaced-* included
        tally.add("other broken promises", where, [f"temporaries left: {faults.leftovers(root)}"])
    reopened = faults.TrialResult("reopened", [], None)
    faults.reopen(root, reopened)  # and the next CheckpointManager must find nothing to put back or remove
    tally.add("checkpoints lost", where, reopened.lost)
    tally.add("silent corruptions", where, reopened.silent)
    tally.add("other broken promises", where, reopened.other)


def grouped(items: list[str]) -> list[tuple[int, str]]:
    """Findings that differ only in numbers, paths or hex digests, counted once: (count, first example)."""
    groups: dict[str, list[str]] = {}
    for item in items:
        key = re.sub(r"\S*\d\S*", "N", item)  # every word holding a digit: steps, pids, offsets, paths
        groups.setdefault(key[:200], []).append(item)
    return [(len(g), g[0]) for g in groups.values()]


def report(tally: Tally, seed: int, work: Path, args: argparse.Namespace | None = None) -> None:
    print()
    print(f"portable-ckpt stress run (seed {seed}, workdir {work})")
    if args is not None:
        options = (
            "preset",
            "trials",
            "s3_trials",
            "fuzz_examples",
            "import_examples",
            "flips",
            "concurrency_rounds",
            "s3_reads",
            "inc_trials",
            "inc_rounds",
            "inc_s3_trials",
        )
        print("  " + ", ".join(f"{k.replace('_', '-')} {getattr(args, k)}" for k in options))
    rows = [
        (
            "trials run",
            tally.trials,
            "a saving process SIGKILLed: at random moments (local and S3), and before each call of an overwrite",
        ),
        ("faults injected", tally.faults, "kills, failed I/O calls, file-size limits, concurrent rounds"),
        ("corrupt inputs tried", tally.corrupt_inputs, "damaged checkpoints loaded or validated"),
        ("fuzz examples run", tally.fuzz_examples, "hypothesis examples over all targets, and import-source mutations"),
        (
            "concurrent loads",
            tally.concurrent_loads,
            f"complete checkpoints loaded by readers racing writers "
            f"(+{tally.concurrent_not_found} CheckpointNotFoundError)",
        ),
        *[(kind, len(tally.findings[kind]), "") for kind in KINDS],
    ]
    for label, value, note in rows:
        print(f"  {label:24} {value:>8}   {note}")
    print("  seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in tally.seconds.items()))
    for skipped in tally.skipped:
        print(f"  SKIPPED {skipped}")
    print(f"  total: {sum(tally.seconds.values()):.0f} s, {sum(tally.cpu.values()):.0f} s CPU")
    print("  per section (wall seconds, CPU seconds; what it counted, per wall second and per CPU second):")
    for name, added in tally.per_section.items():
        secs, cpu = max(tally.seconds[name], 1e-9), max(tally.cpu[name], 1e-9)
        parts = [f"{v} {k} ({v / secs:.1f}/s, {v / cpu:.1f}/CPU s)" for k, v in added.items() if v and k != "findings"]
        print(f"    {name:16} {tally.seconds[name]:7.1f} {tally.cpu[name]:7.1f}   {'; '.join(parts)}")
    for kind in KINDS:
        if tally.findings[kind]:
            groups = grouped(tally.findings[kind])
            print(f"\n{kind}: {len(tally.findings[kind])}, {len(groups)} distinct (one example each):")
            for count, item in groups:
                print(f"  - [{count}x] " + item.replace("\n", "\n    ")[:1200])
    print("\nFAILED: some promises were broken" if tally.failed else "\nOK: every promise held")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--trials", type=int, default=50, help="crash trials (default 50)")
    parser.add_argument(
        "--fuzz-examples",
        type=int,
        default=5000,
        help="examples per fuzz target (a fifth for the targets that load whole checkpoints)",
    )
    parser.add_argument("--flips", type=int, default=40, help="random byte flips per file, on top of the catalog")
    parser.add_argument("--concurrency-rounds", type=int, default=3)
    parser.add_argument("--s3-trials", type=int, default=10, help="kill trials against the local S3 server")
    parser.add_argument("--import-examples", type=int, default=1000, help="random mutations of import sources")
    parser.add_argument("--s3-reads", type=int, default=6, help="read-fault cases tried on S3 (all on memory://)")
    parser.add_argument("--inc-trials", type=int, default=20, help="kill trials of incremental saves (local)")
    parser.add_argument("--inc-rounds", type=int, default=2, help="rounds of retention racing incremental saves")
    parser.add_argument("--inc-s3-trials", type=int, default=6, help="kill trials of incremental saves on S3")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="a documented run: its values replace the defaults (an option given with another value than its "
        "default still wins)",
    )
    parser.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory, removed")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=SECTIONS,
        default=SECTIONS,
        help="run these sections only (each draws from its own generator, so a seed reproduces)",
    )
    args = parser.parse_args(argv)
    if args.preset is not None:
        given = parser.parse_args(argv)
        defaults = {a.dest: a.default for a in parser._actions}
        for key, value in PRESETS[args.preset].items():
            if getattr(given, key) == defaults[key]:  # not given explicitly
                setattr(args, key, value)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="portable-ckpt-stress-"))
    work.mkdir(parents=True, exist_ok=True)
    tally = Tally()
    stack = contextlib.ExitStack()
    servers: list[remote.S3] = []

    def s3() -> remote.S3:
        missing = [m for m in ("s3fs", "moto") if importlib.util.find_spec(m) is None]
        if missing:  # the s3 extra and moto[server] come with the dev extra
            raise SkipSection(f"{', '.join(missing)} not installed (pip install -e '.[dev]')")
        if not servers:
            servers.append(stack.enter_context(remote.s3_server()))
        return servers[0]

    try:
        runs = {
            "crash": lambda rng: crash_trials(tally, work / "crash", args.trials, rng),
            "overwrite-crash": lambda rng: overwrite_crash(tally, work / "overwrite"),
            "disk-full": lambda rng: disk_full(tally, work / "diskfull"),
            "storage-faults": lambda rng: storage_faults(tally, rng),
            "corruption": lambda rng: corruption(tally, work / "corruption", rng, args.flips),
            "pipes": lambda rng: hostile_pipes(tally, work / "pipes"),
            "importers": lambda rng: import_faults(tally, work / "importers", args.import_examples, rng),
            "fuzz": lambda rng: fuzz(tally, work / "fuzz", args.fuzz_examples, rng),
            "s3-crash": lambda rng: s3_crash(tally, work / "s3-crash", args.s3_trials, rng, s3()),
            "remote-reads": lambda rng: remote_reads(tally, rng, s3() if args.s3_reads else None, args.s3_reads),
            "concurrency": lambda rng: concurrency(tally, work / "concurrency", args.concurrency_rounds),
            "incremental": lambda rng: incremental(tally, work / "incremental", args.inc_trials, args.inc_rounds, rng),
            "incremental-s3": lambda rng: incremental_s3(tally, work / "incremental-s3", args.inc_s3_trials, rng, s3()),
        }
        for name in SECTIONS:
            if name in args.only:
                with section(tally, name):
                    runs[name](random.Random(f"{seed}-{name}"))
    finally:
        stack.close()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    report(tally, seed, work, args)
    return 1 if tally.failed else 0


if __name__ == "__main__":
    sys.exit(main())
