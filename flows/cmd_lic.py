"""CLI of the LIC slice: ``train``, ``distill``, ``quantize``, ``inspect``, ``eval``,
``plot rd``, ``bench lic`` and ``bench kd``."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from licforge.errors import (UsageError, finite_float, need_dir, need_file, need_int, out_dir, out_file,
                             positive_float, read_json, seed_int)

__all__ = ["register"]


def _boundary(fn):
    """Turn the LIC modules' input errors (files, recipes, data, bitstreams) into exit 2."""
    def run(*args):
        from licforge.models.data import DataError
        from licforge.models.lic import CheckpointError
        from licforge.quant.codec import BitstreamError
        from licforge.quant.lic_recipe import RecipeError

        try:
            return fn(*args)
        except (CheckpointError, RecipeError, DataError, BitstreamError) as e:
            raise UsageError(str(e)) from None
    return run


def _train_config(args, kd_recon: float = 0.0, kd_latent: float = 0.0, dist_weight: float = 1.0,
                  launched: bool = False, kd_targets: str = "online"):
    """The TrainConfig of the arguments; ``launched``: a train/distill command that joins a
    torchrun launch, whose noise is then drawn per global sample so that N processes train like
    one (and a run may resume with another number of processes)."""
    from licforge.models.lic_train import TrainConfig, torchrun_env

    launch = torchrun_env() if launched else None
    try:
        cfg = TrainConfig(lmbda=args.lmbda, steps=args.steps, lr=args.lr, crop=args.crop, batch=args.batch,
                          seed=args.seed, kd_recon=kd_recon, kd_latent=kd_latent, dist_weight=dist_weight,
                          amp=getattr(args, "bf16", False), noise="sample" if launch else "global",
                          kd_targets=kd_targets, ema=args.ema)
    except ValueError as e:
        raise UsageError(f"--{str(e).replace('_', '-')}") from None
    if launch is not None and cfg.batch % launch[1]:
        raise UsageError(f"--batch {cfg.batch} (the global batch) does not split between the {launch[1]} "
                         f"processes torchrun started; use a multiple of {launch[1]}")
    return cfg


def _launch(device: str):
    """:func:`models.lic_train.distributed` for ``device``: under torchrun (``RANK``/``WORLD_SIZE``/
    ``LOCAL_RANK`` set) join the process group and yield this process's device; else ``device``."""
    import torch

    from licforge.models.lic_train import distributed, torchrun_env

    launch = torchrun_env()
    if launch is not None and torch.device(device).type == "cuda":
        _, world, local = launch
        if torch.device(device).index is not None and world > 1:
            raise UsageError(f"--device {device}: under torchrun every process takes the GPU of its LOCAL_RANK; "
                             f"use --device cuda")
        if local >= torch.cuda.device_count():
            raise UsageError(f"torchrun started process LOCAL_RANK {local} but this machine has "
                             f"{torch.cuda.device_count()} CUDA GPU(s); use --nproc_per_node "
                             f"{torch.cuda.device_count()} or fewer")
    return distributed(device)


def _rank0() -> bool:
    from licforge.models.lic_train import torchrun_env

    launch = torchrun_env()
    return launch is None or launch[0] == 0


def _device(args) -> str:
    """The ``--device`` to train on, checked: ``cpu`` or ``cuda[:i]`` of a GPU torch can see."""
    import torch

    d = args.device
    try:
        dev = torch.device(d)
    except RuntimeError:
        raise UsageError(f"--device {d!r}: not a device; use cpu or cuda (cuda:1 for the second GPU)") from None
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {d!r}: only cpu and cuda are supported")
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise UsageError(f"--device {d}: torch {torch.__version__} sees no CUDA GPU on this machine; "
                             f"train with --device cpu")
        if dev.index is not None and dev.index >= n:
            raise UsageError(f"--device {d}: this machine has {n} CUDA GPU(s) (cuda:0..cuda:{n - 1})")
    return d


