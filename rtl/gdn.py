"""Fixed-point GDN of the quantized model, inverse or forward, on a pixel stream.

    n_i = requantize_u(beta_i + sum_j gamma_ij |x_j|, norm_shift, norm_bits)   (unsigned)
    inverse: y_i = requantize(x_i * n_i, out_shift, out_bits)                   (signed)
    forward: y_i = saturate(round_half_even(x_i * 2^-out_shift / n_i), out_bits)

exactly :func:`quant.golden.igdn_int` / :func:`quant.golden.gdn_int` (the simplified GDN of
Johnston et al. 2019 that the quantized PyTorch model trains with: L1 norm, no square root).
The two differ only after the norm: a multiplier, or a pipelined restoring divider.

The inverse GDN of a MinConv decoder is multiplier-free (issue 15's contract): the norm's
terms ``gamma_ij |x_j|`` become ``min(|x_j| << norm_x_shift, gamma_ij << norm_g_shift)``
(``norm_product="min"``: comparators), and ``x * n`` becomes ``x << e`` with ``2**e`` the
power of two nearest to ``n`` (``out_product="shift"``: a leading-one detector,
:func:`pow2_exponent`, and a barrel shifter).
"""
from __future__ import annotations

from functools import reduce

import numpy as np
from amaranth import Cat, Const, Module, Mux, Signal, Value, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from licforge.quant.fixed import accumulator_bits, check_bits, int_range, requantize
from .conv_transpose import pack_words
from .emit import rom_file_attr
from .mac_pipe import (Delayed, accumulate, check_divisor, check_lanes, check_product, delay, emit_pixels, mac_array,
                       mac_latency, pack_chunk, packed_dsps, register, split_product, term_bound, PRODUCTS)
from .requantizer import requantize_expr

__all__ = ["GdnUnit", "gamma_layout", "gdn_latency", "split_stages", "divide_round_half_even", "pow2_exponent",
           "OUT_PRODUCTS", "INVERSE_TAIL"]

#: how an inverse GDN forms ``x * n``: a multiplier, or a shift by the exponent of the power of
#: two nearest to ``n`` (:func:`pow2_exponent`)
OUT_PRODUCTS = ("mul", "shift")


INVERSE_TAIL = 2   # the inverse GDN after the norm register: its copy (the x * n operand register), the product


