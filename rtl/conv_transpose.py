"""Streaming transposed convolution (5x5, stride 2, padding 2, output padding 1) by sub-pixel
decomposition: each 2x2 block of outputs is four ordinary convolutions with the sub-kernels
(9, 6, 6 and 4 taps), so no multiplier ever sees an inserted zero.

Pixels stream in and out in raster order, one pixel (all its channels) per beat.  The frame
size is a run-time input (``width``, ``height`` of the *input* grid, ``width <= max_width``);
the output grid is ``2*height x 2*width``.  Output-pixel parallelism (``pp`` lanes) computes
``PP`` output columns of one phase at once: they share every weight and every tap count, so
the phases' unequal work (9/6/6/4 taps) never leaves a lane idle.
"""
from __future__ import annotations

import numpy as np
from amaranth import Array, Cat, Module, Mux, Signal, Value, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from licforge.quant.fixed import accumulator_bits, check_bits, int_range
from .emit import rom_file_attr
from .mac_pipe import (Delayed, accumulate, check_divisor, check_lanes, check_product, emit_pixels, mac_array,
                       mac_latency, pack_chunk, packed_dsps, register, term_bound, PRODUCTS)
from .requantizer import requantize_expr

__all__ = ["ConvTransposeEngine", "conv_latency", "OPERAND_STAGES", "phase_taps", "conv_weight_layout", "pack_words",
           "LINE_SLOTS", "KERNEL", "STRIDE", "PADDING", "OUTPUT_PADDING"]

KERNEL, STRIDE, PADDING, OUTPUT_PADDING = 5, 2, 2, 1
LINE_SLOTS = 4  # input rows i-1, i, i+1 being read for output rows 2i, 2i+1; one filling


