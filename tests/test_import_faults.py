"""import_checkpoint fed damaged and hostile sources (the catalog of tests/faults/importers.py) and random
mutations of valid ones: each imports correctly or raises a CheckpointError naming the file; never another
exception, never a hang, never code from the source run, never a committed checkpoint on failure.

``tests/stress.py --only importers`` runs the same catalog and many more mutations.
"""

from __future__ import annotations

import random
from pathlib import Path

import faults
import pytest
from faults import importers

FUZZ_EXAMPLES = 300  # random mutations in the default suite (about 100 a second)
CASE_SECONDS = 60

CATALOG = importers.catalog()
# the defects this catalog found (fixed), kept in every run as regression tests: deep nesting (RecursionError),
# an optimizer.pt that is no optimizer state, a step of 2**64 or more, a zip version zipfile cannot read
_REGRESSIONS = ("nested 990 deep", "optimizer.pt: holding what", "optimizer.pt: an empty dict", "2**70", "24.6")
CASES = importers.sample(CATALOG, keep=lambda c: any(r in c.name for r in (*_REGRESSIONS, str(2**64))))


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in CASES])
def test_damaged_source(case: importers.ImportCase, tmp_path: Path) -> None:
    with faults.deadline(CASE_SECONDS):
        outcome, found = importers.run_import_case(case, tmp_path)
    assert not any(found.values()), f"{outcome}: {found}"
    if case.expect != "either":
        assert outcome == case.expect


def test_the_catalog_covers_every_kind_and_trick() -> None:
    names = " | ".join(c.name for c in CATALOG)
    assert {c.kind for c in CASES} == set(importers.SOURCES)
    assert {c.group for c in CASES} == {c.group for c in CATALOG}  # the sample tries every damage somewhere
    for trick in (
        "cut in half",
        "evil builtins.exec",
        "persistent id an int",
        "storage of 2**62 elements",
        "shape [2**40] over 4 elements",
        "list nested 100,000 deep",
        "member '../archive/data.pkl'",
        "members under '/'",
        "data.pkl twice",
        "symlinked outside the folder",
        "a missing shard",
        "a shard '../outside.safetensors'",
        "trainer_state.json: cut in half",
    ):
        assert trick in names, trick


def test_the_checker_sees_a_broken_promise(tmp_path: Path) -> None:
    """The checker is not vacuous: a source that must be refused but imports is reported, and so is a
    marker file (what code run from a pickle would leave)."""
    src, marker = importers.build_source("state_dict", tmp_path)
    marker.touch()
    outcome, found = importers.import_problems(src, tmp_path / "dst", marker, expect="refused", names=(src.name,))
    assert outcome == "imported"
    assert found["other broken promises"] and found["silent corruptions"]


def test_random_mutations_of_every_source_kind(tmp_path: Path) -> None:
    rng = random.Random(20261201)
    pristine = importers.fuzz_sources(tmp_path / "pristine")
    problems = []
    with faults.deadline(CASE_SECONDS):
        for i in range(FUZZ_EXAMPLES):
            kind, file, found = importers.fuzz_example(rng, pristine, tmp_path / "scratch")
            problems += [f"example {i} ({kind} {file}): {p}" for ps in found.values() for p in ps]
    assert not problems, problems[:10]
