"""``licforge bench kd``: does distillation help the students when they are trained long enough?

The distillation part of ``licforge bench lic`` (teacher, students N = 16, 32, 64 with and
without KD, base model at ``BASE_LAMBDA`` then one fine-tune per lambda) with the step count,
crops, batch and device as arguments, so that it can be run far longer on a GPU than the
2-core benchmark affords.  Per width, three students share steps, crops, batch and seed:

* ``nokd``: rate + lambda * MSE(image);
* ``recon1``: + lambda * MSE(teacher's reconstruction) (the benchmark's KD, ``--kd-recon 1``);
* ``mix50``: rate + lambda * (0.5 MSE(image) + 0.5 MSE(teacher)): the same total distortion
  weight as ``nokd``, so the RD trade-off is unchanged and only the target moves;
* ``prim``: the KD seed's recipe (PRIM, FABallemand/PRIM ``KDLoss_RD_MSE``: 0.2 MSE(latents) +
  0.2 MSE(reconstructions) + 0.6 (rate + lambda D)), divided by 0.6 into this project's loss:
  rate + lambda D + 1/3 MSE(A(y), y_teacher), the latent through the 1x1 adapter ``A``.  PRIM's
  reconstruction term is on the 0..1 scale without lambda: 1/3 / (255**2 lambda) of ours, under
  0.04 % of the distortion weight at these lambdas, so it is left out;
* ``nokd_m192`` / ``prim_m192``: PRIM's students keep the teacher's M = 192 latent channels (not the
  hardware students' M = 3N/2), the latents compared directly: the student without KD and the
  PRIM-distilled one at that M;

each at every seed asked for (``--seeds``).  Each arm is paired with its twin of the same seed
(``TWIN``): the KD arms with the student without KD of their M, ``nokd_m192`` with ``nokd`` (the
effect of M alone).  The BD-rate between students without KD of the smallest width at different seeds
(with a single seed, a twin at the next seed is trained) is the noise a distillation gain has
to exceed.

Every trained model is evaluated on the held-out images with real bitstreams (``licforge
eval``); ``lic_kd_<tag>.json`` holds BD-rate and BD-PSNR of each student vs the teacher and
of each KD student vs its ``nokd`` twin, and ``rd_kd_<tag>.png`` the curves.
"""
from __future__ import annotations

import json
import shlex
import statistics
import time
from pathlib import Path
from typing import Any

from licforge.bench.lic import BASE_LAMBDA, LAMBDAS, MIX50, PRIM, TEACHER, Job, kd_args, plan_star, run_jobs
from licforge.errors import UsageError

__all__ = ["plan_kd", "kd_study", "ARMS", "KEEP_M", "TWIN", "WIDTHS"]

WIDTHS = (16, 32, 64)
ARMS: dict[str, dict[str, float] | None] = {
    "nokd": None,
    "recon1": {"kd_recon": 1.0, "kd_latent": 0.0, "dist_weight": 1.0},
    "mix50": MIX50,
    "prim": PRIM,
    "nokd_m192": None,
    "prim_m192": PRIM,
}
DEFAULT_ARMS = ("nokd", "recon1", "mix50")
KEEP_M = ("nokd_m192", "prim_m192")
"""Arms whose students keep the teacher's M."""
TWIN = {"recon1": "nokd", "mix50": "nokd", "prim": "nokd", "nokd_m192": "nokd", "prim_m192": "nokd_m192"}
"""The arm each arm is paired with (same seed): what it differs from in one respect."""
STUDENT_LR = 1e-3


def _curve(n: int, arm: str, seed: int = 0) -> str:
    m = f" M={TEACHER['M']}" if arm in KEEP_M else ""
    kd = {"nokd": "", "recon1": " + KD", "mix50": " + KD mix50", "prim": " + KD prim"}[arm.removesuffix("_m192")]
    return f"N={n}{m} GDN1{kd}" + (f" seed {seed}" if seed else "")


