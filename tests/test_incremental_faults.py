"""Incremental saves (format_version 3, format_spec §21.3) under fault injection: kills, failing links and
writes, parts changed or removed behind the checkpoints' back, retention racing a save that links, and the
same on S3 (server-side copies). The model (faults.incremental.IncModel) has two frozen parts, a slow and a
fast trainable part, so every save after the first reuses two or three parts of the previous checkpoint.

What must hold: reuse is never a reason for a save to fail (a failed link or copy: the part is written);
a save that fails otherwise raises CheckpointWriteError and leaves the root as it was; every committed
checkpoint loads verified with its step's values, and one whose (shared) part was damaged is refused naming
that part, never loaded wrong. ``tests/stress.py --only incremental`` runs many more of each.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
from collections.abc import Iterator
from pathlib import Path

import faults
import pytest
from faults import incremental as inc
from faults import remote

import portable_ckpt as pc

STEPS = 4


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root holding incremental steps 1 and 2 (step 2 links step 1's frozen and slow parts)."""
    return inc.template(tmp_path_factory.mktemp("incremental"))


def test_the_model_reuses_what_is_unchanged(template: Path, tmp_path: Path) -> None:
    """The premise of every test here: step 2 hard-links exactly the parts whose tensors did not change."""
    assert inc.shared_parts(template, 1, 2) == inc.reusable(1, 2) == [*inc.FROZEN_PARTS, inc.SLOW_PART]
    assert inc.check_all(template) == ([], [], [])
    root = inc.copy_root(template, tmp_path / "root")
    inc.inc_save(inc.inc_manager(root), 3)  # 3 // SLOW != 2 // SLOW: only the frozen parts are reused
    assert inc.shared_parts(root, 2, 3) == list(inc.FROZEN_PARTS)
    assert inc.check_all(root) == ([], [], [])


# --------------------------------------------------------------------------------------------------
# kill trials
# --------------------------------------------------------------------------------------------------


def test_sigkill_of_an_incremental_writer_loses_nothing(tmp_path: Path) -> None:
    """Killed before random I/O calls (os.link included) and after random delays; plus before the first and
    the last link of a save and its commit rename. Every committed checkpoint loads with its values, the
    newest reported commit is there, the next manager clears every temporary and reuses parts again."""
    calls, seconds = inc.count_inc_ops(tmp_path / "count", STEPS)
    ops = len(calls)
    links = [i + 1 for i, c in enumerate(calls) if c.startswith("link ")]
    commits = [i + 1 for i, c in enumerate(calls) if re.match(r"rename .*/\.tmp-step-[^/]+ -> .*/step-[0-9]+$", c)]
    assert len(links) >= 2 * (STEPS - 1) and len(commits) == STEPS
    rng = random.Random(20261201)
    results = [
        inc.inc_crash_trial(tmp_path / f"fixed{k}", rng, kind="op", steps=STEPS, ops_per_run=ops, kill_op=k)
        for k in (links[0], links[-1], commits[1])
    ]
    results += [
        inc.inc_crash_trial(tmp_path / "random", rng, kind=kind, steps=STEPS, ops_per_run=ops, seconds=seconds)
        for kind in ("op", "op", "time")
    ]
    failures = [f"{r.mode}: committed {r.committed}, loaded {r.loaded}: {r.problems}" for r in results if not r.ok]
    assert not failures, "\n".join(failures)
    assert [len(r.committed) < STEPS for r in results[:3]] == [True] * 3, "a fixed kill did not land inside a save"


# --------------------------------------------------------------------------------------------------
# I/O faults
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", inc.LINK_ERRNOS, ids=lambda c: __import__("errno").errorcode[c])
def test_every_link_failing_means_the_parts_are_written(template: Path, tmp_path: Path, code: int) -> None:
    assert inc.link_failure_problems(template, tmp_path, code) == []


@pytest.mark.parametrize("nth", [1, 2, 3])
def test_one_link_failing_writes_that_part_and_links_the_others(template: Path, tmp_path: Path, nth: int) -> None:
    assert inc.link_failure_problems(template, tmp_path, inc.LINK_ERRNOS[nth % 4], nth=nth) == []