def _lic_config(args, gdn: str):
    from licforge.models.lic import LICConfig

    m = args.M if args.M is not None else (3 * args.N + 1) // 2
    try:
        return LICConfig(args.arch, args.N, m, gdn, args.product, args.gdn_out, tuple(args.mul_layers))
    except ValueError as e:
        raise UsageError(f"--{e}") from None


def _init(args) -> Path | None:
    return need_file(args.init, "--init") if args.init else None


def _cmd_train(args) -> int:
    from licforge.quant.train import train_model

    cfg = _lic_config(args, args.gdn)
    tcfg, init = _train_config(args, launched=True), _init(args)
    out = out_file(args.out)
    with _launch(_device(args)) as device:
        meta = train_model(cfg, tcfg, out, data=args.data, resume=args.resume,
                           init=init, curve=args.curve, half=args.half, device=device)
    if _rank0():
        print(f"{args.out}: {cfg.name}, {meta['steps']} steps in {meta['wall_s']:.0f} s")
    return 0


def _cmd_distill(args) -> int:
    from licforge.quant.train import train_model

    if args.kd_recon < 0 or args.kd_latent < 0:
        raise UsageError("--kd-recon and --kd-latent must be >= 0")
    cfg = _lic_config(args, args.gdn)
    teacher = None
    if args.kd_recon > 0 or args.kd_latent > 0:
        if args.teacher is None:
            raise UsageError("--teacher is required when --kd-recon or --kd-latent is > 0 "
                             "(--kd-recon 0 trains the student without distillation)")
        teacher = need_file(args.teacher, "--teacher")
    tcfg, init = _train_config(args, args.kd_recon, args.kd_latent, args.dist_weight, launched=True,
                               kd_targets=args.kd_targets), _init(args)
    out = out_file(args.out)
    with _launch(_device(args)) as device:
        meta = train_model(cfg, tcfg, out, data=args.data, teacher=teacher, init=init,
                           resume=args.resume, curve=args.curve, half=args.half, device=device)
    if _rank0():
        print(f"{args.out}: {cfg.name}, {meta['steps']} steps in {meta['wall_s']:.0f} s")
    return 0


def _cmd_quantize(args) -> int:
    from licforge.quant.train import quant_model_path, quantize_model

    weights = need_file(args.weights, "weights")
    qat = None if args.ptq else _train_config(args)
    parent = need_dir(args.parent, "--parent") if args.parent else None
    meta = quantize_model(weights, args.recipe, out_dir(args.out), qat=qat, data=args.data, resume=args.resume,
                          curve=args.curve, parent=parent)
    print(f"{args.out}: bundle {meta['bundle_hash'][:16]} ({meta['mode']}, recipe {meta['recipe']}); "
          f"Brevitas model {quant_model_path(Path(args.out))}")
    return 0


def _cmd_inspect(args) -> int:
    from licforge.quant.bundle import read_bundle

    b = read_bundle(args.bundle)
    print(f"{b.path}: valid, hash {b.hash}")
    print(json.dumps(b.model))
    for lay in b.layers:
        shapes = {t: list(a.shape) for t, a in lay.tensors.items()}
        bits = {k: v for k, v in lay.attrs.items() if k.endswith(("bits", "exp", "shift"))}
        # the products of contract_15 (a multiplier layer of an earlier bundle records none: it multiplies)
        kinds = " ".join(f"{k}={lay.attrs[k]}" for k in ("product", "norm_product", "out_product") if k in lay.attrs)
        print(f"  {lay.name:<7} {lay.op:<17} {kinds + ' ' if kinds else ''}{shapes} {bits}")
    return 0


def _cmd_eval(args) -> int:
    from licforge.models.data import load_split

    from licforge.quant.eval import evaluate
    from licforge.quant.rd import write_json

    if not args.models and args.no_baselines:
        raise UsageError("nothing to evaluate: give weight files or bundle directories, or drop --no-baselines")
    models = [Path(m) for m in args.models]
    twice = sorted({str(m) for m in models if sum(m.resolve() == n.resolve() for n in models) > 1})
    if twice:
        raise UsageError(f"{', '.join(twice)}: given more than once (its points would be counted twice in a curve)")
    bitstreams = out_dir(args.bitstreams, "--bitstreams") if args.bitstreams else None
    images = load_split(args.data, "held-out")
    res = evaluate(models, images, baselines=not args.no_baselines, bitstreams=bitstreams)
    res["data"] = args.data or "embedded"
    for e in res["entries"]:
        if e["kind"] == "baseline":  # the models' lines were printed as they were evaluated
            print(_eval_line(e))
    if args.json:
        write_json(Path(args.json), res)
        print(f"results: {args.json}")
    return 0


