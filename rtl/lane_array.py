"""Dot-product arrays: ``L`` lanes of a pairwise operator, an adder tree, an accumulator and a
requantizer.  One generator, two lane operators:

* ``"mul"`` -> :class:`MacArray`: ``t = x * w`` (a true multiplier per lane);
* ``"min"`` -> :class:`MinConvArray`: ``t = sign(x) sign(w) min(|x| << dx, |w| << dw)``
  (a comparator and sign logic per lane; ``dx``/``dw`` align the two power-of-two scales,
  free wiring).

The accumulated dot product is requantized (shift, round half to even, saturate, optional
ReLU) exactly as :func:`quant.golden.dot_requant` computes it.
"""
from __future__ import annotations

from amaranth import Module, Mux, Signal, Value, signed
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from licforge.quant.fixed import accumulator_bits, check_bits
from .requantizer import requantize_expr

__all__ = ["LaneArray", "MinConvArray", "MacArray", "lane_term", "adder_tree", "LANE_OPS"]

LANE_OPS = ("mul", "min")


def lane_term(op: str, x: Value, w: Value, x_shift: int = 0, w_shift: int = 0) -> Value:
    """The lane operator on two signed operands (combinational)."""
    if op == "mul":
        return x * w
    if op == "min":
        ax, aw = abs(x) << x_shift, abs(w) << w_shift
        smaller = Mux(ax < aw, ax, aw)
        return Mux(x[-1] ^ w[-1], -smaller, smaller)
    raise ValueError(f"lane operator must be one of {LANE_OPS}, not {op!r}")


def adder_tree(m: Module, terms: list[Value], enable: Value, name: str) -> tuple[Value, int]:
    """Pairwise adder tree with a register after every level, all clocked by ``enable``.

    Returns the root (a signal) and its latency in cycles, ``ceil(log2(len(terms)))``.
    """
    level, depth = list(terms), 0
    while len(level) > 1:
        nxt = []
        for k in range(0, len(level) - 1, 2):
            s = level[k] + level[k + 1]
            r = Signal(s.shape(), name=f"{name}_l{depth}_{k // 2}")
            m.d.sync += r.eq(Mux(enable, s, r))
            nxt.append(r)
        if len(level) % 2:
            r = Signal(level[-1].shape(), name=f"{name}_l{depth}_pass")
            m.d.sync += r.eq(Mux(enable, level[-1], r))
            nxt.append(r)
        level, depth = nxt, depth + 1
    return level[0], depth


class LaneArray(wiring.Component):
    """``L``-lane dot-product engine with accumulator and requantizer.

    Input beat: ``x[L]``, ``w[L]`` (signed ``bits``) and ``last``; beats up to and including
    one with ``last`` set form one dot product (at most ``max_beats`` beats).  Output beat:
    ``requantize(sum_k term(x_k, w_k), shift, out_bits, relu)``.

    Timing: one input beat per cycle; latency from the ``last`` beat to the output is
    ``2 + ceil(log2 L)`` cycles.  Back-pressure stalls the whole pipeline (``i.ready`` is
    low exactly while an output is held un-taken).
    """

    def __init__(self, lanes: int, bits: int, op: str, *, shift: int, out_bits: int,
                 max_beats: int = 1024, x_shift: int = 0, w_shift: int = 0,
                 relu: bool = False) -> None:
        if not isinstance(lanes, int) or isinstance(lanes, bool) or lanes < 1:
            raise ValueError(f"lanes must be a positive integer, not {lanes!r}")
        self.lanes, self.bits = lanes, check_bits(bits, "bits", 2, 32)
        if op not in LANE_OPS:
            raise ValueError(f"op must be one of {LANE_OPS}, not {op!r}")
        if op == "mul" and (x_shift or w_shift):
            raise ValueError("x_shift/w_shift align scales for the 'min' operator only")
        if min(x_shift, w_shift) < 0:
            raise ValueError("x_shift and w_shift must be >= 0")
        self.op, self.x_shift, self.w_shift = op, x_shift, w_shift
        self.shift, self.out_bits, self.relu = shift, check_bits(out_bits, "out_bits"), relu
        self.max_beats = max_beats
        big = 1 << (bits - 1)
        max_term = big * big if op == "mul" else big << max(x_shift, w_shift)
        self.acc_bits = accumulator_bits(max_term, lanes * max_beats)
        self.latency = 2 + (lanes - 1).bit_length()
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

        # stage 1: the lane operators
        terms = []
        for k in range(self.lanes):
            t = lane_term(self.op, self.i.payload.x[k], self.i.payload.w[k], self.x_shift, self.w_shift)
            r = Signal(t.shape(), name=f"term{k}")
            with m.If(advance):
                m.d.sync += r.eq(t)
            terms.append(r)
        valid, last = Signal(), Signal()
        with m.If(advance):
            m.d.sync += [valid.eq(self.i.valid), last.eq(self.i.payload.last)]

        # stages 2 .. 1+depth: the adder tree, with valid/last delayed alongside
        total, depth = adder_tree(m, terms, advance, "tree")
        for d in range(depth):
            v, l = Signal(name=f"valid_d{d}"), Signal(name=f"last_d{d}")
            with m.If(advance):
                m.d.sync += [v.eq(valid), l.eq(last)]
            valid, last = v, l

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
    """:class:`LaneArray` with multiplier lanes (``x * w``)."""
    return LaneArray(lanes, bits, "mul", **kwargs)
