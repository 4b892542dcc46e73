"""Brevitas building blocks of the quantized LIC models: constant power-of-two activation
quantizers and the hardware-friendly (simplified) GDN / inverse GDN.

:class:`QuantGDN1` computes, in the quantized model, exactly what
:func:`quant.golden.gdn_int` / :func:`quant.golden.igdn_int` compute in integers::

    x  integer at 2**x_exp (a QuantTensor)
    n  = requant(beta + sum_j gamma_ij |x_j|)    1x1 convolution of |x|: gamma (C, C) is a
         weight quantizer (narrow signed gamma_bits, power-of-two scale 2**gamma_exp),
         beta a bias at the accumulator scale 2**(x_exp + gamma_exp); the sum is
         requantized (round half even, saturate) to UNSIGNED norm_bits at 2**norm_exp
    IGDN y_i = x_i * n_i   GDN y_i = x_i / n_i   (float; exact in float64), then the
         output quantizer: signed out_bits at 2**out_exp

Constraints kept by :meth:`QuantGDN1.project_` (called after every optimiser step):
gamma >= 0 and beta >= 2**norm_exp, so that every norm is an integer >= 1 (the forward GDN
divides by it; the golden model refuses a zero norm).

MinConv layers (issue 15): :class:`QuantMinConv2d` / :class:`QuantMinConvTranspose2d` take
signed minimums of the quantized operands (the stored weight is the gained weight
``2**log2_gain * w``; the sum is divided back by ``2**log2_gain``); their bias is an integer at
the minimum's accumulator scale ``2**(min(x_exp, w_exp) - log2_gain)`` (:func:`min_acc_exp`),
not at ``x_exp + w_exp``.  ``QuantGDN1(product="min")`` is the multiplier-free inverse GDN: its
norm a :class:`QuantMinConv2d` 1x1 on ``|x|`` and its output ``x * 2**e`` with ``2**e`` the
quantized norm rounded to the nearest power of two (:func:`models.minconv.pow2_round_ste`), or,
with ``out_product="mul"`` (a student distilled with ``--gdn-out mul``), the exact ``x * n``: one
product of two activations per channel, kept exact (in LUTs, or a DSP) and counted.
"""
from __future__ import annotations

import torch
from brevitas.inject.enum import ScalingImplType
from brevitas.nn import QuantConv2d, QuantConvTranspose2d, QuantIdentity
from torch import Tensor, nn

from licforge.models.minconv import min_conv2d, min_conv_transpose2d, pow2_round_ste
from licforge.models.training import plain_tensor
from .quantizers import ActFixedPoint, BiasAtAccumulator, UActFixedPoint, WeightFixedPoint

__all__ = ["fixed_act_quant", "fixed_act", "QuantGDN1", "exp_for_range", "QuantMinConv2d",
           "QuantMinConvTranspose2d", "min_acc_exp", "pow2_exp"]


def pow2_exp(scale) -> int:
    """The exponent of a power-of-two scale (a tensor or a number); ValueError otherwise."""
    s = float(scale.detach().reshape(-1)[0]) if torch.is_tensor(scale) else float(scale)
    e = torch.log2(torch.tensor(s, dtype=torch.float64)).item()
    if abs(e - round(e)) > 1e-9:
        raise ValueError(f"scale {s} is not a power of two")
    return int(round(e))


def min_acc_exp(x_exp: int, w_exp: int, log2_gain: int) -> tuple[int, int, int]:
    """(accumulator exponent, x_shift, w_shift) of a sum of signed minimums of integers at
    ``2**x_exp`` and ``2**w_exp`` divided by ``2**log2_gain``: both operands are aligned to the
    finer scale ``2**min(x_exp, w_exp)`` (the coarser one shifted left)."""
    m = min(x_exp, w_exp)
    return m - log2_gain, x_exp - m, w_exp - m