def phase_taps(phase: int, k: int = KERNEL, stride: int = STRIDE, padding: int = PADDING) -> list[tuple[int, int]]:
    """The engine's tap schedule for output phase ``phase`` (row or column parity): a list of
    (kernel index, input offset).  Output ``2i + phase`` sums kernel index ``ky`` times input
    ``i + offset``; equal to :func:`quant.golden.subpixel_taps` (tested)."""
    return [(ky, (phase + padding - ky) // stride) for ky in range(k) if (ky - phase - padding) % stride == 0]


def conv_weight_layout(cin: int, cout: int, pi: int, po: int) -> np.ndarray:
    """Weight ROM layout: array (words, PO*PI, 4) of (input channel, output channel, ky, kx).

    Words are ordered phase (a, b) in (0,0), (0,1), (1,0), (1,1), then output group ``o``,
    row tap, column tap, input group ``g``: the order in which the engine reads them.  Lane
    ``oo*PI + ii`` of a word (bits ``lane*w_bits`` upward) holds
    ``W[g*PI + ii, o*PO + oo, ky, kx]``.
    """
    ii, oo = np.meshgrid(np.arange(pi), np.arange(po))  # (po, pi): lane = oo*pi + ii
    words = []
    for a in (0, 1):
        for b in (0, 1):
            for o in range(cout // po):
                for ky, _ in phase_taps(a):
                    for kx, _ in phase_taps(b):
                        for g in range(cin // pi):
                            lanes = np.stack([g * pi + ii, o * po + oo, np.full_like(ii, ky),
                                              np.full_like(ii, kx)], -1)
                            words.append(lanes.reshape(po * pi, 4))
    return np.stack(words)


def pack_words(values: np.ndarray, bits: int) -> list[int]:
    """Pack rows of integers (two's complement, ``bits`` each, lane 0 at the LSB) into words."""
    mask = (1 << bits) - 1
    out = []
    for row in np.asarray(values, np.int64):
        word = 0
        for k, v in enumerate(row.tolist()):
            word |= (v & mask) << (k * bits)
        out.append(word)
    return out


#: pipeline stages from an item's issue to the operands of the multiplier array: the registered
#: line-buffer and ROM addresses, the memories' read data, the read-data registers
OPERAND_STAGES = 3


def conv_latency(pi: int, split: bool = False) -> int:
    """Cycles from the issue of an output pixel's last item to its output beat: registered
    addresses, memory read, read-data registers (:data:`OPERAND_STAGES`), the multiplier
    array (:func:`rtl.mac_pipe.mac_latency`: operand registers, products -- two stages each
    when ``split`` --, ``ceil(log2 PI)`` adder-tree levels), the accumulator, the requantizer
    into the output queue."""
    return OPERAND_STAGES + mac_latency(pi, split) + 2


class ConvTransposeEngine(wiring.Component):
    """``y = requantize(conv_transpose2d(x, W) + bias, shift)`` on a pixel stream.

    ``W`` is (Cin, Cout, 5, 5) (PyTorch layout), stride 2, padding 2, output padding 1;
    ``x`` signed ``x_bits``; ``W`` signed ``w_bits``; ``bias`` (Cout,) signed ``b_bits`` at
    the accumulator scale; ``y`` ``out_bits`` (signed, or unsigned when ``out_signed`` is
    false), rounded half to even and saturated exactly as :func:`quant.golden.run_layer`.

    ``product``: ``"mul"`` (each tap ``x * w``, a multiplier) or ``"min"`` (MinConv: each tap
    ``sign(x) sign(w) min(|x| << x_shift, |w| << w_shift)``, a comparator; the terms, adder
    trees and accumulators are as wide as the smaller operand bound, and the engine uses no
    DSP).  Everything else -- schedule, ROM layouts, latency -- is the same for both.

    Parallelism: ``pi`` input channels x ``po`` output channels x ``pp`` output pixels a
    cycle.  The ``PP`` lanes compute output columns ``2(j0 + p) + b`` (``p < PP``) of one row
    phase ``a`` and column phase ``b``: the same weight word feeds every lane.  ``pack``: two
    8-bit products per DSP48E2 (:func:`rtl.mac_pipe.mac_array`): ``PI * PO * PP`` products
    in ``dsp_pairs`` packed DSPs and ``dsp_single`` lone multipliers ("mul" only: refused
    for "min").  ``split_products`` ("mul" without ``pack``: for a build whose multipliers are
    LUTs, ``synth_ecp5 -nodsp``): each product in two pipeline stages
    (:func:`rtl.mac_pipe.split_product`), one cycle more latency; the sums are the same.

    Structure: a line buffer of 4 input rows, split into ``PP`` banks by column modulo
    ``PP`` (``PI`` channels a word, depth ``4 * 2**ceil(log2 ceil(max_width/PP)) *
    2**ceil(log2 Cin/PI)`` each, inferred RAM), so that the lanes' ``PP`` consecutive input
    columns are read in one cycle; a weight ROM of ``25 * Cin/PI * Cout/PO`` words of
    ``PI*PO`` weights and a bias ROM of ``Cout/PO`` words, both initialised from
    ``$readmemh`` files named ``<name>_w.hex`` / ``<name>_b.hex``; the multiplier array,
    adder trees, ``PP * PO`` accumulators that start from the bias, requantizers, and an
    output queue of two banks of one block of pixels each (:func:`rtl.mac_pipe.emit_pixels`).

    Schedule: output rows ``2i`` and ``2i+1`` start once input rows ``i-1 .. i+1`` are in the
    line buffer; a block of ``PP`` output pixels of phase (a, b) takes ``taps(a) * taps(b) *
    Cin/PI * Cout/PO`` cycles (taps = 3 for even, 2 for odd phases; border taps read zeros),
    so a frame of ``h x w`` input pixels takes ``25 * h * ceil(w/PP) * Cin/PI * Cout/PO``
    cycles plus the wait for the first rows, as long as the output keeps up (one pixel a
    beat: a block of ``2*PP`` pixels of both column phases goes out while the next computes;
    with ``PP = 1`` each pixel goes out when finished).  Input pixels are written into the
    line buffer at one per ``Cin/PI`` cycles while computing; the input stalls while 4 rows
    are held.  Latency from the last cycle of an output block to its first beat:
    :func:`conv_latency` = ``7 + ceil(log2 PI)`` cycles (``8 + ceil(log2 PI)`` with
    ``split_products``), every path between registers kept short for the clock: registered
    memory addresses and read data, registered multiplier operands and products, a register
    after every adder-tree level, the accumulators, the requantizers (from the accumulators)
    into the output queue.  Back-pressure: the finished
    block waits in the output queue; the engine stalls only when a second block is finished
    while more than one beat of the first waits (never on the consumer's ``ready`` directly).
    ``width``/``height`` must stay constant while a frame is in the engine, and be set a cycle
    before its first pixel (a cycle of reset counts).
    """

    def __init__(self, weight: np.ndarray, bias: np.ndarray, *, shift: int, x_bits: int, w_bits: int,
                 b_bits: int, out_bits: int, out_signed: bool = True, pi: int = 1, po: int = 1, pp: int = 1,
                 pack: bool = False, max_width: int = 128, name: str = "convt", product: str = "mul",
                 x_shift: int = 0, w_shift: int = 0, split_products: bool = False) -> None:
        weight, bias = np.asarray(weight), np.asarray(bias)
        self.product, self.x_shift, self.w_shift = check_product(product, x_shift, w_shift, pack=pack)
        if split_products and (self.product != "mul" or pack):
            raise ValueError(f"split_products cuts multipliers built from LUTs into two stages: a 'mul' engine "
                             f"without pack, not {self.product!r}{' with pack' if pack else ''}")
        self.split = bool(split_products)
        if weight.ndim != 4 or weight.shape[2:] != (KERNEL, KERNEL):
            raise ValueError(f"weight must have shape (Cin, Cout, {KERNEL}, {KERNEL}), not {weight.shape}")
        self.cin, self.cout = int(weight.shape[0]), int(weight.shape[1])
        if bias.shape != (self.cout,):
            raise ValueError(f"bias must have shape ({self.cout},), not {bias.shape}")
        self.x_bits, self.w_bits = check_bits(x_bits, "x_bits", 2), check_bits(w_bits, "w_bits", 2)
        self.b_bits, self.out_bits = check_bits(b_bits, "b_bits", 1, 48), check_bits(out_bits, "out_bits")
        for arr, bits, what in ((weight, w_bits, "weight"), (bias, b_bits, "bias")):
            lo, hi = int_range(bits, True)
            if arr.size and (arr.min() < lo or arr.max() > hi):
                raise ValueError(f"{what} values lie outside the {bits}-bit range [{lo}, {hi}]")
        if not isinstance(shift, (int, np.integer)) or abs(shift) > 63:
            raise ValueError(f"shift must be an integer in [-63, 63], not {shift!r}")
        if isinstance(max_width, bool) or not isinstance(max_width, int) or max_width < 1:
            raise ValueError(f"max_width must be a positive integer, not {max_width!r}")
        self.pi = check_divisor(pi, "pi", self.cin, "input channels")
        self.po = check_divisor(po, "po", self.cout, "output channels")
        self.pp = check_lanes(pp)
        self.shift, self.out_signed, self.max_width, self.name = int(shift), bool(out_signed), max_width, name
        self.pack = bool(pack)
        self.weight, self.bias = weight.astype(np.int64), bias.astype(np.int64)
        taps = len(phase_taps(0))
        xs, ws = signed(self.x_bits), signed(self.w_bits)
        self.acc_bits = accumulator_bits(term_bound(self.product, xs, ws, self.x_shift, self.w_shift),
                                         taps * taps * self.cin, 1 << (b_bits - 1))
        self.latency = conv_latency(self.pi, self.split)
        lanes = self.pi * self.po * self.pp
        self.multipliers, self.comparators = (lanes, 0) if self.product == "mul" else (0, lanes)
        self.dsp_pairs, self.dsp_single = (0, 0) if self.product == "min" else packed_dsps(
            self.pp, self.po, self.pi, pack and pack_chunk(ws, xs) > 0, pack and pack_chunk(xs, ws) > 0)
        self.dsps = self.dsp_pairs + self.dsp_single
        out_shape = signed(out_bits) if out_signed else unsigned(out_bits)
        super().__init__({
            "i": In(stream.Signature(data.ArrayLayout(signed(x_bits), self.cin))),
            "o": Out(stream.Signature(data.ArrayLayout(out_shape, self.cout))),
            "width": In(max_width.bit_length()),
            "height": In(16),
        })

    @classmethod
    def for_layer(cls, layer, *, pi: int, po: int, pp: int = 1, pack: bool = False,
                  max_width: int, split_products: bool = False) -> "ConvTransposeEngine":
        """The engine of a bundle ``conv_transpose2d`` layer (:class:`quant.bundle.Layer`);
        ``split_products``: a multiplier layer's products in two stages (ignored by a MinConv
        layer, which has none)."""
        a = layer.attrs
        if layer.op != "conv_transpose2d":
            raise ValueError(f"layer {layer.name!r} is {layer.op!r}, not conv_transpose2d")
        geom = (layer.tensors["weight"].shape[2], a["stride"], a["padding"], a["output_padding"])
        if geom != (KERNEL, STRIDE, PADDING, OUTPUT_PADDING):
            raise ValueError(f"layer {layer.name!r}: (kernel, stride, padding, output_padding) = {geom}; the "
                             f"engine implements {(KERNEL, STRIDE, PADDING, OUTPUT_PADDING)}")
        if a.get("relu", False):
            raise ValueError(f"layer {layer.name!r}: ReLU after a transposed convolution is not supported")
        product = a.get("product", "mul")
        if product not in PRODUCTS:
            raise ValueError(f"layer {layer.name}: product {product!r} is not supported by the RTL generator "
                             f"(ConvTransposeEngine: one of {PRODUCTS})")
        bias = layer.tensors.get("bias", np.zeros(layer.tensors["weight"].shape[1], np.int64))
        try:
            return cls(layer.tensors["weight"], bias, shift=a["shift"], x_bits=a["x_bits"], w_bits=a["w_bits"],
                       b_bits=a["b_bits"], out_bits=a["out_bits"], out_signed=a.get("out_signed", True),
                       pi=pi, po=po, pp=pp, pack=pack, max_width=max_width, name=layer.name, product=product,
                       x_shift=a.get("x_shift", 0), w_shift=a.get("w_shift", 0),
                       split_products=split_products and product == "mul")
        except ValueError as e:
            raise ValueError(f"layer {layer.name}: {e}") from None

    @property
    def groups(self) -> tuple[int, int]:
        """(Cin/PI, Cout/PO): input groups per tap, output groups per pixel."""
        return self.cin // self.pi, self.cout // self.po

    def weight_words(self) -> list[int]:
        """Contents of the weight ROM (see :func:`conv_weight_layout`)."""
        lay = conv_weight_layout(self.cin, self.cout, self.pi, self.po)
        return pack_words(self.weight[lay[..., 0], lay[..., 1], lay[..., 2], lay[..., 3]], self.w_bits)

    def bias_words(self) -> list[int]:
        """Contents of the bias ROM: word ``o`` holds ``bias[o*PO .. o*PO+PO-1]``."""
        return pack_words(self.bias.reshape(-1, self.po), self.b_bits)

    def deployment(self) -> dict:
        """The block's entry in a deployment manifest: shapes, parallelism, number formats and
        its ROM files (layouts: :func:`conv_weight_layout`, bias word ``o`` = channels
        ``o*PO ..``; neither depends on ``pp`` or ``pack``)."""
        return {"name": self.name, "op": "conv_transpose2d", "cin": self.cin, "cout": self.cout,
                "kernel": KERNEL, "pi": self.pi, "po": self.po, "pp": self.pp, "pack": self.pack,
                "product": self.product, "split_products": self.split, "x_shift": self.x_shift, "w_shift": self.w_shift,
                "dsp_pairs": self.dsp_pairs, "dsp_single": self.dsp_single, "x_bits": self.x_bits,
                "shift": self.shift, "out_bits": self.out_bits, "out_signed": self.out_signed,
                "acc_bits": self.acc_bits, "max_width": self.max_width, "latency": self.latency,
                "roms": {"weight": {"file": f"{self.name}_w.hex", "bits": self.w_bits},
                         "bias": {"file": f"{self.name}_b.hex", "bits": self.b_bits}}}

    def elaborate(self, platform) -> Module:
        m = Module()
        _, go = self.groups
        advance, free, released = Signal(), Signal(), Signal()
        banks = []
        # The writer fills a row slot only after the issuer's last read of it (``released``) and the
        # issuer reads whole rows only, so a read and a write never meet at one address in a cycle:
        # ``no_rw_check`` tells Yosys so.  Without it Yosys emulates the collision it cannot rule
        # out (a copy of the write data, an address-match flag and a LUT after every block-RAM
        # output bit): on the ECP5 that LUT made the block RAM's read the critical path.
        for k in range(self.pp):
            m.submodules[f"lines{k}" if self.pp > 1 else "lines"] = mem = Memory(
                shape=unsigned(self.pi * self.x_bits), init=[],
                depth=LINE_SLOTS << (self._col_bits + self._group_bits), attrs={"no_rw_check": 1})
            banks.append(mem)
        words = self.weight_words()
        m.submodules.wrom = wrom = Memory(shape=unsigned(self.pi * self.po * self.w_bits), depth=len(words),
                                          init=words, attrs=rom_file_attr(f"{self.name}_w"))
        m.submodules.brom = brom = Memory(shape=unsigned(self.po * self.b_bits), depth=go, init=self.bias_words(),
                                          attrs=rom_file_attr(f"{self.name}_b"))
        reads, wport = [b.read_port() for b in banks], wrom.read_port()
        complete = self._writer(m, [b.write_port() for b in banks], free, released)
        items = self._issuer(m, advance, complete, free, reads, wport, len(words))
        # a freed row's slot is reused only after its last read has taken place (at the next
        # advance: the read addresses are registered), one cycle later (a register)
        m.d.sync += released.eq(register(m, free, advance, "free") & advance)
        self._datapath(m, advance, reads, wport, brom.read_port(), items)
        return m

    @property
    def _col_bits(self) -> int:
        """Address bits of a column inside a bank (bank ``c % PP`` holds column ``c`` at ``c // PP``)."""
        return max(1, (-(-self.max_width // self.pp) - 1).bit_length())

    @property
    def _group_bits(self) -> int:
        return (self.groups[0] - 1).bit_length()

    def _writer(self, m: Module, writes: list, free: Signal, released: Signal) -> Signal:
        """Input pixels -> line buffer, one pixel accepted per Cin/PI cycles and written PI
        channels a cycle into bank ``column % PP``.  A row is allocated a slot when its first
        pixel is accepted (at most 4 rows held, a slot reusable after ``released``); returns
        ``complete``, the number of whole rows held (less those ``free``d)."""
        gi, xb, pp = self.groups[0], self.x_bits, self.pp
        occupied = Signal(range(LINE_SLOTS + 1))   # rows allocated (complete or being written)
        complete = Signal(range(LINE_SLOTS + 1))   # rows fully written, not yet freed
        acol, aslot = Signal(range(self.max_width)), Signal(2)   # where the next pixel goes
        aq, am = Signal(self._col_bits), Signal(range(pp))   # acol // PP, acol % PP
        held = Signal(self.cin * xb)
        wbusy, wg = Signal(), Signal(range(gi))
        wcol, wq, wm, wslot = Signal(range(self.max_width)), Signal.like(aq), Signal.like(am), Signal(2)
        # registered flags (wg == gi - 1, acol == 0) keep the input's ready a LUT from flip-flops
        wlast, astart = Signal(init=gi == 1, name="wlast"), Signal(init=1, name="astart")
        # the last column registered (no carry chain from the frame size into the counters); not
        # reset, so it holds the frame's value from the first cycle after reset
        wm1 = Signal.like(self.width, name="width_m1", reset_less=True)
        m.d.sync += wm1.eq(self.width - 1)
        wdone = wbusy & wlast
        m.d.comb += self.i.ready.eq((~wbusy | wdone) & (~astart | (occupied < LINE_SLOTS)))
        accept = self.i.valid & self.i.ready
        for k, wr in enumerate(writes):
            m.d.comb += [wr.en.eq(wbusy & (wm == k)), wr.addr.eq(Cat(wg, wq[:self._col_bits], wslot)),
                         wr.data.eq(held.word_select(wg, self.pi * xb))]
        with m.If(wbusy):
            m.d.sync += [wg.eq(Mux(wdone, 0, wg + 1)), wlast.eq(Mux(wdone, gi == 1, wg == gi - 2 if gi > 1 else 1))]
            with m.If(wdone):
                m.d.sync += wbusy.eq(0)
        with m.If(accept):
            m.d.sync += [held.eq(self.i.payload.as_value()), wbusy.eq(1), wg.eq(0), wlast.eq(gi == 1), wcol.eq(acol),
                         wq.eq(aq), wm.eq(am), wslot.eq(aslot)]
            with m.If(acol == wm1):
                m.d.sync += [acol.eq(0), astart.eq(1), aq.eq(0), am.eq(0), aslot.eq(aslot + 1)]
            with m.Else():
                m.d.sync += [acol.eq(acol + 1), astart.eq(0), am.eq(Mux(am == pp - 1, 0, am + 1)),
                             aq.eq(aq + (am == pp - 1))]
        row_written = wdone & (wcol == wm1)
        m.d.sync += [occupied.eq(occupied + (accept & astart) - released),
                     complete.eq(complete + row_written - free)]
        return complete

    def _issuer(self, m: Module, advance: Signal, complete: Signal, free: Signal, reads: list, wport,
                rom_depth: int) -> dict:
        """One item a cycle: (output group o, row tap, column tap, input group g) of the
        current block of ``PP`` output pixels (columns ``2(j0 + p) + b``), as line-buffer and
        weight-ROM addresses.  Output rows 2i and 2i+1 start when input rows i-1 .. i+1 are
        held; ``free`` releases row i-1 after row 2i, and the last row after the frame's last
        output row."""
        gi, go = self.groups
        pp = self.pp
        taps = [phase_taps(0), phase_taps(1)]
        ntmax = len(taps[0])
        nt = Array([len(taps[0]), len(taps[1])])

        def offset(phase: Value, idx: Signal) -> Value:
            rows = [[off for _, off in tp] + [0] * (ntmax - len(tp)) for tp in taps]
            return Mux(phase, Array(rows[1])[idx], Array(rows[0])[idx])

        i = Signal(16)                               # input row of the current pair
        a, b = Signal(), Signal()                    # output row 2i + a; column phase b
        j0 = Signal(range(self.max_width + pp))      # first input column of the block
        jb = Signal(range(-(-self.max_width // pp) + 1))   # j0 // PP: the block's address in a bank
        o, ty, tx, g = Signal(range(go)), Signal(range(ntmax)), Signal(range(ntmax)), Signal(range(gi))
        slot_i = Signal(2)                           # line-buffer slot of input row i
        wa = Signal(range(rom_depth))                # weight ROM address
        nv = Signal(range(pp + 1))                   # lanes holding real pixels
        # the frame-size tests are flip-flops (no carry chain from the frame size into the
        # issue): each is computed from its counter's next value, or, while the counter
        # holds, from its value and the frame size registered (2 cycles behind a new size)
        hm1, hm2, h1 = Signal(16), Signal(16), Signal()
        w_pp = Signal(signed(max(self.max_width, pp).bit_length() + 1))   # width - PP
        m.d.sync += [hm1.eq(self.height - 1), hm2.eq(self.height - 2), h1.eq(self.height == 1),
                     w_pp.eq(self.width - pp)]
        last_i, first_i, last_j = Signal(), Signal(init=1), Signal()    # i == h - 1, i == 0, j0 + PP >= w
        m.d.sync += [last_i.eq(i == hm1), first_i.eq(i == 0), last_j.eq(j0 >= w_pp)]
        last_g, last_tx, last_ty = g == gi - 1, tx == nt[b] - 1, ty == nt[a] - 1
        last_o = o == go - 1
        last_x = b & last_j
        item_last = last_g & last_tx & last_ty
        pix_last = item_last & last_o
        # every counter at 0 (a row pair starts): a flip-flop, set by the step that wraps them all
        pair_start = Signal(init=1, name="pair_start")
        issue = Mux(pair_start, complete >= 1 + ~first_i + ~last_i, 1)
        step = advance & issue
        with m.If(step):
            m.d.sync += pair_start.eq(pix_last & last_x & a)
        m.d.comb += [free.eq(step & pix_last & last_x & Mux(a, last_i, ~first_i)),
                     nv.eq(Mux(last_j, self.width - j0, pp))]
        counters = [(last_g, [g.eq(g + 1)], [g.eq(0)]), (last_tx, [tx.eq(tx + 1)], [tx.eq(0)]),
                    (last_ty, [ty.eq(ty + 1)], [ty.eq(0)]), (last_o, [o.eq(o + 1)], [o.eq(0)]),
                    (b, [b.eq(1)], [b.eq(0)]),
                    (last_j, [j0.eq(j0 + pp), jb.eq(jb + 1), last_j.eq(j0 + pp >= w_pp)],
                     [j0.eq(0), jb.eq(0), last_j.eq(w_pp <= 0)])]
        with m.If(step):
            self._count(m, counters, [a.eq(~a)], a, [slot_i.eq(slot_i + 1), i.eq(Mux(last_i, 0, i + 1)),
                                                     last_i.eq(Mux(last_i, h1, i == hm2)), first_i.eq(last_i)])
            base_a1 = go * gi * ntmax * (len(taps[0]) + len(taps[1]))   # first word of phase (1, 0)
            m.d.sync += wa.eq(Mux(pix_last & b, Mux(Mux(last_x, ~a, a), base_a1, 0), wa + 1))
        dy, dx = offset(a, ty), offset(b, tx)
        back, ahead = dx == -1, dx == 1      # the lanes read columns j0 + p + dx, dx in {-1, 0, 1}
        # bank k at the block's address, but lane PP-1 reads bank 0 of the next block (dx = 1)
        # and lane 0 the last bank of the previous one (dx = -1)
        # the addresses are registered (stage 1), the memories read at stage 2
        for k, rd in enumerate(reads):
            idx = jb + (ahead if k == 0 else 0) - (back if k == pp - 1 else 0)
            addr = register(m, Cat(g, idx[:self._col_bits], (slot_i + dy)[:2]), advance, f"raddr{k}")
            m.d.comb += [rd.addr.eq(addr), rd.en.eq(advance)]
        m.d.comb += [wport.addr.eq(register(m, wa, advance, "waddr")), wport.en.eq(advance)]
        row_inside = ~((dy == -1) & first_i) & ~((dy == 1) & last_i)    # 0 <= i + dy < height
        inside = [row_inside & ((j0 + k + dx).as_signed() >= 0) & (j0 + k + dx < self.width) for k in range(pp)]
        return {"v": issue, "inside": Cat(*inside), "back": back, "ahead": ahead, "b": b, "nv": nv,
                "first": (g == 0) & (tx == 0) & (ty == 0), "done": issue & item_last, "pix": pix_last, "o": o}

    @staticmethod
    def _count(m: Module, counters: list, on_row: list, a: Signal, on_pair: list) -> None:
        """Nested counters, innermost first, each (last, increment, clear): a counter at its
        last value clears and carries into the next."""
        if not counters:
            m.d.sync += on_row
            with m.If(a):
                m.d.sync += on_pair
            return
        (last, incr, clear), rest = counters[0], counters[1:]
        with m.If(~last):
            m.d.sync += incr
        with m.Else():
            m.d.sync += clear
            ConvTransposeEngine._count(m, rest, on_row, a, on_pair)

    def _datapath(self, m: Module, advance: Signal, reads: list, wport, bport, items: dict) -> None:
        """The lanes' operands (bank ``(p + dx) % PP`` for lane ``p``), the multiplier array,
        adder trees, accumulators that start from the bias, requantizers, and the output
        queue."""
        pi, po, pp, xb, wb = self.pi, self.po, self.pp, self.x_bits, self.w_bits
        root = OPERAND_STAGES + mac_latency(pi, self.split)   # addresses, read, read data, operands, products, tree
        flags = Delayed(m, items, root + 1, advance, "s")
        so = flags.stage(OPERAND_STAGES)
        data = [register(m, rd.data, advance, f"xraw{k}") for k, rd in enumerate(reads)]
        wdata = register(m, wport.data, advance, "wraw")
        words = [Mux(so["back"], data[(k - 1) % pp], Mux(so["ahead"], data[(k + 1) % pp], data[k]))
                 for k in range(pp)]
        xs = [[Mux(so["inside"][k], words[k][ii * xb:(ii + 1) * xb], 0).as_signed() for ii in range(pi)]
              for k in range(pp)]
        ws = [[wdata[(oo * pi + ii) * wb:(oo * pi + ii + 1) * wb].as_signed() for ii in range(pi)]
              for oo in range(po)]
        roots, _ = mac_array(m, xs, ws, advance, "mac", pack=self.pack, product=self.product, x_shift=self.x_shift,
                             w_shift=self.w_shift, split=self.split)
        # the bias ROM: read at stage root - 1, its data registered for the accumulators at root
        m.d.comb += [bport.addr.eq(flags.stage(root - 2)["o"]), bport.en.eq(advance)]
        bdata = register(m, bport.data, advance, "braw")
        sr = flags.stage(root)
        bias = [bdata[k * self.b_bits:(k + 1) * self.b_bits].as_signed() for k in range(po)]
        accs = accumulate(m, [s for lane in roots for s in lane], bias * pp, sr["first"], advance & sr["v"],
                          self.acc_bits, "acc")
        # the requantizers read the finished sums from the accumulators (stage root + 1)
        q = [requantize_expr(s, self.shift, self.out_bits, self.out_signed) for s in accs]
        sq, nq = flags.stage(root + 1), flags.upcoming(root + 1, advance)
        done = sq["done"]
        stall = emit_pixels(m, self.o, [q[k * po:(k + 1) * po] for k in range(pp)], write=advance & done,
                            pixel_done=sq["pix"], finishing=done, groups=self.groups[1], bits=self.out_bits,
                            count=sq["nv"], phase=sq["b"] if pp > 1 else None,
                            ahead=(nq["done"], nq["pix"], nq["b"] if pp > 1 else None))
        m.d.comb += advance.eq(~stall)
