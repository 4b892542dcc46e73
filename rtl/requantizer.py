"""Requantization in hardware: accumulator -> arithmetic shift, round half to even, saturate.

This is the RTL twin of :func:`quant.fixed.requantize` (checked against it bit for bit).
"""
from __future__ import annotations

from amaranth import Const, Module, Mux, Value, signed, unsigned
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from licforge.quant.fixed import check_bits, int_range

__all__ = ["requantize_expr", "Requantizer"]


def requantize_expr(value: Value, shift: int, out_bits: int, signed_out: bool = True,
                    relu: bool = False) -> Value:
    """Combinational ``saturate(round_half_even(value * 2**-shift))``.

    ``value`` is a signed accumulator.  ``shift > 0`` drops ``shift`` bits, rounding up when
    the dropped bits exceed one half, or equal one half and the kept LSB is odd; ``shift <= 0``
    is an exact left shift.  The result saturates to ``out_bits`` (two's complement when
    ``signed_out``), and to ``[0, max]`` when ``relu``.  Depth: one adder, two comparators.
    """
    check_bits(out_bits, "out_bits")
    value = value.as_signed()
    if shift > 0:
        q = value >> shift
        r = value[:shift]
        half = 1 << (shift - 1)
        up = (r > half) | ((r == half) & q[0])
        rounded = q + up
    else:
        rounded = value << (-shift)
    lo, hi = int_range(out_bits, signed_out)
    if relu:
        lo = max(lo, 0)
    shape = signed(out_bits) if signed_out else unsigned(out_bits)
    kept = rounded[:out_bits].as_signed() if signed_out else rounded[:out_bits]
    return Mux(rounded > hi, Const(hi, shape), Mux(rounded < lo, Const(lo, shape), kept))


class Requantizer(wiring.Component):
    """Stream requantizer: ``o = saturate(round_half_even(i * 2**-shift))`` per beat.

    Parameters: ``in_bits`` (signed accumulator width), ``shift`` (bits dropped, may be <= 0),
    ``out_bits``, ``signed_out``, ``relu``.  Timing: latency 1 cycle, one beat per cycle;
    a stalled output (``o.ready`` low) holds the beat and stalls the input.
    """

    def __init__(self, in_bits: int, shift: int, out_bits: int, signed_out: bool = True,
                 relu: bool = False) -> None:
        self.in_bits = check_bits(in_bits, "in_bits", 2, 64)
        self.out_bits = check_bits(out_bits, "out_bits")
        if not isinstance(shift, int) or abs(shift) > 63:
            raise ValueError(f"shift must be an integer in [-63, 63], not {shift!r}")
        self.shift, self.signed_out, self.relu = shift, signed_out, relu
        out_shape = signed(out_bits) if signed_out else unsigned(out_bits)
        super().__init__({
            "i": In(stream.Signature(signed(in_bits))),
            "o": Out(stream.Signature(out_shape)),
        })

    def elaborate(self, platform) -> Module:
        m = Module()
        m.d.comb += self.i.ready.eq(~self.o.valid | self.o.ready)
        with m.If(self.i.ready):
            m.d.sync += [
                self.o.valid.eq(self.i.valid),
                self.o.payload.eq(requantize_expr(self.i.payload, self.shift, self.out_bits,
                                                  self.signed_out, self.relu)),
            ]
        return m
