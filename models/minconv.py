"""MinConv layers (Yang et al., "MinConvNets: a new class of multiplication-less neural
networks", 2021): every product ``x * w`` of the forward pass is replaced by

    x (*) w = sign(x) * sign(w) * min(|x|, |w|)

a comparator and sign logic instead of a multiplier.  The approximation is good when
features and weights have similar mean and variance; the layers here keep a per-layer
power-of-two weight gain ``2**log2_gain`` that brings the weights to the scale of the
features (``min(|x|, |g w|) / g``), chosen from statistics at conversion, so that the
constraint holds and the gain is a free shift in hardware.

The transposed convolution (:func:`min_conv_transpose2d`) is computed by sub-pixel
decomposition: each of the ``stride**2`` output phases is a :func:`min_conv2d` of the input
with that phase's taps, so no minimum is ever taken against an inserted zero.  The
multiplier-free inverse GDN rounds its norm to a power of two (:func:`pow2_round_exp`,
:func:`pow2_round_ste`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["signed_min_matmul", "min_conv2d", "min_linear", "min_conv_transpose2d", "subpixel_taps",
           "pow2_round_exp", "pow2_round_ste", "MinConv2d", "MinLinear", "MinConvTranspose2d", "MinIGDN1",
           "GDN_OUTS"]

_BLOCK = 1 << 22  # elements of one (rows, outputs, K) block of signed minimums


def _blocks(rows: int, outs: int, k: int) -> tuple[int, int]:
    """(rows, output channels) per block so that a block holds about ``_BLOCK`` terms."""
    oc = max(1, min(outs, _BLOCK // max(1, k)))
    return max(1, _BLOCK // (oc * max(1, k))), oc


def _min_forward(x: Tensor, w: Tensor) -> Tensor:
    """``out[r, o] = sum_k sign(x[r,k]) sign(w[o,k]) min(|x[r,k]|, |w[o,k]|)`` for 2-D ``x``, ``w``,
    in blocks of rows and output channels (memory bounded by ``_BLOCK``)."""
    r, k = x.shape
    o = w.shape[0]
    out = torch.empty((r, o), dtype=torch.result_type(x, w))
    rb, ob = _blocks(r, o, k)
    ws, wa = torch.sign(w), w.abs()
    for r0 in range(0, r, rb):
        xb = x[r0:r0 + rb]
        xs, xa = torch.sign(xb).unsqueeze(1), xb.abs().unsqueeze(1)
        for o0 in range(0, o, ob):
            t = torch.minimum(xa, wa[o0:o0 + ob])
            t.mul_(xs).mul_(ws[o0:o0 + ob])
            out[r0:r0 + rb, o0:o0 + ob] = t.sum(-1)
    return out


def _terms_fwd(x: Tensor, wa: Tensor, ws: Tensor) -> Tensor:
    """``sum_k ws[o,k] clamp(x[r,k], -wa[o,k], wa[o,k])``: the signed minimum written as one
    clamp (``sign(x) min(|x|, a) = clamp(x, -a, a)``), a form the compiler fuses into one loop."""
    return (torch.clamp(x.unsqueeze(1), -wa, wa) * ws).sum(-1)


def _terms_bwd(g: Tensor, x: Tensor, wa: Tensor, ws: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`_terms_fwd` w.r.t. ``x`` and ``w`` (see :class:`_SignedMin`)."""
    xa = x.abs().unsqueeze(1)
    to_x = (xa < wa).to(x.dtype) + 0.5 * (xa == wa).to(x.dtype)
    go = g.unsqueeze(-1)
    return (go * ws * to_x).sum(1), (go * torch.sign(x).unsqueeze(1) * (1.0 - to_x)).sum(0)


_COMPILED: list = []


_COMPILE_FROM = 1 << 20  # terms per call from which compiling pays (small problems run eagerly)
_EAGER_CALLS = 500       # calls of that size run eagerly first: a short run never pays the compiler
_large_calls = 0