def test_every_io_call_of_an_incremental_save_failing_in_turn(template: Path, tmp_path: Path) -> None:
    """os.write/fsync/open/mkdir/rename/replace/link failing at each call of the save of step 3: a failed link
    is no failure; any other raises CheckpointWriteError, steps 1 and 2 intact, latest unchanged."""
    calls = inc.io_calls(template, tmp_path / "count")
    assert len(calls) > 30 and sum(c.startswith("link ") for c in calls) == 2
    problems = [p for n in range(1, len(calls) + 1) for p in inc.io_sweep_problems(template, tmp_path / f"n{n}", n)]
    writes = [i + 1 for i, c in enumerate(calls) if c.startswith("write ") and "/model-" in c]
    problems += [p for n in writes for p in inc.io_sweep_problems(template, tmp_path / f"p{n}", n, partial=True)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("strategy", faults.STRATEGIES)
def test_every_memory_backend_operation_failing_in_turn(strategy: str) -> None:
    """The n-th operation of the in-memory backend failing, "copy" (its server-side copy) included."""
    operations = inc.memory_operations(strategy)
    assert sum(op.startswith("copy ") for op in operations) == 3
    problems = [p for n in range(1, len(operations) + 1) for p in inc.memory_fault_problems(strategy, n)]
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------------------------------
# changed behind the back
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", inc.BEHIND_CASES)
def test_a_reused_part_changed_or_removed_behind_the_back(case: str, tmp_path: Path) -> None:
    """Step 2's frozen part 0 (one file with step 1's) flipped, truncated, unlinked, replaced, or the whole
    step 2 deleted before the save or right after the writer opened the part (between the manifest's reading
    and the link: retention racing the save). Damaged checkpoints are refused naming the part; step 3 is
    whole and written where its source was missing or changed (see faults.incremental.PROPAGATES)."""
    assert inc.behind_the_back_problems(case, tmp_path / "root") == []


def test_retention_right_after_the_source_part_is_opened_is_really_hit(tmp_path: Path) -> None:
    """The race above lands where it is meant to: the writer opened the source part (to compare its header)
    and then found its checkpoint gone, so it wrote the part instead of linking it."""
    got = inc.behind_the_back("retire-at-open", tmp_path / "root")
    first, *later = got["opened"]
    assert first == inc.PARTS[0]  # opened by name in the source directory (its descriptor): the source part
    assert later and all("/.tmp-step-00000003-" in p for p in later)  # then the part it wrote instead
    assert (got[1], got[2], got[3], got["links"]) == ("ok", "absent", "ok", 1)


def test_a_flipped_data_byte_of_a_shared_part_is_never_loaded(tmp_path: Path) -> None:
    """Both checkpoints holding the damaged file are refused naming it. The next save re-hashes the source
    part before linking it (its memory, the manifest and the header all agree; the bytes on disk do not), so
    it writes the part afresh: step 3 is whole and shares nothing with the damaged file."""
    got = inc.behind_the_back("flip-data", tmp_path / "root")
    part = inc.PARTS[0]
    for step in (1, 2):
        assert got[step].startswith("refused: ") and part in got[step] and "checksum mismatch" in got[step]
    assert got[3] == "ok" and not got["shared"] and got["links"] == 1


def test_a_damaged_source_part_is_not_carried_into_the_next_checkpoint(tmp_path: Path) -> None:
    """The state in memory is right and the save reports success, so its checkpoint holds that state: a
    local source part is re-hashed before it is linked, so a frozen part damaged once (and refused in every
    checkpoint that already shares it) is written afresh by the next save, not carried into it; after a few
    more saves with keep_last=2 the retained checkpoints load."""
    root = tmp_path / "root"
    manager = inc.inc_manager(root, keep_last=2)
    inc.inc_save(manager, 1)
    inc.inc_save(manager, 2)
    inc._flip_data(root / "step-00000002" / inc.PARTS[0])  # one bit of step 1's and 2's shared frozen part
    for step in (3, 4, 5):
        inc.inc_save(manager, step)  # each reports success
    assert inc.committed(root) == [4, 5]
    manager.restore(inc.IncModel(), fall_back=True)
    assert inc.inc_load(root) == (5, [])
    assert inc.inc_load(root / "step-00000004") == (4, [])


def test_overwriting_the_source_checkpoint_itself(tmp_path: Path) -> None:
    """save_checkpoint(step N, overwrite=True) where step N is the source: its parts are linked into the new
    step N, the old one is moved aside and deleted, and the new one keeps its (now only) names."""
    root = tmp_path / "root"
    manager = inc.inc_manager(root, keep_last=1)
    for step in (1, 2, 3):
        inc.inc_save(manager, step)
    before = {p: (root / "step-00000003" / p).stat().st_ino for p in inc.PARTS}
    inc.inc_save(root, 3, overwrite=True)
    after = {p: (root / "step-00000003" / p).stat() for p in inc.PARTS}
    assert [p for p in inc.PARTS if after[p].st_ino == before[p]] == list(inc.PARTS)  # all four reused
    assert [after[p].st_nlink for p in inc.PARTS] == [1, 1, 1, 1]
    assert inc.committed(root) == [3] and inc.check_all(root) == ([], [], []) and faults.leftovers(root) == []


# --------------------------------------------------------------------------------------------------
# retention racing a save that links
# --------------------------------------------------------------------------------------------------


def test_retention_and_drop_after_racing_an_incremental_writer_and_readers(tmp_path: Path) -> None:
    """One process saving incrementally, one running retention (keep_last=1) and drop_after of the newest
    (the source of the save in flight), two verifying readers; then every checkpoint loads whole."""
    counts, result = inc.race_round(tmp_path, steps=12)
    assert result.ok, "\n".join(result.problems)
    assert counts["saves"] == 12 and counts["retentions"] > 0 and counts["drops"] > 0
    assert counts["reused"] > 0  # the writer did link (not every part fell back)


# --------------------------------------------------------------------------------------------------
# S3 (moto's server; skipped without the s3 extra and moto[server])
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3() -> Iterator[remote.S3]:
    missing = [m for m in ("s3fs", "moto", "boto3") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (the s3 extra and moto[server])")
    with remote.s3_server() as server:
        yield server


def test_s3_reuses_unchanged_parts_by_server_side_copy(s3: remote.S3) -> None:
    info, problems = inc.s3_reuse_problems(s3, "plain", "plain")
    assert not problems, "\n".join(problems)
    assert info["copies"] == 3 and info["same"] == inc.reusable(1, 2)


def test_s3_source_deleted_right_before_the_copy_falls_back_to_writing(s3: remote.S3) -> None:
    info, problems = inc.s3_reuse_problems(s3, "deleted", "deleted")
    assert not problems, "\n".join(problems)
    assert info["changed"] and info["changed"] not in info["same"]  # written, not copied


def test_s3_source_replaced_right_before_the_copy_is_never_loaded(s3: remote.S3) -> None:
    """Replaced after the writer read its ETag: S3 refuses the CopyObject (CopySourceIfMatch) and the part is
    written. moto ignores CopySourceIfMatch, so there the copy goes through and step 2 holds the damaged
    bytes: it must then be refused naming the part."""
    info, problems = inc.s3_reuse_problems(s3, "replaced", "replaced")
    moto_copied = [p for p in problems if p.startswith("replaced: step 2 does not load") and info["changed"] in p]
    assert [p for p in problems if p not in moto_copied] == []


def test_sigkill_of_an_incremental_s3_save(s3: remote.S3, tmp_path: Path) -> None:
    server = faults.fork_server()
    server.preload(remote.S3_MODULES)
    [(status, lines)] = server.run([inc.s3_job(s3, "count")], tmp_path / "first")  # step 1: nothing to reuse
    assert status == 0, server.errors()
    [(status, lines)] = server.run([inc.s3_job(s3, "count")], tmp_path / "second")
    assert status == 0, server.errors()
    calls = json.loads(lines[-1])
    assert calls.count("CopyObject") == 3
    rng = random.Random(7)
    copy = calls.index("CopyObject") + 1  # killed just before its first server-side copy, then at random
    # (each trial saves the step after the newest into the same root: an incremental save with parts to copy)
    results = [
        inc.s3_inc_crash_trial(
            server, s3, "count", rng, calls=len(calls), seconds=1.0, workdir=tmp_path / f"t{i}", kill_op=k
        )
        for i, k in enumerate((copy, 0, 0))
    ]
    failures = [f"{r.mode}: committed {r.committed}, loaded {r.loaded}: {r.problems}" for r in results if not r.ok]
    assert not failures, "\n".join(failures)
    assert results[0].committed == []  # the fixed kill landed inside the save


def test_a_failed_incremental_save_raises_the_write_error(template: Path, tmp_path: Path) -> None:
    """A direct check of one mid-save write failure: CheckpointWriteError, steps 1 and 2 and latest intact."""
    root = inc.copy_root(template, tmp_path / "root")
    inj = faults.Injector(ops=("write",), match=r"/\.tmp-step-[^/]+/model-00002-of-00004\.safetensors$", fail_at=1)
    with inj.installed(), pytest.raises(pc.CheckpointWriteError) as raised:
        inc.inc_save(inc.inc_manager(root), 3)
    assert "nothing was committed" in str(raised.value) and inj.failed
    assert inc.root_state(root) == {"steps": [1, 2], "latest": "step-00000002", "leftovers": []}
    assert inc.inc_load(root) == (2, [])