def _eval_line(entry: dict) -> str:
    """One row of the ``eval`` table, as :func:`quant.eval.evaluate` prints a model's."""
    m = entry["mean"]
    ssim = "n/a" if m["ms_ssim"] is None else f"{m['ms_ssim']:.4f}"
    return f"{entry['name']:<36} {entry['curve']:<28} {m['bpp']:.4f} bpp  {m['psnr']:.2f} dB  MS-SSIM {ssim}"


def _cmd_plot_rd(args) -> int:
    from licforge.quant.rd import curves_from_results, plot_rd, rd_report, write_json

    png = out_file(args.out if args.out else Path(args.build) / "lic" / "rd.png", "--out", ".png")
    results = []
    for f in args.results:
        res = read_json(need_file(f, "results"), "results")
        if not isinstance(res, dict) or "entries" not in res:
            raise UsageError(f"results {f}: not a file written by 'licforge eval' (no 'entries')")
        results.append(res)
    curves = curves_from_results(results)
    if args.anchor not in curves:
        raise UsageError(f"--anchor {args.anchor!r}: no such curve (curves: {sorted(curves)})")
    report = rd_report(curves, args.anchor)
    plot_rd(curves, png, title=f"held-out images, BD-rate anchor: {args.anchor}")
    for k, v in sorted(report["curves"].items()):
        r = v["bd_rate_pct"]
        print(f"{k:<40} BD-rate {'n/a' if r is None else f'{r:+.2f} %'}")
    if args.json:
        write_json(Path(args.json), report)
    print(f"plot: {png}" + (f"; BD-rates: {args.json}" if args.json else ""))
    return 0


def _bench_lic(out: Path, build: Path, args: argparse.Namespace) -> str:
    from licforge.bench.lic import bench_lic

    res = bench_lic(out, build / "lic" / "bench")
    return f"wrote {out / 'lic.json'} and {out / 'rd.png'} ({len(res['models'])} models)"


def _given_teachers(files: list[str] | None) -> dict[float, Path] | None:
    """``bench kd --teachers FILE...``: each teacher weight file keyed by the lambda it was trained at
    (from its metadata); two files of one lambda are refused."""
    from licforge.models.lic import load_weights

    if not files:
        return None
    out: dict[float, Path] = {}
    for f in files:
        lam = load_weights(f)[2].get("lmbda")
        if lam is None or lam in out:
            raise UsageError(f"--teachers {f}: " + ("its metadata names no lambda" if lam is None else
                                                    f"a second teacher for lambda {lam} (first: {out[lam]})"))
        out[lam] = Path(f)
    return out


def _eval_sets(folders: list[str] | None) -> dict[str, str]:
    """``bench kd --eval-data``: each folder named by its last component (distinct, and existing)."""
    sets = {Path(f).name: str(need_dir(f, "--eval-data")) for f in folders or []}
    if len(sets) != len(folders or []):
        raise UsageError(f"--eval-data: the folders' names must differ (they name the result files), not {folders}")
    return sets


