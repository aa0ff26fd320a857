"""Shared fixtures: small models and optimizers that exercise every kind of state."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class TinyLM(nn.Module):
    """Embedding, a linear layer, a head tied to the embedding, and assorted buffers."""

    def __init__(self, vocab: int = 11, dim: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.lin = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("count", torch.tensor(3, dtype=torch.int64))
        self.register_buffer("mask", torch.tensor([True, False, True]))
        self.register_buffer("empty", torch.zeros(0, 4))
        self.register_buffer("f16", torch.linspace(-2, 2, 5, dtype=torch.float16))
        self.register_buffer("b16", torch.linspace(-3, 3, 7, dtype=torch.bfloat16))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(torch.relu(self.lin(self.emb(ids)))))


def train_some(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 3, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, 11, (4, 5), generator=g)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
        loss.backward()
        optimizer.step()


OPTIMIZERS = {
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}


@pytest.fixture
def trained() -> tuple[TinyLM, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = TinyLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_some(model, optimizer)
    return model, optimizer