def gamma_layout(channels: int, pi: int, po: int) -> np.ndarray:
    """Gamma ROM layout: array (words, PO*PI, 2) of (row i, column j) of ``gamma``.  Word
    ``o*C/PI + g`` holds, in lane ``oo*PI + ii``, ``gamma[o*PO + oo, g*PI + ii]``."""
    ii, oo = np.meshgrid(np.arange(pi), np.arange(po))
    words = [np.stack([o * po + oo, g * pi + ii], -1).reshape(po * pi, 2)
             for o in range(channels // po) for g in range(channels // pi)]
    return np.stack(words)


def gdn_latency(pi: int, tail: int, split: bool = False) -> int:
    """Cycles from the issue of a pixel's last item to its output beat: ROM read (with ``|x|``),
    the read-data registers, the multiplier array (:func:`rtl.mac_pipe.mac_latency`: operand
    registers, products -- two stages each when ``split`` --, ``ceil(log2 PI)`` adder-tree
    levels), accumulator, norm (from the accumulator), ``tail``
    (:data:`INVERSE_TAIL` for the inverse's ``x * n``, one more when it is split; the divider's
    stages for the forward GDN), output register."""
    return 5 + mac_latency(pi, split) + tail


def divide_round_half_even(m: Module, x: Value, n: Value, *, num_shift: int, den_shift: int, out_bits: int,
                           bits_per_stage: int, enable: Value, name: str) -> tuple[Value, int]:
    """``saturate(round_half_even((x << num_shift) / (n << den_shift)), out_bits)`` for signed
    ``x`` and unsigned ``n >= 1``: :func:`quant.golden.div_round_half_even` then saturation.

    Restoring division of ``a = |x| << num_shift`` by ``d = n << den_shift`` into
    ``Q = out_bits - 1`` quotient bits: ``a >= d << Q`` saturates whatever the rounding;
    otherwise bit ``k`` (MSB first) is set when ``(r >> k) >= d``, a ``(w(d) + 1)``-bit
    subtraction.  The quotient ``q`` and remainder ``r`` round half to even (``2r > d``, or
    ``2r == d`` and ``q`` odd), the sign is applied (exact: half-to-even is symmetric) and the
    result saturates.  A register (clocked by ``enable``) follows every ``bits_per_stage``
    quotient bits; returns the combinational result after the last register and the number of
    registers, ``ceil(Q / bits_per_stage)``."""
    qb = out_bits - 1
    d = Cat(Const(0, den_shift), n)
    dw = len(d)
    a = Cat(Const(0, num_shift), abs(x))
    r = Signal(dw + qb, name=f"{name}_r0")  # a, cut to the bits a non-saturating quotient leaves
    m.d.comb += r.eq(a)
    st = {"r": r, "d": d, "q": Const(0, 0), "neg": x < 0, "ovf": (a >> qb) >= d}
    stages = 0
    for k in reversed(range(qb)):
        top = st["r"][k:k + dw + 1]  # r < d << (k + 1) unless the quotient saturates
        ge = top >= st["d"]
        st["r"] = Mux(ge, Cat(st["r"][:k], (top - st["d"])[:dw + 1]), st["r"])[:dw + k]
        st["q"] = Cat(ge, st["q"])
        if (qb - k) % bits_per_stage == 0 or k == 0:
            stages += 1
            regs = {}
            for key, v in st.items():
                regs[key] = Signal(v.shape(), name=f"{name}_{key}{stages}")
                m.d.sync += regs[key].eq(Mux(enable, v, regs[key]))
            st = regs
    r, q, d = st["r"], st["q"], st["d"]
    twice = Cat(Const(0, 1), r)
    mag = q + ((twice > d) | ((twice == d) & q[0]))
    lo, hi = int_range(out_bits, True)
    y = Mux(st["ovf"], Mux(st["neg"], lo, hi), Mux(st["neg"], -mag, Mux(mag > hi, hi, mag)))
    return y[:out_bits].as_signed(), stages


def pow2_exponent(n: Value) -> tuple[Value, Value]:
    """``(e, zero)`` for unsigned ``n``: ``2**e`` is the power of two nearest to ``n`` in the
    linear domain, ties up, and ``zero`` flags ``n == 0`` (``e`` is then 0), as
    :func:`quant.golden.pow2_round` (which returns -1 there).

    With ``k`` the position of the leading one, ``e = k + n[k-1]`` (the bit below it rounds
    up: ``n >= 1.5 * 2**k``).  Structure: a one-hot leading-one vector from prefix ORs, then
    each bit of ``e`` an OR over the positions whose ``k`` or ``k + 1`` has it set -- two or
    three LUT levels for 12 bits, no carry chain and no priority chain."""
    width = len(n)
    picks = []
    for k in range(width):
        lead = n[k] & ~n[k + 1:].any() if k < width - 1 else n[k]
        picks.append(Mux(lead, Mux(n[k - 1], k + 1, k) if k else k, 0))
    e = reduce(lambda a, b: a | b, picks)[:width.bit_length()]
    return e, ~n.any()


def split_stages(norm_product: str, out_product: str, inverse: bool, pack: bool) -> tuple[bool, bool]:
    """Which multipliers of a GDN unit ``split_products`` cuts into two pipeline stages: (its
    norm's -- unpacked multipliers, not comparators --, an inverse GDN's exact ``x * n``)."""
    return norm_product == "mul" and not pack, inverse and out_product == "mul"


class GdnUnit(wiring.Component):
    """GDN of ``C`` channels with the norm ``n`` above: the inverse
    ``y = requantize(x * n, out_shift, out_bits)`` or, with ``inverse=False``, the forward
    ``y = saturate(round_half_even(x * 2^-out_shift / n), out_bits)``; ``x`` signed ``x_bits``,
    ``gamma`` (C, C) >= 0 signed ``gamma_bits``, ``beta`` (C,) signed ``beta_bits`` at the scale
    of ``gamma |x|``, ``n`` unsigned ``norm_bits`` (the forward GDN needs every beta to
    requantize to a norm >= 1, as :func:`quant.golden.gdn_int` does).

    Parallelism: ``po`` norms per item, each over ``pi`` input channels, for ``pp`` pixels
    (lanes) at once: ``PI * PO * PP`` multipliers for ``gamma |x|``, then ``PO * PP``
    multipliers for ``x * n`` (inverse) or ``PO * PP`` pipelined restoring dividers of
    ``out_bits - 1`` quotient bits, ``div_bits`` of them per stage (forward;
    :func:`divide_round_half_even`, ``(out_bits - 1) * PO`` subtractors of
    ``norm_bits + max(0, out_shift) + 1`` bits per lane); a block of ``PP`` pixels takes
    ``(C/PI) * (C/PO)`` cycles, so ``pi = po = C`` is one pixel per cycle, fully pipelined.
    ``pack``: two ``gamma |x|`` products per DSP48E2 where a gamma pair fits
    (:func:`rtl.mac_pipe.mac_array`; ``dsp_pairs`` packed DSPs, ``dsp_single`` lone
    multipliers, the ``x * n`` products not included).  ``gamma``/``beta`` live in ROMs
    initialised from ``<name>_gamma.hex`` / ``<name>_beta.hex``.

    Multiplier-free inverse GDN: ``norm_product="min"`` makes the ``PI * PO * PP`` norm terms
    comparators, ``min(|x_j| << norm_x_shift, gamma_ij << norm_g_shift)`` (no sign: both are
    >= 0; ``pack`` is refused), and ``out_product="shift"`` replaces the ``PO * PP``
    multipliers ``x * n`` by ``x << e`` (:func:`pow2_exponent`; ``y = 0`` where ``n = 0``),
    requantized as the product was, in the same pipeline stage: the latency does not change.
    ``split_products`` (for a build whose multipliers are LUTs, ``synth_ecp5 -nodsp``): every
    multiplier of the unit -- the norm's when they are unpacked multipliers, the inverse's
    ``x * n`` -- in two pipeline stages (:func:`rtl.mac_pipe.split_product`), one cycle more
    latency for each of the two; the outputs are the same.

    The inverse's ``x * n`` reads a copy of the norm register (and ``x`` one cycle later): the
    norm's requantizer (a carry chain) and the route to the multiplier get a cycle each, and
    the copy, loaded straight from a flip-flop, is an operand register that
    :func:`rtl.pnr.pack_dsp_input_registers` moves into an ECP5 MULT18X18D as it does the norm
    products' (without it the norm register stayed in the fabric, and norm -> MULT18 ->
    product was the N=16 decoder's critical path on four of six placement seeds).

    Lanes: with ``pp > 1`` the unit has a ``width`` port (pixels a row) and its blocks are up
    to ``PP`` consecutive pixels of one row: ``PP - 1`` pixels wait in a gather register
    while the previous block computes, and the block starts when its last pixel (the
    ``PP``-th, or the row's last) arrives.  The block's pixels leave one a beat, in order.

    Timing: the input block is held while its items issue (the next block's last pixel is
    accepted in the cycle its last item issues); latency from the last item to the output beat
    ``7 + ceil(log2 PI) + T`` cycles (:func:`gdn_latency`; one more with split norm products),
    ``T = 2`` for the inverse (3 with a split ``x * n``) and
    ``ceil((out_bits - 1) / div_bits)`` for the forward GDN (8-bit output, ``div_bits = 2``:
    ``T = 4``).  A finished block waits in the output queue (two banks of one block,
    :func:`rtl.mac_pipe.emit_pixels`); the unit stalls only when a second one finishes while
    more than one beat of the first waits.
    """

    def __init__(self, gamma: np.ndarray, beta: np.ndarray, *, x_bits: int, gamma_bits: int, beta_bits: int,
                 norm_shift: int, norm_bits: int, out_shift: int, out_bits: int, pi: int | None = None,
                 po: int = 1, pp: int = 1, pack: bool = False, inverse: bool = True, div_bits: int | None = None,
                 name: str = "igdn", norm_product: str = "mul", norm_x_shift: int = 0, norm_g_shift: int = 0,
                 out_product: str = "mul", split_products: bool = False) -> None:
        gamma, beta = np.asarray(gamma), np.asarray(beta)
        c = int(beta.shape[0]) if beta.ndim == 1 else -1
        if c < 1 or gamma.shape != (c, c):
            raise ValueError(f"gamma must be (C, C) and beta (C,); got {gamma.shape} and {beta.shape}")
        if (gamma < 0).any():
            raise ValueError("gamma must be non-negative")
        self.channels = c
        self.x_bits = check_bits(x_bits, "x_bits", 2)
        self.gamma_bits, self.beta_bits = check_bits(gamma_bits, "gamma_bits", 2), check_bits(beta_bits, "beta_bits", 1, 48)
        self.norm_bits, self.out_bits = check_bits(norm_bits, "norm_bits"), check_bits(out_bits, "out_bits")
        for arr, bits, what in ((gamma, gamma_bits, "gamma"), (beta, beta_bits, "beta")):
            lo, hi = int_range(bits, True)
            if arr.min() < lo or arr.max() > hi:
                raise ValueError(f"{what} values lie outside the {bits}-bit range [{lo}, {hi}]")
        for v, what in ((norm_shift, "norm_shift"), (out_shift, "out_shift")):
            if not isinstance(v, (int, np.integer)) or abs(v) > 63:
                raise ValueError(f"{what} must be an integer in [-63, 63], not {v!r}")
        self.pi = check_divisor(c if pi is None else pi, "pi", c, "channels")
        self.po = check_divisor(po, "po", c, "channels")
        self.pp, self.pack = check_lanes(pp), bool(pack)
        self.norm_shift, self.out_shift, self.name = int(norm_shift), int(out_shift), name
        self.inverse, self.div_bits = bool(inverse), None
        self.norm_product, self.norm_x_shift, self.norm_g_shift = check_product(
            norm_product, norm_x_shift, norm_g_shift, pack=pack, what="norm_product",
            shifts=("norm_x_shift", "norm_g_shift"))
        if out_product not in OUT_PRODUCTS:
            raise ValueError(f"out_product must be one of {OUT_PRODUCTS}, not {out_product!r}")
        self.out_product = out_product
        if not self.inverse and (norm_product, out_product) != ("mul", "mul"):
            raise ValueError("norm_product='min' and out_product='shift' belong to the inverse GDN of a MinConv "
                             "decoder; the forward GDN (inverse=False) multiplies and divides")
        # split_products: every multiplier of the unit (the norm's, unless they are comparators or packed,
        # and the inverse's x * n) in two pipeline stages, for multipliers built from LUTs
        self.split_norm, self.split_out = (bool(split_products) and k for k in split_stages(
            self.norm_product, self.out_product, self.inverse, self.pack))
        if split_products and not (self.split_norm or self.split_out):
            raise ValueError("split_products cuts multipliers built from LUTs into two stages: this unit has none "
                             "(comparator or packed norm products, and a shift or a divider after the norm)")
        if self.inverse:
            if div_bits is not None:
                raise ValueError("div_bits sets the forward GDN's divider; the inverse GDN (inverse=True) has none")
            self.tail = INVERSE_TAIL + self.split_out
        else:
            check_bits(out_bits, "out_bits", 2)
            self.div_bits = check_bits(2 if div_bits is None else div_bits, "div_bits", 1, out_bits - 1)
            if requantize(beta, self.norm_shift, norm_bits, signed=False).min() < 1:
                raise ValueError("forward GDN: every beta must requantize to a norm >= 1 (the divisor); "
                                 "quant.golden.gdn_int refuses a zero norm too")
            self.tail = -(-(out_bits - 1) // self.div_bits)
        self.gamma, self.beta = gamma.astype(np.int64), beta.astype(np.int64)
        xs, gs = unsigned(self.x_bits), signed(self.gamma_bits)   # |x| and gamma
        if self.norm_product == "min":   # |x| <= 2**(x_bits - 1); gamma >= 0: its sign bit is dropped
            term = term_bound("min", signed(self.x_bits), unsigned(self.gamma_bits - 1), self.norm_x_shift,
                              self.norm_g_shift)
        else:
            term = (1 << (x_bits - 1)) * (1 << (gamma_bits - 1))
        self.acc_bits = accumulator_bits(term, c, 1 << (beta_bits - 1))
        self.latency = gdn_latency(self.pi, self.tail, self.split_norm)
        # x * n: a multiplier per output unless shifted (the forward GDN divides instead)
        lone = self.po * self.pp if self.inverse and self.out_product == "mul" else 0
        norm = self.pi * self.po * self.pp
        self.multipliers = (norm if self.norm_product == "mul" else 0) + lone
        self.comparators = norm if self.norm_product == "min" else 0
        self.shifters = self.po * self.pp if self.out_product == "shift" else 0
        self.dsp_pairs, self.dsp_single = (0, 0) if self.norm_product == "min" else packed_dsps(
            self.pp, self.po, self.pi, pack and pack_chunk(gs, xs) > 0, pack and pack_chunk(xs, gs) > 0)
        self.dsps = self.dsp_pairs + self.dsp_single + lone
        pixel = data.ArrayLayout(signed(x_bits), c)
        ports = {"i": In(stream.Signature(pixel)), "o": Out(stream.Signature(data.ArrayLayout(signed(out_bits), c)))}
        super().__init__({**ports, "width": In(16)} if self.pp > 1 else ports)

    @classmethod
    def for_layer(cls, layer, *, pi: int | None = None, po: int = 1, pp: int = 1, pack: bool = False,
                  div_bits: int | None = None, split_products: bool = False) -> "GdnUnit":
        """The unit of a bundle ``igdn`` or ``gdn`` layer (:class:`quant.bundle.Layer`);
        ``split_products``: its multipliers, if it has any, in two stages each."""
        if layer.op not in ("igdn", "gdn"):
            raise ValueError(f"layer {layer.name!r} is {layer.op!r}: GdnUnit implements 'igdn' and 'gdn' layers")
        a, t = layer.attrs, layer.tensors
        for key, kinds in (("norm_product", PRODUCTS), ("out_product", OUT_PRODUCTS)):
            if a.get(key, "mul") not in kinds:
                raise ValueError(f"layer {layer.name}: {key} {a[key]!r} is not supported by the RTL generator "
                                 f"(GdnUnit: one of {kinds})")
        try:
            return cls(t["gamma"], t["beta"], x_bits=a["x_bits"], gamma_bits=a["gamma_bits"],
                       beta_bits=a["beta_bits"], norm_shift=a["norm_shift"], norm_bits=a["norm_bits"],
                       out_shift=a["out_shift"], out_bits=a["out_bits"], pi=pi, po=po, pp=pp, pack=pack,
                       inverse=layer.op == "igdn", div_bits=div_bits, name=layer.name,
                       norm_product=a.get("norm_product", "mul"), norm_x_shift=a.get("norm_x_shift", 0),
                       norm_g_shift=a.get("norm_g_shift", 0), out_product=a.get("out_product", "mul"),
                       split_products=split_products and any(split_stages(
                           a.get("norm_product", "mul"), a.get("out_product", "mul"), layer.op == "igdn", pack)))
        except ValueError as e:
            raise ValueError(f"layer {layer.name}: {e}") from None

    @property
    def groups(self) -> tuple[int, int]:
        """(C/PI, C/PO): items per norm, norm groups per pixel."""
        return self.channels // self.pi, self.channels // self.po

    def gamma_words(self) -> list[int]:
        lay = gamma_layout(self.channels, self.pi, self.po)
        return pack_words(self.gamma[lay[..., 0], lay[..., 1]], self.gamma_bits)

    def beta_words(self) -> list[int]:
        return pack_words(self.beta.reshape(-1, self.po), self.beta_bits)

    def deployment(self) -> dict:
        """The block's entry in a deployment manifest (layouts: :func:`gamma_layout`, beta word
        ``o`` = channels ``o*PO ..``)."""
        return {"name": self.name, "op": "igdn" if self.inverse else "gdn", "channels": self.channels, "pi": self.pi, "po": self.po,
                "pp": self.pp, "pack": self.pack, "dsp_pairs": self.dsp_pairs, "dsp_single": self.dsp_single,
                "norm_product": self.norm_product, "norm_x_shift": self.norm_x_shift,
                "norm_g_shift": self.norm_g_shift, "out_product": self.out_product,
                "x_bits": self.x_bits, "norm_shift": self.norm_shift, "norm_bits": self.norm_bits,
                "out_shift": self.out_shift, "out_bits": self.out_bits, "acc_bits": self.acc_bits,
                "latency": self.latency, "split_products": self.split_norm or self.split_out,
                "roms": {"gamma": {"file": f"{self.name}_gamma.hex", "bits": self.gamma_bits},
                         "beta": {"file": f"{self.name}_beta.hex", "bits": self.beta_bits}}}

    def elaborate(self, platform) -> Module:
        m = Module()
        gi, go = self.groups
        pi, po, pp, xb = self.pi, self.po, self.pp, self.x_bits
        advance = Signal()
        gwords = self.gamma_words()
        m.submodules.grom = grom = Memory(shape=unsigned(pi * po * self.gamma_bits), depth=len(gwords),
                                          init=gwords, attrs=rom_file_attr(f"{self.name}_gamma"))
        m.submodules.brom = brom = Memory(shape=unsigned(po * self.beta_bits), depth=go, init=self.beta_words(),
                                          attrs=rom_file_attr(f"{self.name}_beta"))
        gport, bport = grom.read_port(), brom.read_port()

        # ---- hold one block of input pixels while its (norm group, input group) items issue
        have = Signal()
        o, g, ga = Signal(range(go)), Signal(range(gi)), Signal(range(len(gwords)))
        last_g, last_o = g == gi - 1, o == go - 1
        step = advance & have
        # the block's last item is the current one (ga == items - 1): a register, so that the
        # input's ready (freeing the block) is one LUT from flip-flops
        items = len(gwords)
        pix_last = Signal(init=items == 1, name="pix_last")
        held, nv = self._gather(m, have, step & pix_last)
        with m.If(step):
            m.d.sync += [g.eq(Mux(last_g, 0, g + 1)), ga.eq(Mux(pix_last, 0, ga + 1)),
                         pix_last.eq(Mux(pix_last, items == 1, ga == items - 2 if items > 1 else 1))]
            with m.If(last_g):
                m.d.sync += o.eq(Mux(last_o, 0, o + 1))
        m.d.comb += [gport.addr.eq(ga), gport.en.eq(advance)]
        # ---- gamma |x| (PI x PO x PP multipliers, adder trees), + beta, norm; then x * n and
        # requantize (inverse) or the divider (forward): ``tail`` registers after the norm's.
        # Stage 1: the item's input group of x (a multiplexer) and the gamma ROM's data; stage 2:
        # |x| (a comparator reads x itself: rtl.mac_pipe.magnitude, no negation) and the ROM
        # data registered
        root, tail = 2 + mac_latency(pi, self.split_norm), self.tail
        flags = Delayed(m, {"v": have, "first": g == 0, "done": have & last_g, "pix": pix_last, "o": o, "nv": nv},
                        root + 2 + tail, advance, "s")
        mins = self.norm_product == "min"
        xsel = register(m, Cat(*(h.word_select(g, pi * xb) for h in held)), advance, "xsel")
        absx1 = register(m, Cat(*(v if mins else abs(v) for v in (xsel.word_select(k, xb).as_signed()
                                                                    for k in range(pi * pp)))), advance, "absx")
        gdata = register(m, gport.data, advance, "graw")
        xo_at = root + 2 + (INVERSE_TAIL - 1 if self.inverse else 0)   # x meets the norm (its copy, inverse)
        xo = delay(m, Cat(*(h.word_select(o, po * xb) for h in held)), xo_at, advance, "xo")[xo_at]
        gb = self.gamma_bits
        xs = [[absx1[(p * pi + k) * xb:(p * pi + k + 1) * xb] for k in range(pi)] for p in range(pp)]
        xs = [[v.as_signed() for v in lane] for lane in xs] if mins else xs
        if self.norm_product == "min":   # gamma >= 0: the low gb - 1 bits, unsigned
            ws = [[gdata[(oo * pi + ii) * gb:(oo * pi + ii + 1) * gb - 1] for ii in range(pi)] for oo in range(po)]
        else:
            ws = [[gdata[(oo * pi + ii) * gb:(oo * pi + ii + 1) * gb].as_signed() for ii in range(pi)]
                  for oo in range(po)]
        roots, _ = mac_array(m, xs, ws, advance, "mac", pack=self.pack, product=self.norm_product,
                             x_shift=self.norm_x_shift, w_shift=self.norm_g_shift, x_magnitude=mins,
                             split=self.split_norm)
        m.d.comb += [bport.addr.eq(flags.stage(root - 2)["o"]), bport.en.eq(advance)]
        bdata = register(m, bport.data, advance, "braw")
        sr = flags.stage(root)
        beta = [bdata[k * self.beta_bits:(k + 1) * self.beta_bits].as_signed() for k in range(po)]
        accs = accumulate(m, [s for lane in roots for s in lane], beta * pp, sr["first"], advance & sr["v"],
                          self.acc_bits, "acc")
        y = []
        for k, s in enumerate(accs):   # the norm from the accumulator: registered at root + 1
            n = Signal(unsigned(self.norm_bits), name=f"norm{k}")
            with m.If(advance):
                m.d.sync += n.eq(requantize_expr(s, self.norm_shift, self.norm_bits, signed_out=False))
            xk = xo[k * xb:(k + 1) * xb].as_signed()
            if self.inverse:
                n = register(m, n, advance, f"norm{k}_op")
                if self.split_out:   # the half products' register, then their sum's: one stage more
                    p = split_product(m, xk, n, advance, f"xn{k}")
                else:
                    p = Signal(signed(xb + self.norm_bits + 1), name=f"xn{k}")
                    if self.out_product == "shift":   # e <= norm_bits: x << e fits xb + norm_bits bits
                        e, zero = pow2_exponent(n)
                        xn = Mux(zero, 0, (xk << e)[:xb + self.norm_bits].as_signed())
                    else:
                        xn = xk * n
                    with m.If(advance):
                        m.d.sync += p.eq(xn)
                y.append(requantize_expr(p, self.out_shift, self.out_bits, True))
            else:
                q, _ = divide_round_half_even(m, xk, n, num_shift=max(0, -self.out_shift),
                                              den_shift=max(0, self.out_shift), out_bits=self.out_bits,
                                              bits_per_stage=self.div_bits, enable=advance, name=f"div{k}")
                y.append(q)
        se, ne = flags.stage(root + 2 + tail), flags.upcoming(root + 2 + tail, advance)
        done = se["done"]
        stall = emit_pixels(m, self.o, [y[p * po:(p + 1) * po] for p in range(pp)], write=advance & done,
                            pixel_done=se["pix"], finishing=done, groups=go, bits=self.out_bits, count=se["nv"],
                            ahead=(ne["done"], ne["pix"], None))
        m.d.comb += advance.eq(~stall)
        return m

    def _gather(self, m: Module, have: Signal, freeing: Value) -> tuple[list[Signal], Value]:
        """Input pixels -> the held block (``PP`` pixels, the first ``nv`` of them real;
        ``have`` while its items issue, cleared when ``freeing``: its last item issues).  The
        first pixels of a block wait in a gather register; the block's last pixel (the
        ``PP``-th, or the row's last) moves the block into ``held`` when the held block is done
        or freeing, and is accepted only then."""
        pp = self.pp
        pixel = self.i.payload.as_value()
        held = [Signal(len(pixel), name=f"held{k}" if pp > 1 else "held") for k in range(pp)]
        if pp == 1:
            m.d.comb += self.i.ready.eq(~have | freeing)
            with m.If(freeing):
                m.d.sync += have.eq(0)
            with m.If(self.i.valid & self.i.ready):
                m.d.sync += [held[0].eq(pixel), have.eq(1)]
            return held, Const(1, 1)
        gather = [Signal(len(pixel), name=f"gather{k}") for k in range(pp - 1)]
        count, nv, col = Signal(range(pp)), Signal(range(pp + 1)), Signal(16)
        ends = (count == pp - 1) | (col == self.width - 1)
        m.d.comb += self.i.ready.eq(~ends | ~have | freeing)
        with m.If(freeing):
            m.d.sync += have.eq(0)
        with m.If(self.i.valid & self.i.ready):
            m.d.sync += col.eq(Mux(col == self.width - 1, 0, col + 1))
            with m.If(ends):
                m.d.sync += [h.eq(Mux(count == k, pixel, gather[k] if k < pp - 1 else pixel))
                             for k, h in enumerate(held)]
                m.d.sync += [nv.eq(count + 1), count.eq(0), have.eq(1)]
            with m.Else():
                m.d.sync += [gr.eq(Mux(count == k, pixel, gr)) for k, gr in enumerate(gather)] + [count.eq(count + 1)]
        return held, nv