def _bench_kd(out: Path, build: Path, args: argparse.Namespace) -> str:
    from licforge.bench.kd_study import kd_study
    from licforge.models.lic_train import TrainConfig

    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, not {args.workers}")
    need_int(args.base_steps, "--base-steps", 1, 10 ** 7)
    need_int(args.ft_steps, "--ft-steps", 1, 10 ** 7)
    try:  # the crop and batch every job of the study trains with, checked before the first job starts
        TrainConfig(crop=args.crop, batch=args.batch)
    except ValueError as e:
        raise UsageError(f"--{e}") from None
    _device(args)
    if min(args.widths) < 1 or len(set(args.seeds)) != len(args.seeds):
        raise UsageError(f"--widths must be >= 1 and --seeds distinct, not {args.widths} / {args.seeds}")
    if args.lambdas is not None and len(args.lambdas) < 4:
        raise UsageError(f"--lambdas: give at least 4 values (a BD-rate needs 4 points), not {args.lambdas}")
    extra = {"lambdas": tuple(sorted(args.lambdas))} if args.lambdas else {}
    if args.student_lr is not None:
        extra["student_lr"] = args.student_lr
    init = need_file(args.student_init, "--student-init") if args.student_init else None
    work = Path(args.work) if args.work else build / "lic" / "kd"
    res = kd_study(out, work, base=args.base_steps, ft=args.ft_steps, batch=args.batch,
                   crop=args.crop, device=args.device, workers=args.workers, tag=args.tag,
                   widths=tuple(args.widths), seeds=tuple(args.seeds), arms=tuple(args.arms), data=args.data,
                   teachers=_given_teachers(args.teachers), kd_targets=args.kd_targets,
                   eval_sets=_eval_sets(args.eval_data), student_init=init, **extra)

    def f(v: float | None, fmt: str) -> str:  # BD figures are None where two curves do not overlap
        return "n/a" if v is None else format(v, fmt)

    written = [out / f"lic_kd_{args.tag}.json", out / f"rd_kd_{args.tag}.png"]
    for name in res.get("eval_sets", {}):
        written += [out / f"lic_kd_{args.tag}_{name}.json", out / f"rd_kd_{args.tag}_{name}.png"]
    for path in written[::2]:
        rec = json.loads(path.read_text())
        print(f"held-out {rec.get('data') or res['settings']['data']}:")
        for w, dist in rec["distillation"].items():
            print(f"  {w}: " + ", ".join(f"{arm} {f(r['bd_rate_vs_nokd_pct'], '+.1f')} % / "
                                         f"{f(r['bd_psnr_vs_nokd_db'], '+.3f')} dB vs {r['twin']}"
                                         for arm, r in dist.items() if "twin" in r))
        for n in rec["seed_noise"]:
            print(f"  seed noise ({' vs '.join(n['pair'])}): {f(n['bd_rate_pct'], '+.1f')} % / "
                  f"{f(n['bd_psnr_db'], '+.3f')} dB")
    return "wrote " + ", ".join(map(str, written))


def _train_args(p: argparse.ArgumentParser, steps: int, lr: float) -> None:
    p.add_argument("--lmbda", type=positive_float, default=0.013, help="rate-distortion trade-off (MSE on 0..255)")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--lr", type=positive_float, default=lr)
    p.add_argument("--crop", type=int, default=64, help="random crop size (multiple of 16)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--data", default=None, help="image folder (default: embedded scikit-image photographs)")
    p.add_argument("--resume", action="store_true", help="continue from <out>.state.pt")
    p.add_argument("--curve", default=None, help="label of the RD curve this model belongs to")
    p.add_argument("--ema", type=finite_float, default=0.0, metavar="DECAY",
                   help="write the exponential moving average of the weights (decay e.g. 0.999, warmed up over "
                        "the first steps) instead of the last step's: smooths a noisy run, and a loss spike in the "
                        "last steps barely moves it (0 = off)")


def _init_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--init", default=None,
                   help="start from this weight file (same architecture; e.g. a neighbouring lambda)")


def _device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu",
                   help="train on cpu (default) or cuda[:i]; the weights are written for the CPU either way. "
                        "Several GPUs/machines: launch with torchrun and --device cuda (see models/lic_train.py)")


def _bf16_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bf16", action="store_true",
                   help="bf16 autocast of the transforms (entropy model, rate and distortion in fp32); on cuda, "
                        "or on CPUs with bf16 instructions (AVX512-BF16/AMX), where it is faster than fp32")


