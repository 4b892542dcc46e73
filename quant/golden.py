"""Integer golden model: the reference the RTL and the Brevitas model are checked against.

Everything here is integer arithmetic on integer tensors: products or signed minimums, sums,
and :func:`quant.fixed.requantize`.  Sums of products (convolutions, transposed
convolutions, the GDN norm) run as matrix products in the fastest dtype that computes them
*exactly* (:func:`exact_dtype`): float32 when no partial sum can reach 2**24 in magnitude,
float64 below 2**53, int64 otherwise.  Every partial sum of integer products is an integer
bounded by ``max|x| * max_o sum|w[o]|``; below the dtype's integer limit each such integer
is representable, so every rounding step of the floating-point matrix product is exact in
any summation order, and the result equals the int64 sum bit for bit.  Sums of signed
minimums (``product="min"``: ``sign(x) sign(w) min(|x| << x_shift, |w| << w_shift)``) have no
matrix product; they run as vectorized tensor operations over the taps
(:func:`licforge.models.minconv.signed_min_matmul`) in the same exact dtypes, bounded by
``min(K * max|x|, max_o sum|w[o]|)`` (a minimum never exceeds either operand).  Requantization
(scaling by a power of two, rounding half to even) and the forward GDN's rounded division are
exact in float under the bounds their functions state, so a chain of layers stays in float32
from one layer to the next (:func:`run_layers`); beyond a bound the int64 definitions run.
Testbenches import these functions; they are never re-derived in a test.
"""
from __future__ import annotations

import numpy as np
import torch

from licforge.models.minconv import min_conv_transpose2d, pow2_round_exp, signed_min_matmul, subpixel_taps
from .bundle import Bundle
from .fixed import int_range, requantize, saturate

__all__ = ["exact_dtype", "lane_dot", "dot_requant", "im2col", "conv2d_int", "linear_int", "layer_accumulate",
           "subpixel_taps", "conv_transpose2d_int", "div_round_half_even", "gdn_norm_int", "igdn_int", "pow2_round",
           "gdn_int", "run_layer", "run_layers", "golden_encode", "golden_decode", "golden_forward"]


def _i64(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.int64))


def _np(t: torch.Tensor) -> np.ndarray:
    """An integer-valued tensor (int64, or a float dtype holding exact integers) as int64 numpy."""
    return t.to(torch.int64).numpy()


def _float32_is_ieee() -> bool:
    """True when torch computes float32 matrix products in IEEE single precision (not TF32 or
    bfloat16, which a user may allow with ``torch.set_float32_matmul_precision``)."""
    if torch.get_float32_matmul_precision() != "highest":
        return False
    mkldnn_matmul = getattr(torch.backends.mkldnn, "matmul", None)
    return getattr(mkldnn_matmul, "fp32_precision", "none") in ("none", "ieee")


_EXACT_BELOW = {torch.float32: 1 << 24, torch.float64: 1 << 53}


def exact_dtype(bound: int) -> torch.dtype:
    """The fastest dtype that holds, and sums, integers of magnitude ``<= bound`` exactly:
    float32 below 2**24, float64 below 2**53, else int64 (module doc)."""
    if bound < _EXACT_BELOW[torch.float32] and _float32_is_ieee():
        return torch.float32
    return torch.float64 if bound < _EXACT_BELOW[torch.float64] else torch.int64


def _abs_max(t: torch.Tensor) -> int:
    return int(t.abs().max()) if t.numel() else 0


def _sum_dtype(w: torch.Tensor, max_x: int, max_bias: int = 0) -> tuple[torch.dtype, int]:
    """(:func:`exact_dtype`, bound) for the sums of products of the int64 weight rows ``w``
    (outputs first) with integers ``|x| <= max_x``, plus a bias ``|b| <= max_bias``: every
    partial sum is at most ``bound = max_x * max_o sum|w[o]| + max_bias`` in magnitude."""
    bound = max_x * (int(w.abs().reshape(len(w), -1).sum(1).max()) if w.numel() else 0) + max_bias
    return exact_dtype(bound), bound


