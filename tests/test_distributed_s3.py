"""A sharded save onto S3: two gloo ranks upload their shards into one step directory of a moto server on
loopback, rank 0 writes the manifest last; retention, restore and a one-process load read it back."""

from __future__ import annotations

from pathlib import Path

import pytest
import s3server
import torch
from test_distributed import assert_same, launch

import portable_ckpt as pc

s3_endpoint, s3_bucket = s3server.s3_endpoint, s3server.s3_bucket  # the fixtures


def test_fsdp_ranks_save_one_checkpoint_onto_s3_and_restore_it(s3_bucket: str, s3_endpoint: str, tmp_path: Path):
    from portable_ckpt.storage import FsspecStorage

    url = f"s3://{s3_bucket}/dist"
    options = s3server.options(s3_endpoint)
    ranks = launch(tmp_path / "out", 2, [("s3", "fsdp_s3", {"url": url, "options": options})], deadline=240)
    reports = [ranks.report("s3", r) for r in range(2)]
    assert all(r is not None and r["ok"] for r in reports), reports
    dist_steps = reports[0]["value"]["step"]
    assert reports[0]["value"]["steps"] == [dist_steps]  # keep_last=1
    saved = torch.load(tmp_path / "out" / "s3-saved.pt")
    loaded = torch.load(tmp_path / "out" / "s3-loaded.pt")
    assert_same(loaded, saved, "restored from S3 on 2 ranks")
    root = FsspecStorage.from_location(url, storage_options=options)
    ckpt = pc.load_checkpoint(root, restore_rng=False)  # one process, no process group: full tensors
    assert ckpt.format_version == 2 and ckpt.step == dist_steps
    assert_same(ckpt.model_state, saved["model"], "one-process load from S3")
    assert pc.validate_checkpoint(root).valid
    names = sorted(root.child(f"step-{dist_steps:08d}").listdir())
    assert [n for n in names if n.startswith(("model-", "optimizer-"))] == [
        "model-00000-of-00002.safetensors",
        "model-00001-of-00002.safetensors",
        "optimizer-00000-of-00002.safetensors",
        "optimizer-00001-of-00002.safetensors",
    ]
    assert not any(n.startswith(".pending-") for n in root.listdir())


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
