"""cocotb testbench: a LaneArray (MinConvArray or MacArray) against the golden model.

Stimulus (``LICFORGE_TB_INPUT``, npz): ``x``, ``w`` of shape (dots, beats, lanes),
``expected`` (dots,), the golden outputs (:func:`quant.golden.dot_requant`, computed by the
caller: the simulator's Python then imports numpy, not torch), and ``params`` (JSON: bits,
out_bits, seed, p_valid, p_ready).  Every dot product's output is compared with ``expected``.
"""
from __future__ import annotations

import json

import cocotb
import numpy as np

from licforge.sim.streams import pack, run_stream, start_clock_and_reset, tb_input, unpack, write_report


def beat_words(x: np.ndarray, w: np.ndarray, bits: int) -> list[int]:
    """Pack (dots, beats, lanes) operands into the array's input beats (x | w | last)."""
    dots, beats, lanes = x.shape
    words = []
    for d in range(dots):
        for b in range(beats):
            words.append(pack(x[d, b], bits) | pack(w[d, b], bits) << (lanes * bits)
                         | int(b == beats - 1) << (2 * lanes * bits))
    return words


@cocotb.test()
async def lane_array_matches_golden(dut):
    stim = tb_input()
    p = json.loads(str(stim["params"]))
    x, w = stim["x"].astype(np.int64), stim["w"].astype(np.int64)
    dots = x.shape[0]
    dut._log.info("seed %d, %d dot products of %d beats x %d lanes", p["seed"], dots, x.shape[1], x.shape[2])
    await start_clock_and_reset(dut)
    outs, cycles = await run_stream(dut, beat_words(x, w, p["bits"]), dots, seed=p["seed"],
                                    p_valid=p["p_valid"], p_ready=p["p_ready"])
    got = np.array([unpack(o, p["out_bits"], 1)[0] for o in outs], dtype=np.int64)
    exp = stim["expected"].astype(np.int64)
    bad = np.flatnonzero(got != exp)
    write_report({"checked": dots, "mismatches": int(bad.size), "cycles": cycles,
                  "first_mismatches": [(int(i), int(got[i]), int(exp[i])) for i in bad[:8]],
                  "outputs": got.tolist()})
    assert bad.size == 0, f"{bad.size} mismatches of {dots}; first (index, rtl, golden): {[(int(i), int(got[i]), int(exp[i])) for i in bad[:8]]}"
