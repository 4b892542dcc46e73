"""Uchida et al. 2017, the baseline: a regulariser that writes the bits into a projection of
one layer's mean kernel.

Uchida, Nagai, Sakazawa, Satoh, "Embedding Watermarks into Deep Neural Networks", ICMR 2017.
For a layer with ``L`` output channels and kernels of ``M`` weights (``W`` as ``L x M``),

    w_bar = (1/L) sum_l W[l, :]                     (mean kernel, eq. 1 of the paper)
    y_j   = sigmoid(sum_i X[j, i] w_bar[i])          (X: secret T x M matrix, N(0, 1))
    E_R   = -lam sum_j [b_j log y_j + (1 - b_j) log(1 - y_j)]   (binary cross-entropy)

``E_R`` is added to the task loss during training; the bits are read back as
``b_j = [sum_i X[j, i] w_bar[i] > 0]``.  A positive per-layer scale does not change the
signs, so the bits read from the deployed integers ``q = w / 2**e`` are those of the weights
the regulariser saw.  To make the integers carry the bits, licforge applies the regulariser
to the layer's *effective* weight: the fake-quantized one for a Brevitas layer during QAT
(gradients through Brevitas' straight-through estimator), the float one otherwise.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import Tensor, nn

from .keys import WatermarkKey
from .layers import OUT_AXIS, dot_modules, rows
from licforge.models.training import Marker

__all__ = ["Uchida", "uchida_bits", "effective_weight"]


def effective_weight(module: nn.Module) -> Tensor:
    """The weight a layer computes with: Brevitas' fake-quantized value, or the float weight."""
    if hasattr(module, "quant_weight"):
        return module.quant_weight().value
    return module.weight


def uchida_bits(key: WatermarkKey, weights: Mapping[str, np.ndarray]) -> np.ndarray:
    """The bits read from ``weights`` (float or integer): ``[X w_bar > 0]``."""
    (name, info), = key.layers.items()
    w_bar = rows(np.asarray(weights[name], np.float64), info["op"]).mean(0)
    return (key.projection() @ w_bar > 0).astype(np.uint8)


class Uchida(Marker):
    """Uchida's regulariser bound to one layer of ``model``; ``lam`` is its weight."""

    def __init__(self, key: WatermarkKey, model: nn.Module, *, lam: float = 0.01) -> None:
        if key.scheme != "uchida":
            raise ValueError(f"Uchida needs a uchida key, not a {key.scheme} key")
        (name, info), = key.layers.items()
        mods = dot_modules(model)
        if name not in mods:
            raise ValueError(f"the key's layer {name!r} is not in the model (layers: {list(mods)})")
        if list(mods[name].weight.shape) != list(info["shape"]):
            raise ValueError(f"layer {name!r}: the key is for shape {info['shape']}, the model's is "
                             f"{list(mods[name].weight.shape)}")
        self.key, self.lam, self.module = key, float(lam), mods[name]
        self.axis = OUT_AXIS[info["op"]]
        w = mods[name].weight
        self.X = torch.as_tensor(key.projection(), dtype=w.dtype)
        self.target = torch.as_tensor(key.bits, dtype=w.dtype)

    def projections(self) -> Tensor:
        """``X w_bar`` for the layer's current effective weight (differentiable)."""
        w = effective_weight(self.module)
        w_bar = torch.movedim(w, self.axis, 0).reshape(w.shape[self.axis], -1).mean(0)
        return self.X @ w_bar

    def extra_loss(self, net: nn.Module | None = None) -> Tensor:
        """``E_R`` of the module docstring (binary cross-entropy on logits ``X w_bar``), summed
        over the bits as in the paper."""
        return self.lam * nn.functional.binary_cross_entropy_with_logits(
            self.projections(), self.target, reduction="sum")