def plan_kd(work: Path, base: int, ft: int, *, batch: int = 8, crop: int = 64, device: str = "cpu",
            lambdas: tuple[float, ...] = LAMBDAS, widths: tuple[int, ...] = WIDTHS,
            seeds: tuple[int, ...] = (0,), arms: tuple[str, ...] = DEFAULT_ARMS, data: str | None = None,
            teachers: dict[float, Path] | None = None, kd_targets: str = "online",
            eval_sets: dict[str, str] | None = None, student_init: Path | None = None,
            student_lr: float = STUDENT_LR) -> list[Job]:
    """The study's jobs in a valid order, base models first: the teacher (trained, or the weight
    files ``teachers`` maps each lambda to: jobs of kind ``"given"``), per width and seed the
    students of ``arms`` (the teacher of the same lambda in each stage for the KD arms) and, with a
    single seed, a twin of the smallest student without KD at the next seed (the noise estimate);
    then their fine-tunes; then one ``licforge eval`` per fine-tuned model.  ``data``: the
    ``--data`` folder of every training and evaluation (default: the embedded images);
    ``kd_targets``: the distilled students' ``--kd-targets`` (``"precomputed"``: the teacher runs
    once per training image, see :mod:`models.lic_train`); ``eval_sets``: more held-out sets (name:
    image folder, its ``test/`` split or every 8th image) on which every model is evaluated too
    (jobs ``eval_<name>_<model>``; the first with the Pillow JPEG/WebP baselines);
    ``student_init``: a trained student weight file every student's base model starts from
    (``--init``; the study then asks whether distillation helps a student already trained, one
    width, the file's; arms keeping the teacher's M are refused); ``student_lr``: the students'
    learning rate."""
    if base < 1 or ft < 1:
        raise ValueError(f"base and fine-tune steps must be >= 1, not {base}/{ft}")
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"seeds must be distinct integers >= 0, not {seeds}")
    if not set(arms) <= set(ARMS) or any(TWIN.get(a, "nokd") not in arms for a in arms):
        raise ValueError(f"arms must be among {', '.join(ARMS)} and include each one's twin "
                         f"({', '.join(f'{a}: {t}' for a, t in TWIN.items())}), not {arms}")
    if student_lr <= 0:
        raise UsageError(f"--student-lr must be > 0, not {student_lr}")
    init = _check_init(student_init, widths, arms) if student_init is not None else []
    jobs: list[Job] = []
    common = ["--batch", str(batch), "--crop", str(crop), "--device", device]
    common += ["--data", data] if data else []
    if teachers is not None:
        missing = sorted({BASE_LAMBDA, *lambdas} - set(teachers))
        if missing:
            raise UsageError(f"--teachers: no teacher for lambda {', '.join(map(str, missing))}: give one weight "
                             f"file per lambda of --lambdas ({', '.join(map(str, sorted({BASE_LAMBDA, *lambdas})))})")
        info = {"role": "teacher", "N": TEACHER["N"]}
        jobs.append(Job("teacher_base", [], Path(teachers[BASE_LAMBDA]), [], "given", {**info, "lmbda": BASE_LAMBDA}))
        jobs += [Job(f"teacher_l{lam:.4f}", [], Path(teachers[lam]), [], "given", {**info, "lmbda": lam})
                 for lam in lambdas]
    else:
        targs = ["train", "--N", str(TEACHER["N"]), "--M", str(TEACHER["M"]), "--gdn", "gdn", *common]
        plan_star(jobs, work, "teacher", {"base": targs, "ft": targs}, "teacher",
                  {"role": "teacher", "N": TEACHER["N"]}, {"lr": TEACHER["lr"], "base": base, "ft": ft},
                  lambdas=lambdas)
    cfg = {"lr": student_lr, "base": base, "ft": ft}
    runs = [(n, arm, seed) for n in widths for seed in seeds for arm in arms]
    runs += [(min(widths), "nokd", seeds[0] + 1)] if len(seeds) == 1 else []
    for n, arm, seed in runs:
        kd = ARMS[arm]
        m = ["--M", str(TEACHER["M"])] if arm in KEEP_M else []
        args = ["distill", "--N", str(n), *m, "--gdn", "gdn1", *kd_args(kd), *common]
        args += ["--kd-targets", kd_targets] if kd and kd_targets != "online" else []
        args += ["--seed", str(seed)] if seed else []
        plan_star(jobs, work, f"s{n}_{arm}" + (f"_seed{seed}" if seed else ""), {"base": args + init, "ft": args},
                  _curve(n, arm, seed), {"role": "student", "N": n, "M": int(m[1]) if m else n * 3 // 2,
                                         "arm": arm, "seed": seed}, cfg,
                  {"base": "same", "ft": "same"} if kd else None, lambdas=lambdas)
    evaluated = [j for j in jobs if j.kind == "train" or (j.kind == "given" and j.name != "teacher_base")]
    for j in evaluated:
        ev = work / "eval" / f"{j.name}.json"
        jobs.append(Job(f"eval_{j.name}", ["eval", str(j.out), "--no-baselines", *common[6:], "--json", str(ev)],
                        ev, [j.name], "eval", {"model": j.name, "teacher": j.kind == "given"}))
    for name, folder in (eval_sets or {}).items():
        for k, j in enumerate(evaluated):
            ev = work / f"eval_{name}" / f"{j.name}.json"
            jobs.append(Job(f"eval_{name}_{j.name}", ["eval", str(j.out), *(["--no-baselines"] if k else []),
                                                       "--data", folder, "--json", str(ev)],
                            ev, [j.name], "eval", {"model": j.name, "teacher": j.kind == "given", "set": name}))
    # base models first (the distilled ones are on the critical path), then fine-tunes, then evals
    return sorted(jobs, key=lambda j: ("given", "base", "train", "eval").index(j.kind))


