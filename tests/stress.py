"""The long fault-tolerance run: many crash trials, every I/O call of a save failed in turn, the corruption
catalog plus random byte flips, thousands of fuzz examples, rounds of concurrent writers and readers.

    python tests/stress.py [--trials 50] [--fuzz-examples 5000] [--seed N] [--workdir DIR]

Prints the figures (trials run, faults injected, corrupt inputs tried, fuzz examples run, checkpoints
lost, silent corruptions, unexpected exceptions, other broken promises) and the first findings of each
kind; exits 1 if any promise failed. The default test suite runs a small, fixed sample of the same.
"""

from __future__ import annotations

import argparse
import contextlib
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

import portable_ckpt as pc

SECTIONS = ["crash", "overwrite-crash", "disk-full", "storage-faults", "corruption", "pipes", "fuzz", "concurrency"]
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

    def add(self, kind: str, where: str, items: list[str]) -> None:
        self.findings[kind] += [f"{where}: {item}" for item in items]

    @property
    def failed(self) -> bool:
        return any(self.findings.values())


@contextlib.contextmanager
def section(tally: Tally, name: str) -> Iterator[None]:
    start = time.monotonic()
    print(f"-- {name} ...", flush=True)
    try:
        yield
    except Exception as e:  # a section that breaks is itself a finding; the run goes on
        tally.add(
            "unexpected exceptions",
            name,
            [f"the section stopped: {type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"],
        )
    tally.seconds[name] = time.monotonic() - start


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
        tally.add("checkpoints lost", where, result.lost)
        tally.add("silent corruptions", where, result.silent)
        tally.add("unexpected exceptions", where, result.unexpected)
        tally.add("other broken promises", where, result.other)


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


def report(tally: Tally, seed: int, work: Path) -> None:
    print()
    print(f"portable-ckpt stress run (seed {seed}, workdir {work})")
    rows = [
        (
            "trials run",
            tally.trials,
            "a saving process SIGKILLed: at random moments, and before each call of an overwrite",
        ),
        ("faults injected", tally.faults, "kills, failed I/O calls, file-size limits, concurrent rounds"),
        ("corrupt inputs tried", tally.corrupt_inputs, "damaged checkpoints loaded or validated"),
        ("fuzz examples run", tally.fuzz_examples, "hypothesis examples over all targets"),
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
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="portable-ckpt-stress-"))
    work.mkdir(parents=True, exist_ok=True)
    tally = Tally()
    try:
        runs = {
            "crash": lambda rng: crash_trials(tally, work / "crash", args.trials, rng),
            "overwrite-crash": lambda rng: overwrite_crash(tally, work / "overwrite"),
            "disk-full": lambda rng: disk_full(tally, work / "diskfull"),
            "storage-faults": lambda rng: storage_faults(tally, rng),
            "corruption": lambda rng: corruption(tally, work / "corruption", rng, args.flips),
            "pipes": lambda rng: hostile_pipes(tally, work / "pipes"),
            "fuzz": lambda rng: fuzz(tally, work / "fuzz", args.fuzz_examples, rng),
            "concurrency": lambda rng: concurrency(tally, work / "concurrency", args.concurrency_rounds),
        }
        for name in SECTIONS:
            if name in args.only:
                with section(tally, name):
                    runs[name](random.Random(f"{seed}-{name}"))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    report(tally, seed, work)
    return 1 if tally.failed else 0


if __name__ == "__main__":
    sys.exit(main())