def _requant(acc: torch.Tensor, bound: int, shift: int, bits: int, signed: bool) -> torch.Tensor:
    """:func:`quant.fixed.requantize` of integers ``|acc| <= bound`` held exactly in ``acc``'s
    dtype, in that dtype.  In float the scaling by ``2**-shift`` is exact (a power of two) and
    ``torch.round`` rounds half to even, so the result equals the integer definition; int64
    tensors (or bounds beyond the float's integer limit) take the integer definition."""
    lo, hi = int_range(bits, signed)
    if acc.is_floating_point() and max(bound, -lo, hi) < _EXACT_BELOW[acc.dtype]:
        return torch.round(acc * 2.0 ** -shift).clamp_(lo, hi)
    return torch.from_numpy(requantize(_np(acc), shift, bits, signed))


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


def _tap_sum(xp: torch.Tensor, taps: list[tuple[int, int, torch.Tensor]], rows: int, cols: int) -> torch.Tensor:
    """``sum over taps (dy, dx, W) of W @ xp[:, :, dy:dy + rows, dx:dx + cols]`` (a stride-1
    convolution; ``W`` is (outputs, channels)), (n, outputs, rows, cols).  Each tap is one
    matrix product, accumulated in place, whose input is a contiguous run of ``xp``'s flattened
    rows (no copy): the output grid is computed ``xp``'s width wide and its surplus columns
    dropped, so ``xp`` needs one spare row below ``max dy + rows``."""
    n, c, hp, wp = xp.shape
    if max(dy for dy, _, _ in taps) + rows >= hp or max(dx for _, dx, _ in taps) + cols > wp:
        raise ValueError(f"_tap_sum: input {hp}x{wp} too small for a {rows}x{cols} output")
    flat = xp.reshape(n, c, hp * wp)
    acc = torch.zeros((n, len(taps[0][2]), rows * wp), dtype=xp.dtype)
    for dy, dx, w in taps:
        start = dy * wp + dx
        for f in range(n):
            acc[f].addmm_(w, flat[f, :, start:start + rows * wp])
    return acc.reshape(n, -1, rows, wp)[..., :cols]


def _patches(xt: torch.Tensor, k: int, stride: int, padding: int) -> torch.Tensor:
    """:func:`im2col` of a tensor, in its dtype."""
    cols = torch.nn.functional.pad(xt, (padding,) * 4).unfold(2, k, stride).unfold(3, k, stride)  # n,c,ho,wo,kh,kw
    n, c, ho, wo = cols.shape[:4]
    return cols.permute(0, 2, 3, 1, 4, 5).reshape(n, ho * wo, c * k * k)


def im2col(x: np.ndarray, k: int, stride: int, padding: int) -> np.ndarray:
    """Patches of an NCHW integer tensor: (n, ho*wo, c*k*k), channel-major within a patch
    (the order of ``weight.reshape(o, -1)``), positions in raster order."""
    return _patches(_i64(x), k, stride, padding).numpy()


def _bias_of(bias: np.ndarray | None, dims: int) -> tuple[torch.Tensor | None, int]:
    """(bias as an int64 tensor shaped to broadcast over an accumulator of ``dims`` dimensions
    with channels in dim 1, its largest magnitude)."""
    if bias is None:
        return None, 0
    b = _i64(bias)
    return b.reshape((1, -1) + (1,) * (dims - 2)), _abs_max(b)


