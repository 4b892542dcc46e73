"""Requantization in hardware: accumulator -> arithmetic shift, round half to even, saturate.

This is the RTL twin of :func:`quant.fixed.requantize` (checked against it bit for bit).
"""
from __future__ import annotations

from amaranth import Cat, Const, Module, Mux, Value, signed, unsigned
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from licforge.quant.fixed import check_bits, int_range

__all__ = ["requantize_expr", "Requantizer"]


def _extend(v: Value, width: int) -> Value:
    """Signed ``v`` sign-extended to at least ``width`` bits."""
    return Cat(v, v[-1].replicate(width - len(v))).as_signed() if len(v) < width else v


def requantize_expr(value: Value, shift: int, out_bits: int, signed_out: bool = True,
                    relu: bool = False) -> Value:
    """Combinational ``saturate(round_half_even(value * 2**-shift))``.

    ``value`` is a signed accumulator.  ``shift > 0`` drops ``shift`` bits, rounding up when
    the dropped bits exceed one half, or equal one half and the kept LSB is odd; ``shift <= 0``
    is an exact left shift.  The result saturates to ``out_bits`` (two's complement when
    ``signed_out``), and to ``[0, max]`` when ``relu``.

    Structure (for the clock): with ``q`` the kept bits and ``up`` the rounding bit, the only
    adder is ``q + up`` on the ``out_bits`` that are kept; whether ``q + up`` leaves the output
    range is decided from ``q`` and ``up`` by bit reductions (the range is ``[-2**k, 2**k - 1]``
    or ``[0, 2**k - 1]``), in parallel with that adder.  Depth: the rounding bit (an OR over the
    dropped bits), an ``out_bits`` carry chain or a few LUT levels, one multiplexer.
    """
    check_bits(out_bits, "out_bits")
    value = value.as_signed()
    if shift > 0:
        value = _extend(value, shift + 1)    # the dropped bits of a narrow value are its sign
        q, r = value >> shift, value[:shift]
        # r > half, or r == half and q odd: the top dropped bit, and any other dropped bit or q's LSB
        up = r[shift - 1] & ((r[:shift - 1].any() if shift > 1 else 0) | q[0])
    else:
        q, up = value << (-shift), Const(0, 1)
    lo, hi = int_range(out_bits, signed_out)
    if relu:
        lo = max(lo, 0)
    k = hi.bit_length()                      # hi = 2**k - 1
    q = _extend(q.as_signed(), k + 2)        # room for q + up and the sign
    top = q[k:]                              # zero for 0 <= q <= hi
    over = ~q[-1] & (top.any() | (q[:k].all() & up))         # q > hi, or q == hi and rounding up
    if lo < 0:                               # lo = -2**k: q < lo, unless q == lo - 1 rounds up to lo
        under = q[-1] & ~top.all() & ~(up & q[:k].all() & ~top[0] & top[1:].all())
    else:                                    # lo = 0: q < 0, unless q == -1 rounds up to 0
        under = q[-1] & ~(up & q.all())
    shape = signed(out_bits) if signed_out else unsigned(out_bits)
    kept = (q[:out_bits] + up)[:out_bits]
    return Mux(over, Const(hi, shape), Mux(under, Const(lo, shape), kept.as_signed() if signed_out else kept))


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