def _model_args(p: argparse.ArgumentParser, n: int, gdn: str) -> None:
    p.add_argument("--N", type=int, default=n, help="width N (channels of g_a/g_s)")
    p.add_argument("--M", type=int, default=None, help="latent channels (default 3N/2)")
    p.add_argument("--arch", default="factorized", choices=("factorized", "hyperprior"))
    p.add_argument("--gdn", default=gdn, choices=("gdn", "gdn1"),
                   help="gdn: CompressAI float GDN; gdn1: simplified GDN (the hardware's)")
    p.add_argument("--product", default="mul", choices=("mul", "min"),
                   help="products of the synthesis transform: mul, or min (MinConv, multiplier-free; gdn1 "
                        "only; --init may then be the multiplier twin, converted with calibrated gains)")
    p.add_argument("--gdn-out", default="shift", choices=("shift", "mul", "min"),
                   help="with --product min, the inverse GDN1's output x*n: shift (n rounded to a power of two, "
                        "multiplier-free), mul (exact: one product of two activations per channel, kept in LUTs "
                        "or a DSP), or the ablation min (sign(x) min(|x|, n), a clamp, not quantized)")
    p.add_argument("--mul-layers", nargs="+", default=[], metavar="LAYER",
                   help="with --product min, synthesis convolutions kept as multiplier layers (a hybrid: any of "
                        "g_s.0 g_s.2 g_s.4 g_s.6); --init may be the multiplier twin or a MinConv student, whose "
                        "listed layers are then fitted as multipliers to its outputs")
    p.add_argument("--half", action="store_true", help="store the weights in fp16")


