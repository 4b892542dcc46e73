"""One training loop for embedding, deployment (QAT) and the fine-tuning attack.

:func:`train` runs Adam with a cosine schedule for a number of *steps* on any task, given a
``loss_fn(net, batch) -> Tensor``: cross-entropy for the classifiers, rate-distortion for LIC
students.  A :class:`Marker` (WaterMAS or Uchida) takes part in every step through three
hooks, the first and last of which have the signature of the ``extra_loss(net)`` /
``after_step(net)`` hooks of :func:`models.training.fit_classifier` and the QAT loops, so a
marker can also ride along in those loops (WaterMAS's sharpness term needs this loop, see
:class:`watermark.watermas.WaterMAS`):

1. ``extra_loss(net)``   added to the task loss (Uchida's regulariser);
2. ``adjust_gradients(net, loss_fn, batch, loss)`` after ``backward``, before the optimiser
   step (WaterMAS's sharpness-aware second pass, and zero gradients on the key weights);
3. ``after_step(net)``   after the optimiser step (WaterMAS re-imposes the key weights).

The attacker's fine-tuning uses the same loop with no marker.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from tqdm import tqdm

__all__ = ["Marker", "train", "logits", "classifier_loss"]


class Marker:
    """A watermark that takes part in training; the defaults do nothing."""

    def extra_loss(self, net: nn.Module | None = None) -> Tensor | float:
        """Term added to the task loss."""
        return 0.0

    def adjust_gradients(self, net: nn.Module, loss_fn: Callable, batch: Sequence[Tensor],
                         loss: Tensor) -> None:
        """Edit the parameter gradients of this step (called after ``loss.backward()``)."""

    def after_step(self, net: nn.Module | None = None) -> None:
        """Called after every optimiser step."""


def logits(out) -> Tensor:
    """Plain tensor of a model output (a Brevitas ``QuantTensor`` gives its ``value``)."""
    return out.value if hasattr(out, "value") else out


def classifier_loss(net: nn.Module, batch: Sequence[Tensor]) -> Tensor:
    """Cross-entropy of ``net`` on ``batch = (x, y)``."""
    x, y = batch
    return nn.functional.cross_entropy(logits(net(x)), y)


def train(net: nn.Module, loss_fn: Callable[[nn.Module, Sequence[Tensor]], Tensor],
          data: Sequence[Tensor], *, steps: int, lr: float = 1e-3, batch: int = 64, seed: int = 0,
          marker: Marker | None = None, cosine: bool = True,
          on_step: Callable[[int, nn.Module], None] | None = None,
          desc: str = "train", progress: bool = False) -> list[float]:
    """``steps`` Adam steps on shuffled minibatches of ``data`` (a tuple of tensors sharing
    their first dimension), ``lr`` cosine-annealed to 0 (or constant with ``cosine=False``);
    ``on_step(k, net)`` runs after step ``k`` (1-based).  Returns the task loss of every step."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, not {steps}")
    n = len(data[0])
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps)) if cosine else None
    order, at, history = torch.randperm(n, generator=g), 0, []
    for k in tqdm(range(1, steps + 1), desc=desc, disable=None if progress else True, leave=False):
        if at + batch > n and at > 0:
            order, at = torch.randperm(n, generator=g), 0
        idx = order[at:at + batch]
        at += batch
        part = tuple(t[idx] for t in data)
        net.train()
        loss = loss_fn(net, part)
        total = loss + (marker.extra_loss(net) if marker is not None else 0.0)
        opt.zero_grad()
        total.backward()
        if marker is not None:
            marker.adjust_gradients(net, loss_fn, part, loss.detach())
        opt.step()
        if sched is not None:
            sched.step()
        if marker is not None:
            marker.after_step(net)
        history.append(float(loss.detach()))
        if on_step is not None:
            on_step(k, net)
    net.eval()
    return history
