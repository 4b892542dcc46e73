"""MinConv layers (Yang et al., "MinConvNets: a new class of multiplication-less neural
networks", 2021): every product ``x * w`` of the forward pass is replaced by

    x (*) w = sign(x) * sign(w) * min(|x|, |w|)

a comparator and sign logic instead of a multiplier.  The approximation is good when
features and weights have similar mean and variance; the layers here keep a per-layer
power-of-two weight gain ``2**log2_gain`` that brings the weights to the scale of the
features (``min(|x|, |g w|) / g``), chosen from statistics at conversion, so that the
constraint holds and the gain is a free shift in hardware.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["signed_min_matmul", "min_conv2d", "min_linear", "MinConv2d", "MinLinear"]


def signed_min_matmul(cols: Tensor, weight: Tensor, chunk: int = 64) -> Tensor:
    """``out[..., o] = sum_k sign(cols[..., k]) sign(w[o, k]) min(|cols[..., k]|, |w[o, k]|)``.

    ``cols``: (..., K); ``weight``: (O, K).  Works on float tensors (training, Brevitas
    fake-quant) and on int64 tensors (the integer golden model) alike; evaluated in chunks of
    output rows so memory stays at ``prod(...) * chunk * K`` elements.
    """
    if cols.shape[-1] != weight.shape[-1]:
        raise ValueError(f"signed_min_matmul: inner sizes differ, {cols.shape[-1]} vs {weight.shape[-1]}")
    xs, xa = torch.sign(cols).unsqueeze(-2), cols.abs().unsqueeze(-2)
    outs = []
    for o0 in range(0, weight.shape[0], chunk):
        w = weight[o0:o0 + chunk]
        terms = xs * torch.sign(w) * torch.minimum(xa, w.abs())
        outs.append(terms.sum(-1))
    return torch.cat(outs, -1)


def min_conv2d(x: Tensor, weight: Tensor, stride: int = 1, padding: int = 0) -> Tensor:
    """2-D MinConv: ``conv2d`` with every product replaced by the signed minimum."""
    n, c, h, w = x.shape
    o, ci, kh, kw = weight.shape
    if ci != c:
        raise ValueError(f"min_conv2d: input has {c} channels, weight expects {ci}")
    ho = (h + 2 * padding - kh) // stride + 1
    wo = (w + 2 * padding - kw) // stride + 1
    if x.dtype.is_floating_point:
        cols = F.unfold(x, (kh, kw), padding=padding, stride=stride)  # (n, c*kh*kw, L)
    else:  # integer golden model: unfold by indexing, no float round trip
        xp = F.pad(x, (padding,) * 4)
        patches = xp.unfold(2, kh, stride).unfold(3, kw, stride)  # n,c,ho,wo,kh,kw
        cols = patches.permute(0, 1, 4, 5, 2, 3).reshape(n, c * kh * kw, ho * wo)
    out = signed_min_matmul(cols.transpose(1, 2), weight.reshape(o, -1))  # (n, L, o)
    return out.transpose(1, 2).reshape(n, o, ho, wo)


def min_linear(x: Tensor, weight: Tensor) -> Tensor:
    """Fully connected MinConv layer: ``linear`` with the signed minimum."""
    return signed_min_matmul(x, weight)


class _GainMixin:
    """Holds the power-of-two weight gain ``2**log2_gain`` (a buffer, not trained)."""

    log2_gain: Tensor

    def _init_gain(self) -> None:
        self.register_buffer("log2_gain", torch.zeros((), dtype=torch.int64))

    def set_gain_from(self, x: Tensor) -> int:
        """Choose the gain so that mean |g w| is the power of two nearest mean |x| (non-zero)."""
        xa = x.detach().abs()
        xa = xa[xa > 0]
        wa = self.weight.detach().abs().mean()
        k = 0 if xa.numel() == 0 or wa == 0 else round(math.log2(float(xa.mean() / wa)))
        self.log2_gain.fill_(k)
        return k

    @property
    def gain(self) -> float:
        return float(2.0 ** int(self.log2_gain))


class MinConv2d(_GainMixin, nn.Conv2d):
    """``nn.Conv2d`` whose products are signed minimums; same parameters, same shapes."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_gain()
        if self.dilation != (1, 1) or self.groups != 1 or self.padding_mode != "zeros":
            raise ValueError("MinConv2d supports dilation 1, groups 1 and zero padding only")

    def forward(self, x: Tensor) -> Tensor:
        g = self.gain
        y = min_conv2d(x, self.weight * g, self.stride[0], self.padding[0]) / g
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)


class MinLinear(_GainMixin, nn.Linear):
    """``nn.Linear`` whose products are signed minimums."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_gain()

    def forward(self, x: Tensor) -> Tensor:
        g = self.gain
        y = min_linear(x, self.weight * g) / g
        return y if self.bias is None else y + self.bias
