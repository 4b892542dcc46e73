"""cocotb testbench: a chain of bundle layers in RTL (one ConvTransposeEngine, one GdnUnit, or
the whole Decoder, inside :mod:`sim.harness`) against the integer golden model.

Stimulus (``LICFORGE_TB_INPUT``, npz): ``x`` (frames, C, H, W) integers, already written as
``stimulus.hex`` beside it (frames back to back), ``expected``, the golden output of the
chain (:func:`quant.golden.run_layers` on the named layers of the bundle, computed by the
caller: the simulator's Python then imports numpy, not torch), and ``params`` (JSON: bundle,
layers, frame, seed, p_valid, p_ready, timeout_cycles, out_signed, out_bits).  Every output
pixel and channel of every frame is compared.
"""
from __future__ import annotations

import json
import time

import cocotb
import numpy as np

from licforge.sim.harness import OUTPUT_FILE, read_outputs, run_harness
from licforge.sim.streams import tb_input, write_report


def compare(got: np.ndarray, exp: np.ndarray) -> dict:
    """Mismatch count and the first few (frame, channel, row, column, rtl, golden)."""
    bad = np.argwhere(got != exp)
    return {"checked": int(exp.size), "mismatches": int(len(bad)),
            "first_mismatches": [(*map(int, idx), int(got[tuple(idx)]), int(exp[tuple(idx)])) for idx in bad[:8]]}


@cocotb.test()
async def chain_matches_golden(dut):
    stim = tb_input()
    p = json.loads(str(stim["params"]))
    x = stim["x"].astype(np.int64)
    exp, out_signed, out_bits = stim["expected"].astype(np.int64), bool(p["out_signed"]), int(p["out_bits"])
    frames, channels, h_out, w_out = exp.shape
    dut._log.info("seed %d: layers %s on a %s input, p_valid %.2f p_ready %.2f", p["seed"], p["layers"],
                  list(x.shape), p["p_valid"], p["p_ready"])
    t0 = time.perf_counter()
    counts = await run_harness(dut, n_in=x.shape[0] * x.shape[2] * x.shape[3], n_out=frames * h_out * w_out,
                               seed=p["seed"],
                               p_valid=p["p_valid"], p_ready=p["p_ready"],
                               frame=(x.shape[3], x.shape[2]) if p["frame"] else None,
                               timeout_cycles=p["timeout_cycles"])
    wall = time.perf_counter() - t0
    got = read_outputs(OUTPUT_FILE, channels, out_bits, out_signed, (frames, h_out, w_out))
    np.save("outputs.npy", got)
    report = {**compare(got, exp), **counts, "sim_wall_s": round(wall, 3),
              "sim_cycles_per_s": round(counts["cycles"] / max(wall, 1e-9)), "output_shape": list(exp.shape)}
    write_report(report)
    assert report["mismatches"] == 0, (f"{report['mismatches']} mismatches of {report['checked']}; first "
                                       f"(frame, channel, row, col, rtl, golden): {report['first_mismatches']}")
