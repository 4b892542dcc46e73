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
"""
from __future__ import annotations

import torch
from brevitas.inject.enum import ScalingImplType
from brevitas.nn import QuantConv2d, QuantIdentity
from torch import nn

from .quantizers import ActFixedPoint, BiasAtAccumulator, UActFixedPoint, WeightFixedPoint

__all__ = ["fixed_act_quant", "fixed_act", "QuantGDN1", "exp_for_range"]


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
                 out_bits: int, out_exp: int) -> None:
        super().__init__()
        self.inverse, self.channels = bool(inverse), int(channels)
        self.norm_bits, self.norm_exp, self.out_bits, self.out_exp = norm_bits, norm_exp, out_bits, out_exp
        self.gamma_bits = gamma_bits
        self.norm_conv = QuantConv2d(channels, channels, 1, bias=True, weight_quant=WeightFixedPoint,
                                     weight_bit_width=gamma_bits, bias_quant=BiasAtAccumulator)
        self.norm_q = fixed_act(norm_exp, norm_bits, signed=False)
        self.out_q = fixed_act(out_exp, out_bits, signed=True)

    @torch.no_grad()
    def load_float(self, gdn: nn.Module) -> None:
        """Copy gamma and beta from a CompressAI ``GDN1`` (through its reparametrisation)."""
        gamma = gdn.gamma_reparam(gdn.gamma).reshape(self.channels, self.channels, 1, 1)
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
        return self.out_q(xv * nv if self.inverse else xv / nv)

    def extra_repr(self) -> str:
        return (f"{self.channels}, inverse={self.inverse}, gamma_bits={self.gamma_bits}, "
                f"norm=u{self.norm_bits}@2^{self.norm_exp}, out=s{self.out_bits}@2^{self.out_exp}")
