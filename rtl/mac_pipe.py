"""Shared pieces of the streaming engines: stall-aware delay lines, an array of products over
several lanes (output pixels) feeding adder trees -- multipliers (optionally two 8-bit
products per DSP48E2) or MinConv comparators -- and the block emitter that turns finished
pixels into one beat a cycle.

Every register here is clocked by one ``enable`` (the engine's ``advance``): when a consumer
stalls the engine, the whole pipeline holds its state.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from amaranth import Array, Cat, Const, Module, Mux, Shape, Signal, Value, signed
from amaranth.hdl import ShapeLike

__all__ = ["delay", "register", "Delayed", "mac_array", "mac_latency", "split_product", "accumulate", "emit_pixels",
           "adder_tree", "check_divisor", "check_lanes", "check_product", "Magnitude", "magnitude", "min_term",
           "carry_tree", "term_bound", "pack_chunk", "product_pairs", "packed_dsps", "PRODUCTS", "PACK_SHIFT",
           "PACK_A_BITS", "PACK_B_BITS"]

#: the products a dot-product array computes: ``"mul"`` (``x * w``, a multiplier) and ``"min"``
#: (``sign(x) sign(w) min(|x| << x_shift, |w| << w_shift)``, a comparator: MinConv)
PRODUCTS = ("mul", "min")

#: shared-operand packing into one DSP48E2 (27 x 18 signed multiplier): the packed operand
#: ``(a1 << PACK_SHIFT) + a2`` goes to the 27-bit A port, the shared one to the 18-bit B port
PACK_SHIFT, PACK_A_BITS, PACK_B_BITS = 18, 27, 18


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


def check_divisor(value: int, name: str, total: int, what: str) -> int:
    """``value`` if it is a positive integer dividing ``total`` (a parallelism over ``total``
    channels); else ValueError naming ``name`` and listing the valid values."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or total % value:
        valid = [d for d in range(1, total + 1) if total % d == 0]
        raise ValueError(f"{name} must divide the {total} {what}: one of {valid}, not {value!r}")
    return value


