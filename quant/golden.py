"""Integer golden model: the reference the RTL and the Brevitas model are checked against.

Everything here is int64 arithmetic on integer tensors (no float round trip): products or
signed minimums, sums, and :func:`quant.fixed.requantize`.  Testbenches import these
functions; they are never re-derived in a test.
"""
from __future__ import annotations

import numpy as np
import torch

from licforge.models.minconv import signed_min_matmul
from .fixed import requantize, saturate

__all__ = ["lane_dot", "dot_requant", "im2col", "conv2d_int", "linear_int", "layer_accumulate",
           "subpixel_taps", "conv_transpose2d_int", "div_round_half_even", "gdn_norm_int", "igdn_int",
           "gdn_int", "run_layer", "run_layers"]


def _i64(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.int64))


def lane_dot(x: np.ndarray, w: np.ndarray, op: str, x_shift: int = 0, w_shift: int = 0) -> np.ndarray:
    """``sum_k term(x[..., k], w[..., k])`` with the lane operator of :mod:`rtl.lane_array`:
    ``x*w`` for ``"mul"``; ``sign(x)sign(w)min(|x|<<x_shift, |w|<<w_shift)`` for ``"min"``."""
    x, w = np.asarray(x, np.int64), np.asarray(w, np.int64)
    if op == "mul":
        return (x * w).sum(-1)
    if op == "min":
        return (np.sign(x) * np.sign(w) * np.minimum(np.abs(x) << x_shift, np.abs(w) << w_shift)).sum(-1)
    raise ValueError(f"op must be 'mul' or 'min', not {op!r}")


def dot_requant(x: np.ndarray, w: np.ndarray, op: str, *, shift: int, out_bits: int,
                x_shift: int = 0, w_shift: int = 0, relu: bool = False) -> np.ndarray:
    """One output of a :class:`rtl.lane_array.LaneArray` per row of ``x``/``w``."""
    acc = lane_dot(x, w, op, x_shift, w_shift)
    out = requantize(acc, shift, out_bits, signed=True)
    return np.maximum(out, 0) if relu else out


def im2col(x: np.ndarray, k: int, stride: int, padding: int) -> np.ndarray:
    """Patches of an NCHW integer tensor: (n, ho*wo, c*k*k), channel-major within a patch
    (the order of ``weight.reshape(o, -1)``), positions in raster order."""
    xt = torch.nn.functional.pad(_i64(x), (padding,) * 4)
    cols = xt.unfold(2, k, stride).unfold(3, k, stride)  # n,c,ho,wo,kh,kw
    n, c, ho, wo = cols.shape[:4]
    return cols.permute(0, 2, 3, 1, 4, 5).reshape(n, ho * wo, c * k * k).numpy()


def conv2d_int(x: np.ndarray, w: np.ndarray, stride: int, padding: int, op: str = "mul",
               x_shift: int = 0, w_shift: int = 0) -> np.ndarray:
    """Integer 2-D convolution accumulator (NCHW), products or signed minimums."""
    w = np.asarray(w, np.int64)
    o, _, k, _ = w.shape
    n, _, h, wd = np.shape(x)
    ho, wo = (h + 2 * padding - k) // stride + 1, (wd + 2 * padding - k) // stride + 1
    acc = linear_int(im2col(x, k, stride, padding), w.reshape(o, -1), op, x_shift, w_shift)
    return acc.reshape(n, ho, wo, o).transpose(0, 3, 1, 2)


def linear_int(x: np.ndarray, w: np.ndarray, op: str = "mul", x_shift: int = 0, w_shift: int = 0) -> np.ndarray:
    """Integer fully connected accumulator, products or signed minimums."""
    xt, wt = _i64(x) << x_shift, _i64(w) << w_shift
    if op == "min":
        return signed_min_matmul(xt, wt).numpy()
    return (xt @ wt.T).numpy()


def layer_accumulate(kind: str, x: np.ndarray, w: np.ndarray, op: str, stride: int = 1, padding: int = 0,
                     x_shift: int = 0, w_shift: int = 0) -> np.ndarray:
    """Accumulator of a ``conv2d`` or ``linear`` layer (before requantization)."""
    if kind == "conv2d":
        return conv2d_int(x, w, stride, padding, op, x_shift, w_shift)
    if kind == "linear":
        return linear_int(x, w, op, x_shift, w_shift)
    raise ValueError(f"layer kind must be 'conv2d' or 'linear', not {kind!r}")


