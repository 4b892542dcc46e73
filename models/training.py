"""One seeded training loop for every small model: the digits classifiers (float training,
MinConv fine-tuning, QAT), watermark embedding and deployment, the fine-tuning attack.

:func:`train` runs Adam with a cosine schedule on any task, given a
``loss_fn(net, batch) -> Tensor`` (:func:`classifier_loss` for the classifiers,
rate-distortion for LIC students), for a number of *steps* (full minibatches, the data
reshuffled whenever a pass runs out, the learning rate annealed every step) or of *epochs*
(one shuffled pass each, the last minibatch short, the learning rate annealed every epoch).
A :class:`Marker` (WaterMAS or Uchida, :mod:`watermark`) takes part in every step through
three hooks:

1. ``extra_loss(net)``   added to the task loss (Uchida's regulariser);
2. ``adjust_gradients(net, loss_fn, batch, loss)`` after ``backward``, before the optimiser
   step (WaterMAS's sharpness-aware second pass, and zero gradients on the key weights);
3. ``after_step(net)``   after the optimiser step (WaterMAS re-imposes the key weights).
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from tqdm import tqdm

__all__ = ["Marker", "train", "plain_tensor", "classifier_loss", "epoch_steps"]


class Marker:
    """A participant in every training step (a watermark); the defaults do nothing."""

    def extra_loss(self, net: nn.Module | None = None) -> Tensor | float:
        """Term added to the task loss."""
        return 0.0

    def adjust_gradients(self, net: nn.Module, loss_fn: Callable, batch: Sequence[Tensor],
                         loss: Tensor) -> None:
        """Edit the parameter gradients of this step (called after ``loss.backward()``)."""

    def after_step(self, net: nn.Module | None = None) -> None:
        """Called after every optimiser step."""


def plain_tensor(out) -> Tensor:
    """Plain tensor of a model output or a quantized weight (a Brevitas ``QuantTensor`` gives its ``value``)."""
    return out.value if hasattr(out, "value") else out


def classifier_loss(net: nn.Module, batch: Sequence[Tensor]) -> Tensor:
    """Cross-entropy of ``net`` on ``batch = (x, y)``."""
    x, y = batch
    return nn.functional.cross_entropy(plain_tensor(net(x)), y)


def epoch_steps(n: int, epochs: int, batch: int = 64) -> int:
    """Steps of :func:`train` worth ``epochs`` passes over ``n`` samples: ``epochs * ceil(n / batch)``."""
    return epochs * -(-n // batch)


def _batches(n: int, batch: int, g: torch.Generator, steps: int | None,
             epochs: int | None) -> Iterator[tuple[Tensor, bool]]:
    """Indices of each minibatch, and whether the learning rate is annealed after it (every
    step when counting ``steps``; at the end of each pass when counting ``epochs``)."""
    if epochs is not None:
        for _ in range(epochs):
            perm = torch.randperm(n, generator=g)
            for i in range(0, n, batch):
                yield perm[i:i + batch], i + batch >= n
        return
    order, at = torch.randperm(n, generator=g), 0
    for _ in range(steps):
        if at + batch > n and at > 0:
            order, at = torch.randperm(n, generator=g), 0
        yield order[at:at + batch], True
        at += batch


def train(net: nn.Module, loss_fn: Callable[[nn.Module, Sequence[Tensor]], Tensor],
          data: Sequence[Tensor], *, steps: int | None = None, epochs: int | None = None, lr: float = 1e-3,
          batch: int = 64, seed: int = 0, marker: Marker | None = None, cosine: bool = True,
          on_step: Callable[[int, nn.Module], None] | None = None,
          desc: str = "train", progress: bool = False) -> list[float]:
    """Adam on shuffled minibatches of ``data`` (a tuple of tensors sharing their first
    dimension), for ``steps`` steps or ``epochs`` passes (exactly one of them; see the module
    docstring), ``lr`` cosine-annealed to 0 (or constant with ``cosine=False``); the
    shuffling is seeded by ``seed``; ``on_step(k, net)`` runs after step ``k`` (1-based).
    Leaves ``net`` in eval mode; returns the task loss of every step."""
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps, epochs")
    count = steps if steps is not None else epochs
    if count < 0:
        raise ValueError(f"{'steps' if steps is not None else 'epochs'} must be >= 0, not {count}")
    n = len(data[0])
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, count)) if cosine else None
    total = steps if steps is not None else epoch_steps(n, epochs, batch)
    history = []
    bar = tqdm(_batches(n, batch, g, steps, epochs), total=total, desc=desc, disable=None if progress else True,
               leave=False)
    for k, (idx, anneal) in enumerate(bar, 1):
        part = tuple(t[idx] for t in data)
        net.train()
        loss = loss_fn(net, part)
        total_loss = loss + (marker.extra_loss(net) if marker is not None else 0.0)
        opt.zero_grad()
        total_loss.backward()
        if marker is not None:
            marker.adjust_gradients(net, loss_fn, part, loss.detach())
        opt.step()
        if sched is not None and anneal:
            sched.step()
        if marker is not None:
            marker.after_step(net)
        history.append(float(loss.detach()))
        if on_step is not None:
            on_step(k, net)
    net.eval()
    return history