def check_lanes(value: int, name: str = "pp", limit: int = 256) -> int:
    """``value`` if it is an integer in [1, ``limit``] (output pixels per cycle); else ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise ValueError(f"{name} (output pixels per cycle) must be an integer in [1, {limit}], not {value!r}")
    return value


def check_product(product: str, x_shift: int = 0, w_shift: int = 0, *, pack: bool = False,
                  what: str = "product", shifts: tuple[str, str] = ("x_shift", "w_shift")) -> tuple[str, int, int]:
    """(product, x_shift, w_shift) if they describe a product of :data:`PRODUCTS`: the shifts
    (named ``shifts``) are integers >= 0, at most one of them non-zero, and only for ``"min"``;
    ``pack`` (two multiplications per DSP48E2) only for ``"mul"``.  ValueError otherwise."""
    if product not in PRODUCTS:
        raise ValueError(f"{what} must be one of {PRODUCTS}, not {product!r}")
    for v, name in zip((x_shift, w_shift), shifts):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v <= 32:
            raise ValueError(f"{name} must be an integer in [0, 32], not {v!r}")
    if x_shift and w_shift:
        raise ValueError(f"{shifts[0]} and {shifts[1]} align two power-of-two scales: at most one of them is "
                         f"non-zero, not {x_shift} and {w_shift}")
    if product == "mul" and (x_shift or w_shift):
        raise ValueError(f"{shifts[0]}/{shifts[1]} align the operands of a 'min' {what}; a 'mul' {what} has none")
    if product == "min" and pack:
        raise ValueError(f"pack puts two multiplications into one DSP48E2; a 'min' {what} is a comparator and "
                         f"uses no DSP: build it with pack=False")
    return product, int(x_shift), int(w_shift)


def delay(m: Module, value: Value, cycles: int, enable: Value, name: str,
          shape: ShapeLike | None = None) -> list[Value]:
    """``value`` and its ``cycles`` delayed copies, registers clocked by ``enable``:
    element ``k`` of the result is ``value`` as it was ``k`` enabled cycles ago."""
    taps = [value]
    for k in range(cycles):
        r = Signal(shape if shape is not None else value.shape(), name=f"{name}_d{k + 1}")
        m.d.sync += r.eq(Mux(enable, taps[-1], r))
        taps.append(r)
    return taps


def register(m: Module, value: Value, enable: Value, name: str) -> Signal:
    """``value`` one enabled cycle later: a register (named ``<name>_d1``) clocked by ``enable``."""
    return delay(m, value, 1, enable, name)[1]


class Delayed:
    """Named signals (flags, indices, operands) travelling down a pipeline together:
    ``stage(k)[name]`` is the value that entered ``k`` enabled cycles ago."""

    def __init__(self, m: Module, values: dict[str, Value], cycles: int, enable: Value, name: str) -> None:
        self._lines = {k: delay(m, v, cycles, enable, f"{name}_{k}") for k, v in values.items()}

    def stage(self, k: int) -> dict[str, Value]:
        return {name: line[k] for name, line in self._lines.items()}

    def upcoming(self, k: int, enable: Value) -> dict[str, Value]:
        """What ``stage(k)`` (``k >= 1``) will hold in the next cycle (its registers' inputs)."""
        return {name: Mux(enable, line[k - 1], line[k]) for name, line in self._lines.items()}


def _limits(shape: ShapeLike) -> tuple[int, int]:
    s = Shape.cast(shape)
    return (-(1 << (s.width - 1)), (1 << (s.width - 1)) - 1) if s.signed else (0, (1 << s.width) - 1)


def pack_chunk(packed: ShapeLike, shared: ShapeLike) -> int:
    """How many products ``(a1 << 18) + a2`` times ``s`` may be summed before the two fields
    are separated (``a1, a2`` of shape ``packed``, ``s`` of shape ``shared``), or 0 when such
    a pair does not fit one DSP48E2: ``(a1 << 18) + a2`` must fit its 27-bit signed A port,
    ``s`` its 18-bit signed B port, and a sum of ``K`` low products ``a2 * s`` must stay in
    ``[-2**17, 2**17)`` so that it can be read back from the low 18 bits (8 x 8 bits: 7)."""
    alo, ahi = _limits(packed)
    slo, shi = _limits(shared)
    top = 1 << (PACK_A_BITS - 1)
    if alo * (1 << PACK_SHIFT) + alo < -top or ahi * (1 << PACK_SHIFT) + ahi >= top:
        return 0
    if slo < -(1 << (PACK_B_BITS - 1)) or shi >= 1 << (PACK_B_BITS - 1):
        return 0
    corners = [a * s for a in (alo, ahi) for s in (slo, shi)]
    half = 1 << (PACK_SHIFT - 1)
    k = min((half - 1) // max(max(corners), 1), half // max(-min(corners), 1))
    return max(0, k)


def product_pairs(lanes: int, rows: int, row_pairs: bool, lane_pairs: bool) -> list[tuple]:
    """How the ``lanes x rows`` dot products of a multiplier array share DSPs, per input:
    ``("row", p, o)`` packs rows ``o`` and ``o + 1`` of lane ``p`` (a weight pair times the
    shared activation), ``("lane", p, o)`` lanes ``p`` and ``p + 1`` of row ``o`` (an
    activation pair times the shared weight: the odd row left over by an odd ``rows``),
    ``("one", p, o)`` a lone product.  ``row_pairs``/``lane_pairs``: whether those operand
    pairs fit a DSP (:func:`pack_chunk`)."""
    paired = rows - rows % 2 if row_pairs else 0
    out = [("row", p, o) for p in range(lanes) for o in range(0, paired, 2)]
    for o in range(paired, rows):
        p = 0
        while p < lanes:
            if lane_pairs and p + 1 < lanes:
                out.append(("lane", p, o))
                p += 2
            else:
                out.append(("one", p, o))
                p += 1
    return out


def packed_dsps(lanes: int, rows: int, inputs: int, row_pairs: bool, lane_pairs: bool) -> tuple[int, int]:
    """(packed DSPs, lone multipliers) of a ``lanes x rows x inputs`` multiplier array."""
    kinds = [e[0] for e in product_pairs(lanes, rows, row_pairs, lane_pairs)]
    return inputs * (len(kinds) - kinds.count("one")), inputs * kinds.count("one")


def _unpack(total: Value) -> tuple[Value, Value]:
    """(high, low) fields of a sum of packed products: low = the signed low 18 bits, high =
    the rest plus the borrow a negative low field took from it."""
    return (total >> PACK_SHIFT) + total[PACK_SHIFT - 1], total[:PACK_SHIFT].as_signed()


def _packed_sums(m: Module, operands: list[tuple[Value, Value, Value]], chunk: int, enable: Value,
                 name: str) -> tuple[Value, Value]:
    """Two dot products through one multiplier per input: ``operands`` are (a1, a2, s) and
    the results ``sum a1*s`` and ``sum a2*s``.  Each multiplier computes
    ``((a1 << 18) + a2) * s`` (registered); adder trees sum ``chunk`` packed products (a power
    of two, padded with zeros), whose roots are split (:func:`_unpack`) and summed on in two
    trees.  Latency ``1 + ceil(log2 len(operands))``, as for unpacked products."""
    terms = []
    for k, (a1, a2, s) in enumerate(operands):
        p = (a1.shift_left(PACK_SHIFT) + a2) * s
        r = Signal(p.shape(), name=f"{name}_p{k}")
        m.d.sync += r.eq(Mux(enable, p, r))
        terms.append(r)
    terms += [Const(0, signed(1))] * (-len(terms) % chunk)
    highs, lows = [], []
    for c in range(0, len(terms), chunk):
        root, _ = adder_tree(m, terms[c:c + chunk], enable, f"{name}_c{c // chunk}")
        hi, lo = _unpack(root)
        highs.append(hi)
        lows.append(lo)
    return adder_tree(m, highs, enable, f"{name}_hi")[0], adder_tree(m, lows, enable, f"{name}_lo")[0]


class Magnitude(NamedTuple):
    """A MinConv operand as the comparators read it: ``|v| << shift == mag + corr``.

    A signed, unshifted ``v`` is kept in ones' complement, ``mag = v XOR sign`` (``|v| - 1``
    for a negative ``v``, one bit narrower than ``v``) and ``corr`` its sign bit: no negation
    and no carry chain.  A shifted signed ``v`` is ``abs(v) << shift`` exactly (``corr``
    None), an unsigned one itself.  ``top`` is the largest ``mag``."""
    mag: Value
    corr: Value | None
    sign: Value | None
    top: int


def magnitude(v: Value, shift: int = 0, unsigned_term: bool = False) -> Magnitude:
    """:class:`Magnitude` of ``v << shift``: computed once per operand and shared by every
    comparator that reads it.  ``unsigned_term``: only ``|v|`` enters the term, not the sign
    (a GDN norm's ``|x|``)."""
    s = Shape.cast(v.shape())
    if not s.signed:
        return Magnitude(v << shift, None, None, ((1 << s.width) - 1) << shift)
    sign = None if unsigned_term else v[-1]
    if shift:
        return Magnitude(abs(v) << shift, None, sign, (1 << (s.width - 1)) << shift)
    return Magnitude(v[:-1] ^ v[-1].replicate(s.width - 1), v[-1], sign, (1 << (s.width - 1)) - 1)


def min_term(x: Magnitude, w: Magnitude) -> tuple[Value, Value | None]:
    """``sign(x) sign(w) min(|x| << x_shift, |w| << w_shift)`` of two :func:`magnitude`s as
    ``(value, carry)``, the term being ``value + carry`` (``carry`` a bit, or None for 0).

    The comparator orders the keys ``(mag, corr)`` lexicographically, which orders the true
    magnitudes ``mag + corr`` (equal ``mag``: the one with ``corr`` set is larger; a smaller
    ``mag`` is at most equal after its correction); the chosen ``mag`` is cut to the width of
    the smaller operand bound.  A negative term is the ones' complement of that ``mag`` with
    the carry ``1 - corr``, a positive one ``mag`` with the carry ``corr``: one LUT a bit after
    the comparator, and the adder tree takes the carries as carry-ins (:func:`carry_tree`).
    ``sign(0) = 0`` needs no logic: the minimum with a zero is zero (or a negated zero, ``-1 + 1``)."""
    c = Cat(x.corr if x.corr is not None else Const(0, 1), x.mag) < Cat(w.corr if w.corr is not None else Const(0, 1),
                                                                       w.mag)
    k = min(x.top, w.top).bit_length()
    chosen = Mux(c, x.mag, w.mag)[:k]
    corrs = [v.corr if v.corr is not None else Const(0, 1) for v in (x, w)]
    carry = Mux(c, *corrs) if x.corr is not None or w.corr is not None else None
    signs = [v.sign for v in (x, w) if v.sign is not None]
    if not signs:
        return chosen, carry
    neg = signs[0] ^ signs[1] if len(signs) == 2 else signs[0]
    value = Cat(chosen ^ neg.replicate(k), neg).as_signed()
    return value, neg if carry is None else carry ^ neg


def term_bound(product: str, x_shape: ShapeLike, w_shape: ShapeLike, x_shift: int = 0, w_shift: int = 0) -> int:
    """The largest magnitude of one product of operands of these shapes: ``max|x| max|w|`` for
    ``"mul"``, ``min(max|x| << x_shift, max|w| << w_shift)`` for ``"min"`` (what accumulator
    widths are derived from)."""
    def top(shape: ShapeLike) -> int:
        s = Shape.cast(shape)
        return 1 << (s.width - 1) if s.signed else (1 << s.width) - 1
    if product == "mul":
        return top(x_shape) * top(w_shape)
    return min(top(x_shape) << x_shift, top(w_shape) << w_shift)


def _min_array(m: Module, x: list[list[Value]], w: list[list[Value]], enable: Value, name: str, x_shift: int,
               w_shift: int, x_magnitude: bool) -> list[list[Value]]:
    """MinConv dot products: the magnitudes of each activation (shared by the ``PO`` rows) and
    of each weight (shared by the ``PP`` lanes), then one registered comparator term per
    (p, o, i) and an adder tree per dot product."""
    xm = [[magnitude(v, x_shift, x_magnitude) for v in lane] for lane in x]
    wm = [[magnitude(v, w_shift) for v in row] for row in w]
    sums = []
    for p, lane in enumerate(xm):
        sums.append([])
        for o, row in enumerate(wm):
            terms, carries = [], []
            for i, (a, b) in enumerate(zip(lane, row)):
                value, carry = min_term(a, b)
                r = Signal(value.shape(), name=f"{name}_{p}_{o}_p{i}")
                m.d.sync += r.eq(Mux(enable, value, r))
                terms.append(r)
                if carry is not None:
                    c = Signal(name=f"{name}_{p}_{o}_c{i}")
                    m.d.sync += c.eq(Mux(enable, carry, c))
                    carries.append(c)
            sums[p].append(carry_tree(m, terms, carries, enable, f"{name}_{p}_{o}_t"))
    return sums


def carry_tree(m: Module, terms: list[Value], carries: list[Value], enable: Value, name: str) -> Value:
    """``sum terms + sum carries`` (``carries``: bits, at most ``len(terms)``) through a
    pipelined adder tree of :func:`adder_tree`'s depth in which each adder
    takes one carry as its carry-in (free in a carry chain) and the rest travel up with it,
    registered; the root's remaining carries are added after it (combinational, for the
    accumulator's carry-in)."""
    level = [(t, [carries[k]] if k < len(carries) else []) for k, t in enumerate(terms)]
    depth = 0
    while len(level) > 1:
        nxt = []
        for k in range(0, len(level), 2):
            (a, ca), (b, cb) = level[k], (level[k + 1] if k + 1 < len(level) else (None, []))
            pending = ca + cb
            s = a if b is None else (a + b + pending.pop(0) if pending else a + b)
            r = Signal(s.shape(), name=f"{name}_l{depth}_{k // 2}")
            regs = [Signal(name=f"{name}_l{depth}_{k // 2}_c{j}") for j in range(len(pending))]
            m.d.sync += [r.eq(Mux(enable, s, r))] + [q.eq(Mux(enable, c, q)) for q, c in zip(regs, pending)]
            nxt.append((r, regs))
        level, depth = nxt, depth + 1
    root, rest = level[0]
    return sum(rest, root) if rest else root


def mac_latency(inputs: int, split: bool = False) -> int:
    """Cycles from :func:`mac_array`'s operands to its sums: the operand registers, the
    registered products (two stages each when ``split``: :func:`split_product`),
    ``ceil(log2 inputs)`` adder-tree levels."""
    return 2 + int(split) + (inputs - 1).bit_length()


def split_product(m: Module, a: Value, b: Value, enable: Value, name: str) -> Signal:
    """``a * b`` in two pipeline stages, for a multiplier built from LUTs: the wider operand
    ``b`` is cut into its low half (unsigned) and its high half (with ``b``'s sign), the two
    half-width products are registered, and their sum ``lo + (hi << h)`` is registered.
    Exact for any signedness; each stage is a half-width multiplier or one adder, so a LUT
    multiplier no longer sets the clock (a DSP would take the whole product in one stage).
    Latency: 2 enabled cycles (one more than a registered ``a * b``)."""
    if len(a) > len(b):
        a, b = b, a
    h = (len(b) + 1) // 2
    hi = b[h:].as_signed() if b.shape().signed else b[h:]
    lo = register(m, a * b[:h], enable, f"{name}_lo")
    top = register(m, a * hi, enable, f"{name}_hi")
    r = Signal((a * b).shape(), name=name)
    m.d.sync += r.eq(Mux(enable, lo + (top << h), r))
    return r


def mac_array(m: Module, x: list[list[Value]], w: list[list[Value]], enable: Value, name: str,
              pack: bool = False, *, product: str = "mul", x_shift: int = 0, w_shift: int = 0,
              x_magnitude: bool = False, split: bool = False) -> tuple[list[list[Value]], int]:
    """``PP x PO`` dot products of length ``PI`` per cycle: ``s[p][o] = sum_i x[p][i] * w[o][i]``
    for lanes (output pixels) ``p`` and rows (output channels) ``o``; with ``product="min"``
    ``sum_i sign(x) sign(w) min(|x[p][i]| << x_shift, |w[o][i]| << w_shift)`` instead
    (comparators, no multiplier; an unsigned operand has no sign; ``x_magnitude``: the
    activations enter as ``|x|``, read from signed ``x`` without a negation), the terms and
    the adder trees as wide as the smaller operand bound (:func:`term_bound`).

    Every operand is registered first (``PP * PI`` activations, ``PO * PI`` weights, clocked
    by ``enable``): a multiplier's inputs are then plain flip-flops, which
    :func:`rtl.pnr.pack_dsp_input_registers` moves into an ECP5 MULT18X18D (and a DSP48E2
    takes as its A/B registers), so no operand multiplexer sits in front of a multiplier.
    Unpacked: one registered multiplier per (p, o, i) (``PP * PO * PI`` DSP candidates), then
    one pipelined adder tree per dot product.  ``pack``: two products share one DSP48E2
    wherever their operands fit it (:func:`pack_chunk`, :func:`product_pairs`): rows ``o, o+1``
    of a lane as the weight pair ``(w[o][i] << 18) + w[o+1][i]`` times ``x[p][i]``, an odd last
    row as the activation pair ``(x[p][i] << 18) + x[p+1][i]`` times ``w[o][i]``; bit-exact.
    ``split`` (``"mul"`` unpacked only, for multipliers built from LUTs): each product in two
    stages (:func:`split_product`).  Returns the sums (combinational of registers) and the
    latency in cycles, :func:`mac_latency` (``2 + ceil(log2 PI)``, one more when ``split``).
    """
    lanes, rows, n = len(x), len(w), len(w[0])
    check_product(product, x_shift, w_shift, pack=pack)
    if split and (product != "mul" or pack):
        raise ValueError(f"split products are multipliers built from LUTs: a 'mul' product without pack, not "
                         f"{product!r}{' with pack' if pack else ''}")
    x = [[register(m, v, enable, f"{name}_x{p}_{i}") for i, v in enumerate(lane)] for p, lane in enumerate(x)]
    w = [[register(m, v, enable, f"{name}_w{o}_{i}") for i, v in enumerate(row)] for o, row in enumerate(w)]
    if product == "min":
        return _min_array(m, x, w, enable, name, x_shift, w_shift, x_magnitude), mac_latency(n)
    xs, ws = x[0][0].shape(), w[0][0].shape()
    row_chunk = pack_chunk(ws, xs) if pack else 0
    lane_chunk = pack_chunk(xs, ws) if pack else 0
    sums: list[list[Value | None]] = [[None] * rows for _ in range(lanes)]
    for kind, p, o in product_pairs(lanes, rows, row_chunk > 0, lane_chunk > 0):
        tag = f"{name}_{p}_{o}"
        if kind == "one":
            terms = []
            for i in range(n):
                if split:
                    terms.append(split_product(m, x[p][i], w[o][i], enable, f"{tag}_p{i}"))
                    continue
                r = Signal((x[p][i] * w[o][i]).shape(), name=f"{tag}_p{i}")
                m.d.sync += r.eq(Mux(enable, x[p][i] * w[o][i], r))
                terms.append(r)
            sums[p][o], _ = adder_tree(m, terms, enable, f"{tag}_t")
            continue
        if kind == "row":
            ops, chunk, into = [(w[o][i], w[o + 1][i], x[p][i]) for i in range(n)], row_chunk, [(p, o), (p, o + 1)]
        else:
            ops, chunk, into = [(x[p][i], x[p + 1][i], w[o][i]) for i in range(n)], lane_chunk, [(p, o), (p + 1, o)]
        chunk = 1 << (min(chunk, n).bit_length() - 1)  # a power of two: every chunk tree has the same depth
        hi, lo = _packed_sums(m, ops, chunk, enable, tag)
        (p1, o1), (p2, o2) = into
        sums[p1][o1], sums[p2][o2] = hi, lo
    return sums, mac_latency(n, split)


def accumulate(m: Module, terms: list[Value], init: list[Value], first: Value, enable: Value, bits: int,
               name: str) -> list[Signal]:
    """Accumulators ``acc_k`` (signed ``bits``, returned): when ``enable`` they take
    ``(init_k if first else acc_k) + terms_k``, so a dot product's sum is in them the cycle
    after its last terms.  ``bits`` must be a derived bound on every partial sum."""
    accs = []
    for k, (t, v0) in enumerate(zip(terms, init)):
        acc = Signal(signed(bits), name=f"{name}{k}")
        with m.If(enable):
            m.d.sync += acc.eq(Mux(first, v0, acc) + t)
        accs.append(acc)
    return accs


def emit_pixels(m: Module, out, values: list[list[Value]], *, write: Value, pixel_done: Value, finishing: Value,
                groups: int, bits: int, count: Value, ahead: tuple[Value, Value, Value | None],
                phase: Value | None = None) -> Value:
    """Assemble finished pixels of ``len(values)`` lanes into one pixel beat a cycle on stream
    ``out``, and return the stall condition.

    ``values[p]`` is the current group of output channels of lane ``p`` (``bits`` each); a
    pixel has ``groups`` groups, group 0 first (at the LSB of the beat).  ``write``: a group
    is finished this cycle (and the pipeline advances); ``pixel_done``: it is the last group
    of the lanes' pixels; ``finishing``: a group is waiting at the end of the pipeline
    (regardless of stalls); ``count``: how many lanes hold real pixels (a block cut short by
    the end of a row).  Without ``phase`` the lanes' pixels go out in lane order as soon as
    they are finished.  With ``phase`` (a transposed convolution's output column parity,
    lanes ``p`` at columns ``2(j0 + p) + phase``), the even pixels wait for their odd
    neighbours and the block goes out interleaved, even 0, odd 0, even 1, ...

    The beats wait in two banks of one block each (``lanes`` pixels, or ``2 * lanes``
    interleaved), written in turn: a finished block goes into the free bank while the
    previous block's last beat may still wait in the other, and the output beat is the bank
    entry at the read pointer.  The pipeline stalls (the returned ``stall``) only when a
    finished block meets more than one beat of the previous one not yet taken.  The
    consumer's ``ready`` moves only the read pointer and the beat count (a few flip-flops):
    no wide enable depends on it, and the stall is a function of this engine's registers, so
    no combinational path runs from the consumer's ``ready`` to the engine's enable, nor
    from engine to engine.  ``ahead``: the values ``(finishing, pixel_done, phase)`` take in
    the next cycle; the stall and the banks' load are registers computed a cycle ahead from
    them and the beat count's next value, so the engine's enable and the banks' enables fan
    out from flip-flops.  Latency: a block's first beat is valid the cycle after it loads.
    """
    lanes, gbits = len(values), len(values[0]) * bits
    pixels = []
    for p, vals in enumerate(values):
        parts = [v[:bits] for v in vals]
        if groups > 1:
            held = Signal((groups - 1) * gbits, name=f"emit_held{p}")  # groups 0 .. groups-2, group 0 at the LSB
            with m.If(write & ~pixel_done):
                m.d.sync += held.eq(Cat(held[gbits:], *parts))
            pixels.append(Cat(held, *parts))
        else:
            pixels.append(Cat(*parts))
    width = groups * gbits
    if phase is None:
        block, n = pixels, count
    else:
        evens = [Signal(width, name=f"emit_even{p}") for p in range(lanes)]
        with m.If(write & pixel_done & ~phase):
            m.d.sync += [e.eq(v) for e, v in zip(evens, pixels)]
        block = [v for pair in zip(evens, pixels) for v in pair]
        n = count * 2
    size = len(block)
    banks = [[Signal(width, name=f"emit_q{b}_{k}") for k in range(size)] for b in range(2)]
    counts = [Signal(range(size + 1), name=f"emit_n{b}") for b in range(2)]
    wbank, rbank = Signal(name="emit_wbank"), Signal(name="emit_rbank")   # bank written next; bank read
    ridx = Signal(range(size), name="emit_ridx")
    left = Signal(range(2 * size + 1))   # beats in the banks not yet taken
    valid, load = Signal(name="emit_valid"), Signal(name="emit_load")   # left != 0; a block loads now
    taken = valid & out.ready

    def entry(bank: list[Signal]) -> Value:
        return bank[0] if size == 1 else Array(bank)[ridx]

    m.d.comb += [out.valid.eq(valid), out.payload.eq(Mux(rbank, entry(banks[1]), entry(banks[0])))]
    for b in range(2):
        with m.If(load & (wbank == b)):
            m.d.sync += [q.eq(v) for q, v in zip(banks[b], block)] + [counts[b].eq(n)]
    with m.If(load):
        m.d.sync += wbank.eq(~wbank)
    with m.If(taken):
        with m.If(ridx == Mux(rbank, counts[1], counts[0]) - 1):
            m.d.sync += [rbank.eq(~rbank), ridx.eq(0)]
        with m.Else():
            m.d.sync += ridx.eq(ridx + 1)
    left_next = Signal.like(left)
    m.d.comb += left_next.eq(left - taken + Mux(load, n, 0))
    f, d, ph = ahead
    stall = Signal(name="emit_stall")
    finished = f & d & (1 if ph is None else ph)   # a block finishes in the next cycle: it stalls or loads
    m.d.sync += [left.eq(left_next), valid.eq(left_next != 0),
                 stall.eq(finished & (left_next > 1)), load.eq(finished & (left_next <= 1))]
    return stall
