"""Helpers the test modules import (``pythonpath = ["tests"]`` in pyproject.toml: the suite runs
with ``--import-mode=importlib``, so the repository root is not on ``sys.path`` and a bare
``import models`` fails as it does for a user)."""
from __future__ import annotations

import struct
from typing import Callable, Sequence

import numpy as np
import pytest

__all__ = ["require_simulator", "Interrupt", "interrupt_after", "rans64_encode", "simulate_mac_array"]


def require_simulator(name: str) -> None:
    """Skip (with the reason) when the HDL simulator ``name`` is not installed."""
    from licforge.sim.runner import SimulatorUnavailable, simulator_env

    try:
        simulator_env(name)
    except SimulatorUnavailable as e:
        pytest.skip(str(e))


class Interrupt(Exception):
    """Raised by :func:`interrupt_after` to stop a training run the way a kill would."""


def interrupt_after(steps: int | None) -> Callable[[object], None]:
    """An ``after_step`` hook for ``train_lic`` that raises :class:`Interrupt` during step
    ``steps + 1`` (after ``steps`` completed steps); ``None``: never."""
    calls: list[int] = []

    def hook(_net: object) -> None:
        calls.append(1)
        if steps is not None and len(calls) > steps:
            raise Interrupt

    return hook


def rans64_encode(ops: list[tuple]) -> bytes:
    """A rANS string that CompressAI's decoder (``rans64.h``, 16-bit probabilities, 32-bit
    words) reads as ``ops``, in decode order: ``("sym", start, freq)`` decodes a symbol whose
    cdf interval is ``[start, start + freq)``, ``("bits", value)`` a 4-bit bypass group.  For
    crafting strings CompressAI's encoder cannot write (a test's adversarial payloads)."""
    low, mask, words = 1 << 31, (1 << 32) - 1, []
    x = low
    for op in reversed(ops):
        freq = op[2] if op[0] == "sym" else 1 << 12
        if x >= ((low >> 16) << 32) * freq:
            words.append(x & mask)
            x >>= 32
        x = ((x // freq) << 16) + (x % freq) + op[1] if op[0] == "sym" else (x << 4) | op[1]
    return struct.pack(f"<{2 + len(words)}I", x & mask, x >> 32, *reversed(words))


def simulate_mac_array(x_shape, w_shape, lanes: int, rows: int, n: int, vectors: Sequence[tuple], **kwargs
                       ) -> tuple[np.ndarray, int]:
    """``rtl.mac_pipe.mac_array`` of ``lanes`` x ``rows`` x ``n`` inputs (enable high, ``kwargs``
    passed on) in Amaranth's simulator, driven with ``vectors`` of (activations (lanes, n),
    weights (rows, n)), one a cycle: the sums as an int array (vectors, lanes, rows), and the
    array's latency."""
    from amaranth import Module, Signal
    from amaranth.sim import Simulator

    from licforge.rtl.mac_pipe import mac_array

    m = Module()
    x = [[Signal(x_shape, name=f"x{p}_{i}") for i in range(n)] for p in range(lanes)]
    w = [[Signal(w_shape, name=f"w{o}_{i}") for i in range(n)] for o in range(rows)]
    sums, depth = mac_array(m, x, w, 1, "mac", **kwargs)
    got = []

    async def tb(ctx):
        for k in range(len(vectors) + depth):
            if k < len(vectors):
                xv, wv = vectors[k]
                for sigs, vals in zip(x + w, [*xv, *wv]):
                    for sig, v in zip(sigs, vals):
                        ctx.set(sig, int(v))
            await ctx.tick()
            if k >= depth - 1 and len(got) < len(vectors):
                got.append([[ctx.get(sig) for sig in lane] for lane in sums])

    sim = Simulator(m)
    sim.add_clock(1e-8)
    sim.add_testbench(tb)
    sim.run()
    return np.array(got), depth
