"""The benchmark harness runs end to end (quick mode, tiny sizes) and reports every case with sane numbers.

No timing assertions: the numbers depend on the machine. The checks are on completeness and on values
that do not: byte counts, sample counts, orderings that hold by construction.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.cases import CASES, EXTRA_ROWS  # noqa: E402

REPS = 2
FRESH_RUNS = 2  # --quick
SIZE_MIB = 2
TENSORS = 256


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> tuple[dict, Path]:
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "results"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks",
        "--quick",
        "--size-mib",
        str(SIZE_MIB),
        "--tensors",
        str(TENSORS),
        "--scaling",
        "1,2",
        "--lazy-size-mib",
        "2",
        "--async-size-mib",
        "2",
        "--dcp-size-mib",
        "2",
        "--small-tensors",
        "200",
        "--reps",
        str(REPS),
        "--out",
        str(out),
        "--workdir",
        str(tmp),
        "--json",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(tmp.glob("portable-ckpt-bench-*")) == []  # the work folder is removed
    return json.loads(proc.stdout), out


def _by_id(result: dict) -> dict[str, dict]:
    return {row["id"]: row for row in result["rows"]}


@pytest.mark.slow
def test_every_case_and_row_is_reported(result):
    doc, _ = result
    assert doc["failures"] == []
    cases = {row["case"] for row in doc["rows"]}
    assert cases == (set(CASES) - {"async"}) | set(EXTRA_ROWS)  # the async case reports only its own rows
    ids = set(_by_id(doc))
    for state in ("model", "full"):
        for case in (
            "save.raw_fsync",
            "save.raw",
            "save.ours",
            "save.torch",
            "save.torch_fsync",
            "load.raw",
            "load.ours",
            "load.ours_noverify",
            "load.torch",
            "load.torch_mmap",
        ):
            assert f"{case}:{state}" in ids
    assert {
        "save.safetensors:model",
        "load.safetensors:model",
        "save.ours:small",
        "save.ours:few",
        "save.ours:scale-1",
        "load.ours:scale-2",
        "lazy:lazy",
        "lazy.raw:lazy",
        "lazy:small",
    } <= ids
    assert "save.safetensors:full" not in ids  # safetensors cannot hold the optimizer state


@pytest.mark.slow
def test_numbers_are_sane(result):
    doc, _ = result
    for row in doc["rows"]:
        s = row["samples"]
        assert len(s) == REPS, row["id"]  # the async case saves max(2, reps) times
        assert all(x > 0 for x in s), row["id"]
        assert row["min_s"] <= row["median_s"] <= row["max_s"], row["id"]
        assert all(isinstance(r, int) and r >= 0 for r in row["rss_increase"]), row["id"]
        if row["direction"] in ("save", "load"):
            assert row["bytes"] > 0 and row["gb_per_s"] > 0, row["id"]
        if row["baseline_id"]:
            assert row["ratio"] > 0, row["id"]
        if row["direction"] in ("save", "load", "lazy") and row["baseline_id"]:
            # the raw limit was timed alternately in the same process
            assert row["paired"] and len(row["paired_samples"]) == REPS, row["id"]
            assert row["paired_case"] == row["baseline_id"].split(":")[0]


@pytest.mark.slow
def test_bytes_are_the_states(result):
    doc, _ = result
    rows = _by_id(doc)
    model = rows["save.raw_fsync:model"]["bytes"]
    assert rows["save.raw:model"]["bytes"] == model
    assert abs(model - SIZE_MIB * 2**20) < 0.05 * SIZE_MIB * 2**20
    # AdamW: exp_avg and exp_avg_sq per parameter (twice the model) and a 4-byte step per parameter
    assert rows["save.raw_fsync:full"]["bytes"] == 3 * model + 4 * TENSORS
    # ours writes the same tensor bytes plus headers, manifest, RNG state and the optimizer's pickle framing
    for state, raw in (("model", model), ("full", 3 * model)):
        assert raw < rows[f"save.ours:{state}"]["bytes"] < raw + (1 << 20)
        assert rows[f"load.ours:{state}"]["bytes"] == rows[f"load.ours_noverify:{state}"]["bytes"]
    lazy = rows["lazy:lazy"]["extra"]
    assert lazy["tensor_bytes"] <= lazy["bytes_read"] < lazy["checkpoint_bytes"]
    assert rows["async.call_sync:async"]["bytes"] == rows["async.call_async:async"]["bytes"] > 0


@pytest.mark.slow
def test_targets_and_report_files(result):
    doc, out = result
    assert {t["status"] for t in doc["targets"]} <= {"PASS", "FAIL", "INFO"}
    assert len([t for t in doc["targets"] if t["status"] == "INFO"]) == 4
    (json_file,) = out.glob("*.json")
    (md_file,) = out.glob("*.md")
    assert json.loads(json_file.read_text()) == doc
    md = md_file.read_text()
    assert "| case | state | bytes | median s |" in md and "## Targets" in md
    # a table line per row after the header, and one per fresh-process pair after its own
    assert md.count("\n| ") == len(doc["rows"]) + 1 + len(doc["fresh"]) + 1
    assert "## Fresh-process pairs" in md


@pytest.mark.slow
def test_fresh_process_pairs_and_io_series(result):
    doc, _ = result
    pairs = {p["id"]: p for p in doc["fresh"]}
    assert set(pairs) == {"save.ours:model", "save.ours:full", "load.ours:model", "load.ours:full"}
    for p in pairs.values():
        assert p["runs"] == FRESH_RUNS == len(p["samples"]) == len(p["paired_samples"]) == len(p["ratios"])
        assert all(x > 0 for x in p["samples"] + p["paired_samples"])
        assert p["ratios"] == [a / b for a, b in zip(p["samples"], p["paired_samples"], strict=True)]
        assert p["ratio_min"] <= p["ratio_median"] <= p["ratio_p90"] <= p["ratio_max"]
    assert pairs["save.ours:full"]["against"] == "save.raw_fsync"
    assert pairs["load.ours:model"]["against"] == "load.ours_noverify"
    fresh_targets = [t for t in doc["targets"] if "fresh processes" in t["figure"]]
    assert len(fresh_targets) == 4 and {t["status"] for t in fresh_targets} <= {"PASS", "FAIL"}
    rows = _by_id(doc)
    for n in (1, 2):  # --quick: PORTABLE_CKPT_IO_THREADS=1,2
        for case in ("save.ours", "load.ours"):
            assert rows[f"{case}:io-{n}"]["bytes"] == rows[f"{case}:full"]["bytes"]


def test_distributed_section(result):
    """Two gloo ranks: our sharded save and loads against DCP's own storage, as ratios per repetition."""
    doc, _ = result
    section = doc["dcp"]
    assert (section["world_size"], section["reps"], section["size_mib"]) == (2, REPS, 2.0)
    for key in (
        "save_vs_filesystem_writer",
        "load_vs_filesystem_reader (2 -> 2)",
        "reshard_load_vs_filesystem_reader (2 -> 1)",
    ):
        r = section[key]
        assert 0 < r["min"] <= r["median"] <= r["max"], (key, r)
        assert r["ours_s"] > 0 and r["theirs_s"] > 0, (key, r)
    assert set(section["extra_peak_rss_fraction_of_shard"]) == {"save.ours", "save.dcp", "load.ours", "load.dcp"}
    assert section["shard_mib"] > 0


