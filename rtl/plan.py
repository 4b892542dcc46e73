"""Parallelism plan of a decoder pipeline: which (PI, PO, PP, packing) each layer gets.

The layers of a synthesis transform run concurrently, chained by streams, so the frame rate
is set by the slowest one.  :func:`plan_decoder` takes (PI, PO, PP) for the heaviest
transposed convolution (the one with the most multiply-accumulates per frame) and gives every
other layer the fewest DSPs with which it is no slower than that one; :func:`rtl.perf.plan_for_target`
chooses every layer from a frame-rate target instead.  Balanced this way, all multipliers are
busy most of the time (the DSP efficiency of :mod:`rtl.perf`).

Costs, for a layer whose input grid is ``2**s x 2**s`` times the latent grid (``h x w``
pixels for a latent grid ``lh x lw``), ``G = Cin/PI * Cout/PO`` and ``PP`` lanes:

* transposed convolution (5x5, stride 2): every pair of output rows is ``ceil(w/PP)``
  blocks of ``PP`` output pixels in each of the four phases, ``9 G, 6 G`` cycles (even row)
  and ``6 G, 4 G`` (odd row); with ``PP > 1`` a block of ``2 PP`` pixels leaves one a beat
  while the next computes, so a row's block takes ``max(15 G, 2 PP)`` / ``max(10 G, 2 PP)``
  cycles; the input row is written at one pixel per ``Cin/PI`` cycles.  ``PI*PO*PP``
  multiplier slots (products a cycle), ``25 Cin Cout`` MACs per input pixel;
* inverse GDN: ``ceil(w/PP)`` blocks a row of ``max(G, PP)`` cycles (a block's pixels
  arrive and leave one a beat), ``(PI * PO + PO) * PP`` multiplier slots, ``C*C + C`` MACs
  per pixel.

``pack`` puts two products into one DSP48E2 wherever the operands fit
(:func:`rtl.mac_pipe.packed_dsps`, the same rule as the generators): a layer's DSPs are its
packed pairs plus its lone multipliers.

MinConv layers (issue 15) use no DSP: a ``conv_transpose2d`` with ``product="min"`` has
comparators instead of multipliers, an ``igdn`` with ``norm_product="min"`` comparators in
its norm and with ``out_product="shift"`` shifters instead of its ``x * n`` multipliers
(:attr:`LayerPlan.product`, :attr:`LayerPlan.out_product`, read by :func:`layer_products`).
Packing applies to multiplier layers only.  The planner ranks a layer's options by DSPs,
then by product units a cycle of any kind (multipliers, comparators, shifters).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from fractions import Fraction

from amaranth import signed, unsigned

from .gdn import OUT_PRODUCTS
from .mac_pipe import PRODUCTS, pack_chunk, packed_dsps

__all__ = ["LayerPlan", "plan_decoder", "plan_tag", "layer_shapes", "layer_formats", "layer_products", "layer_plan", "divisors",
           "largest_divisor", "heaviest_layer", "default_parallelism", "TAPS", "ROW_TAPS"]

TAPS = 25  # 5x5 kernel, stride 2: 9 + 6 + 6 + 4 taps per 2x2 output block
ROW_TAPS = (15, 10)  # taps of an even (9 + 6) and of an odd (6 + 4) output row, per column pair


def _exact(v: Fraction) -> int | float:
    return int(v) if v.denominator == 1 else float(v)


@dataclass(frozen=True)
class LayerPlan:
    """One layer of the pipeline: ``op`` ('conv_transpose2d' or 'igdn'), channels, the grid
    scale ``s`` of its input (``4**s`` input pixels per latent pixel), its parallelism
    (``pi`` input channels, ``po`` output channels, ``pp`` output pixels a cycle), ``pack``
    (two products per DSP where they fit) and its operand widths (activation ``x_bits``,
    weight or gamma ``w_bits``), which decide where packing fits; ``product`` (``"mul"`` or
    ``"min"``) of its dot products (taps, or a GDN's norm terms) and ``out_product`` (a GDN's
    ``x * n``: ``"mul"`` or ``"shift"``; ``"mul"`` for a convolution, which has none)."""
    name: str
    op: str
    cin: int
    cout: int
    scale: int
    pi: int
    po: int
    pp: int = 1
    pack: bool = False
    x_bits: int = 8
    w_bits: int = 8
    product: str = "mul"
    out_product: str = "mul"

    def __post_init__(self) -> None:
        for key, value, kinds in (("product", self.product, PRODUCTS), ("out_product", self.out_product, OUT_PRODUCTS)):
            if value not in kinds:
                raise ValueError(f"layer {self.name}: {key} {value!r} is not supported by the RTL generator's plan "
                                 f"(one of {kinds})")
        if self.op == "conv_transpose2d" and self.out_product != "mul":
            raise ValueError(f"layer {self.name}: out_product belongs to an igdn layer, not a {self.op}")
        if self.pack and self.product == "min":
            raise ValueError(f"layer {self.name}: pack puts two multiplications into one DSP; its 'min' products "
                             f"are comparators (no DSP): plan it with pack=False")

    @property
    def groups(self) -> int:
        """``Cin/PI * Cout/PO``: cycles a block of ``PP`` pixels spends per tap (per pixel for a GDN)."""
        return (self.cin // self.pi) * (self.cout // self.po)

    def grid(self, lh: int, lw: int) -> tuple[int, int]:
        """The layer's input grid for a latent grid ``lh x lw``."""
        return lh << self.scale, lw << self.scale

    def frame_cycles(self, lh: int, lw: int) -> int:
        """Steady-state cycles of one frame (frames back to back) for a latent grid ``lh x lw``,
        the layer alone with its input always ready and its output always taken."""
        h, w = self.grid(lh, lw)
        g, pp = self.groups, self.pp
        nb = -(-w // pp)
        nv = w - pp * (nb - 1)
        if self.op == "conv_transpose2d":
            drain = (lambda n: 2 * n) if pp > 1 else (lambda n: 0)   # beats of the previous block
            pair = sum(max(t * g, drain(nv)) + (nb - 1) * max(t * g, drain(pp)) for t in ROW_TAPS)
            return h * max(pair, w * (self.cin // self.pi))
        return h * ((nb - 1) * max(g, pp) + max(g, nv))

    @property
    def cycles_per_latent(self) -> int | float:
        """Steady-state cycles per latent pixel when the grid width is a multiple of ``PP``."""
        return _exact(Fraction(self.frame_cycles(1, self.pp), self.pp))

    @property
    def _out_units(self) -> int:
        """A GDN's ``x * n`` units (multipliers or shifters): one per output channel and lane."""
        return self.po * self.pp if self.op == "igdn" else 0

    @property
    def slots(self) -> int:
        """Product units a cycle of any kind (multipliers, comparators, shifters)."""
        return self.pi * self.po * self.pp + self._out_units

    @property
    def multipliers(self) -> int:
        """Multiplier slots: multiplications a cycle (DSP candidates before packing)."""
        return ((self.pi * self.po * self.pp if self.product == "mul" else 0)
                + (self._out_units if self.out_product == "mul" else 0))

    @property
    def comparators(self) -> int:
        """MinConv comparators: ``min`` products a cycle."""
        return self.pi * self.po * self.pp if self.product == "min" else 0

    @property
    def shifters(self) -> int:
        """A multiplier-free GDN's barrel shifters (``x << e``)."""
        return self._out_units if self.out_product == "shift" else 0

    @property
    def dsp_split(self) -> tuple[int, int]:
        """(packed DSPs, lone multipliers); a GDN's ``x * n`` products are lone; comparators
        and shifters use none."""
        lone = self._out_units if self.out_product == "mul" else 0
        if self.product == "min":
            return 0, lone
        xs = signed(self.x_bits) if self.op == "conv_transpose2d" else unsigned(self.x_bits)   # |x| in a GDN
        ws = signed(self.w_bits)
        pairs, single = packed_dsps(self.pp, self.po, self.pi, self.pack and pack_chunk(ws, xs) > 0,
                                    self.pack and pack_chunk(xs, ws) > 0)
        return pairs, single + lone

    @property
    def dsps(self) -> int:
        """DSP48E2s: packed pairs plus lone multipliers."""
        return sum(self.dsp_split)

    def as_dict(self) -> dict:
        return {**asdict(self), "cycles_per_latent": self.cycles_per_latent, "multipliers": self.multipliers,
                "comparators": self.comparators, "shifters": self.shifters, "dsps": self.dsps}


def divisors(n: int) -> list[int]:
    """Positive divisors of ``n``, ascending."""
    return [d for d in range(1, n + 1) if n % d == 0]


def layer_shapes(layers) -> list[tuple[str, str, int, int, int]]:
    """(name, op, Cin, Cout, scale) of each layer of a synthesis-transform chain of bundle
    layers (``conv_transpose2d`` and ``igdn`` only)."""
    out, scale = [], 0
    for lay in layers:
        if lay.op == "conv_transpose2d":
            cin, cout = lay.tensors["weight"].shape[:2]
            out.append((lay.name, lay.op, int(cin), int(cout), scale))
            scale += 1
        elif lay.op == "igdn":
            c = int(lay.tensors["beta"].shape[0])
            out.append((lay.name, lay.op, c, c, scale))
        else:
            raise ValueError(f"layer {lay.name!r}: op {lay.op!r} is not part of a decoder pipeline "
                             f"(conv_transpose2d and igdn only)")
    return out


def layer_formats(layers) -> list[tuple[int, int]]:
    """(activation bits, weight or gamma bits) of each layer: the multiplier operands."""
    return [(int(l.attrs["x_bits"]), int(l.attrs["w_bits" if l.op == "conv_transpose2d" else "gamma_bits"]))
            for l in layers]


def layer_products(layers) -> list[tuple[str, str]]:
    """(product, out_product) of each layer: a ``conv_transpose2d``'s ``product`` attr and
    ``"mul"``; an ``igdn``'s ``norm_product`` and ``out_product`` attrs (absent: ``"mul"``)."""
    return [(l.attrs.get("product", "mul"), "mul") if l.op == "conv_transpose2d" else
            (l.attrs.get("norm_product", "mul"), l.attrs.get("out_product", "mul")) for l in layers]


def layer_plan(shape: tuple, pi: int, po: int, pp: int, pack: bool, bits: tuple[int, int],
               products: tuple[str, str]) -> LayerPlan:
    """The plan of a layer of ``shape`` (:func:`layer_shapes`), formats ``bits``
    (:func:`layer_formats`) and ``products`` (:func:`layer_products`); ``pack`` where its
    products are multiplications."""
    return LayerPlan(*shape, pi, po, pp, pack and products[0] == "mul", *bits, *products)


def _options(shape: tuple, bits: tuple[int, int], products: tuple[str, str], max_pp: int,
             pack: bool) -> list[LayerPlan]:
    _, _, cin, cout, _ = shape
    return [layer_plan(shape, pi, po, pp, pack, bits, products)
            for pi in divisors(cin) for po in divisors(cout) for pp in range(1, max_pp + 1)]


def _cheapest(shape: tuple, bits: tuple[int, int], products: tuple[str, str], budget: int | float, max_pp: int,
              pack: bool) -> LayerPlan:
    """The plan with the fewest DSPs that needs at most ``budget`` cycles per latent pixel
    (ties: fewer product units a cycle, fewer cycles, wider PI, fewer lanes); the fully
    parallel one (``max_pp`` lanes) if none does."""
    _, _, cin, cout, _ = shape
    fit = [p for p in _options(shape, bits, products, max_pp, pack) if p.cycles_per_latent <= budget]
    if not fit:
        return layer_plan(shape, cin, cout, max_pp, pack, bits, products)
    return min(fit, key=lambda p: (p.dsps, p.slots, p.cycles_per_latent, -p.pi, p.pp))


def heaviest_layer(layers) -> tuple[str, str, int, int, int]:
    """(name, op, Cin, Cout, scale) of the transposed convolution with the most MACs a frame."""
    convs = [s for s in layer_shapes(layers) if s[1] == "conv_transpose2d"]
    if not convs:
        raise ValueError("a decoder needs at least one conv_transpose2d layer")
    return max(convs, key=lambda s: 4 ** s[4] * s[2] * s[3])


def largest_divisor(n: int, limit: int) -> int:
    """The largest divisor of ``n`` that is at most ``limit``."""
    return max(d for d in divisors(n) if d <= limit)


def default_parallelism(layers, limit: int = 8) -> tuple[int, int]:
    """(PI, PO) for the heaviest layer when none is asked for: the largest divisors of its
    channel counts that are at most ``limit``."""
    _, _, cin, cout, _ = heaviest_layer(layers)
    return largest_divisor(cin, limit), largest_divisor(cout, limit)


def plan_decoder(layers, pi: int, po: int, pp: int = 1, *, max_pp: int = 1, pack: bool = False) -> list[LayerPlan]:
    """Balanced plan: (``pi``, ``po``, ``pp``) for the heaviest transposed convolution, the
    cheapest sufficient parallelism for every other layer, with at most ``max_pp`` lanes
    (default 1: channel parallelism only, as the earlier plans; a layer that cannot keep up
    gets full parallelism).  ``pack``: two products per DSP where they fit, in every
    multiplier layer.
    Raises ValueError naming the layer when ``pi``/``po`` do not divide its channels."""
    layers = list(layers)
    shapes, formats, products = layer_shapes(layers), layer_formats(layers), layer_products(layers)
    name, _, cin, cout, scale = heaviest_layer(layers)
    for v, n, what in ((pi, cin, "--pi"), (po, cout, "--po")):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1 or n % v:
            raise ValueError(f"{what} must divide the {n} {'input' if what == '--pi' else 'output'} channels of "
                             f"the heaviest layer {name!r}: one of {divisors(n)}, not {v!r}")
    for v, what in ((pp, "--pp"), (max_pp, "max_pp")):
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 256:
            raise ValueError(f"{what} (output pixels per cycle) must be an integer in [1, 256], not {v!r}")
    k = [s[0] for s in shapes].index(name)
    top = layer_plan(shapes[k], pi, po, pp, pack, formats[k], products[k])
    return [top if s[0] == name else _cheapest(s, f, pr, top.cycles_per_latent, max_pp, pack)
            for s, f, pr in zip(shapes, formats, products)]


def plan_tag(plan: list[LayerPlan]) -> str:
    """A short name of a decoder plan for file names: its (PI, PO, PP, pack) per layer, hashed."""
    import hashlib

    key = ";".join(f"{p.name}:{p.pi},{p.po},{p.pp},{int(p.pack)}" for p in plan)
    return "plan" + hashlib.sha256(key.encode()).hexdigest()[:10]