def _conv2d_taps(x: torch.Tensor, w: torch.Tensor, s: int, padding: int, ho: int, wo: int) -> torch.Tensor:
    """Strided convolution of float tensors as a stride-1 one (:func:`_tap_sum`): the padded
    input split into its ``s*s`` pixel phases (space to depth, channel ``c*s*s + a*s + b``
    holding ``x[c, s*u + a, s*v + b]``) meets kernel taps ``(s*dy + a, s*dx + b)`` at offset
    ``(dy, dx)``, ``ceil(K/s)**2`` taps of ``s*s*C`` channels."""
    o, c, k, _ = w.shape
    n, _, h, wd = x.shape
    kk = -(-k // s)
    hs, ws = max(-(-(h + 2 * padding) // s), ho + kk), max(-(-(wd + 2 * padding) // s), wo + kk - 1)
    xp = torch.nn.functional.pad(x, (padding, ws * s - wd - padding, padding, hs * s - h - padding))
    phases = torch.nn.functional.pixel_unshuffle(xp, s)
    wk = torch.nn.functional.pad(w, (0, kk * s - k, 0, kk * s - k))  # zero taps beyond K
    wk = wk.reshape(o, c, kk, s, kk, s).permute(2, 4, 0, 1, 3, 5).reshape(kk, kk, o, c * s * s)
    return _tap_sum(phases, [(dy, dx, wk[dy, dx]) for dy in range(kk) for dx in range(kk)], ho, wo)


def _dot_acc(kind: str, x: torch.Tensor, w: torch.Tensor, op: str, stride: int, padding: int, x_shift: int,
             w_shift: int, bias: np.ndarray | None = None) -> tuple[torch.Tensor, int]:
    """(accumulator + bias, bound on its partial sums) of a ``conv2d`` (NCHW) or ``linear``
    layer on integer-valued tensors; products as one exact matrix product, minimums in int64."""
    if op != "mul" or x_shift:
        x = x.to(torch.int64) << x_shift
    w = w << w_shift
    o = w.shape[0]
    b, max_b = _bias_of(bias, 4 if kind == "conv2d" else 2)
    if kind == "conv2d":
        k = w.shape[-1]
        n, _, h, wd = x.shape
        ho, wo = (h + 2 * padding - k) // stride + 1, (wd + 2 * padding - k) // stride + 1
    if op == "mul":
        dt, bound = _sum_dtype(w, _abs_max(x), max_b)
        wm = w.reshape(o, -1).to(dt)
        acc = _conv2d_taps(x.to(dt), w.to(dt), stride, padding, ho, wo) if kind == "conv2d" else x.to(dt) @ wm.T
    elif op == "min":
        rows = _patches(x, k, stride, padding).reshape(-1, w[0].numel()) if kind == "conv2d" else x
        acc = signed_min_matmul(rows, w.reshape(o, -1))
        if kind == "conv2d":
            acc = acc.reshape(n, ho, wo, o).permute(0, 3, 1, 2)
        bound = _abs_max(acc) + max_b
    else:
        raise ValueError(f"op must be 'mul' or 'min', not {op!r}")
    return (acc if b is None else acc + b.to(acc.dtype)), bound


def conv2d_int(x: np.ndarray, w: np.ndarray, stride: int, padding: int, op: str = "mul",
               x_shift: int = 0, w_shift: int = 0) -> np.ndarray:
    """Integer 2-D convolution accumulator (NCHW), products (one exact matrix product of the
    patches, :func:`exact_dtype`) or signed minimums."""
    return _np(_dot_acc("conv2d", _i64(x), _i64(w), op, stride, padding, x_shift, w_shift)[0])


def linear_int(x: np.ndarray, w: np.ndarray, op: str = "mul", x_shift: int = 0, w_shift: int = 0) -> np.ndarray:
    """Integer fully connected accumulator, products (an exact matrix product,
    :func:`exact_dtype`) or signed minimums."""
    return _np(_dot_acc("linear", _i64(x), _i64(w), op, 1, 0, x_shift, w_shift)[0])


def layer_accumulate(kind: str, x: np.ndarray, w: np.ndarray, op: str, stride: int = 1, padding: int = 0,
                     x_shift: int = 0, w_shift: int = 0) -> np.ndarray:
    """Accumulator of a ``conv2d`` or ``linear`` layer (before requantization)."""
    if kind == "conv2d":
        return conv2d_int(x, w, stride, padding, op, x_shift, w_shift)
    if kind == "linear":
        return linear_int(x, w, op, x_shift, w_shift)
    raise ValueError(f"layer kind must be 'conv2d' or 'linear', not {kind!r}")


def _min_bound(w: torch.Tensor, max_x: int, fan_in: int, max_bias: int) -> int:
    """Bound on every partial sum of signed minimums of the weight rows ``w`` (outputs first,
    already shifted) with integers ``|x| <= max_x`` (already shifted), ``fan_in`` terms per
    output, plus a bias: a minimum is at most either operand."""
    rows = int(w.abs().reshape(len(w), -1).sum(1).max()) if w.numel() else 0
    return min(rows, fan_in * max_x) + max_bias


def _convt_acc(x: torch.Tensor, w: torch.Tensor, stride: int, padding: int, output_padding: int,
               bias: np.ndarray | None = None, op: str = "mul", x_shift: int = 0,
               w_shift: int = 0) -> tuple[torch.Tensor, int]:
    """(accumulator + bias, bound) of :func:`conv_transpose2d_int` on integer-valued tensors."""
    n, c, h, wd = x.shape
    cin, cout, k, _ = w.shape
    if cin != c:
        raise ValueError(f"conv_transpose2d_int: input has {c} channels, weight expects {cin}")
    if op == "min":
        x, w = x.to(torch.int64) << x_shift, w << w_shift
        b, max_b = _bias_of(bias, 4)
        taps = max(len(subpixel_taps(k, stride, padding, a)) for a in range(stride)) ** 2
        bound = _min_bound(w.transpose(0, 1), _abs_max(x), cin * taps, max_b)
        dt = exact_dtype(bound)
        acc = min_conv_transpose2d(x.to(dt), w.to(dt), stride, padding, output_padding)
        return (acc if b is None else acc + b.to(dt)), bound
    if op != "mul" or x_shift or w_shift:
        raise ValueError(f"conv_transpose2d_int: op must be 'mul' (no shifts) or 'min', not {op!r}")
    s = stride
    ho = (h - 1) * s - 2 * padding + k + output_padding
    wo = (wd - 1) * s - 2 * padding + k + output_padding
    rows, cols = -(-ho // s), -(-wo // s)  # the grid of the longest phase
    taps = [subpixel_taps(k, s, padding, a) for a in range(s)]
    offsets = sorted({d for phase in taps for _, d in phase})
    lo, hi = offsets[0], offsets[-1]
    b, max_b = _bias_of(bias, 4)
    dt, bound = _sum_dtype(w.transpose(0, 1), _abs_max(x), max_b)
    pad = max(0, -lo)  # zero border so that every offset reads inside; one spare row (_tap_sum)
    xp = torch.nn.functional.pad(x.to(dt), (pad, max(0, hi + cols - wd), pad, max(0, hi + rows - h) + 1))
    wt = w.to(dt)
    stacks = []
    for dy in offsets:
        for dx in offsets:
            stack = torch.zeros((s, s, cout, cin), dtype=dt)
            for a in range(s):
                for ky, ty in taps[a]:
                    for bb in range(s):
                        for kx, tx in taps[bb]:
                            if (ty, tx) == (dy, dx):
                                stack[a, bb] = wt[:, :, ky, kx].T
            stacks.append((pad + dy, pad + dx, stack.reshape(s * s * cout, cin)))
    acc = _tap_sum(xp, stacks, rows, cols)
    out = acc.reshape(n, s, s, cout, rows, cols).permute(0, 3, 4, 1, 5, 2)
    out = out.reshape(n, cout, rows * s, cols * s)[:, :, :ho, :wo]
    return (out if b is None else out + b.to(dt)), bound


def conv_transpose2d_int(x: np.ndarray, w: np.ndarray, stride: int, padding: int,
                         output_padding: int, op: str = "mul", x_shift: int = 0, w_shift: int = 0) -> np.ndarray:
    """Integer transposed convolution accumulator (NCHW; ``w`` is (Cin, Cout, K, K) as in
    PyTorch), computed by sub-pixel decomposition (no multiplications by inserted zeros).

    Output phase (a, b) (rows ``stride*i + a``, columns ``stride*j + b``) is an ordinary
    convolution of the input with the taps of :func:`subpixel_taps`; all ``stride**2`` phases
    are computed together, one exact matrix product (:func:`exact_dtype`) per input offset
    (dy, dx) with the phases' weights stacked (zero for a phase without a tap at that offset),
    then interleaved (pixel shuffle) and cropped to the output size.

    ``op="min"``: every product is ``sign(x) sign(w) min(|x| << x_shift, |w| << w_shift)``
    (:func:`licforge.models.minconv.min_conv_transpose2d`, the same sub-pixel phases)."""
    return _np(_convt_acc(_i64(x), _i64(w), stride, padding, output_padding, None, op, x_shift, w_shift)[0])


def div_round_half_even(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` rounded half to even, for int64 ``num`` and positive int64 ``den``."""
    num, den = np.asarray(num, np.int64), np.asarray(den, np.int64)
    if (den <= 0).any():
        raise ValueError("div_round_half_even: denominators must be positive")
    q, r = np.divmod(num, den)  # floor division, 0 <= r < den
    twice = 2 * r
    up = (twice > den) | ((twice == den) & ((q & 1) == 1))
    return q + up.astype(np.int64)


def _gdn_norm(x: torch.Tensor, gamma: np.ndarray, beta: np.ndarray, norm_shift: int, norm_bits: int,
              product: str = "mul", x_shift: int = 0, g_shift: int = 0) -> torch.Tensor:
    """:func:`gdn_norm_int` of an integer-valued tensor, in its exact dtype."""
    xa, g = x.abs(), _i64(gamma)
    n, c = xa.shape[:2]
    b, max_b = _bias_of(beta, 3)
    if product == "min":
        xa, g = xa.to(torch.int64) << x_shift, g << g_shift
        bound = _min_bound(g, _abs_max(xa), c, max_b)
        dt = exact_dtype(bound)
        acc = signed_min_matmul(xa.to(dt).reshape(n, c, -1).transpose(1, 2), g.to(dt)).transpose(1, 2) + b.to(dt)
    elif product == "mul" and not (x_shift or g_shift):
        dt, bound = _sum_dtype(g, _abs_max(xa), max_b)
        acc = g.to(dt) @ xa.to(dt).reshape(n, c, -1) + b.to(dt)
    else:
        raise ValueError(f"GDN norm: product must be 'mul' (no shifts) or 'min', not {product!r}")
    return _requant(acc, bound, norm_shift, norm_bits, False).reshape(x.shape)


def gdn_norm_int(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, norm_shift: int, norm_bits: int,
                 norm_product: str = "mul", norm_x_shift: int = 0, norm_g_shift: int = 0) -> np.ndarray:
    """Simplified GDN norm in integers: ``n_i = requant(beta_i + sum_j gamma_ij |x_j|)``
    (unsigned ``norm_bits``); ``x`` NCHW, ``gamma`` (C, C), ``beta`` (C,) at the
    accumulator scale (x scale x gamma scale).  ``norm_product="min"``: each product is
    ``min(|x_j| << norm_x_shift, gamma_ij << norm_g_shift)`` (gamma >= 0, no sign)."""
    return _np(_gdn_norm(_i64(x), gamma, beta, norm_shift, norm_bits, norm_product, norm_x_shift, norm_g_shift))


def pow2_round(n: np.ndarray) -> np.ndarray:
    """Exponent ``e`` of the power of two nearest the integer ``n >= 0`` in the linear domain,
    ties up: ``L = bit_length(n)``, ``e = L - 1 + bit (L - 2) of n`` (for ``L >= 2``), ``-1``
    where ``n == 0`` (int64).  The leading-one detector of the multiplier-free inverse GDN."""
    n = np.asarray(n, np.int64)
    if (n < 0).any() or (n >= 1 << 53).any():
        raise ValueError("pow2_round: n must lie in [0, 2**53)")
    return pow2_round_exp(torch.from_numpy(n)).numpy()


def _igdn(x: torch.Tensor, gamma: np.ndarray, beta: np.ndarray, norm_shift: int, norm_bits: int,
          out_shift: int, out_bits: int, norm_product: str = "mul", norm_x_shift: int = 0,
          norm_g_shift: int = 0, out_product: str = "mul") -> torch.Tensor:
    """:func:`igdn_int` of an integer-valued tensor: the product ``x * n`` (or the shift
    ``x << e``, ``e`` = :func:`pow2_round` of ``n``) in :func:`exact_dtype`."""
    n = _gdn_norm(x, gamma, beta, norm_shift, norm_bits, norm_product, norm_x_shift, norm_g_shift)
    if out_product == "shift":
        e = pow2_round_exp(n)
        n = torch.where(e >= 0, torch.ldexp(torch.ones((), dtype=torch.float64), e.clamp(min=0).double()), 0.0)
        n = n.to(torch.int64)
    elif out_product != "mul":
        raise ValueError(f"igdn: out_product must be 'mul' or 'shift', not {out_product!r}")
    bound = _abs_max(x) * _abs_max(n)
    dt = exact_dtype(bound)
    return _requant(x.to(dt) * n.to(dt), bound, out_shift, out_bits, True)


def igdn_int(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, *, norm_shift: int, norm_bits: int,
             out_shift: int, out_bits: int, norm_product: str = "mul", norm_x_shift: int = 0,
             norm_g_shift: int = 0, out_product: str = "mul") -> np.ndarray:
    """Hardware-friendly inverse GDN (Johnston et al. 2019, simplified: L1 norm, no square
    root): ``y_i = x_i * n_i`` with ``n`` from :func:`gdn_norm_int` (``norm_product``,
    shifts), requantized by ``out_shift`` to ``out_bits`` (signed).  ``out_product="shift"``:
    ``n`` is replaced by ``2**pow2_round(n)`` (0 where ``n == 0``), ``y = requant(x << e)``."""
    return _np(_igdn(_i64(x), gamma, beta, norm_shift, norm_bits, out_shift, out_bits, norm_product,
                     norm_x_shift, norm_g_shift, out_product))


def _gdn(x: torch.Tensor, gamma: np.ndarray, beta: np.ndarray, norm_shift: int, norm_bits: int,
         out_shift: int, out_bits: int) -> torch.Tensor:
    """:func:`gdn_int` of an integer-valued tensor.  The quotient ``num / den`` is rounded in
    float64 when ``|num| < 2**52`` and ``den < 2**53``: a quotient that is not a half-integer
    lies at least ``1 / (2 den)`` from one, more than float64's error ``|num| / den * 2**-53``,
    and a half-integer or integer quotient is exact, so ``torch.round`` (half to even) gives the
    integer definition (:func:`div_round_half_even`), which runs otherwise."""
    n = _gdn_norm(x, gamma, beta, norm_shift, norm_bits)
    if (n <= 0).any():
        raise ValueError("gdn_int: the norm must be positive (beta >= 1 at the norm's scale)")
    up, down = max(0, -out_shift), max(0, out_shift)
    lo, hi = int_range(out_bits, True)
    if _abs_max(x) << up < 1 << 52 and _abs_max(n) << down < 1 << 53:
        q = (x.to(torch.float64) * 2.0 ** up) / (n.to(torch.float64) * 2.0 ** down)
        return torch.round(q).clamp_(lo, hi)
    num, den = _np(x) << np.int64(up), _np(n) << np.int64(down)
    return torch.from_numpy(saturate(div_round_half_even(num, den), out_bits, signed=True))


def gdn_int(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, *, norm_shift: int, norm_bits: int,
            out_shift: int, out_bits: int) -> np.ndarray:
    """Simplified forward GDN: ``y_i = x_i / n_i``.  With scales 2^ex, 2^en, 2^ey the result
    is ``round_half_even(x * 2**-out_shift / n)``, ``out_shift = ey + en - ex``; the division
    is exact integer division with round half to even, then saturation."""
    return _np(_gdn(_i64(x), gamma, beta, norm_shift, norm_bits, out_shift, out_bits))


def _run(layer, x: torch.Tensor) -> torch.Tensor:
    """One bundle layer on an integer-valued tensor (int64, or float holding exact integers:
    a chain stays in float32 while every value and sum is exact)."""
    a, t = layer.attrs, layer.tensors
    op = layer.op
    if op == "flatten":
        return x.reshape(len(x), -1)
    if op == "latent":  # encoder output -> integer latent symbols (scale 2^0)
        return _requant(x, _abs_max(x), a["shift"], a["out_bits"], True)
    if op == "igdn":
        return _igdn(x, t["gamma"], t["beta"], a["norm_shift"], a["norm_bits"], a["out_shift"], a["out_bits"],
                     a.get("norm_product", "mul"), a.get("norm_x_shift", 0), a.get("norm_g_shift", 0),
                     a.get("out_product", "mul"))
    if op == "gdn":
        return _gdn(x, t["gamma"], t["beta"], a["norm_shift"], a["norm_bits"], a["out_shift"], a["out_bits"])
    if op == "conv_transpose2d":
        acc, bound = _convt_acc(x, _i64(t["weight"]), a["stride"], a["padding"], a["output_padding"], t.get("bias"),
                                a.get("product", "mul"), a.get("x_shift", 0), a.get("w_shift", 0))
    elif op in ("conv2d", "linear"):
        acc, bound = _dot_acc(op, x, _i64(t["weight"]), a["product"], a.get("stride", 1), a.get("padding", 0),
                              a.get("x_shift", 0), a.get("w_shift", 0), t.get("bias"))
    else:
        raise ValueError(f"layer {layer.name!r}: no golden model for op {op!r}")
    y = _requant(acc, bound, a["shift"], a["out_bits"], a.get("out_signed", True))
    return y.clamp_(min=0) if a.get("relu", False) else y


def run_layer(layer, x: np.ndarray) -> np.ndarray:
    """One bundle layer (:class:`quant.bundle.Layer`) in integer arithmetic."""
    return _np(_run(layer, _i64(x)))


def run_layers(layers, x: np.ndarray) -> np.ndarray:
    """A chain of bundle layers in integer arithmetic (between layers the integers stay in
    the exact dtype of the last one, see the module doc)."""
    t = _i64(x)
    for layer in layers:
        t = _run(layer, t)
    return _np(t)


def _latent_index(bundle: Bundle) -> int:
    ops = [l.op for l in bundle.layers]
    if "latent" not in ops:
        raise ValueError(f"bundle {bundle.path} has no 'latent' layer (a decoder-only bundle)")
    return ops.index("latent") + 1


def _integers(x: np.ndarray, what: str, channels: int, bits: int, signed: bool, multiple: int = 1) -> np.ndarray:
    """``x`` as int64 if it is (N, ``channels``, H, W) of whole numbers within the ``bits``-wide format
    (H, W multiples of ``multiple``); ValueError naming ``what`` otherwise (a float would be truncated,
    a value out of range wrapped by the hardware's input port, without a word)."""
    a = np.asarray(x)
    if a.ndim != 4 or a.shape[1] != channels or min(a.shape[2:]) < 1 or a.shape[2] % multiple or a.shape[3] % multiple \
            or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        side = f" with H, W multiples of {multiple}" if multiple > 1 else ""
        raise ValueError(f"{what} must be (N, {channels}, H, W){side}, not {a.dtype} {a.shape}")
    if np.issubdtype(a.dtype, np.floating) and not np.array_equal(a, np.round(a)):
        raise ValueError(f"{what}: {a.dtype} values that are not whole numbers; give the integers")
    lo, hi = int_range(bits, signed)
    if a.size and (a.min() < lo or a.max() > hi):
        raise ValueError(f"{what}: values {a.min():g}..{a.max():g} outside the {bits}-bit "
                         f"{'signed' if signed else 'unsigned'} range {lo}..{hi} that the bundle takes")
    return a.astype(np.int64)


def golden_encode(bundle: Bundle, pixels: np.ndarray) -> np.ndarray:
    """Integer golden encoder: uint8 pixels (N, 3, H, W), H and W multiples of 16 ->
    integer latents (N, M, H/16, W/16) (layers up to and including ``latent``)."""
    inp = bundle.input
    px = _integers(pixels, "pixels", inp["shape"][0], inp["bits"], inp["signed"], multiple=16)
    return run_layers(bundle.layers[:_latent_index(bundle)], px)


def golden_decode(bundle: Bundle, latent: np.ndarray) -> np.ndarray:
    """Integer golden decoder (synthesis transform): latents (N, M, h, w) in the latent layer's
    signed format -> pixel integers 0..255."""
    k = _latent_index(bundle)
    first = bundle.layers[k]
    lat = _integers(latent, "latents", first.tensors["weight"].shape[0], bundle.layers[k - 1].attrs["out_bits"], True)
    return run_layers(bundle.layers[k:], lat)


def golden_forward(bundle: Bundle, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The whole quantized model in integer arithmetic: (latents, output pixels)."""
    latent = golden_encode(bundle, pixels)
    return latent, golden_decode(bundle, latent)
