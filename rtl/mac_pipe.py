"""Shared pieces of the streaming engines: stall-aware delay lines and a PI x PO multiplier
array feeding PO adder trees.

Every register here is clocked by one ``enable`` (the engine's ``advance``): when a consumer
stalls the engine, the whole pipeline holds its state.
"""
from __future__ import annotations

from amaranth import Cat, Module, Mux, Signal, Value, signed
from amaranth.hdl import ShapeLike

from .lane_array import adder_tree

__all__ = ["delay", "Delayed", "mac_array", "accumulate", "emit_pixels", "check_divisor"]


def check_divisor(value: int, name: str, total: int, what: str) -> int:
    """``value`` if it is a positive integer dividing ``total`` (a parallelism over ``total``
    channels); else ValueError naming ``name`` and listing the valid values."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or total % value:
        valid = [d for d in range(1, total + 1) if total % d == 0]
        raise ValueError(f"{name} must divide the {total} {what}: one of {valid}, not {value!r}")
    return value


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


class Delayed:
    """Named signals (flags, indices, operands) travelling down a pipeline together:
    ``stage(k)[name]`` is the value that entered ``k`` enabled cycles ago."""

    def __init__(self, m: Module, values: dict[str, Value], cycles: int, enable: Value, name: str) -> None:
        self._lines = {k: delay(m, v, cycles, enable, f"{name}_{k}") for k, v in values.items()}

    def stage(self, k: int) -> dict[str, Value]:
        return {name: line[k] for name, line in self._lines.items()}


def mac_array(m: Module, x: list[Value], w: list[list[Value]], enable: Value, name: str) -> tuple[list[Value], int]:
    """``PO`` dot products of length ``PI`` per cycle: ``s_o = sum_i x_i * w[o][i]``.

    One registered multiplier per (i, o) pair (``PI * PO`` DSP candidates), then one pipelined
    adder tree per output.  Returns the ``PO`` sums and the latency in cycles,
    ``1 + ceil(log2 PI)``.
    """
    roots, depth = [], 0
    for o, row in enumerate(w):
        terms = []
        for i, (xi, wi) in enumerate(zip(x, row)):
            p = xi * wi
            r = Signal(p.shape(), name=f"{name}_p{o}_{i}")
            m.d.sync += r.eq(Mux(enable, p, r))
            terms.append(r)
        root, depth = adder_tree(m, terms, enable, f"{name}_t{o}")
        roots.append(root)
    return roots, 1 + depth


def accumulate(m: Module, terms: list[Value], init: list[Value], first: Value, enable: Value, bits: int,
               name: str) -> list[Value]:
    """Accumulators: ``running_k = (init_k if first else acc_k) + terms_k`` (combinational,
    returned); ``acc_k`` (signed ``bits``) takes ``running_k`` when ``enable``.  ``bits`` must
    be a derived bound on every partial sum."""
    running = []
    for k, (t, v0) in enumerate(zip(terms, init)):
        acc = Signal(signed(bits), name=f"{name}{k}")
        s = Mux(first, v0, acc) + t
        with m.If(enable):
            m.d.sync += acc.eq(s)
        running.append(s)
    return running


def emit_pixels(m: Module, out, values: list[Value], write: Value, pixel_done: Value, finishing: Value,
                groups: int, bits: int) -> Value:
    """Assemble ``groups`` consecutive groups of ``values`` (group 0 first, ``bits`` each) into
    one pixel beat on stream ``out`` and return the stall condition.

    ``write``: a group is finished this cycle (and the pipeline advances); ``pixel_done``: it
    is the pixel's last group; ``finishing``: a group is waiting at the end of the pipeline
    (regardless of stalls).  The pixel beat is registered; the pipeline must stall (the
    returned ``stall``) only when a finished pixel meets an output register not yet taken.
    """
    gbits = len(values) * bits
    parts = [v[:bits] for v in values]
    held = Signal((groups - 1) * gbits)  # groups 0 .. groups-2, group 0 at the LSB
    with m.If(out.ready):
        m.d.sync += out.valid.eq(0)
    with m.If(write):
        with m.If(pixel_done):
            m.d.sync += [out.payload.eq(Cat(held, *parts)), out.valid.eq(1)]
        if groups > 1:
            with m.Else():
                m.d.sync += held.eq(Cat(held[gbits:], *parts))
    return finishing & pixel_done & out.valid & ~out.ready