def _call(i: int, terms: int, *args):
    """Kernel ``i`` (0 forward, 1 backward) of the training path: :func:`torch.compile`'d for
    ``terms >= _COMPILE_FROM`` once :data:`_EAGER_CALLS` such calls have run eagerly (fused loops,
    no (rows, outputs, K) temporaries), else eager.  A training step of the N=16 MinConv student
    (8 crops of 128^2, one CPU thread) takes 0.37 s compiled against 1.8-2.0 s eager (most of its
    38 calls hold 1-16 M terms); the first compile costs ~16 s, so a run of a dozen steps or fewer
    stays eager.  Where compiling fails (no C++ compiler), eager from then on."""
    global _large_calls
    eager = (_terms_fwd, _terms_bwd)
    if terms < _COMPILE_FROM:
        return eager[i](*args)
    _large_calls += 1
    if _large_calls <= _EAGER_CALLS:
        return eager[i](*args)
    if not _COMPILED:
        _COMPILED.extend(torch.compile(f, dynamic=True) for f in eager)
    try:
        return _COMPILED[i](*args)
    except Exception:  # noqa: BLE001 (the compiler's errors have many types)
        if _COMPILED[i] is eager[i]:
            raise
        _COMPILED[:] = eager
        return eager[i](*args)


class _SignedMin(torch.autograd.Function):
    """Autograd of the signed-minimum sum that stores only its inputs.  A term is ``sign(w) x``
    where ``|x| < |w|`` and ``sign(x) w`` where ``|w| < |x|``: the gradient flows to the smaller
    operand, split half and half on a tie (as ``torch.minimum``'s)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor) -> Tensor:  # noqa: D102
        ctx.save_for_backward(x, w)
        return _call(0, x.numel() * len(w), x, w.abs(), torch.sign(w))

    @staticmethod
    def backward(ctx, g: Tensor):  # noqa: D102
        x, w = ctx.saved_tensors
        return _call(1, x.numel() * len(w), g.contiguous(), x, w.abs(), torch.sign(w))


def signed_min_matmul(cols: Tensor, weight: Tensor) -> Tensor:
    """``out[..., o] = sum_k sign(cols[..., k]) sign(w[o, k]) min(|cols[..., k]|, |w[o, k]|)``.

    ``cols``: (..., K); ``weight``: (O, K).  Works on float tensors (training, Brevitas
    fake-quant: when a gradient is needed, :class:`_SignedMin` with compiled kernels, which keep
    no per-term tensor) and on int64 tensors (the integer golden model) alike; without
    gradients evaluated eagerly in blocks of rows and output channels so memory stays near
    ``_BLOCK`` terms.
    """
    if cols.shape[-1] != weight.shape[-1]:
        raise ValueError(f"signed_min_matmul: inner sizes differ, {cols.shape[-1]} vs {weight.shape[-1]}")
    lead = cols.shape[:-1]
    x = cols.reshape(-1, cols.shape[-1])
    if torch.is_grad_enabled() and (cols.requires_grad or weight.requires_grad):
        out = _SignedMin.apply(x, weight)
    else:
        out = _min_forward(x, weight)
    return out.reshape(*lead, weight.shape[0])


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


def subpixel_taps(k: int, stride: int, padding: int, phase: int) -> list[tuple[int, int]]:
    """Taps of one output phase of a transposed convolution, as (kernel index, input offset).

    Output row ``y = stride*i + phase`` of ``conv_transpose2d`` receives kernel rows ``ky``
    with ``ky = (phase + padding) mod stride`` (mod ``stride``), from input row
    ``i + (phase + padding - ky) / stride``.  For k=5, stride=2, padding=2 the even phase has
    3 taps (offsets +1, 0, -1) and the odd phase 2 (offsets +1, 0): 25 taps per 2x2 block.
    """
    return [(ky, (phase + padding - ky) // stride) for ky in range(k) if (ky - phase - padding) % stride == 0]


def _phase(k: int, stride: int, padding: int, phase: int) -> tuple[int, list[int]]:
    """(lowest input offset, kernel indices in ascending offset order) of one output phase;
    the offsets of a phase are consecutive integers."""
    taps = sorted(subpixel_taps(k, stride, padding, phase), key=lambda t: t[1])
    return (taps[0][1] if taps else 0), [ky for ky, _ in taps]


def min_conv_transpose2d(x: Tensor, weight: Tensor, stride: int, padding: int, output_padding: int = 0) -> Tensor:
    """``conv_transpose2d`` with every product replaced by the signed minimum; ``weight`` is
    (Cin, Cout, K, K) as in PyTorch.  Output phase (a, b) (rows ``stride*i + a``, columns
    ``stride*j + b``) is the :func:`min_conv2d` (stride 1, no padding) of the input window
    starting at the phase's lowest offset with the phase's taps (:func:`subpixel_taps`); float
    and int64 tensors alike."""
    n, c, h, wd = x.shape
    cin, cout, k, _ = weight.shape
    if cin != c:
        raise ValueError(f"min_conv_transpose2d: input has {c} channels, weight expects {cin}")
    s = stride
    ho = (h - 1) * s - 2 * padding + k + output_padding
    wo = (wd - 1) * s - 2 * padding + k + output_padding
    out = torch.zeros((n, cout, ho, wo), dtype=torch.result_type(x, weight))
    phases = [_phase(k, s, padding, a) for a in range(s)]
    for a, (lo_y, ky) in enumerate(phases):
        rows = len(range(a, ho, s))
        for b, (lo_x, kx) in enumerate(phases):
            cols = len(range(b, wo, s))
            if not (rows and cols and ky and kx):
                continue
            win = F.pad(x, (-lo_x, lo_x + cols + len(kx) - 1 - wd, -lo_y, lo_y + rows + len(ky) - 1 - h))
            wk = weight[:, :, ky][:, :, :, kx].transpose(0, 1)  # (cout, cin, taps_y, taps_x)
            out[:, :, a::s, b::s] = min_conv2d(win, wk)
    return out


def pow2_round_exp(n: Tensor) -> Tensor:
    """Exponent ``e`` (int64) of the power of two nearest ``n > 0`` in the linear domain, ties
    up: with ``n = m * 2**E``, ``0.5 <= m < 1``, ``e = E`` if ``m >= 0.75`` else ``E - 1``.  For an
    integer ``n`` this is ``bit_length(n) - 1`` plus bit ``bit_length(n) - 2`` of ``n``; ``-1``
    where ``n == 0``.  Exact for integers below 2**53 and for any float ``n``."""
    m, e = torch.frexp(n.to(torch.float64) if not n.dtype.is_floating_point else n)
    return (e - (m < 0.75).to(e.dtype)).to(torch.int64)


def pow2_round_ste(n: Tensor) -> Tensor:
    """``n`` (>= 0) rounded to the nearest power of two (:func:`pow2_round_exp`; 0 stays 0) in
    the forward pass, with the identity gradient (straight-through estimator)."""
    p = torch.where(n > 0, torch.ldexp(torch.ones_like(n), pow2_round_exp(n).to(n.dtype)), torch.zeros_like(n))
    return n + (p - n).detach()


class _GainMixin:
    """Holds the power-of-two weight gain ``2**log2_gain`` (a buffer, not trained)."""

    log2_gain: Tensor

    def _init_gain(self) -> None:
        self.register_buffer("log2_gain", torch.zeros((), dtype=torch.int64))

    def set_gain_from(self, x: Tensor) -> int:
        """Choose the gain so that mean |g w| is the power of two nearest mean |x| (non-zero)."""
        xa = x.detach().abs()
        xa = xa[xa > 0]
        wa = self.min_weight().detach().abs().mean()
        k = 0 if xa.numel() == 0 or wa == 0 else round(math.log2(float(xa.mean() / wa)))
        self.log2_gain.fill_(k)
        return k

    def min_weight(self) -> Tensor:
        """The operand the features meet in the minimums (before the gain)."""
        return self.weight

    def _set_min_weight(self, w: Tensor) -> None:
        self.weight.copy_(w)

    def min_sum(self, x: Tensor, w: Tensor) -> Tensor:
        """The layer's sum of signed minimums of ``x`` with the operand ``w`` (no gain, no bias)."""
        raise NotImplementedError

    @torch.no_grad()
    def fit_gain_(self, x: Tensor, target: Tensor, steps: int = 4, span: int = 3) -> float:
        """Fit the layer to a target at conversion (transfer learning starts here): the operand
        becomes ``c * w`` (``c`` on a grid of ``2**(j/steps)``, ``|j| <= span*steps``, around the
        magnitude-matching :meth:`set_gain_from` gain) and the output scale ``2**-log2_gain`` the
        power of two nearest the least-squares scale, for the pair with the least squared error
        of ``2**-log2_gain * min_sum(x, c * w)`` against ``target`` (the multiplier layer's sum of
        products).  Returns the relative RMS error of the fit (NaN where no candidate correlates
        positively with the target, e.g. all-zero features: the magnitude-matching gain is kept)."""
        w = self.min_weight().detach().clone()
        g0 = 2.0 ** self.set_gain_from(x)
        t = target.detach()
        best = (math.inf, g0, int(self.log2_gain))
        for j in range(-span * steps, span * steps + 1):
            c = g0 * 2.0 ** (j / steps)
            m = self.min_sum(x, w * c)
            mm = float((m * m).sum())
            if mm == 0:
                continue
            scale = float((m * t).sum()) / mm
            if scale <= 0:
                continue
            k = round(-math.log2(scale))
            err = float(((m * 2.0 ** -k - t) ** 2).mean())
            if err < best[0]:
                best = (err, c, k)
        err, c, k = best
        self._set_min_weight(w * c * 2.0 ** -k)  # gained operand c * w = weight * 2**k
        self.log2_gain.fill_(k)
        return math.sqrt(err / max(float((t * t).mean()), 1e-30)) if err < math.inf else math.nan

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