def _check_init(path: Path, widths: tuple[int, ...], arms: tuple[str, ...]) -> list[str]:
    """``--init`` arguments of the students' base models from ``path``, after checking that it is a
    student of the study's one width and of the hardware's M = 3N/2 (UsageError naming the file)."""
    from licforge.models.lic import load_weights

    cfg = load_weights(path)[1]
    if set(widths) != {cfg.N} or cfg.M != cfg.N * 3 // 2 or cfg.gdn != "gdn1" or cfg.arch != "factorized":
        raise UsageError(f"--student-init {path}: a factorized GDN1 student with M = 3N/2 of the study's one width "
                         f"is needed (it is N={cfg.N}, M={cfg.M}, {cfg.arch}, {cfg.gdn}; --widths {' '.join(map(str, widths))}): "
                         f"give --widths {cfg.N} or another file")
    if set(arms) & set(KEEP_M):
        raise UsageError(f"--student-init: the arms {', '.join(sorted(set(arms) & set(KEEP_M)))} keep the teacher's "
                         f"M = {TEACHER['M']}, which {path} (M={cfg.M}) does not have: leave them out")
    return ["--init", str(path)]


def kd_study(results: Path, work: Path, *, base: int, ft: int, batch: int = 8, crop: int = 64,
             device: str = "cpu", workers: int = 2, tag: str = "long", lambdas: tuple[float, ...] = LAMBDAS,
             widths: tuple[int, ...] = WIDTHS, seeds: tuple[int, ...] = (0,), arms: tuple[str, ...] = DEFAULT_ARMS,
             data: str | None = None, teachers: dict[float, Path] | None = None,
             kd_targets: str = "online", eval_sets: dict[str, str] | None = None,
             student_init: Path | None = None, student_lr: float = STUDENT_LR) -> dict[str, Any]:
    """Run :func:`plan_kd` (finished steps are kept) and write ``results/lic_kd_<tag>.json``
    and ``results/rd_kd_<tag>.png``, and per set of ``eval_sets`` the same verdict on it,
    ``lic_kd_<tag>_<set>.json`` (with BD-rates against Pillow JPEG and WebP) and
    ``rd_kd_<tag>_<set>.png``; returns the JSON record."""
    from licforge.models.lic import load_weights

    from licforge.quant.rd import bd_rate, plot_rd

    jobs = plan_kd(work, base, ft, batch=batch, crop=crop, device=device, lambdas=lambdas, widths=widths,
                   seeds=seeds, arms=arms, data=data, teachers=teachers, kd_targets=kd_targets, eval_sets=eval_sets,
                   student_init=student_init, student_lr=student_lr)
    t0 = time.perf_counter()
    run_jobs(jobs, work / "logs", workers)
    elapsed = time.perf_counter() - t0
    evals, curves, per_width, seed_noise = _verdict(jobs, None, widths, seeds, arms)
    small = min(widths)
    note = ("bd_rate_vs_nokd_pct < 0 (bd_psnr_vs_nokd_db > 0): the distilled student beats its twin "
            "without KD (same steps, crops, batch, seed); seed_noise: the student without KD against "
            "itself trained with another seed, the size of a difference that means nothing")
    results.mkdir(parents=True, exist_ok=True)
    title = f"distillation study ({tag}): {base} + {ft} steps, batch {batch} x {crop}^2 crops"

    def shown(c: dict) -> dict:   # other seeds: only the spread of the student without KD
        return {k: v for k, v in c.items() if " seed " not in k or k.startswith(f"N={small} GDN1 seed ")}

    for name, folder in (eval_sets or {}).items():
        _, c, dist, sn = _verdict(jobs, name, widths, seeds, arms)
        pillow = {"jpeg": c["JPEG (Pillow)"], "webp": c["WebP (Pillow)"]}
        models_c = {k: v for k, v in c.items() if not k.endswith("(Pillow)")}
        rec = {"tag": tag, "set": name, "data": folder, "distillation": dist, "seed_noise": sn,
               **{f"bd_rate_vs_{b}_pct": {k: bd_rate(ref, v) for k, v in models_c.items()} for b, ref in pillow.items()},
               "curves": c, "note": f"every model of lic_kd_{tag}.json evaluated on {folder} (licforge eval, "
                                    f"real bitstreams), the same paired verdict; " + note}
        (results / f"lic_kd_{tag}_{name}.json").write_text(json.dumps(rec, indent=1))
        plot_rd(shown(c), results / f"rd_kd_{tag}_{name}.png", f"{title}, held-out {folder}")
    models = {}
    for j in jobs:
        if j.kind in ("train", "base", "given"):
            meta = load_weights(j.out)[2]
            models[j.name] = {**j.info, "steps": meta["steps"], "train_wall_s": meta["wall_s"],
                              "device": meta.get("device")}
            models[j.name].update({"file": str(j.out), "sha256": _sha256(j.out)} if j.kind == "given" else
                                  {"command": "licforge " + shlex.join(j.args)})
            if j.name in evals:
                e = evals[j.name]["entries"][0]
                models[j.name].update(curve=e["curve"], mean=e["mean"])
    plot_rd(shown(curves), results / f"rd_kd_{tag}.png", f"{title}, held-out astronaut, chelsea, coffee")
    device_name = next((m["device"] for m in models.values() if m.get("device")), device)
    out = {"tag": tag, "device": device_name, "workers": workers, "elapsed_s": elapsed,
           "settings": {"base_steps": base, "fine_tune_steps": ft, "batch": batch, "crop": crop,
                        "lambdas": list(lambdas), "teacher": {"N": TEACHER["N"], "M": TEACHER["M"],
                                                              "lr": TEACHER["lr"]},
                        "student_lr": student_lr,
                        **({"student_init": {"file": str(student_init), "sha256": _sha256(student_init)}}
                           if student_init is not None else {}),
                        "arms": {a: ARMS[a] for a in arms}, "seeds": list(seeds),
                        "data": data or "embedded", "teachers": "given" if teachers else "trained"},
           "distillation": per_width, "seed_noise": seed_noise, "models": models,
           **({"eval_sets": dict(eval_sets)} if eval_sets else {}), "note": note}
    (results / f"lic_kd_{tag}.json").write_text(json.dumps(out, indent=1))
    return out


