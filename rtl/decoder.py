"""The whole synthesis transform of a bundle as one streaming pipeline.

For the factorized-prior model: ``conv_transpose2d (M->N), igdn, conv_transpose2d (N->N),
igdn, conv_transpose2d (N->N), igdn, conv_transpose2d (N->3)``, each layer a
:class:`~rtl.conv_transpose.ConvTransposeEngine` or :class:`~rtl.gdn.GdnUnit` with the
parallelism of a :func:`~rtl.plan.plan_decoder` plan, chained by valid/ready streams.  Each
block takes its layer's products from the bundle: multipliers, or (issue 15) comparators in a
MinConv ``conv_transpose2d`` / GDN norm and a shift for a GDN's ``x * n`` -- a MinConv
decoder has no multiplier and uses no DSP.
"""
from __future__ import annotations

from amaranth import Cat, Const, Module, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .conv_transpose import ConvTransposeEngine
from .gdn import GdnUnit
from .plan import LayerPlan, plan_decoder

__all__ = ["Decoder"]


class Decoder(wiring.Component):
    """Quantized latents in, 8-bit RGB pixels out.

    Input: one latent pixel (``M`` signed ``latent_bits`` symbols) per beat, raster order, on a
    ``height x width`` grid (run-time ports, ``width <= max_width``).  Output: one pixel
    (R, G, B unsigned 8-bit) per beat, raster order, on the ``16*height x 16*width`` grid;
    the integers equal :func:`quant.golden.run_layers` of the layers exactly.

    Every layer runs concurrently, with the parallelism (PI, PO, PP, packing) of its plan
    entry; the frame takes about ``max_layer frame_cycles`` plus the pipeline fill
    (:mod:`rtl.perf`).  Back-pressure on the
    output stalls the last engine, and the stall propagates upstream through the line buffers.
    ``width``/``height`` must stay constant while a frame is in the pipeline.
    ``split_products`` (for a build whose multipliers are LUTs, ``-nodsp``): every multiplier
    of every block in two pipeline stages (a cycle more latency in each block that has any);
    the pixels are the same.  Packed plan entries (two products per DSP48E2) are refused with it.
    """

    def __init__(self, layers, *, pi: int | None = None, po: int | None = None,
                 plan: list[LayerPlan] | None = None, max_width: int = 120, split_products: bool = False) -> None:
        layers = list(layers)
        if plan is None:
            if pi is None or po is None:
                raise ValueError("give either plan or both pi and po")
            plan = plan_decoder(layers, pi, po)
        if [p.name for p in plan] != [l.name for l in layers]:
            raise ValueError("plan and layers name different layers")
        if isinstance(max_width, bool) or not isinstance(max_width, int) or max_width < 1:
            raise ValueError(f"max_width must be a positive integer, not {max_width!r}")
        ops = [l.op for l in layers]
        if not ops or ops[0] != "conv_transpose2d" or ops[-1] != "conv_transpose2d":
            raise ValueError(f"a decoder starts and ends with conv_transpose2d; got ops {ops}")
        last = layers[-1].attrs
        if last.get("out_signed", True) or last["out_bits"] != 8 or layers[-1].tensors["weight"].shape[1] != 3:
            raise ValueError(f"the last layer {layers[-1].name!r} must output 3 unsigned 8-bit channels (pixels)")
        for prev, nxt in zip(layers, layers[1:]):
            if prev.attrs["out_bits"] != nxt.attrs["x_bits"]:
                raise ValueError(f"layer {nxt.name!r} expects {nxt.attrs['x_bits']}-bit inputs but {prev.name!r} "
                                 f"emits {prev.attrs['out_bits']}-bit outputs")
        packed = [p.name for p in plan if p.pack]
        if split_products and packed:
            raise ValueError(f"split_products cuts multipliers built from LUTs into two stages, but the plan packs two "
                             f"products per DSP in {', '.join(packed)}: plan without packing (--no-pack)")
        self.layers, self.plan, self.max_width, self.split_products = layers, plan, max_width, bool(split_products)
        self.blocks, scale = [], 0
        for lay, p in zip(layers, plan):
            if lay.op == "conv_transpose2d":
                self.blocks.append(ConvTransposeEngine.for_layer(lay, pi=p.pi, po=p.po, pp=p.pp, pack=p.pack,
                                                                 max_width=max_width << scale,
                                                                 split_products=split_products))
                scale += 1
            else:
                self.blocks.append(GdnUnit.for_layer(lay, pi=p.pi, po=p.po, pp=p.pp, pack=p.pack,
                                                     split_products=split_products))
        self.upsampling = 1 << scale
        first = layers[0]
        self.latent_channels = int(first.tensors["weight"].shape[0])
        self.latent_bits = int(first.attrs["x_bits"])
        super().__init__({
            "i": In(stream.Signature(data.ArrayLayout(signed(self.latent_bits), self.latent_channels))),
            "o": Out(stream.Signature(data.ArrayLayout(unsigned(8), 3))),
            "width": In(max_width.bit_length()),
            "height": In(16),
        })

    def manifest(self) -> dict:
        """What a deployment needs to know: the plan, each block's ROMs and their layouts."""
        return {"max_width": self.max_width, "upsampling": self.upsampling, "split_products": self.split_products,
                "latent_channels": self.latent_channels, "latent_bits": self.latent_bits,
                "blocks": [b.deployment() for b in self.blocks],
                "dsps": sum(b.dsps for b in self.blocks),
                "plan": [p.as_dict() for p in self.plan]}

    def elaborate(self, platform) -> Module:
        m = Module()
        scale = 0
        for k, blk in enumerate(self.blocks):
            m.submodules[f"l{k}_{blk.name.replace('.', '_')}"] = blk
            width = Cat(Const(0, scale), self.width) if scale else self.width
            if isinstance(blk, ConvTransposeEngine):
                m.d.comb += [blk.width.eq(width), blk.height.eq(self.height << scale)]
                scale += 1
            elif blk.pp > 1:   # a GDN with lanes cuts its blocks at the end of a row
                m.d.comb += blk.width.eq(width)
        wiring.connect(m, wiring.flipped(self.i), self.blocks[0].i)
        for a, b in zip(self.blocks, self.blocks[1:]):
            wiring.connect(m, a.o, b.i)
        wiring.connect(m, self.blocks[-1].o, wiring.flipped(self.o))
        return m
