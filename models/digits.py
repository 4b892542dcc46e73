"""A small convolutional classifier for scikit-learn's bundled ``load_digits`` (8x8, 10
classes): the embedded default for the MinConv and watermark studies.

    conv1  3x3, 1 -> C1, pad 1      8x8   + ReLU
    conv2  3x3, C1 -> C2, stride 2  4x4   + ReLU
    fc     C2*16 -> 10

Layers carry no bias (a MinConv array is a pure dot-product engine).  ``exact=False`` builds
the same network from :class:`MinConv2d` / :class:`MinLinear`.  A network file
(:func:`save_digits_model`) holds the architecture and the weights, nothing else.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .lic import CheckpointError, read_checkpoint
from .minconv import MinConv2d, MinLinear
from .training import plain_tensor

__all__ = ["DigitsNet", "load_digits_split", "to_minconv", "accuracy", "save_digits_model", "load_digits_model",
           "MODEL_FORMAT"]

MODEL_FORMAT = "licforge-digits-model/1"


class DigitsNet(nn.Module):
    """Digits classifier; ``c1``, ``c2`` are the channel widths (constructor knobs)."""

    def __init__(self, c1: int = 8, c2: int = 16, exact: bool = True) -> None:
        super().__init__()
        conv, lin = (nn.Conv2d, nn.Linear) if exact else (MinConv2d, MinLinear)
        self.c1, self.c2, self.exact = c1, c2, exact
        self.conv1 = conv(1, c1, 3, padding=1, bias=False)
        self.conv2 = conv(c1, c2, 3, stride=2, padding=1, bias=False)
        self.fc = lin(c2 * 16, 10, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.flatten(1))


def load_digits_split(test_fraction: float = 0.2, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's bundled digits as (x_train, y_train, x_test, y_test); pixels 0..16 are
    scaled to ``p / 16`` in [0, 1], shape (n, 1, 8, 8).  The split is stratified and fixed
    by ``seed`` (default: 1437 training, 360 held-out images)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]
    xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=test_fraction,
                                          random_state=seed, stratify=d.target)
    return (torch.from_numpy(xtr), torch.from_numpy(ytr).long(),
            torch.from_numpy(xte), torch.from_numpy(yte).long())


@torch.no_grad()
def to_minconv(net: DigitsNet, calib: Tensor) -> DigitsNet:
    """Copy an exact network into its MinConv twin and set each layer's power-of-two weight
    gain from the statistics of its input on ``calib`` (transfer learning starts here)."""
    mc = DigitsNet(net.c1, net.c2, exact=False)
    mc.load_state_dict(net.state_dict(), strict=False)
    x = calib
    for layer in (mc.conv1, mc.conv2, mc.fc):
        if layer is mc.fc:
            x = x.flatten(1)
        layer.set_gain_from(x)
        x = torch.relu(layer(x))
    return mc


@torch.no_grad()
def accuracy(net: nn.Module, x: Tensor, y: Tensor) -> float:
    """Top-1 accuracy of ``net`` (float or Brevitas) on (x, y), in eval mode."""
    net.eval()
    return float((plain_tensor(net(x)).argmax(1) == y).float().mean())


def save_digits_model(net: DigitsNet, path: str | Path) -> Path:
    """Write a float digits network (architecture + weights) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": MODEL_FORMAT, "c1": net.c1, "c2": net.c2, "exact": net.exact,
                "state_dict": net.state_dict()}, path)
    return path


def load_digits_model(path: str | Path, writer: str = "licforge watermark embed") -> DigitsNet:
    """The network written by :func:`save_digits_model` at ``path``, in eval mode; a
    :class:`CheckpointError` names the file (and ``writer``, what writes one) when it is
    missing, corrupt, of another format or its weights do not fit."""
    doc = read_checkpoint(path, MODEL_FORMAT, writer)
    try:
        net = DigitsNet(doc["c1"], doc["c2"], exact=doc["exact"])
        net.load_state_dict(doc["state_dict"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a whole digits network ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:160]}); write it again with {writer}") from None
    net.eval()
    return net
