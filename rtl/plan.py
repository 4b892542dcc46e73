"""Parallelism plan of a decoder pipeline: which (PI, PO) each layer gets.

The layers of a synthesis transform run concurrently, chained by streams, so the frame rate
is set by the slowest one.  The user picks (PI, PO) for the heaviest transposed convolution
(the one with the most multiply-accumulates per frame); every other layer gets the fewest
multipliers with which it is no slower than that one.  Balanced this way, all multipliers
are busy most of the time (the DSP efficiency of :mod:`rtl.perf`).

Costs per latent pixel, for a layer whose input grid is ``4**s`` times the latent grid:

* transposed convolution (5x5, stride 2): ``4**s * 25 * Cin/PI * Cout/PO`` cycles,
  ``4**s * 25 * Cin * Cout`` MACs (border taps included), ``PI * PO`` multipliers;
* inverse GDN on a grid ``4**s`` times the latent grid: ``4**s * C/PI * C/PO`` cycles,
  ``4**s * (C*C + C)`` MACs, ``PI * PO + PO`` multipliers.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["LayerPlan", "plan_decoder", "layer_shapes", "divisors", "largest_divisor", "heaviest_layer",
           "default_parallelism"]

TAPS = 25  # 5x5 kernel, stride 2: 9 + 6 + 6 + 4 taps per 2x2 output block


@dataclass(frozen=True)
class LayerPlan:
    """One layer of the pipeline: ``op`` ('conv_transpose2d' or 'igdn'), channels, the grid
    scale ``s`` of its input (``4**s`` input pixels per latent pixel) and its parallelism."""
    name: str
    op: str
    cin: int
    cout: int
    scale: int
    pi: int
    po: int

    @property
    def cycles_per_latent(self) -> int:
        """Steady-state cycles per latent pixel."""
        per_px = (self.cin // self.pi) * (self.cout // self.po)
        return 4 ** self.scale * (TAPS * per_px if self.op == "conv_transpose2d" else per_px)

    @property
    def multipliers(self) -> int:
        """Multipliers instantiated (DSP candidates)."""
        return self.pi * self.po + (self.po if self.op == "igdn" else 0)

    def as_dict(self) -> dict:
        return {**asdict(self), "cycles_per_latent": self.cycles_per_latent, "multipliers": self.multipliers}


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


def _cheapest(name: str, op: str, cin: int, cout: int, scale: int, budget: int) -> LayerPlan:
    """The plan with the fewest multipliers that needs at most ``budget`` cycles per latent
    pixel (ties: fewer cycles, then wider PI); the fully parallel one if none does."""
    options = [LayerPlan(name, op, cin, cout, scale, pi, po) for pi in divisors(cin) for po in divisors(cout)]
    fit = [p for p in options if p.cycles_per_latent <= budget]
    if not fit:
        return LayerPlan(name, op, cin, cout, scale, cin, cout)
    return min(fit, key=lambda p: (p.multipliers, p.cycles_per_latent, -p.pi))


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


def plan_decoder(layers, pi: int, po: int) -> list[LayerPlan]:
    """Balanced plan: (``pi``, ``po``) for the heaviest transposed convolution, the cheapest
    sufficient parallelism for every other layer.  Raises ValueError naming the layer when
    ``pi``/``po`` do not divide its channels."""
    shapes = layer_shapes(layers)
    name, _, cin, cout, scale = heaviest_layer(layers)
    for v, n, what in ((pi, cin, "--pi"), (po, cout, "--po")):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1 or n % v:
            raise ValueError(f"{what} must divide the {n} {'input' if what == '--pi' else 'output'} channels of "
                             f"the heaviest layer {name!r}: one of {divisors(n)}, not {v!r}")
    budget = LayerPlan(name, "conv_transpose2d", cin, cout, scale, pi, po).cycles_per_latent
    return [LayerPlan(n, op, ci, co, s, pi, po) if n == name else _cheapest(n, op, ci, co, s, budget)
            for n, op, ci, co, s in shapes]
