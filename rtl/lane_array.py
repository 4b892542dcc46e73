"""Dot-product arrays: ``L`` lanes of a pairwise operator, an adder tree, an accumulator and a
requantizer.  One generator, the decoder engines' (:func:`rtl.mac_pipe.mac_array`), two lane
operators:

* ``"mul"`` -> :class:`MacArray`: ``t = x * w`` (a true multiplier per lane; ``split``: in two
  pipeline stages, the better multiplier from LUTs);
* ``"min"`` -> :class:`MinConvArray`: ``t = sign(x) sign(w) min(|x| << dx, |w| << dw)``
  (a comparator and sign logic per lane, operands in ones' complement; ``dx``/``dw`` align the
  two power-of-two scales, free wiring).

The accumulated dot product is requantized (shift, round half to even, saturate, optional
ReLU) exactly as :func:`quant.golden.dot_requant` computes it.
"""
from __future__ import annotations

from amaranth import Module, Mux, Signal, signed
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from licforge.quant.fixed import accumulator_bits, check_bits
from .mac_pipe import Delayed, check_product, mac_array, mac_latency
from .requantizer import requantize_expr

__all__ = ["LaneArray", "MinConvArray", "MacArray"]


class LaneArray(wiring.Component):
    """``L``-lane dot-product engine with accumulator and requantizer.

    Input beat: ``x[L]``, ``w[L]`` (signed ``bits``) and ``last``; beats up to and including
    one with ``last`` set form one dot product (at most ``max_beats`` beats).  Output beat:
    ``requantize(sum_k term(x_k, w_k), shift, out_bits, relu)``.

    ``split`` (``"mul"`` only, for multipliers built from LUTs): each product in two pipeline
    stages, two half-width products and their sum (:func:`rtl.mac_pipe.split_product`).

    Timing: one input beat per cycle; latency from the ``last`` beat to the output is
    ``3 + ceil(log2 L)`` cycles (operand registers, products, adder tree, accumulator), one
    more with ``split``.  Back-pressure stalls the whole pipeline (``i.ready`` is low exactly
    while an output is held un-taken).
    """

    def __init__(self, lanes: int, bits: int, op: str, *, shift: int, out_bits: int,
                 max_beats: int = 1024, x_shift: int = 0, w_shift: int = 0,
                 relu: bool = False, split: bool = False) -> None:
        if not isinstance(lanes, int) or isinstance(lanes, bool) or lanes < 1:
            raise ValueError(f"lanes must be a positive integer, not {lanes!r}")
        self.lanes, self.bits = lanes, check_bits(bits, "bits", 2, 32)
        if split and op != "mul":
            raise ValueError(f"split products are multipliers built from LUTs: op 'mul', not {op!r}")
        self.op, self.x_shift, self.w_shift = check_product(op, x_shift, w_shift, what="op")
        self.split = bool(split)
        self.shift, self.out_bits, self.relu = shift, check_bits(out_bits, "out_bits"), relu
        self.max_beats = max_beats
        big = 1 << (bits - 1)
        max_term = big * big if op == "mul" else big << max(x_shift, w_shift)
        self.acc_bits = accumulator_bits(max_term, lanes * max_beats)
        self.latency = 1 + mac_latency(lanes, self.split)
        beat = data.StructLayout({
            "x": data.ArrayLayout(signed(bits), lanes),
            "w": data.ArrayLayout(signed(bits), lanes),
            "last": 1,
        })
        super().__init__({
            "i": In(stream.Signature(beat)),
            "o": Out(stream.Signature(signed(out_bits))),
        })

    def elaborate(self, platform) -> Module:
        m = Module()
        advance = Signal()
        m.d.comb += [advance.eq(~self.o.valid | self.o.ready), self.i.ready.eq(advance)]

        # the lane operators and their adder tree: one dot product of L terms, valid/last alongside
        beat = self.i.payload
        sums, depth = mac_array(m, [[beat.x[k] for k in range(self.lanes)]], [[beat.w[k] for k in range(self.lanes)]],
                                advance, "lanes", product=self.op, x_shift=self.x_shift, w_shift=self.w_shift,
                                split=self.split)
        total = sums[0][0]
        flags = Delayed(m, {"valid": self.i.valid, "last": beat.last}, depth, advance, "beat").stage(depth)
        valid, last = flags["valid"], flags["last"]

        # last stage: accumulate; on 'last' requantize into the output register
        acc = Signal(signed(self.acc_bits))
        fresh = Signal(init=1)  # the next beat starts a new dot product
        running = Mux(fresh, 0, acc) + total
        with m.If(advance):
            m.d.sync += self.o.valid.eq(valid & last)
            with m.If(valid):
                m.d.sync += [acc.eq(running), fresh.eq(last),
                             self.o.payload.eq(requantize_expr(running, self.shift, self.out_bits,
                                                               True, self.relu))]
        return m


def MinConvArray(lanes: int, bits: int, **kwargs) -> LaneArray:
    """:class:`LaneArray` with comparator lanes (``sign(x) sign(w) min(|x|, |w|)``)."""
    return LaneArray(lanes, bits, "min", **kwargs)


def MacArray(lanes: int, bits: int, **kwargs) -> LaneArray:
    """:class:`LaneArray` with multiplier lanes (``x * w``; ``split=True``: in two stages)."""
    return LaneArray(lanes, bits, "mul", **kwargs)