def register(groups: dict) -> None:
    """Add this module's subcommands to the ``licforge`` parser groups."""
    top = groups["top"]
    p = top.add_parser("train", help="train a float LIC model (teacher by default: N=128, M=192, GDN)")
    _model_args(p, 128, "gdn")
    _train_args(p, 2000, 1e-3)
    _init_arg(p)
    _device_arg(p)
    _bf16_arg(p)
    p.add_argument("--out", required=True, help="weight file to write (.pt)")
    p.set_defaults(func=_boundary(_cmd_train))

    p = top.add_parser("distill", help="train a student (GDN1), distilled from a frozen teacher")
    _model_args(p, 16, "gdn1")
    _train_args(p, 2000, 1e-3)
    p.add_argument("--teacher", help="teacher weight file (needed when a KD weight is > 0)")
    p.add_argument("--kd-recon", type=finite_float, default=1.0, help="weight of the reconstruction KD term")
    p.add_argument("--kd-latent", type=finite_float, default=0.0, help="weight of the latent KD term")
    p.add_argument("--dist-weight", type=finite_float, default=1.0,
                   help="weight of the distortion against the image (1 - kd-recon interpolates)")
    p.add_argument("--kd-targets", choices=("online", "precomputed"), default="online",
                   help="run the teacher on every batch (online), or once on each whole training image and "
                        "crop its reconstructions with the images (precomputed: a reconstruction-KD step then costs a "
                        "plain step; cached in <out folder>/kd-targets/; the latent term still runs the "
                        "teacher's analysis transform on each batch)")
    _init_arg(p)
    _device_arg(p)
    _bf16_arg(p)
    p.add_argument("--out", required=True, help="weight file to write (.pt)")
    p.set_defaults(func=_boundary(_cmd_distill))

    p = groups["bench"].add_parser("kd", help="teacher + students with/without KD at every width, trained as long "
                                              "as asked (a GPU run, not in bench all) -> lic_kd_<tag>.json, "
                                              "rd_kd_<tag>.png")
    p.add_argument("--base-steps", type=int, default=2000, help="steps of each base model (at lambda 0.013)")
    p.add_argument("--ft-steps", type=int, default=800, help="steps of each fine-tune to one lambda")
    p.add_argument("--crop", type=int, default=64, help="random crop size (multiple of 16)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--workers", type=int, default=2, help="training/eval processes at a time")
    p.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64], help="student widths N")
    p.add_argument("--lambdas", type=positive_float, nargs="+", default=None,
                   help="rate-distortion points (default: those of licforge bench lic)")
    p.add_argument("--seeds", type=seed_int, nargs="+", default=[0],
                   help="seeds of every student (one seed: plus a twin without KD at the next seed)")
    p.add_argument("--arms", nargs="+", default=["nokd", "recon1", "mix50"],
                   choices=["nokd", "recon1", "mix50", "prim", "nokd_m192", "prim_m192"],
                   help="students per width and seed: without KD, KD on reconstructions, half image/half teacher, "
                        "PRIM's latent KD through an adapter, and without KD / PRIM keeping the teacher's M = 192")
    p.add_argument("--teachers", nargs="+", default=None, metavar="FILE",
                   help="teacher weight files, one per lambda (read from each file's metadata) instead of training "
                        "the teacher")
    p.add_argument("--data", default=None, help="image folder (default: embedded scikit-image photographs)")
    p.add_argument("--kd-targets", choices=("online", "precomputed"), default="online",
                   help="the distilled students' --kd-targets (see licforge distill)")
    p.add_argument("--eval-data", nargs="+", default=None, metavar="DIR",
                   help="more held-out image folders: every model evaluated on each too (Pillow JPEG/WebP in the "
                        "same run) -> lic_kd_<tag>_<folder name>.json, rd_kd_<tag>_<folder name>.png")
    p.add_argument("--student-init", default=None, metavar="FILE",
                   help="a trained student every student's base model starts from (one width, the file's): does "
                        "distillation help a student already trained?")
    p.add_argument("--student-lr", type=positive_float, default=None, help="the students' learning rate (default 1e-3)")
    p.add_argument("--tag", default="long", help="suffix of the result files")
    p.add_argument("--work", default=None, help="folder of the models, evaluations and logs (default <build>/lic/kd)")
    _device_arg(p)
    p.set_defaults(bench=_boundary(_bench_kd), in_all=False)

    p = groups["bench"].add_parser("lic", help="the rate-distortion study: teacher, students, KD, QAT/PTQ, "
                                               "baselines -> lic.json, rd.png (hours; cached under <build>/lic/bench)")
    p.set_defaults(bench=_boundary(_bench_lic))

    p = top.add_parser("quantize", help="QAT (default) or PTQ of a GDN1 student -> deployment bundle")
    p.add_argument("weights", help="float student weight file")
    p.add_argument("--recipe", default="hybrid8", help="recipe name in quant/recipes or a JSON file")
    p.add_argument("--ptq", action="store_true", help="post-training quantization only (no QAT steps)")
    p.add_argument("--parent", default=None,
                   help="bundle this student descends from (e.g. a MinConv student's multiplier twin): its hash "
                        "goes into the new bundle's metadata")
    _train_args(p, 400, 1e-4)
    p.add_argument("--out", required=True, help="bundle directory (the Brevitas model goes to <out>.quant.pt)")
    p.set_defaults(func=_boundary(_cmd_quantize))

    p = top.add_parser("inspect", help="validate a bundle and list its layers")
    p.add_argument("bundle", help="bundle directory")
    p.set_defaults(func=_boundary(_cmd_inspect))

    p = top.add_parser("eval", help="encode held-out images to files, decode, bpp/PSNR/MS-SSIM")
    p.add_argument("models", nargs="*", help="weight files (.pt) and bundle directories")
    p.add_argument("--data", default=None, help="image folder (default: embedded held-out images)")
    p.add_argument("--no-baselines", action="store_true", help="skip JPEG/WebP")
    p.add_argument("--bitstreams", default=None, help="keep the bitstream files in this directory")
    p.add_argument("--json", default=None, help="write the results to this file (read by plot rd)")
    p.set_defaults(func=_boundary(_cmd_eval))

    p = groups["plot"].add_parser("rd", help="RD curves (PNG) and BD-rates against an anchor")
    p.add_argument("results", nargs="+", help="JSON files written by 'licforge eval --json'")
    p.add_argument("--anchor", default="teacher")
    p.add_argument("--out", default=None, help="the plot, a PNG file (default <build>/lic/rd.png)")
    p.add_argument("--json", default=None, help="write the BD-rates to this file")
    p.set_defaults(func=_boundary(_cmd_plot_rd))