class MinConvTranspose2d(_GainMixin, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` whose products are signed minimums (:func:`min_conv_transpose2d`)
    with the power-of-two weight gain; same parameters, same shapes."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_gain()
        if self.dilation != (1, 1) or self.groups != 1 or self.padding_mode != "zeros" \
                or len(set(self.stride)) != 1 or len(set(self.padding)) != 1:
            raise ValueError("MinConvTranspose2d supports square stride/padding, dilation 1, groups 1 only")

    def min_sum(self, x: Tensor, w: Tensor) -> Tensor:  # noqa: D102
        return min_conv_transpose2d(x, w, self.stride[0], self.padding[0], self.output_padding[0])

    def forward(self, x: Tensor, output_size=None) -> Tensor:  # noqa: D102
        g = self.gain
        y = min_conv_transpose2d(x, self.weight * g, self.stride[0], self.padding[0], self.output_padding[0]) / g
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)


#: forms of the inverse GDN1's output ``x_i * n_i``: ``shift`` (``n`` rounded to a power of two,
#: multiplier-free), ``mul`` (the exact product, kept in LUTs or a DSP), ``min`` (``sign(x) min(|x|, n)``:
#: the MinConv product of two activations, which degenerates to a clamp; an ablation)
GDN_OUTS = ("shift", "mul", "min")


class MinIGDN1(_GainMixin, nn.Module):
    """Multiplier-free inverse simplified GDN: ``y_i = x_i * P(beta_i + sum_j gamma_ij (*) |x_j|)``
    with the MinConv product ``(*)`` (gain ``2**log2_gain`` on gamma) and ``P`` the rounding to
    the nearest power of two (a shift in hardware; straight-through gradient,
    :func:`pow2_round_ste`).  Parameters and their reparametrisation are CompressAI's ``GDN1``'s
    (same state-dict keys plus ``log2_gain``), so a ``GDN1``'s weights load unchanged.
    ``out`` (:data:`GDN_OUTS`) picks the output's form; ``shift`` and ``mul`` are deployed
    (quantized, exported and built), ``min`` is an ablation."""

    def __init__(self, channels: int, beta_min: float = 1e-6, gamma_init: float = 0.1, out: str = "shift") -> None:
        from compressai.ops.parametrizers import NonNegativeParametrizer

        if out not in GDN_OUTS:
            raise ValueError(f"MinIGDN1 out must be one of {GDN_OUTS}, not {out!r}")
        super().__init__()
        self.inverse = True
        self.out = out
        self.beta_reparam = NonNegativeParametrizer(minimum=float(beta_min))
        self.beta = nn.Parameter(self.beta_reparam.init(torch.ones(channels)))
        self.gamma_reparam = NonNegativeParametrizer()
        self.gamma = nn.Parameter(self.gamma_reparam.init(float(gamma_init) * torch.eye(channels)))
        self._init_gain()

    def min_weight(self) -> Tensor:
        return self.gamma_reparam(self.gamma)

    def _set_min_weight(self, w: Tensor) -> None:
        self.gamma.copy_(self.gamma_reparam.init(w))

    def min_sum(self, x: Tensor, w: Tensor) -> Tensor:  # noqa: D102
        return signed_min_matmul(x.abs().permute(0, 2, 3, 1), w).permute(0, 3, 1, 2)

    def norm(self, x: Tensor) -> Tensor:
        """``beta_i + sum_j min(|x_j|, g gamma_ij) / g`` (gamma >= 0), before the rounding."""
        g = self.gain
        return self.min_sum(x, self.min_weight() * g) / g + self.beta_reparam(self.beta).view(1, -1, 1, 1)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        n = self.norm(x)
        if self.out == "shift":
            return x * pow2_round_ste(n)
        if self.out == "mul":
            return x * n
        return torch.minimum(torch.maximum(x, -n), n)  # sign(x) min(|x|, n), n > 0: a clamp