class _QuantMin:
    """Signed-minimum products for a Brevitas weight layer (mixed in before the layer class):
    ``y = 2**-log2_gain * min_sum(x, Q(w)) + b`` with ``b`` the bias rounded half to even (with a
    straight-through gradient) to the minimum's accumulator scale (:func:`min_acc_exp`), so the
    integers are those of the bundle.  Build with ``bias_quant=None``: Brevitas's bias quantizer
    would use the product's scale ``x_scale * w_scale``."""

    log2_gain: int

    def _min_sum(self, x: Tensor, w: Tensor) -> Tensor:
        raise NotImplementedError

    def acc_scale(self, x_scale, w_scale) -> float:
        """``2**acc_exp`` of the accumulator for these operand scales."""
        return 2.0 ** min_acc_exp(pow2_exp(x_scale), pow2_exp(w_scale), self.log2_gain)[0]

    def int_bias(self, x_scale, w_scale) -> Tensor:
        """The bias as integers at the accumulator scale (round half to even)."""
        return torch.round(self.bias.detach().double() / self.acc_scale(x_scale, w_scale)).long()

    def inner_forward_impl(self, x, quant_weight, quant_bias):
        y = self._min_sum(plain_tensor(x), plain_tensor(quant_weight)) * 2.0 ** -self.log2_gain
        if self.bias is None:
            return y
        s = self.acc_scale(x.scale, quant_weight.scale)
        b = self.bias + (torch.round(self.bias / s) * s - self.bias).detach()
        return y + b.view(1, -1, *([1] * (y.dim() - 2)))