def _verdict(jobs: list[Job], eval_set: str | None, widths: tuple[int, ...], seeds: tuple[int, ...],
             arms: tuple[str, ...]) -> tuple[dict, dict, dict, list]:
    """The evaluations of one held-out set (``eval_set`` None: the study's own), their curves (the
    given teachers' as one curve "teacher"), the paired distillation verdict per width
    (:func:`_distillation`) and the seed noise: BD of the smallest students without KD between seeds."""
    from licforge.quant.rd import bd_psnr, bd_rate, curves_from_results

    mine = [j for j in jobs if j.kind == "eval" and j.info.get("set") == eval_set]
    evals = {j.info["model"]: json.loads(j.out.read_text()) for j in mine}
    for j in mine:
        if j.info["teacher"]:
            for e in evals[j.info["model"]]["entries"]:
                if e.get("kind") != "baseline":    # not the Pillow JPEG/WebP entries
                    e["curve"] = "teacher"
    curves = curves_from_results(list(evals.values()))
    small = min(widths)
    plain = sorted(j.info["seed"] for j in jobs if j.kind == "base" and j.info.get("role") == "student"
                   and j.info["N"] == small and j.info["arm"] == "nokd")
    noise = [{"pair": [_curve(small, "nokd", a), _curve(small, "nokd", b)],
              "bd_rate_pct": bd_rate(curves[_curve(small, "nokd", a)], curves[_curve(small, "nokd", b)]),
              "bd_psnr_db": bd_psnr(curves[_curve(small, "nokd", a)], curves[_curve(small, "nokd", b)])}
             for k, a in enumerate(plain) for b in plain[k + 1:]]
    return evals, curves, {f"N={n}": _distillation(curves, n, list(seeds), arms) for n in widths}, noise


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _distillation(curves: dict[str, list[tuple[float, float]]], n: int, seeds: list[int],
                  arms: tuple[str, ...]) -> dict[str, Any]:
    """BD-rate / BD-PSNR of width ``n``'s students vs the teacher and of each arm vs its twin of the
    same seed (``TWIN``, named in ``twin``; the keys say ``nokd``: for a KD arm the twin is the
    student without KD of its M); with several seeds, per seed, their mean and their spread (min,
    max, sample standard deviation)."""
    from licforge.quant.rd import bd_psnr, bd_rate

    def mean(v: list[float | None]) -> float | None:
        return None if not v or any(x is None for x in v) else sum(v) / len(v)

    teacher = curves["teacher"]
    out: dict[str, Any] = {}
    for arm in arms:
        per = {}
        for s in seeds:
            c = curves[_curve(n, arm, s)]
            per[s] = {"bd_rate_vs_teacher_pct": bd_rate(teacher, c), "bd_psnr_vs_teacher_db": bd_psnr(teacher, c)}
            if arm in TWIN:
                ref = curves[_curve(n, TWIN[arm], s)]
                per[s].update(bd_rate_vs_nokd_pct=bd_rate(ref, c), bd_psnr_vs_nokd_db=bd_psnr(ref, c))
        rec = {k: mean([p[k] for p in per.values()]) for k in per[seeds[0]]}
        if len(seeds) > 1:
            rec["seeds"] = {str(s): p for s, p in per.items()}
            vals = {k: [p[k] for p in per.values()] for k in per[seeds[0]]}
            rec["spread"] = {k: {"min": min(v), "max": max(v), "sd": statistics.stdev(v)}
                             for k, v in vals.items() if None not in v}
        out[arm] = {**rec, "twin": TWIN[arm]} if arm in TWIN else rec
    return out
