"""``licforge flow CONFIG``: images to verified, watermarked Verilog, and a report.

Stages, each cached in ``<run.dir>/<stage>/`` by a hash of the config sections it reads, the
files it reads (checkpoints, image folder) and the stages it follows (:mod:`flows.pipeline`):

    teacher   load (or train) the float teacher
    distill   distil the student of width N from it (rate + lambda*D + KD terms)
    qat       Brevitas QAT of the student with the watermark embedded -> deployment bundle,
              Brevitas model (.quant.pt) and the owner's key file
    eval      real bitstreams of the held-out images: teacher, student, quantized student
              (Brevitas == integer golden asserted on every image), JPEG/WebP; RD plot
    rtl       decoder Verilog, $readmemh weight files, manifest, Vivado TCL
    verify    a held-out image compressed, entropy-decoded, decoded by the RTL in cocotb;
              pixels compared with the integer golden decoder
    synth     Yosys synth_xilinx resources of the decoder; the analytical fps model
    watermark the key read back from the memory init files and the bundle; wrong keys;
              attacks on the deployed integers (noise, pruning, permutation + re-sync)
    qonnx     QONNX export of the quantized synthesis transform, run by qonnx's executor
    report    report.html (self-contained) and report.md

The config is TOML (``flows/default.toml`` is the documented default; a user file gives only
the keys it changes).  Every key is checked before the first stage runs: an unknown key, a
wrong type, an impossible bit width, a missing checkpoint or image folder stop the flow at
once with a :class:`errors.UsageError` naming the key or the file.
"""
from __future__ import annotations

import copy
import hashlib
import json
import time
import tomllib
from pathlib import Path
from typing import Any, Callable

import numpy as np

from licforge.errors import CheckFailed, UsageError, out_dir
from licforge.flows.pipeline import Pipeline, Stage, StageContext, StageRecord

__all__ = ["DEFAULT_CONFIG", "load_config", "build_pipeline", "run_flow", "STAGES"]

DEFAULT_CONFIG = Path(__file__).with_name("default.toml")
PATH_KEYS = ("run.dir", "data.folder", "teacher.checkpoint", "student.init")
RANGES: dict[str, tuple[float, float]] = {
    "run.seed": (0, 2**31 - 1), "teacher.N": (2, 1024), "teacher.M": (2, 1024), "teacher.steps": (0, 10**7),
    "teacher.lmbda": (1e-6, 10.0), "teacher.lr": (1e-8, 1.0),
    "student.N": (2, 512), "student.lmbda": (1e-6, 10.0), "student.steps": (0, 10**7), "student.lr": (1e-8, 1.0),
    "student.kd_recon": (0.0, 1e3), "student.kd_latent": (0.0, 1e3), "student.crop": (16, 4096),
    "student.batch": (1, 4096),
    "quant.w_bits": (2, 16), "quant.qat_steps": (0, 10**7), "quant.lr": (1e-8, 1.0),
    "watermark.payload": (1, 1 << 20), "watermark.key_seed": (0, 2**31 - 1), "watermark.wrong_keys": (0, 1000),
    "watermark.permute_seed": (0, 2**31 - 1),
    "rtl.pi": (1, 1024), "rtl.po": (1, 1024), "rtl.clock_mhz": (1.0, 2000.0), "verify.crop": (0, 1 << 16),
}
CHOICES = {"student.product": ("mul", "min"), "watermark.scheme": ("watermas", "uchida", "none"), "synth.family": ("xc7", "xcu", "xcup")}
WATERMARK_SWEEPS = {"noise": (0, 100), "prune": (0, 1), "finetune": (0, 10**6), "quant_bits": (2, 16)}
SCHEME_NAMES = {"watermas": "WaterMAS", "uchida": "Uchida", "none": "no watermark"}


# --------------------------------------------------------------------------- configuration

def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"config {path}: not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"config {path}: not valid TOML ({e}); fix the line it names") from None