def subpixel_taps(k: int, stride: int, padding: int, phase: int) -> list[tuple[int, int]]:
    """Taps of one output phase of a transposed convolution, as (kernel index, input offset).

    Output row ``y = stride*i + phase`` of ``conv_transpose2d`` receives kernel rows ``ky``
    with ``ky = (phase + padding) mod stride`` (mod ``stride``), from input row
    ``i + (phase + padding - ky) / stride``.  For k=5, stride=2, padding=2 the even phase has
    3 taps (offsets +1, 0, -1) and the odd phase 2 (offsets +1, 0): 25 taps per 2x2 block.
    """
    return [(ky, (phase + padding - ky) // stride) for ky in range(k) if (ky - phase - padding) % stride == 0]


def conv_transpose2d_int(x: np.ndarray, w: np.ndarray, stride: int, padding: int,
                         output_padding: int) -> np.ndarray:
    """Integer transposed convolution accumulator (NCHW; ``w`` is (Cin, Cout, K, K) as in
    PyTorch), computed by sub-pixel decomposition: ``stride**2`` ordinary convolutions with
    the sub-kernels, interleaved (no multiplications by inserted zeros)."""
    xt = _i64(x)
    wt = _i64(w)
    n, c, h, wd = xt.shape
    cin, cout, k, _ = wt.shape
    if cin != c:
        raise ValueError(f"conv_transpose2d_int: input has {c} channels, weight expects {cin}")
    ho = (h - 1) * stride - 2 * padding + k + output_padding
    wo = (wd - 1) * stride - 2 * padding + k + output_padding
    out = torch.zeros((n, cout, ho, wo), dtype=torch.int64)
    pad = k  # enough zero border for every offset
    xp = torch.nn.functional.pad(xt, (pad,) * 4)
    for a in range(stride):
        rows = len(range(a, ho, stride))
        for b in range(stride):
            cols = len(range(b, wo, stride))
            acc = torch.zeros((n, rows, cols, cout), dtype=torch.int64)
            for ky, dy in subpixel_taps(k, stride, padding, a):
                for kx, dx in subpixel_taps(k, stride, padding, b):
                    patch = xp[:, :, pad + dy: pad + dy + rows, pad + dx: pad + dx + cols]
                    acc += patch.permute(0, 2, 3, 1) @ wt[:, :, ky, kx]
            out[:, :, a::stride, b::stride] = acc.permute(0, 3, 1, 2)
    return out.numpy()


def div_round_half_even(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` rounded half to even, for int64 ``num`` and positive int64 ``den``."""
    num, den = np.asarray(num, np.int64), np.asarray(den, np.int64)
    if (den <= 0).any():
        raise ValueError("div_round_half_even: denominators must be positive")
    q, r = np.divmod(num, den)  # floor division, 0 <= r < den
    twice = 2 * r
    up = (twice > den) | ((twice == den) & ((q & 1) == 1))
    return q + up.astype(np.int64)


def gdn_norm_int(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, norm_shift: int,
                 norm_bits: int) -> np.ndarray:
    """Simplified GDN norm in integers: ``n_i = requant(beta_i + sum_j gamma_ij |x_j|)``
    (unsigned ``norm_bits``); ``x`` NCHW, ``gamma`` (C, C), ``beta`` (C,) at the
    accumulator scale (x scale x gamma scale)."""
    xa = np.abs(np.asarray(x, np.int64))
    acc = np.einsum("ij,njhw->nihw", np.asarray(gamma, np.int64), xa) + np.asarray(beta, np.int64)[None, :, None, None]
    return requantize(acc, norm_shift, norm_bits, signed=False)


def igdn_int(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, *, norm_shift: int, norm_bits: int,
             out_shift: int, out_bits: int) -> np.ndarray:
    """Hardware-friendly inverse GDN (Johnston et al. 2019, simplified: L1 norm, no square
    root): ``y_i = x_i * n_i`` with ``n`` from :func:`gdn_norm_int`, requantized by
    ``out_shift`` to ``out_bits`` (signed)."""
    n = gdn_norm_int(x, gamma, beta, norm_shift, norm_bits)
    return requantize(np.asarray(x, np.int64) * n, out_shift, out_bits, signed=True)


def gdn_int(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, *, norm_shift: int, norm_bits: int,
            out_shift: int, out_bits: int) -> np.ndarray:
    """Simplified forward GDN: ``y_i = x_i / n_i``.  With scales 2^ex, 2^en, 2^ey the result
    is ``round_half_even(x * 2**-out_shift / n)``, ``out_shift = ey + en - ex``; the division
    is exact integer division with round half to even, then saturation."""
    n = gdn_norm_int(x, gamma, beta, norm_shift, norm_bits)
    if (n <= 0).any():
        raise ValueError("gdn_int: the norm must be positive (beta >= 1 at the norm's scale)")
    x = np.asarray(x, np.int64)
    num = x << np.int64(max(0, -out_shift))
    den = n << np.int64(max(0, out_shift))
    return saturate(div_round_half_even(num, den), out_bits, signed=True)


def run_layer(layer, x: np.ndarray) -> np.ndarray:
    """One bundle layer (:class:`quant.bundle.Layer`) in integer arithmetic."""
    a, t = layer.attrs, layer.tensors
    op = layer.op
    if op == "flatten":
        return np.asarray(x, np.int64).reshape(len(x), -1)
    if op == "latent":  # encoder output -> integer latent symbols (scale 2^0)
        return requantize(x, a["shift"], a["out_bits"], signed=True)
    if op in ("igdn", "gdn"):
        fn = igdn_int if op == "igdn" else gdn_int
        return fn(x, t["gamma"], t["beta"], norm_shift=a["norm_shift"], norm_bits=a["norm_bits"],
                  out_shift=a["out_shift"], out_bits=a["out_bits"])
    if op == "conv_transpose2d":
        acc = conv_transpose2d_int(x, t["weight"], a["stride"], a["padding"], a["output_padding"])
    elif op in ("conv2d", "linear"):
        acc = layer_accumulate(op, x, t["weight"], a["product"], a.get("stride", 1), a.get("padding", 0),
                               a.get("x_shift", 0), a.get("w_shift", 0))
    else:
        raise ValueError(f"layer {layer.name!r}: no golden model for op {op!r}")
    if "bias" in t:
        b = np.asarray(t["bias"], np.int64)
        acc = acc + (b[None, :, None, None] if acc.ndim == 4 else b[None, :])
    y = requantize(acc, a["shift"], a["out_bits"], signed=a.get("out_signed", True))
    return np.maximum(y, 0) if a.get("relu", False) else y


def run_layers(layers, x: np.ndarray) -> np.ndarray:
    """A chain of bundle layers in integer arithmetic."""
    x = np.asarray(x, np.int64)
    for layer in layers:
        x = run_layer(layer, x)
    return x
