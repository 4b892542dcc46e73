"""cocotb helpers for ``amaranth.lib.stream`` ports on generated Verilog.

Amaranth flattens a stream port ``i`` into ``i__payload``, ``i__valid`` and ``i__ready``; a
payload layout is packed LSB first in declaration order.  :func:`run_stream` drives one input
stream and drains one output stream in a single cycle loop: inputs change on the falling
edge, handshakes are sampled in the read-only phase before the rising edge (so a beat counts
exactly when ``valid & ready`` is seen at the clock edge).
"""
from __future__ import annotations

import json
import os
import random
from typing import Iterable, Sequence

import numpy as np

__all__ = ["pack", "unpack", "start_clock_and_reset", "run_stream", "tb_input", "write_report"]


def pack(values: Iterable[int], width: int) -> int:
    """Pack integers (two's complement, ``width`` bits each) LSB first into one word."""
    word, mask = 0, (1 << width) - 1
    for k, v in enumerate(values):
        word |= (int(v) & mask) << (k * width)
    return word


def unpack(word: int, width: int, count: int, signed: bool = True) -> list[int]:
    """Inverse of :func:`pack`."""
    mask, out = (1 << width) - 1, []
    for k in range(count):
        v = (word >> (k * width)) & mask
        out.append(v - (1 << width) if signed and v >> (width - 1) else v)
    return out


async def start_clock_and_reset(dut, period_ns: int = 10, cycles: int = 3) -> None:
    """Start ``dut.clk`` and hold ``dut.rst`` high for ``cycles`` clock cycles."""
    import cocotb
    from cocotb.clock import Clock
    from cocotb.triggers import RisingEdge

    cocotb.start_soon(Clock(dut.clk, period_ns, unit="ns").start())
    dut.rst.value = 1
    for _ in range(cycles):
        await RisingEdge(dut.clk)
    dut.rst.value = 0


async def run_stream(dut, beats: Sequence[int], n_out: int, *, seed: int, p_valid: float = 1.0,
                     p_ready: float = 1.0, inp: str = "i", out: str = "o",
                     max_cycles: int | None = None) -> tuple[list[int], int]:
    """Send ``beats`` (packed payload words) into stream ``inp`` and collect ``n_out`` raw
    payload words from stream ``out``.  ``p_valid`` / ``p_ready`` < 1 insert random bubbles
    and back-pressure (seeded).  Returns (outputs, cycles from the first offered beat to the
    last output)."""
    from cocotb.triggers import FallingEdge, ReadOnly

    rng = random.Random(seed)
    i_valid, i_payload, i_ready = (getattr(dut, f"{inp}__{s}") for s in ("valid", "payload", "ready"))
    o_valid, o_payload, o_ready = (getattr(dut, f"{out}__{s}") for s in ("valid", "payload", "ready"))
    limit = max_cycles if max_cycles is not None else 1000 + 50 * (len(beats) + n_out)
    outputs: list[int] = []
    k, cycles = 0, 0
    while len(outputs) < n_out:
        await FallingEdge(dut.clk)
        offer = k < len(beats) and rng.random() < p_valid
        i_valid.value = int(offer)
        if offer:
            i_payload.value = beats[k]
        take = rng.random() < p_ready
        o_ready.value = int(take)
        await ReadOnly()
        if offer and int(i_ready.value):
            k += 1
        if take and int(o_valid.value):
            outputs.append(int(o_payload.value))
        cycles += 1
        if cycles > limit:
            raise TimeoutError(f"stream stalled: {len(outputs)}/{n_out} outputs, {k}/{len(beats)} "
                               f"inputs after {cycles} cycles")
    await FallingEdge(dut.clk)
    i_valid.value = 0
    o_ready.value = 0
    return outputs, cycles


def tb_input() -> dict:
    """The stimulus the caller wrote for this testbench (``LICFORGE_TB_INPUT``)."""
    path = os.environ["LICFORGE_TB_INPUT"]
    if path.endswith(".json"):
        with open(path) as f:
            return json.load(f)
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def write_report(report: dict) -> None:
    """Write the testbench's findings for :func:`sim.runner.run_cocotb`."""
    with open(os.environ["LICFORGE_TB_RESULT"], "w") as f:
        json.dump(report, f, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o))
