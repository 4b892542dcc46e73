"""Small, seeded training loops shared by the flows and the watermark studies."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from tqdm import tqdm

__all__ = ["fit_classifier"]


def fit_classifier(net: nn.Module, x: Tensor, y: Tensor, *, epochs: int = 30, lr: float = 3e-3,
                   batch: int = 64, seed: int = 0, extra_loss: Callable[[nn.Module], Tensor] | None = None,
                   after_step: Callable[[nn.Module], None] | None = None,
                   desc: str = "train", progress: bool = True) -> list[float]:
    """Adam + cross-entropy over ``epochs`` shuffled passes; returns the mean loss per epoch.

    ``extra_loss(net)`` is added to every step's loss (a watermark regulariser, say);
    ``after_step(net)`` runs after every optimiser step (e.g. to re-impose fixed weights).
    """
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    history = []
    bar = tqdm(range(epochs), desc=desc, disable=None if progress else True, leave=False)
    for _ in bar:
        net.train()
        perm = torch.randperm(len(x), generator=g)
        total = 0.0
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            if extra_loss is not None:
                loss = loss + extra_loss(net)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if after_step is not None:
                after_step(net)
            total += float(loss.detach()) * len(idx)
        sched.step()
        history.append(total / len(x))
        bar.set_postfix(loss=f"{history[-1]:.4f}")
    return history