def test_incremental_section(result):
    """int4 LoRA: incremental saves (frozen parts linked) against full saves, alternated, in one process."""
    doc, _ = result
    section = doc["incremental"]
    assert (section["reps"], section["size_mib"]) == (REPS, 16.0)  # --quick
    assert len(section["rows"]) == REPS
    t = section["time_ratio"]
    assert isinstance(t["median"], float) and 0 < t["min"] <= t["median"] <= t["max"]
    for row in section["rows"]:
        inc, full = row["incremental"], row["full"]
        assert inc["s"] > 0 and full["s"] > 0
        # what the save wrote covers what changed (adapters, optimizer, small files), and no frozen part
        assert inc["wchar"] >= 0.9 * inc["changed_bytes"] > 0
        assert inc["new_bytes"] == inc["changed_bytes"] < inc["total_bytes"]
        assert inc["reused"] > 0 and inc["reused"] == inc["parts"]["frozen"]
        assert inc["written"] == inc["parts"]["trainable"] > 0
        assert inc["reused_bytes"] == inc["linked_bytes"] == inc["total_bytes"] - inc["changed_bytes"]
        assert full["wchar"] >= full["bytes"] > inc["wchar"]
    assert section["first_save"]["reused"] == 0 and section["first_save"]["written"] > 0
    assert section["model"]["frozen_bytes"] > 0.9 * 16 * 2**20
    check = section["value_check"]
    assert check["equal"] and check["mismatches"] == [] and check["tensors_compared"] > 0
    names = {t["target"]: t for t in doc["targets"]}
    for name in (
        "incremental save (int4 LoRA) time ≤ 0.2× a full save",
        "incremental save (int4 LoRA): bytes written ≤ 1.1× bytes changed",
    ):
        assert names[name]["status"] in {"PASS", "FAIL"}
