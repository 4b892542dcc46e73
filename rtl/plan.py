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
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from fractions import Fraction

from amaranth import signed, unsigned

from .mac_pipe import pack_chunk, packed_dsps

__all__ = ["LayerPlan", "plan_decoder", "layer_shapes", "layer_formats", "divisors", "largest_divisor",
           "heaviest_layer", "default_parallelism", "TAPS", "ROW_TAPS"]

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
    weight or gamma ``w_bits``), which decide where packing fits."""
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
    def multipliers(self) -> int:
        """Multiplier slots: products a cycle (DSP candidates before packing)."""
        return self.pi * self.po * self.pp + (self.po * self.pp if self.op == "igdn" else 0)

    @property
    def dsp_split(self) -> tuple[int, int]:
        """(packed DSPs, lone multipliers); a GDN's ``x * n`` products are lone."""
        xs = signed(self.x_bits) if self.op == "conv_transpose2d" else unsigned(self.x_bits)   # |x| in a GDN
        ws = signed(self.w_bits)
        pairs, single = packed_dsps(self.pp, self.po, self.pi, self.pack and pack_chunk(ws, xs) > 0,
                                    self.pack and pack_chunk(xs, ws) > 0)
        return pairs, single + (self.po * self.pp if self.op == "igdn" else 0)

    @property
    def dsps(self) -> int:
        """DSP48E2s: packed pairs plus lone multipliers."""
        return sum(self.dsp_split)

    def as_dict(self) -> dict:
        return {**asdict(self), "cycles_per_latent": self.cycles_per_latent, "multipliers": self.multipliers,
                "dsps": self.dsps}


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


def _options(name: str, op: str, cin: int, cout: int, scale: int, bits: tuple[int, int], max_pp: int,
             pack: bool) -> list[LayerPlan]:
    return [LayerPlan(name, op, cin, cout, scale, pi, po, pp, pack, *bits)
            for pi in divisors(cin) for po in divisors(cout) for pp in range(1, max_pp + 1)]


def _cheapest(shape: tuple, bits: tuple[int, int], budget: int | float, max_pp: int, pack: bool) -> LayerPlan:
    """The plan with the fewest DSPs that needs at most ``budget`` cycles per latent pixel
    (ties: fewer multiplier slots, fewer cycles, wider PI, fewer lanes); the fully parallel one
    (``max_pp`` lanes) if none does."""
    name, op, cin, cout, scale = shape
    fit = [p for p in _options(name, op, cin, cout, scale, bits, max_pp, pack) if p.cycles_per_latent <= budget]
    if not fit:
        return LayerPlan(name, op, cin, cout, scale, cin, cout, max_pp, pack, *bits)
    return min(fit, key=lambda p: (p.dsps, p.multipliers, p.cycles_per_latent, -p.pi, p.pp))


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
    gets full parallelism).  ``pack``: two products per DSP where they fit, in every layer.
    Raises ValueError naming the layer when ``pi``/``po`` do not divide its channels."""
    layers = list(layers)
    shapes, formats = layer_shapes(layers), layer_formats(layers)
    name, _, cin, cout, scale = heaviest_layer(layers)
    for v, n, what in ((pi, cin, "--pi"), (po, cout, "--po")):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1 or n % v:
            raise ValueError(f"{what} must divide the {n} {'input' if what == '--pi' else 'output'} channels of "
                             f"the heaviest layer {name!r}: one of {divisors(n)}, not {v!r}")
    for v, what in ((pp, "--pp"), (max_pp, "max_pp")):
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 256:
            raise ValueError(f"{what} (output pixels per cycle) must be an integer in [1, 256], not {v!r}")
    k = [s[0] for s in shapes].index(name)
    top = LayerPlan(name, "conv_transpose2d", cin, cout, scale, pi, po, pp, pack, *formats[k])
    return [top if s[0] == name else _cheapest(s, f, top.cycles_per_latent, max_pp, pack)
            for s, f in zip(shapes, formats)]
