"""A small training job that checkpoints mid-epoch, for the SIGKILL resume tests (run as a script).

    python tests/mid_epoch_job.py ROOT OUT.json --loader stateful|recipe [--kill-at STEP]

It trains a dropout MLP on a shuffled dataset for 3 epochs of 7 batches, saves every 3 steps through a
CheckpointManager, and resumes from the newest checkpoint when one exists. ``--kill-at`` SIGKILLs the
process right after that step's optimizer update (before any save of that step). OUT.json gets the
losses by step and the final parameters.

Loaders:
- ``stateful``: torchdata's StatefulDataLoader, saved with ``states={"loader": loader}``; it restores the
  position inside the epoch, and each epoch's order comes from ``gen.manual_seed(1000 + epoch)``: its resume
  draws from the generator in another order than an uninterrupted epoch does (torchdata 0.11), so without a
  per-epoch seed the epochs after a resumed one would be shuffled differently;
- ``recipe``: a plain DataLoader with a user generator: the generator's state at the start of the epoch
  is saved (``states={"epoch_start": ...}``) with the batch index in ``extra``; on resume the generator
  is set back to it and the batches already trained on are skipped (the README's recipe);
- ``naive``: the same skipping without saving the generator: the control that must diverge.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from portable_ckpt import CheckpointManager

# a plain DataLoader's shuffle order comes from its generator; torchdata's resume is exact within an epoch

EPOCHS, BATCH, SAMPLES, SAVE_EVERY = 3, 4, 28, 3


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(SAMPLES, 6, generator=g)
    return TensorDataset(x, (x.sum(dim=1, keepdim=True) > 0).float())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("root")
    p.add_argument("out")
    p.add_argument("--loader", choices=["stateful", "recipe", "naive"], required=True)
    p.add_argument("--kill-at", type=int, default=-1)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(7)
    data = dataset()
    if args.loader == "stateful":
        from torchdata.stateful_dataloader import StatefulDataLoader

        loader: DataLoader = StatefulDataLoader(data, batch_size=BATCH, shuffle=True, generator=gen)
    else:
        loader = DataLoader(data, batch_size=BATCH, shuffle=True, generator=gen)
    epoch_start = torch.Generator()  # the recipe: the shuffling generator as it was when the epoch began
    manager = CheckpointManager(args.root, keep_last=2)
    out = Path(args.out)
    losses: dict[str, float] = json.loads(out.read_text())["losses"] if out.exists() else {}
    states: dict[str, object] = {
        "stateful": {"loader": loader},
        "recipe": {"epoch_start": epoch_start},
        "naive": {},
    }[args.loader]
    ckpt = manager.restore(model, opt, states=states)
    step, epoch, skip = 0, 0, 0
    if ckpt is not None:
        step, epoch, skip = ckpt.step + 1, ckpt.extra["epoch"], ckpt.extra["next_batch"]
        if args.loader == "recipe":
            gen.set_state(epoch_start.get_state())
    while epoch < EPOCHS:
        if args.loader == "stateful" and skip == 0:
            gen.manual_seed(1000 + epoch)  # each epoch's order from its own seed (see the module docstring)
        if args.loader != "stateful" and skip == 0:
            epoch_start.set_state(gen.get_state())
        batches = iter(loader)
        for i, (x, y) in enumerate(batches, start=skip if args.loader == "stateful" else 0):
            if args.loader != "stateful" and i < skip:
                continue  # trained on before the save: draw it again (same order) and move on
            model.train()
            loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[str(step)] = loss.item()
            out.write_text(json.dumps({"losses": losses}))
            if step == args.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if step % SAVE_EVERY == 0:
                manager.save(model, opt, {}, None, step, extra={"epoch": epoch, "next_batch": i + 1}, states=states)
            step += 1
        epoch, skip = epoch + 1, 0
    params = {k: v.tolist() for k, v in model.state_dict().items()}
    out.write_text(json.dumps({"losses": losses, "params": params, "steps": step}))


if __name__ == "__main__":
    main()
