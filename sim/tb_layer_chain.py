"""cocotb testbench: a chain of bundle layers in RTL (one ConvTransposeEngine, one GdnUnit, or
the whole Decoder, inside :mod:`sim.harness`) against the integer golden model.

Stimulus (``LICFORGE_TB_INPUT``, npz): ``x`` (frames, C, H, W) integers, already written as
``stimulus.hex`` beside it (frames back to back), and ``params`` (JSON: bundle, layers,
frame, seed, p_valid, p_ready, timeout_cycles).  The reference is
:func:`quant.golden.run_layers` on the named layers of the bundle; every output pixel and
channel of every frame is compared.
"""
from __future__ import annotations

import json
import time

import cocotb
import numpy as np

from licforge.quant.bundle import read_bundle
from licforge.quant.golden import run_layers
from licforge.sim.harness import OUTPUT_FILE, read_outputs, run_harness
from licforge.sim.streams import tb_input, write_report


def reference(params: dict, x: np.ndarray) -> tuple[np.ndarray, bool, int]:
    """Golden output of the chain, whether it is signed, and its bit width."""
    bundle = read_bundle(params["bundle"])
    layers = [bundle.layer(n) for n in params["layers"]]
    last = layers[-1].attrs
    return run_layers(layers, x), bool(last.get("out_signed", True)), int(last["out_bits"])


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
    exp, out_signed, out_bits = reference(p, x)
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
