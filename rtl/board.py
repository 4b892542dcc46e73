"""Board-level wrapper: the decoder's wide streams narrowed to byte streams, so that its I/O
fits a real package (an ECP5-85F in CABGA381 has 205 user I/O; the N=16 decoder alone has
192 latent bits in and 24 pixel bits out, plus handshakes and the frame size).

Byte order is element-aligned and little-endian: an array of ``count`` elements of ``bits``
bits travels as ``count * ceil(bits / 8)`` bytes, element 0 first, each element's low byte
first; on the way out, signed elements are sign-extended to their whole bytes.  So a host
sends one byte per 8-bit latent and reads R, G, B bytes per pixel.
"""
from __future__ import annotations

from amaranth import Cat, ClockSignal, Const, Instance, Module, Mux, ResetSignal, Shape, Signal, Value, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

__all__ = ["ByteDeserializer", "ByteSerializer", "DecoderBoard", "RegisterSlice", "element_bytes"]


def element_bytes(layout: data.ArrayLayout) -> int:
    """Bytes one element of ``layout`` occupies on a byte stream."""
    return -(-Shape.cast(layout.elem_shape).width // 8)


class RegisterSlice(wiring.Component):
    """A two-entry stream FIFO that cuts every combinational path through it, ``ready``
    included: ``i.ready`` and ``o.valid`` come from its occupancy register, and the data
    registers are written on the input side only (the consumer's ``o.ready`` moves a read
    pointer and the count, not a wide clock enable).  A slot is written in every cycle in
    which it holds no beat, so its clock enable is a flip-flop (``free``) with no logic
    between it and the wide slot register.  Throughput: one beat per cycle; latency: one
    cycle."""

    def __init__(self, shape) -> None:
        super().__init__({"i": In(stream.Signature(shape)), "o": Out(stream.Signature(shape))})

    def elaborate(self, platform) -> Module:
        m = Module()
        payload = Value.cast(self.i.payload)
        slots = [Signal(len(payload), name=f"slot{k}") for k in range(2)]
        wp, rp, count = Signal(), Signal(), Signal(range(3))
        free = [Signal(name=f"free{k}", init=1) for k in range(2)]   # slot k holds no beat
        push, pop = self.i.valid & self.i.ready, self.o.valid & self.o.ready
        m.d.comb += [self.i.ready.eq(count != 2), self.o.valid.eq(count != 0),
                     Value.cast(self.o.payload).eq(Mux(rp, slots[1], slots[0]))]
        for k, slot in enumerate(slots):
            with m.If(free[k]):   # a pushed beat lands in the free slot wp and stays
                m.d.sync += slot.eq(payload)
            m.d.sync += free[k].eq(free[k] & ~(push & (wp == k)) | pop & (rp == k))
        m.d.sync += [wp.eq(wp ^ push), rp.eq(rp ^ pop), count.eq(count + push - pop)]
        return m


class ByteDeserializer(wiring.Component):
    """Bytes in, one array (``layout``: ``count`` elements) out per ``count * ceil(bits/8)``
    bytes.  Throughput: one byte per cycle; the assembled word waits in the output register,
    and only the byte that completes the next word stalls on it.  Latency: the word is out
    one cycle after its last byte."""

    def __init__(self, layout: data.ArrayLayout) -> None:
        self.layout = layout
        self.nbytes = layout.length * element_bytes(layout)
        super().__init__({"i": In(stream.Signature(8)), "o": Out(stream.Signature(layout))})

    def elaborate(self, platform) -> Module:
        m = Module()
        eb, bits = element_bytes(self.layout), Shape.cast(self.layout.elem_shape).width
        k = Signal(range(self.nbytes))
        held = Signal(8 * (self.nbytes - 1))   # the word's bytes so far, the newest at the top
        last = k == self.nbytes - 1
        m.d.comb += self.i.ready.eq(~last | ~self.o.valid | self.o.ready)
        with m.If(self.o.ready):
            m.d.sync += self.o.valid.eq(0)
        with m.If(self.i.valid & self.i.ready):
            word = Cat(held, self.i.payload)
            with m.If(last):
                m.d.sync += [k.eq(0), self.o.valid.eq(1),
                             self.o.payload.as_value().eq(Cat(*(word[8 * eb * e:][:bits]
                                                                for e in range(self.layout.length))))]
            with m.Else():
                m.d.sync += k.eq(k + 1)
                if self.nbytes > 1:
                    m.d.sync += held.eq(Cat(held[8:], self.i.payload))
        return m


class ByteSerializer(wiring.Component):
    """One array (``layout``) in, its ``count * ceil(bits/8)`` bytes out, one per cycle while
    taken.  The next word is accepted in the cycle the last byte of the current one is taken,
    so back-to-back words stream without a gap.  Latency: the first byte is out one cycle
    after the word."""

    def __init__(self, layout: data.ArrayLayout) -> None:
        self.layout = layout
        self.nbytes = layout.length * element_bytes(layout)
        super().__init__({"i": In(stream.Signature(layout)), "o": Out(stream.Signature(8))})

    def elaborate(self, platform) -> Module:
        m = Module()
        eb = element_bytes(self.layout)
        shape = Shape.cast(self.layout.elem_shape)
        pad = 8 * eb - shape.width
        elems = [Value.cast(self.i.payload[e]) for e in range(self.layout.length)]
        wide = Cat(*(Cat(v, v[-1].replicate(pad) if shape.signed else Const(0, pad)) for v in elems))
        held = Signal(8 * self.nbytes)   # the bytes still to send, the next one at the bottom
        k = Signal(range(self.nbytes))
        taken = self.o.valid & self.o.ready
        m.d.comb += [self.o.payload.eq(held[:8]), self.i.ready.eq(~self.o.valid | (taken & (k == self.nbytes - 1)))]
        with m.If(taken):
            m.d.sync += [held.eq(held >> 8), k.eq(k + 1)]
            with m.If(k == self.nbytes - 1):
                m.d.sync += [self.o.valid.eq(0), k.eq(0)]
        with m.If(self.i.valid & self.i.ready):
            m.d.sync += [held.eq(wide), self.o.valid.eq(1), k.eq(0)]
        return m


class DecoderBoard(wiring.Component):
    """A decoder between byte streams: ``rx`` bytes -> latents -> decoder -> pixels -> ``tx``
    bytes, with the frame size (``width``, ``height``: the latent grid) registered at the pins.

    ``core`` is the decoder: an Amaranth :class:`rtl.decoder.Decoder`, or ``None`` for an
    instance of the Verilog module ``core_module`` that ``licforge rtl decoder`` writes
    (ports ``i__*``, ``o__*``, ``width``, ``height``, ``clk``, ``rst``), described by
    ``latent_channels``, ``latent_bits`` and ``max_width``.  The pixel stream is
    ``pixel_channels`` unsigned 8-bit values a beat.

    I/O: ``rx`` and ``tx`` (8 data bits, valid, ready each), ``width``, ``height``, clock and
    reset: ``22 + bits(max_width) + 16`` pins.  A :class:`RegisterSlice` on each side of the
    decoder keeps the pins' handshakes out of its stall logic, and one at the ``rx`` and at
    the ``tx`` pins keeps them out of the byte (de)serializers' wide enables.  Timing: ``latent_channels *
    ceil(latent_bits/8)`` cycles per latent pixel in and 3 per pixel out at most, far below
    what the decoder needs per latent (hundreds of cycles), so the wrapper never sets the pace.
    """

    def __init__(self, latent_channels: int, latent_bits: int, max_width: int, *, core=None,
                 core_module: str = "decoder", pixel_channels: int = 3) -> None:
        self.core, self.core_module, self.max_width = core, core_module, max_width
        self.latents = data.ArrayLayout(signed(latent_bits), latent_channels)
        self.pixels = data.ArrayLayout(unsigned(8), pixel_channels)
        super().__init__({
            "rx": In(stream.Signature(8)),
            "tx": Out(stream.Signature(8)),
            "width": In(max_width.bit_length()),
            "height": In(16),
        })

    @classmethod
    def for_manifest(cls, manifest: dict) -> "DecoderBoard":
        """The wrapper of a decoder written by :func:`rtl.project.generate_decoder` (its
        ``manifest.json``), instantiating its Verilog module ``manifest["top"]``."""
        return cls(int(manifest["latent_channels"]), int(manifest["latent_bits"]), int(manifest["max_width"]),
                   core_module=manifest.get("top", "decoder"))

    def elaborate(self, platform) -> Module:
        m = Module()
        m.submodules.rx_pins = rxp = RegisterSlice(unsigned(8))
        m.submodules.rx_bytes = des = ByteDeserializer(self.latents)
        m.submodules.tx_bytes = ser = ByteSerializer(self.pixels)
        # register slices: no combinational path from a pin's ready into the decoder's stall logic
        m.submodules.rx_slice = rxs = RegisterSlice(self.latents)
        m.submodules.tx_slice = txs = RegisterSlice(self.pixels)
        # and one at each byte stream's pins: a pin's handshake moves that slice's pointers only
        m.submodules.tx_pins = txp = RegisterSlice(unsigned(8))
        wiring.connect(m, wiring.flipped(self.rx), rxp.i)
        wiring.connect(m, rxp.o, des.i)
        wiring.connect(m, des.o, rxs.i)
        wiring.connect(m, txs.o, ser.i)
        wiring.connect(m, ser.o, txp.i)
        wiring.connect(m, txp.o, wiring.flipped(self.tx))
        width, height = Signal.like(self.width, name="width_r"), Signal.like(self.height, name="height_r")
        m.d.sync += [width.eq(self.width), height.eq(self.height)]
        if self.core is not None:
            m.submodules.core = core = self.core
            wiring.connect(m, rxs.o, core.i)
            wiring.connect(m, core.o, txs.i)
            m.d.comb += [core.width.eq(width), core.height.eq(height)]
        else:
            m.submodules.core = Instance(
                self.core_module, i_clk=ClockSignal(), i_rst=ResetSignal(), i_width=width, i_height=height,
                i_i__valid=rxs.o.valid, i_i__payload=Value.cast(rxs.o.payload), o_i__ready=rxs.o.ready,
                o_o__valid=txs.i.valid, o_o__payload=Value.cast(txs.i.payload), i_o__ready=txs.i.ready)
        return m