def _check_value(where: str, value: Any, default: Any) -> Any:
    """``value`` of key ``where`` if it has the default's type and lies in its range."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, list):  # a list of ints, or of numbers (floats)
        kinds = (int,) if default and all(isinstance(v, int) for v in default) else (int, float)
        ok = isinstance(value, list) and all(isinstance(v, kinds) and not isinstance(v, bool) for v in value)
        value = value if kinds == (int,) or not ok else [float(v) for v in value]
    else:
        ok = isinstance(value, str)
    if not ok:
        raise UsageError(f"config key {where} = {value!r}: expected {type(default).__name__} like {default!r}")
    if where in RANGES and not isinstance(value, list):
        lo, hi = RANGES[where]
        if not lo <= value <= hi:
            raise UsageError(f"config key {where} = {value!r}: must be between {lo:g} and {hi:g}")
    if where in CHOICES and value not in CHOICES[where]:
        raise UsageError(f"config key {where} = {value!r}: must be one of {', '.join(CHOICES[where])}")
    return value


def load_config(path: Path | None = None) -> tuple[dict, str]:
    """The flow's config: the default, overlaid with the keys of ``path``; relative paths
    resolved against the folder of the file that gave them.  Returns (config, TOML text)."""
    base = _read_toml(DEFAULT_CONFIG)
    cfg = copy.deepcopy(base)
    origin = {f"{s}.{k}": DEFAULT_CONFIG.parent for s, keys in base.items() for k in keys}
    text = DEFAULT_CONFIG.read_text()
    if path is not None:
        path = Path(path)
        user = _read_toml(path)
        text = path.read_text()
        for sec, keys in user.items():
            if sec not in base or not isinstance(keys, dict):
                raise UsageError(f"config {path}: unknown section [{sec}] (sections: {', '.join(base)})")
            for k, v in keys.items():
                if k not in base[sec]:
                    raise UsageError(f"config {path}: unknown key {sec}.{k} (keys of [{sec}]: "
                                     f"{', '.join(base[sec])})")
                cfg[sec][k] = v
                origin[f"{sec}.{k}"] = path.resolve().parent
    for sec, keys in cfg.items():
        for k, v in keys.items():
            keys[k] = _check_value(f"{sec}.{k}", v, base[sec][k])
    for where in PATH_KEYS:
        sec, k = where.split(".")
        if cfg[sec][k]:
            cfg[sec][k] = str((origin[where] / cfg[sec][k]).resolve())
    _check_semantics(cfg)
    return cfg, text


def _check_semantics(cfg: dict) -> None:
    """What one key alone cannot say: files and folders exist and fit, crops fit."""
    from licforge.models.data import DataError, load_split
    from licforge.models.lic import CheckpointError, load_weights, read_checkpoint, student_config, WEIGHTS_FORMAT
    from licforge.quant.lic_recipe import RecipeError, load_recipe

    folder = cfg["data"]["folder"] or None
    try:
        held = load_split(folder, "held-out")
        load_split(folder, "train")
    except DataError as e:
        raise UsageError(f"config key data.folder: {e}") from None
    if cfg["teacher"]["checkpoint"]:
        try:
            read_checkpoint(cfg["teacher"]["checkpoint"], WEIGHTS_FORMAT)
        except CheckpointError as e:
            raise UsageError(f"config key teacher.checkpoint: {e}") from None
    elif cfg["teacher"]["steps"] == 0:
        raise UsageError("config keys teacher.checkpoint = \"\" and teacher.steps = 0: give a checkpoint "
                         "or a number of training steps")
    if cfg["student"]["init"]:
        try:
            init_cfg = load_weights(cfg["student"]["init"])[1]
            load_weights(cfg["student"]["init"], expect=student_config(cfg["student"]["N"], product=init_cfg.product))
        except CheckpointError as e:
            raise UsageError(f"config key student.init: {e}") from None
        if init_cfg.product != cfg["student"]["product"] and cfg["student"]["steps"] == 0:
            raise UsageError(f"config keys student.product = \"{cfg['student']['product']}\" and student.steps = 0: "
                             f"student.init is a '{init_cfg.product}' student; converting it needs distillation "
                             f"steps")
    elif cfg["student"]["steps"] == 0:
        raise UsageError("config keys student.init = \"\" and student.steps = 0: an untrained student")
    if cfg["student"]["crop"] % 16:
        raise UsageError(f"config key student.crop = {cfg['student']['crop']}: must be a multiple of 16")
    try:
        load_recipe(cfg["quant"]["recipe"])
    except RecipeError as e:
        raise UsageError(f"config key quant.recipe: {e}") from None
    _check_parallelism(cfg)
    name = cfg["verify"]["image"] or next(iter(held))
    if name not in held:
        raise UsageError(f"config key verify.image = {name!r}: not a held-out image (held-out: {', '.join(held)})")
    crop = cfg["verify"]["crop"]
    h, w = held[name].shape[:2]
    if crop % 16 or crop > min(h, w):
        raise UsageError(f"config key verify.crop = {crop}: must be a multiple of 16 and at most {min(h, w)} "
                         f"(image {name} is {h}x{w}); 0 decodes the whole image")
    for k, (lo, hi) in WATERMARK_SWEEPS.items():
        bad = [v for v in cfg["watermark"][k] if not lo <= v <= hi]
        if bad:
            raise UsageError(f"config key watermark.{k}: {bad} out of range [{lo}, {hi}]")


def _check_parallelism(cfg: dict) -> None:
    """(rtl.pi, rtl.po) must give a decoder plan for a student of width student.N (the plan
    depends on the layer shapes only, so a random bundle of the same shapes decides)."""
    from licforge.models.lic import student_config
    from licforge.quant.bundle import decoder_layers
    from licforge.quant.synthetic import random_decoder_bundle
    from licforge.rtl.plan import plan_decoder

    sc = student_config(cfg["student"]["N"])
    try:
        plan_decoder(decoder_layers(random_decoder_bundle(sc.N, sc.M)), cfg["rtl"]["pi"], cfg["rtl"]["po"])
    except ValueError as e:
        raise UsageError(f"config keys rtl.pi = {cfg['rtl']['pi']}, rtl.po = {cfg['rtl']['po']} "
                         f"(student N={sc.N}, M={sc.M}): {e}") from None


def _fingerprint(path: str) -> str:
    """Content hash of a file, or of a folder's image files (names, sizes, contents)."""
    if not path:
        return ""
    p = Path(path)
    h = hashlib.sha256()
    for f in ([p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())):
        h.update(str(f.relative_to(p.parent if p.is_file() else p)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


# The LIC benchmark's curves, drawn beside this run's points on the embedded images (shipped
# with the package; part of the eval stage's cache key).
BENCH_CURVES = Path(__file__).resolve().parent.parent / "bench" / "results" / "lic.json"

# --------------------------------------------------------------------------- stages

def _images(ctx: StageContext, split: str) -> dict[str, np.ndarray]:
    from licforge.models.data import load_split

    return load_split(ctx.config["data"]["folder"] or None, split)


def _teacher(ctx: StageContext) -> dict:
    from licforge.models.lic import LICConfig, load_weights
    from licforge.models.lic_train import TrainConfig
    from licforge.quant.train import file_sha256, train_model

    t = ctx.config["teacher"]
    if t["checkpoint"]:
        path = Path(t["checkpoint"])
        _, cfg, meta = load_weights(path)
        how = "loaded"
    else:
        path = ctx.dir / "teacher.pt"
        cfg = LICConfig("factorized", t["N"], t["M"], "gdn")
        meta = train_model(cfg, TrainConfig(lmbda=t["lmbda"], steps=t["steps"], lr=t["lr"],
                                            seed=ctx.config["run"]["seed"]),
                           path, data=ctx.config["data"]["folder"] or None, curve="teacher")
        how = "trained"
    return {"weights": str(path), "sha256": file_sha256(path), "config": cfg.to_dict(), "how": how,
            "lmbda": meta.get("lmbda")}


def _student_name(s: dict) -> str:
    """The student's curve label: its width, its product, and "+ KD" only when the distill
    stage trained it with a distillation term (``steps = 0`` takes ``init`` as it is)."""
    kd = s["steps"] > 0 and (s["kd_recon"] > 0 or s["kd_latent"] > 0)
    return f"N={s['N']}{' MinConv' if s['product'] == 'min' else ''} student{' + KD' if kd else ''}"


def _distill(ctx: StageContext) -> dict:
    from licforge.models.lic import load_weights, save_weights, student_config
    from licforge.models.lic_train import TrainConfig
    from licforge.quant.train import train_model

    s = ctx.config["student"]
    cfg = student_config(s["N"], product=s["product"])
    out = ctx.dir / "student.pt"
    if s["steps"] == 0:
        net, _, meta = load_weights(s["init"], expect=cfg)
        save_weights(net, cfg, out, {**meta, "curve": _student_name(s)})
        return {"weights": str(out), "config": cfg.to_dict(), "steps": 0, "wall_s": 0.0}
    teacher = Path(ctx.results["teacher"]["weights"]) if s["kd_recon"] > 0 or s["kd_latent"] > 0 else None
    tcfg = TrainConfig(lmbda=s["lmbda"], steps=s["steps"], lr=s["lr"], crop=s["crop"], batch=s["batch"],
                       seed=ctx.config["run"]["seed"], kd_recon=s["kd_recon"], kd_latent=s["kd_latent"])
    meta = train_model(cfg, tcfg, out, data=ctx.config["data"]["folder"] or None, teacher=teacher,
                       init=Path(s["init"]) if s["init"] else None, curve=_student_name(s),
                       log=print if ctx.progress else None)
    return {"weights": str(out), "config": cfg.to_dict(), "steps": meta["steps"], "wall_s": meta["wall_s"],
            "final": meta["final"]}


def _qat(ctx: StageContext) -> dict:
    from licforge.quant.bundle import write_bundle
    from licforge.quant.lic import save_quantized
    from licforge.watermark.extract import ber
    from licforge.watermark.keys import save_key
    from licforge.watermark.layers import bundle_chain, chain_weights
    from licforge.watermark.lic import LICHost
    from licforge.watermark.markers import MarkerParams, bind_marker
    from licforge.quant.train import quant_model_path

    q_cfg, wm = ctx.config["quant"], ctx.config["watermark"]
    host = LICHost(Path(ctx.results["distill"]["weights"]), steps=q_cfg["qat_steps"], lr=q_cfg["lr"],
                   seed=ctx.config["run"]["seed"], data_folder=ctx.config["data"]["folder"] or None)
    q = host.quantize(q_cfg["w_bits"], q_cfg["recipe"])
    key = marker = None
    if wm["scheme"] != "none":
        params = MarkerParams(uchida_lam=1.0).for_scheme(wm["scheme"])
        try:
            key = host.key(wm["scheme"], wm["payload"], wm["key_seed"], params)
        except ValueError as e:
            raise UsageError(f"config key watermark.payload = {wm['payload']}: {e}") from None
        marker = bind_marker(key, q, write=wm["scheme"] == "watermas")
    t0 = time.perf_counter()
    host.qat(q, marker)
    bundle = host.export(q)
    bdir = ctx.dir / "bundle"
    digest = write_bundle(bundle, bdir)
    curve = f"{_student_name(ctx.config['student'])} {q_cfg['recipe']} QAT {q_cfg['w_bits']}-bit + " \
            f"{SCHEME_NAMES[wm['scheme']]}"
    save_quantized(q, quant_model_path(bdir), {"curve": curve, "lmbda": host.lmbda, "recipe": q_cfg["recipe"]})
    res = {"bundle": str(bdir), "bundle_hash": digest, "quant_model": str(quant_model_path(bdir)),
           "qat_wall_s": round(time.perf_counter() - t0, 1), "curve": curve}
    if key is not None:
        res["key"] = str(save_key(key, ctx.dir / "key.json"))
        res["ber_bundle"] = ber(key, chain_weights(bundle_chain(bundle)))
    return res


def _eval(ctx: StageContext) -> dict:
    from licforge.quant.eval import evaluate
    from licforge.quant.rd import curves_from_results, plot_rd, write_json

    models = [Path(ctx.results["teacher"]["weights"]), Path(ctx.results["distill"]["weights"]),
              Path(ctx.results["qat"]["bundle"])]
    res = evaluate(models, _images(ctx, "held-out"), bitstreams=ctx.dir / "bitstreams",
                   log=print if ctx.progress else None)
    write_json(ctx.dir / "eval.json", res)
    curves = curves_from_results([res])
    bench = BENCH_CURVES
    if not ctx.config["data"]["folder"] and bench.is_file():  # same held-out images: show the bench's curves
        for label, c in json.loads(bench.read_text())["bd_rate_vs_teacher"]["curves"].items():
            if label == "teacher" or "QAT" in label:
                curves[f"{label} (bench)"] = [tuple(p) for p in c["points"]]
    plot_rd(curves, ctx.dir / "rd.png", "held-out images; points: this run, lines: JPEG/WebP and the bench curves")
    rows = [{"model": e["curve"], "kind": e["kind"], **{k: e["mean"][k] for k in ("bpp", "psnr", "ms_ssim")},
             "quality": e.get("quality"), "check": e.get("brevitas_equal_golden")} for e in res["entries"]]
    return {"rd_png": str(ctx.dir / "rd.png"), "eval_json": str(ctx.dir / "eval.json"), "rows": rows,
            "images": res["images"]}


def _bundle(ctx: StageContext):
    from licforge.quant.bundle import read_bundle

    return read_bundle(Path(ctx.results["qat"]["bundle"]))


def _rtl(ctx: StageContext) -> dict:
    from licforge.rtl.project import generate_decoder

    r = ctx.config["rtl"]
    out = ctx.dir / "verilog"
    man = generate_decoder(_bundle(ctx), r["pi"], r["po"], out, part=r["part"], clock_hz=r["clock_mhz"] * 1e6)
    return {"verilog": str(out), "sources": man["sources"], "plan": man.get("plan"),
            "multipliers": man["model_figures"]["1080p"]["multipliers"], "model_figures": man["model_figures"]}


def _verify(ctx: StageContext) -> dict:
    from PIL import Image

    from licforge.sim.decode import sim_decode_image

    v, r = ctx.config["verify"], ctx.config["rtl"]
    images = _images(ctx, "held-out")
    name = v["image"] or next(iter(images))
    img = images[name]
    if v["crop"]:
        h, w = img.shape[:2]
        top, left = (h - v["crop"]) // 2, (w - v["crop"]) // 2
        img = img[top:top + v["crop"], left:left + v["crop"]]
    rep = sim_decode_image(_bundle(ctx), img, ctx.dir / "build", pi=r["pi"], po=r["po"], png=ctx.dir / "decoded.png")
    Image.fromarray(img).save(ctx.dir / "original.png")
    return {"image": name, "crop": v["crop"], **rep, "pixels_checked": int(np.prod(rep["image_hw"])) * 3,
            "original_png": str(ctx.dir / "original.png"), "decoded_png": str(ctx.dir / "decoded.png")}


def _synth(ctx: StageContext) -> dict:
    from licforge.rtl.yosys import synthesize

    s = ctx.config["synth"]
    if not s["enabled"]:
        return {"skipped": "synth.enabled = false"}
    vdir = Path(ctx.results["rtl"]["verilog"])
    rep = synthesize([vdir / f for f in ctx.results["rtl"]["sources"]], "decoder", family=s["family"],
                     workdir=ctx.dir, out_json=ctx.dir / "synth.json")
    return {"family": s["family"], "resources": rep["resources"], "seconds": rep["seconds"]}


def _watermark(ctx: StageContext) -> dict:
    from licforge.quant.lic import load_quantized
    from licforge.rtl.deployed import read_deployed_weights
    from licforge.watermark.extract import ber
    from licforge.watermark.keys import load_key
    from licforge.watermark.layers import bundle_chain, chain_weights
    from licforge.watermark.lic import LICHost
    from licforge.watermark.lic_study import LICStudyConfig, LICTarget, permutation_resync
    from licforge.watermark.study import attack_sweeps
    from licforge.watermark.deployed import lic_metric

    if "key" not in ctx.results["qat"]:
        return {"skipped": "watermark.scheme = none"}
    wm = ctx.config["watermark"]
    key = load_key(Path(ctx.results["qat"]["key"]))
    bundle = _bundle(ctx)
    deployed = {n: t["weight"] for n, t in read_deployed_weights(Path(ctx.results["rtl"]["verilog"])).items()
                if "weight" in t}
    ints = chain_weights(bundle_chain(bundle))
    host = LICHost(Path(ctx.results["distill"]["weights"]), steps=0, seed=ctx.config["run"]["seed"],
                   data_folder=ctx.config["data"]["folder"] or None)
    wrong = [ber(host.key(wm["scheme"], wm["payload"], wm["key_seed"] + 1000 + k), ints)
             for k in range(wm["wrong_keys"])]
    # attacks on the deployed student (each attacked model exported; BER from its integers,
    # PSNR/bpp from real bitstreams of the held-out images decoded by the golden model)
    q, _ = load_quantized(ctx.results["qat"]["quant_model"])
    scfg = LICStudyConfig(noise=tuple(wm["noise"]), prune=tuple(wm["prune"]), finetune_steps=tuple(wm["finetune"]),
                          quant_bits=tuple(wm["quant_bits"]), perm_seed=wm["permute_seed"])
    target = LICTarget(host, scfg, metric=lambda b, tag: lic_metric(b, ctx.dir / "attacked" / tag), tag="flow")
    names = {"noise": "noise, sigma x layer std", "prune": "pruning rate", "finetune": "fine-tuning steps",
             "quantize": "attacker re-quantization, bits"}
    attacks = [{"attack": f"{names[a]} {row['strength']:g}", "ber": row["ber"], "psnr": row["psnr"], "bpp": row["bpp"]}
               for a, rows in attack_sweeps(target, q, key, scfg).items() for row in rows]
    perm = permutation_resync(copy.deepcopy(q), bundle, key, scfg, host)
    attacks += [{"attack": "channel permutation", "ber": perm["ber_without_resync"], "psnr": None, "bpp": None},
                {"attack": "channel permutation, re-synchronized", "ber": perm["ber_with_resync"], "psnr": None,
                 "bpp": None}]
    return {"scheme": wm["scheme"], "payload": key.payload, "layers": sorted(key.layers),
            "ber_memory_files": ber(key, deployed), "ber_bundle": ber(key, ints),
            "ber_wrong_keys_mean": float(np.mean(wrong)) if wrong else None,
            "ber_wrong_keys_min": float(np.min(wrong)) if wrong else None, "attacks": attacks,
            "permutation": perm}


def _qonnx(ctx: StageContext) -> dict:
    from licforge.quant.qonnx import export_synthesis

    if ctx.config["student"]["product"] == "min":
        return {"skipped": "student.product = \"min\": QONNX has no operator for a signed-minimum product"}
    return export_synthesis(ctx.results["qat"]["quant_model"], ctx.dir, data=ctx.config["data"]["folder"] or None)


def _qonnx_section(q: dict):
    """The QONNX hand-off: equality with Brevitas and what FINN can build of each layer."""
    from licforge.flows.report import Section, Table

    if "skipped" in q:
        return Section("QONNX export (for FINN)", text=f"not exported: {q['skipped']}")
    if "error" in q:
        return Section("QONNX export (for FINN)", status="fail", text=f"export failed: {q['error']}",
                       tables=[Table(["layer", "FINN", "reasons"], [[u["layer"], u["finn"], "; ".join(u["reasons"])]
                                                                  for u in q["unsupported"]])])
    text = (f"{q['onnx']}: ops after qonnx cleanup {q['ops']}; qonnx's executor vs Brevitas on {q['samples']} "
            f"held-out latents ({', '.join(q['sample_names'])}): {'bit-exact' if q['exact'] else 'DIFFERENT'} "
            f"(max |diff| {q['max_abs_diff']}). Layers FINN cannot build as exported are named below.")
    return Section("QONNX export (for FINN)", status="pass" if q["exact"] else "fail", text=text,
                   tables=[Table(["layer", "ONNX ops", "FINN", "reasons"],
                                 [[r["layer"], ", ".join(f"{k} x{v}" for k, v in r["onnx_ops"].items()), r["finn"],
                                   "; ".join(r["reasons"])] for r in q["layers"]])])


def _comparison_png(ctx: StageContext, ver: dict) -> Path:
    """The verify image and its hardware-decoded twin side by side, bpp and PSNR under each, a
    central square enlarged below (flows.report.image_comparison)."""
    from PIL import Image

    from licforge.flows.report import image_comparison

    orig, dec = (np.asarray(Image.open(ver[k]).convert("RGB")) for k in ("original_png", "decoded_png"))
    h, w = orig.shape[:2]
    side = min(64, h, w)
    return image_comparison([(orig, [f"original {ver['image']} ({h}x{w})", "24 bpp (8-bit RGB)"]),
                             (dec, ["decoded by the RTL (Verilator)",
                                    f"{ver['bpp']:.4f} bpp, PSNR {ver['psnr_db']:.2f} dB"])],
                            ctx.dir / "verify_comparison.png", crop=((h - side) // 2, (w - side) // 2, side),
                            zoom=max(1, min(4, 256 // side)))


def _report_sections(ctx: StageContext) -> list:
    """The report's sections from the results of every earlier stage."""
    from licforge.flows.report import Section, Table, tool_versions, versions_table

    r, cfg = ctx.results, ctx.config
    sec = []
    ver, wm, hw = r["verify"], r["watermark"], r["rtl"]["model_figures"]
    ok_rtl = ver["mismatches"] == 0
    ok_wm = wm.get("ber_memory_files", 0.0) == 0.0
    fps = hw["1080p"]["fps"]
    sec.append(Section("Summary", status="pass" if ok_rtl and ok_wm else "fail", text=(
        f"Student N={r['distill']['config']['N']} (M={r['distill']['config']['M']}), {cfg['quant']['recipe']} "
        f"with {cfg['quant']['w_bits']}-bit weights, {SCHEME_NAMES[cfg['watermark']['scheme']]}. "
        f"The RTL decoded held-out image {ver['image']} ({ver['image_hw'][0]}x{ver['image_hw'][1]}) from a "
        f"{ver['bytes']}-byte bitstream ({ver['bpp']:.4f} bpp) at {ver['psnr_db']:.2f} dB PSNR with "
        f"{ver['mismatches']} pixel mismatches against the integer golden decoder. At PI x PO = "
        f"{cfg['rtl']['pi']} x {cfg['rtl']['po']} ({hw['1080p']['multipliers']} multipliers) the analytical model "
        f"gives {fps} fps at 1080p and {cfg['rtl']['clock_mhz']:g} MHz (stated clock; no place and route)."
        + (f" Watermark BER read from the deployed memory init files: {wm['ber_memory_files']:.4f}."
           if "ber_memory_files" in wm else ""))))
    ev = r["eval"]
    sec.append(Section("Rate-distortion (held-out images, real bitstreams)", images=[Path(ev["rd_png"])],
                       text="bpp from the file size of each bitstream; the quantized student is decoded by the "
                            "integer golden model, checked equal to Brevitas on every image.",
                       tables=[Table(["model", "kind", "bpp", "PSNR (dB)", "MS-SSIM", "quality", "check"],
                                     [[e["model"], e["kind"], e["bpp"], e["psnr"], e["ms_ssim"], e["quality"],
                                       e["check"]] for e in ev["rows"]])]))
    res = r["synth"].get("resources", {})
    rows = [[f"{cfg['rtl']['pi']}x{cfg['rtl']['po']}", hw[k]["multipliers"], res.get("LUT"), res.get("FF"),
             res.get("DSP"), res.get("BRAM"), res.get("CARRY"), f"{hw[k]['frame'][1]}x{hw[k]['frame'][0]}",
             hw[k]["cycles_per_pixel"], hw[k]["fps"], hw[k]["dsp_efficiency_steady"]] for k in hw]
    sec.append(Section("Hardware", tables=[Table(
        ["PI x PO", "multipliers", "LUT", "FF", "DSP", "BRAM", "CARRY", "frame", "cycles/pixel",
         f"fps @ {cfg['rtl']['clock_mhz']:g} MHz", "DSP efficiency"], rows,
        caption=f"Yosys synth_xilinx -family {r['synth'].get('family', '-')} "
                f"({r['synth'].get('skipped', 'resources of the whole decoder')}); cycles, fps and DSP efficiency "
                f"(useful MACs / (cycles x multipliers), steady state) from the analytical model")],
        text=f"Verilog, memory init files, manifest and Vivado TCL: {r['rtl']['verilog']}"))
    sec.append(Section("Verification", status="pass" if ok_rtl else "fail", tables=[Table(
        ["check", "vectors", "mismatches", "cycles (simulated)", "cycles (model)", "bpp", "PSNR (dB)"],
        [[f"RTL decode of {ver['image']} (Verilator, cocotb) vs integer golden decoder", ver["pixels_checked"],
          ver["mismatches"], ver["cycles"], ver["model_cycles"], ver["bpp"], ver["psnr_db"]],
         ["Brevitas vs integer golden model (latents and pixels)",
          next((e["check"] for e in ev["rows"] if e["kind"] == "quantized"), None), 0, None, None, None, None]])],
        text=f"simulation: {ver['sim_cycles_per_s']:.0f} cycles/s, {ver['wall_s']:.1f} s wall",
        images=[_comparison_png(ctx, ver)] if "decoded_png" in ver else []))
    if "skipped" not in wm:
        ev_q = next(e for e in ev["rows"] if e["kind"] == "quantized")
        rows = [["deployed bundle integers", wm["ber_bundle"], None, None],
                ["memory init files beside the Verilog", wm["ber_memory_files"], None, None],
                [f"wrong keys (mean of {cfg['watermark']['wrong_keys']})", wm["ber_wrong_keys_mean"], None, None]]
        rows += [[a["attack"], a["ber"], a["psnr"], a["bpp"]] for a in wm["attacks"]]
        sec.append(Section("Watermark", status="pass" if ok_wm else "fail", text=(
            "Attacks act on the deployed student without the key; each attacked model is exported and its "
            "watermark read from the bundle's integers; PSNR and bpp of real bitstreams of the held-out images "
            f"(the quantized student without attack: {ev_q['psnr']:.2f} dB, {ev_q['bpp']:.4f} bpp). Permutation: "
            f"{wm['permutation']['neurons_restored']:.0%} of the neurons put back, golden pixels changed by the "
            f"permutation: {wm['permutation']['golden_pixel_mismatches']}."), tables=[Table(
            ["condition", "BER", "PSNR (dB)", "bpp"], rows,
            caption=f"{SCHEME_NAMES[wm['scheme']]}, {wm['payload']} bits in {', '.join(wm['layers'])}")]))
    if "qonnx" in r:
        sec.append(_qonnx_section(r["qonnx"]))
    sec.append(Section("Stages", tables=[Table(["stage", "ran", "seconds"],
                                               [[n, "ran" if rec.ran else "cached", rec.seconds]
                                                for n, rec in ctx.records.items()])]))
    sec.append(Section("Config", code=cfg["_text"], code_lang="toml"))
    sec.append(Section("Tool versions", tables=[versions_table(tool_versions())]))
    return sec


def _report(ctx: StageContext) -> dict:
    from licforge.flows.report import find_browser, screenshot, write_html, write_markdown

    title = ctx.config["report"]["title"]
    sections = _report_sections(ctx)
    meta = {"run directory": str(ctx.run_dir), "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    html = write_html(ctx.dir / "report.html", title, sections, meta)
    md = write_markdown(ctx.dir / "report.md", title, sections, meta)
    out = {"html": str(html), "markdown": str(md), "sections": [s.title for s in sections]}
    if find_browser() is not None:
        out["screenshot"] = str(screenshot(html, ctx.dir / "report.png"))
    return out


STAGES: list[Stage] = [
    Stage("teacher", _teacher, reads=("data", "_images", "teacher", "_teacher_file", "run")),
    Stage("distill", _distill, reads=("data", "_images", "student", "_student_file", "run"), after=("teacher",)),
    Stage("qat", _qat, reads=("data", "_images", "quant", "watermark", "run"), after=("distill",)),
    Stage("eval", _eval, reads=("data", "_images", "_bench_curves"), after=("teacher", "distill", "qat")),
    Stage("rtl", _rtl, reads=("rtl",), after=("qat",)),
    Stage("verify", _verify, reads=("verify", "rtl", "data", "_images"), after=("qat", "rtl")),
    Stage("synth", _synth, reads=("synth",), after=("rtl",)),
    Stage("watermark", _watermark, reads=("watermark", "data", "_images"), after=("qat", "rtl")),
    Stage("qonnx", _qonnx, reads=("data", "_images"), after=("qat",)),
    Stage("report", _report, reads=("report", "_text"),
          after=("teacher", "distill", "qat", "eval", "rtl", "verify", "synth", "watermark", "qonnx")),
]


def build_pipeline() -> Pipeline:
    """The flow's stages in order."""
    return Pipeline(STAGES)


def run_flow(config_path: Path | None = None, *, run_dir: Path | None = None, force_from: str | None = None,
             progress: bool = True, log: Callable[[str], None] = print) -> tuple[list[StageRecord], dict]:
    """Validate the config, run the stages that are out of date, and return (records, config).
    Raises :class:`CheckFailed` after the report when a check failed (RTL pixel mismatches,
    watermark bits wrong in the deployed memory files)."""
    cfg, text = load_config(config_path)
    if run_dir is not None:
        cfg["run"]["dir"] = str(Path(run_dir).resolve())
    out_dir(cfg["run"]["dir"], "--run-dir" if run_dir is not None else "config key run.dir")
    cfg["_teacher_file"] = _fingerprint(cfg["teacher"]["checkpoint"])
    cfg["_student_file"] = _fingerprint(cfg["student"]["init"])
    cfg["_images"] = _fingerprint(cfg["data"]["folder"])
    cfg["_bench_curves"] = _fingerprint(str(BENCH_CURVES) if BENCH_CURVES.is_file() else "")
    cfg["_text"] = text
    pipe = build_pipeline()
    if force_from is not None and force_from not in pipe.names:
        raise UsageError(f"--from {force_from}: no such stage (stages: {', '.join(pipe.names)})")
    records = pipe.run(Path(cfg["run"]["dir"]), cfg, force_from=force_from, progress=progress, log=log)
    res = {r.name: r.result for r in records}
    failures = []
    if "verify" in res and res["verify"].get("mismatches"):
        failures.append(f"RTL decode: {res['verify']['mismatches']} pixel mismatches against the golden decoder")
    if res.get("watermark", {}).get("ber_memory_files"):
        failures.append(f"watermark BER {res['watermark']['ber_memory_files']:.4f} in the deployed memory files")
    if res.get("qonnx") and "skipped" not in res["qonnx"] and not res["qonnx"].get("exact"):
        failures.append(f"QONNX export: {res['qonnx'].get('error') or 'output differs from Brevitas'}")
    if failures:
        raise CheckFailed("; ".join(failures) + f" (see {cfg['run']['dir']})")
    return records, cfg