class QuantMinConv2d(_QuantMin, QuantConv2d):
    """Brevitas conv layer whose products are signed minimums of the quantized operands (see
    :class:`_QuantMin`; the digits classifier's layers and the MinConv inverse GDN's norm)."""

    def __init__(self, *args, log2_gain: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.log2_gain = int(log2_gain)

    def _min_sum(self, x: Tensor, w: Tensor) -> Tensor:
        return min_conv2d(x, w, self.stride[0], self.padding[0])


class QuantMinConvTranspose2d(_QuantMin, QuantConvTranspose2d):
    """Brevitas transposed convolution with signed-minimum products (:class:`_QuantMin`)."""

    def __init__(self, *args, log2_gain: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.log2_gain = int(log2_gain)

    def _min_sum(self, x: Tensor, w: Tensor) -> Tensor:
        return min_conv_transpose2d(x, w, self.stride[0], self.padding[0], self.output_padding[0])


def fixed_act_quant(exp: int, bits: int, signed: bool) -> type:
    """A Brevitas activation quantizer with the constant scale ``2**exp``: signed (full
    range ``[-2**(bits-1), 2**(bits-1)-1]``) or unsigned (``[0, 2**bits-1]``), round half to
    even, saturating.  (Brevitas derives the scale as threshold / 2**(bits-1) for signed and
    threshold / 2**bits for unsigned power-of-two quantizers.)"""
    base = ActFixedPoint if signed else UActFixedPoint
    threshold = 2.0 ** (exp + bits - (1 if signed else 0))
    return type(f"Fixed{'S' if signed else 'U'}{bits}e{exp}", (base,),
                {"scaling_impl_type": ScalingImplType.CONST, "scaling_init": threshold, "bit_width": bits})


def fixed_act(exp: int, bits: int, signed: bool) -> QuantIdentity:
    """A QuantIdentity with :func:`fixed_act_quant`, returning QuantTensors."""
    return QuantIdentity(act_quant=fixed_act_quant(exp, bits, signed), return_quant_tensor=True)


def exp_for_range(peak: float, bits: int, signed: bool) -> int:
    """Smallest exponent ``e`` with ``max_int * 2**e >= peak`` (``max_int`` = 2**(bits-1)-1
    signed, 2**bits-1 unsigned): the finest power-of-two scale that does not clip ``peak``."""
    max_int = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
    peak = max(float(peak), 1e-12)
    e = int(torch.ceil(torch.log2(torch.tensor(peak / max_int, dtype=torch.float64))))
    while max_int * 2.0 ** (e - 1) >= peak:  # guard the float log2 at exact powers of two
        e -= 1
    while max_int * 2.0 ** e < peak:
        e += 1
    return e


class QuantGDN1(nn.Module):
    """Simplified GDN (``inverse=False``) or inverse GDN in fixed point (see module doc).

    ``x_exp`` is the exponent of the input (recorded for the bundle); ``norm_exp`` and
    ``out_exp`` are the calibrated exponents of the norm and of the output."""

    def __init__(self, channels: int, inverse: bool, *, gamma_bits: int, norm_bits: int, norm_exp: int,
                 out_bits: int, out_exp: int, product: str = "mul", log2_gain: int = 0,
                 out_product: str | None = None) -> None:
        super().__init__()
        if product not in ("mul", "min") or (product == "min" and not inverse):
            raise ValueError(f"QuantGDN1: product must be 'mul', or 'min' for the inverse GDN, not {product!r}")
        out_product = out_product or ("shift" if product == "min" else "mul")
        if out_product not in (("shift", "mul") if product == "min" else ("mul",)):
            raise ValueError(f"QuantGDN1: out_product {out_product!r} with product {product!r} (the min form's "
                             f"output is 'shift' or 'mul'; the multiplier GDN's 'mul')")
        self.inverse, self.channels = bool(inverse), int(channels)
        self.product, self.out_product = product, out_product
        self.norm_bits, self.norm_exp, self.out_bits, self.out_exp = norm_bits, norm_exp, out_bits, out_exp
        self.gamma_bits = gamma_bits
        wq = dict(bias=True, weight_quant=WeightFixedPoint, weight_bit_width=gamma_bits)
        self.norm_conv = (QuantMinConv2d(channels, channels, 1, log2_gain=log2_gain, bias_quant=None, **wq)
                          if product == "min" else QuantConv2d(channels, channels, 1, bias_quant=BiasAtAccumulator, **wq))
        self.norm_q = fixed_act(norm_exp, norm_bits, signed=False)
        self.out_q = fixed_act(out_exp, out_bits, signed=True)

    @torch.no_grad()
    def load_float(self, gdn: nn.Module) -> None:
        """Copy gamma and beta from a CompressAI ``GDN1`` or a :class:`models.minconv.MinIGDN1`
        (through the reparametrisation; the latter's gain multiplies gamma)."""
        gamma = gdn.gamma_reparam(gdn.gamma).reshape(self.channels, self.channels, 1, 1)
        if self.product == "min":
            gamma = gamma * gdn.gain
        self.norm_conv.weight.copy_(gamma)
        self.norm_conv.bias.copy_(gdn.beta_reparam(gdn.beta))
        self.project_()

    @torch.no_grad()
    def project_(self) -> None:
        """gamma >= 0, beta >= 2**norm_exp (so every integer norm is >= 1)."""
        self.norm_conv.weight.clamp_(min=0.0)
        self.norm_conv.bias.clamp_(min=2.0 ** self.norm_exp)

    def norm(self, x) -> "torch.Tensor":
        """The quantized norm ``n`` (a QuantTensor, unsigned ``norm_bits`` at 2**norm_exp)."""
        return self.norm_q(self.norm_conv(abs(x)))

    def forward(self, x):
        n = self.norm(x)
        # plain tensors (not QuantTensors) flow through the graph while exporting to QONNX
        xv, nv = getattr(x, "value", x), getattr(n, "value", n)
        if self.out_product == "shift":  # the multiplier-free output: a shift by the norm's nearest power of two
            nv = pow2_round_ste(nv)
        return self.out_q(xv * nv if self.inverse else xv / nv)

    def extra_repr(self) -> str:
        return (f"{self.channels}, inverse={self.inverse}, product={self.product}, out_product={self.out_product}, "
                f"gamma_bits={self.gamma_bits}, "
                f"norm=u{self.norm_bits}@2^{self.norm_exp}, out=s{self.out_bits}@2^{self.out_exp}")
