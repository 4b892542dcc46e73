"""``licforge bench lic``: the rate-distortion study of the LIC slice, end to end.

Every step is a documented ``licforge`` command, run as a subprocess (niceness 10, one torch
thread each, ``WORKERS`` at a time, in dependency order):

* teacher: N=128, M=192, CompressAI GDN, lr 5e-4; students N = 16, 32, 64 with simplified
  GDN (GDN1), with distillation (``--kd-recon 1``) and without (``--kd-recon 0``): same
  steps, crops and seeds; a float-GDN student at the smallest width (the cost of GDN1);
* each configuration is trained from scratch at ``BASE_LAMBDA`` ("base" steps), then
  fine-tuned to each lambda ("ft" steps, ``--init``): every RD point has the same training
  budget, so a curve shows the effect of lambda, not of training length;
* QAT (recipe hybrid8) of every distilled student; PTQ (hybrid8) and QAT (int8: 8-bit GDN
  norms) of the smallest distilled student: the cost of fixed point and of the GDN norm width;
  since QAT trains 400 more steps, each distilled student is also trained 400 more steps in
  float with the same loss, crops and learning rate (the "float +400 steps" control);
* distillation screening (``KD_SCREEN``, N=16): loss variants (image/teacher mix at a constant
  distortion weight, KD in one stage only) and the student without KD with other seeds, each
  paired with the student without KD of its seed; reported as ``kd_screening`` (``KD_ARMS``: the
  paired deltas over seeds next to the seed-to-seed spread of the student without KD);
* ``licforge eval`` of each model on the held-out images (real files), JPEG/WebP baselines,
  ``licforge plot rd`` (BD-rate vs the teacher), then ``lic.json`` with the numbers the
  README reports.

Finished steps are skipped when re-run (a step reruns when its command changed or a step it
depends on reran), so an interrupted benchmark continues where it stopped.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from licforge.errors import CheckFailed

__all__ = ["bench_lic", "plan", "plan_star", "run_jobs", "kd_args", "Job", "LAMBDAS", "TEACHER", "MIX50"]

LAMBDAS = (0.0009, 0.0018, 0.0035, 0.0067, 0.013, 0.025)
BASE_LAMBDA = 0.013  # every model: BASE steps at this lambda, then FT steps at each lambda
TEACHER = {"N": 128, "M": 192, "lr": 5e-4, "base": 5000, "ft": 1000}
STUDENT = {"widths": (16, 32, 64), "lr": 1e-3, "base": 2000, "ft": 800, "kd": 1.0}


def _lam(l: float) -> str:
    return f"{l:.4f}"


KD_SCREEN_LAMBDAS = (0.0018, 0.0067, 0.025)  # three points: enough to rank variants, half the cost
MIX50 = {"kd_recon": 0.5, "kd_latent": 0.0, "dist_weight": 0.5}
"""Distillation weights of the "mix50" loss: half image, half teacher reconstruction, same total distortion weight."""
_LATENT = {"kd_recon": 0.0, "kd_latent": 0.1, "dist_weight": 1.0}
PRIM = {"kd_recon": 0.0, "kd_latent": 0.3333, "dist_weight": 1.0}
"""The KD seed's weights 0.2 latent / 0.2 reconstruction / 0.6 rate-distortion, over 0.6 (see bench.kd_study)."""
KD_SCREEN: tuple[dict[str, Any], ...] = (
    # name; distillation weights of the base and fine-tune stages (None: plain RD loss); teacher
    # ("same": the teacher of each stage's lambda); seed; base_of: reuse the base model of "plain"
    # (the student without KD, seed 0) or of another variant; ref: the student without KD that the
    # variant is paired with (same seed: same initialisation and crops), "plain" or a variant.
    # The student without KD with other seeds: the seed-to-seed spread a KD gain must exceed.
    {"name": "plain-seed1", "base": None, "ft": None, "seed": 1},
    {"name": "plain-seed2", "base": None, "ft": None, "seed": 2},
    {"name": "mix50", "base": MIX50, "ft": MIX50, "lambdas": LAMBDAS},
    {"name": "mix50-base", "base": MIX50, "ft": None, "base_of": "mix50"},
    {"name": "mix50-ft", "base": None, "ft": MIX50, "base_of": "plain"},
    {"name": "mix50-ft-seed1", "base": None, "ft": MIX50, "base_of": "plain-seed1", "seed": 1, "ref": "plain-seed1"},
    {"name": "mix50-ft-seed2", "base": None, "ft": MIX50, "base_of": "plain-seed2", "seed": 2, "ref": "plain-seed2"},
    {"name": "mix50-seed1", "base": MIX50, "ft": MIX50, "seed": 1, "ref": "plain-seed1"},
    {"name": "mix50-seed2", "base": MIX50, "ft": MIX50, "seed": 2, "ref": "plain-seed2"},
    {"name": "latent0.1-seed2", "base": _LATENT, "ft": _LATENT, "seed": 2, "ref": "plain-seed2"},
    {"name": "latent0.1", "base": _LATENT, "ft": _LATENT},
    {"name": "latent0.1-seed1", "base": _LATENT, "ft": _LATENT, "seed": 1, "ref": "plain-seed1"},
    {"name": "mix50-base-seed1", "base": MIX50, "ft": None, "base_of": "mix50-seed1", "seed": 1, "ref": "plain-seed1"},
    {"name": "mix50-base-seed2", "base": MIX50, "ft": None, "base_of": "mix50-seed2", "seed": 2, "ref": "plain-seed2"},
)
KD_SCREEN = tuple({"widths": (16,), "lambdas": KD_SCREEN_LAMBDAS, "teacher": "same", "seed": 0, "base_of": None,
                   "ref": "plain", **v} for v in KD_SCREEN)


KD_ARMS: dict[str, tuple[tuple[str, str], ...]] = {  # (test, paired reference) per seed
    "recon1 (bench KD: kd_recon 1, dist_weight 1)": (("recon1", "plain"),),
    "latent0.1": (("latent0.1", "plain"), ("latent0.1-seed1", "plain-seed1"), ("latent0.1-seed2", "plain-seed2")),
    "mix50": (("mix50", "plain"), ("mix50-seed1", "plain-seed1"), ("mix50-seed2", "plain-seed2")),
    "mix50-base": (("mix50-base", "plain"), ("mix50-base-seed1", "plain-seed1"), ("mix50-base-seed2", "plain-seed2")),
    "mix50-ft": (("mix50-ft", "plain"), ("mix50-ft-seed1", "plain-seed1"), ("mix50-ft-seed2", "plain-seed2")),
    "plain: seed 1, 2 vs seed 0 (no KD)": (("plain-seed1", "plain"), ("plain-seed2", "plain")),
}


def _screen_curve(n: int, name: str) -> str:
    return f"N={n} GDN1 + KD screen {name}"


def _small() -> int:
    """The smallest student width: float-GDN twin, PTQ and int8 variants are trained at it."""
    return min(STUDENT["widths"])


def _quant_variants() -> list[tuple[int, str, str]]:
    return [(n, "hybrid8", "qat") for n in STUDENT["widths"]] + [(_small(), "hybrid8", "ptq"), (_small(), "int8", "qat")]
QAT = {"steps": 400, "lr": 1e-4}
WORKERS = 2
WORK = Path("build/lic/bench")


@dataclass
class Job:
    """One licforge command; ``out`` is its main output, ``deps`` the jobs it needs.  A job of kind
    ``"given"`` has no command: its output is a file the user supplied (a teacher trained elsewhere)."""
    name: str
    args: list[str]
    out: Path
    deps: list[str] = field(default_factory=list)
    kind: str = "train"
    info: dict[str, Any] = field(default_factory=dict)


def kd_args(kd: dict[str, float] | None) -> list[str]:
    """``distill`` flags of one stage's distillation weights (``None``: no distillation)."""
    if not kd:
        return ["--kd-recon", "0"]
    return ["--kd-recon", str(kd["kd_recon"]), "--kd-latent", str(kd["kd_latent"]),
            "--dist-weight", str(kd["dist_weight"])]


def plan_star(jobs: list[Job], work: Path, prefix: str, stage_args: dict[str, list[str]], curve: str, info: dict,
              cfg: dict, teachers: dict[str, str | None] | None = None, lambdas: tuple[float, ...] = LAMBDAS,
              base: Job | None = None) -> Job:
    """Append a base model at BASE_LAMBDA (unless ``base``, an already planned one, is given) and one
    model fine-tuned from it per lambda (same budget each) to ``jobs``; returns the base job.

    ``stage_args``/``teachers`` give each stage ("base", "ft") its flags and teacher: "same" (the
    teacher of the stage's lambda: ``teacher_base`` for the base stage), a lambda string (that
    lambda's teacher at every point) or None (no teacher)."""
    teachers = teachers or {"base": None, "ft": None}

    def job(name: str, lam: float, steps: int, init: Job | None) -> Job:
        stage = "ft" if init else "base"
        out = work / f"{name}.pt"
        args = stage_args[stage] + ["--lmbda", str(lam), "--steps", str(steps), "--lr", str(cfg["lr"]),
                                    "--curve", curve if init else f"{curve} (base)", "--out", str(out)]
        deps = []
        if init is not None:
            args += ["--init", str(init.out)]
            deps.append(init.name)
        t = teachers[stage]
        if t is not None:
            t = ("teacher_base" if init is None else f"teacher_l{_lam(lam)}") if t == "same" else f"teacher_l{t}"
            args += ["--teacher", str(next((j.out for j in jobs if j.name == t), work / f"{t}.pt"))]
            deps.append(t)
        return Job(name, args, out, deps, "train" if init is not None else "base", {**info, "lmbda": lam})

    if base is None:
        base = job(f"{prefix}_base", BASE_LAMBDA, cfg["base"], None)
        jobs.append(base)
    for lam in lambdas:
        jobs.append(job(f"{prefix}_l{_lam(lam)}", lam, cfg["ft"], base))
    return base


def plan(work: Path = WORK) -> list[Job]:
    """The benchmark's jobs, in a valid order."""
    jobs: list[Job] = []
    teacher_args = ["train", "--N", str(TEACHER["N"]), "--M", str(TEACHER["M"]), "--gdn", "gdn"]
    plan_star(jobs, work, "teacher", {"base": teacher_args, "ft": teacher_args}, "teacher",
              {"role": "teacher", "N": TEACHER["N"], "M": TEACHER["M"], "gdn": "gdn"}, TEACHER)
    bases: dict[tuple[int, str], Job] = {}  # (width, "plain" or a screening variant) -> base model job
    for n in STUDENT["widths"]:
        for kd in (True, False):
            args = ["distill", "--N", str(n), "--gdn", "gdn1", "--kd-recon", str(STUDENT["kd"] if kd else 0)]
            b = plan_star(jobs, work, f"s{n}_{'kd' if kd else 'nokd'}", {"base": args, "ft": args},
                          f"N={n} GDN1{' + KD' if kd else ''}", {"role": "student", "N": n, "gdn": "gdn1", "kd": kd},
                          STUDENT, {"base": "same", "ft": "same"} if kd else None)
            if not kd:
                bases[n, "plain"] = b
    for v in KD_SCREEN:  # distillation variants, each against the plain student (same steps, crops, seed)
        for n in v["widths"]:
            head = ["distill", "--N", str(n), "--gdn", "gdn1"] + (["--seed", str(v["seed"])] if v["seed"] else [])
            bases[n, v["name"]] = plan_star(
                jobs, work, f"s{n}_kdv_{v['name']}", {s: head + kd_args(v[s]) for s in ("base", "ft")},
                _screen_curve(n, v["name"]), {"role": "kd-screen", "N": n, "variant": v["name"]}, STUDENT,
                {s: v["teacher"] if v[s] else None for s in ("base", "ft")}, v["lambdas"],
                base=bases[n, v["base_of"]] if v["base_of"] else None)
    for n in (_small(),):
        args = ["distill", "--N", str(n), "--gdn", "gdn", "--kd-recon", "0"]
        plan_star(jobs, work, f"s{n}_gdnfloat", {"base": args, "ft": args}, f"N={n} GDN (float)",
                  {"role": "gdn-float", "N": n, "gdn": "gdn", "kd": False}, STUDENT)
    for n, recipe, mode in _quant_variants():
        for lam in LAMBDAS:
            src = f"s{n}_kd_l{_lam(lam)}"
            name = f"q{n}_kd_{recipe}_{mode}_l{_lam(lam)}"
            args = ["quantize", str(work / f"{src}.pt"), "--recipe", recipe, "--lmbda", str(lam),
                    "--curve", f"N={n} GDN1 + KD, {recipe} {mode.upper()}", "--out", str(work / name)]
            args += ["--ptq"] if mode == "ptq" else ["--steps", str(QAT["steps"]), "--lr", str(QAT["lr"])]
            jobs.append(Job(name, args, work / name, [src], "quantize",
                            {"role": "quantized", "N": n, "recipe": recipe, "mode": mode, "source": src, "lmbda": lam}))
    for n in STUDENT["widths"]:  # float control of QAT: the same extra steps without quantization
        for lam in LAMBDAS:
            src = f"s{n}_kd_l{_lam(lam)}"
            name = f"c{n}_kd_l{_lam(lam)}"
            out = work / f"{name}.pt"
            args = ["distill", "--N", str(n), "--gdn", "gdn1", "--kd-recon", "0", "--init", str(work / f"{src}.pt"),
                    "--lmbda", str(lam), "--steps", str(QAT["steps"]), "--lr", str(QAT["lr"]),
                    "--curve", _control_curve(n), "--out", str(out)]
            jobs.append(Job(name, args, out, [src], "train",
                            {"role": "float-control", "N": n, "source": src, "lmbda": lam}))
    for j in [j for j in jobs if j.kind in ("train", "quantize")]:
        ev = work / "eval" / f"{j.name}.json"
        jobs.append(Job(f"eval_{j.name}", ["eval", str(j.out), "--no-baselines", "--json", str(ev)], ev, [j.name],
                        "eval", {"model": j.name}))
    jobs.append(Job("eval_baselines", ["eval", "--json", str(work / "eval" / "baselines.json")],
                    work / "eval" / "baselines.json", [], "eval", {}))
    return jobs


def _control_curve(n: int) -> str:
    return f"N={n} GDN1 + KD, float +{QAT['steps']} steps"


def _stamp(job: Job, what: str = "cmd") -> Path:
    """``<out>.cmd.json``: the arguments of the run that finished ``job``; ``what="start"``: of the
    last run started."""
    out = job.out
    return out.with_name(f"{out.name}.{what}.json")


def _done(job: Job) -> bool:
    st = _stamp(job)
    return job.out.exists() and st.is_file() and json.loads(st.read_text()).get("args") == job.args


def _resumable(job: Job, rerun: set[str]) -> bool:
    """``job`` is a training run (``train``/``distill``) that was started with the same arguments
    and inputs, interrupted, and left its training state: it continues from there (``--resume``)."""
    from licforge.quant.train import state_path_for

    st = _stamp(job, "start")
    return (job.args[:1] in (["train"], ["distill"]) and state_path_for(job.out).is_file() and st.is_file()
            and json.loads(st.read_text()).get("args") == job.args and not any(d in rerun for d in job.deps))


def run_jobs(jobs: list[Job], logs: Path, workers: int) -> dict[str, float]:
    """Run the jobs (skipping finished ones; an interrupted training run of the same arguments
    resumes from its state file) with up to ``workers`` at a time; returns the wall time of each
    job that ran."""
    by_name = {j.name: j for j in jobs}
    rerun: set[str] = set()
    pending = [j for j in jobs]
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    finished: set[str] = set()
    walls: dict[str, float] = {}
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    while pending or running:
        for name, (proc, start) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            job = by_name[name]
            if proc.returncode != 0:
                raise CheckFailed(f"bench lic: step {name} failed (exit {proc.returncode}); see {logs / name}.log")
            _stamp(job).write_text(json.dumps({"args": job.args}))
            walls[name] = time.perf_counter() - start
            finished.add(name)
            print(f"[{time.perf_counter() - t0:7.0f} s] done  {name} ({walls[name]:.0f} s)", flush=True)
        for job in list(pending):
            if len(running) >= workers:
                break
            if any(d not in finished for d in job.deps):
                continue
            pending.remove(job)
            if job.kind == "given":
                if not job.out.is_file():
                    raise FileNotFoundError(f"bench: {job.name}: no weight file {job.out}")
                finished.add(job.name)
                continue
            if _done(job) and not any(d in rerun for d in job.deps):
                finished.add(job.name)
                continue
            resume = _resumable(job, rerun)
            rerun.add(job.name)
            job.out.parent.mkdir(parents=True, exist_ok=True)
            _stamp(job, "start").write_text(json.dumps({"args": job.args}))
            cmd = ["nice", "-n", str(max(0, 10 - os.nice(0))), sys.executable, "-m", "licforge.flows.cli", *job.args,
                   *(["--resume"] if resume else [])]
            log = open(logs / f"{job.name}.log", "a" if resume else "w")
            running[job.name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env),
                                 time.perf_counter())
            print(f"[{time.perf_counter() - t0:7.0f} s] {'resume' if resume else 'start'} {job.name}: "
                  f"licforge {shlex.join(job.args)}", flush=True)
        time.sleep(0.5)
    return walls


def bench_lic(results: Path, work: Path = WORK, workers: int = WORKERS) -> dict[str, Any]:
    """Run the study and write ``results/lic.json``, ``results/rd.png``, ``results/rd_gdn.png``."""
    from licforge.models.lic import LICConfig, build_lic, load_weights, student_config, synthesis_cost

    from licforge.quant.rd import bd_psnr, bd_rate, curves_from_results, plot_rd, rd_report

    jobs = plan(work)
    run_jobs(jobs, work / "logs", workers)
    evals = {j.info["model"]: json.loads(j.out.read_text()) for j in jobs if j.kind == "eval" and j.info}
    baselines = json.loads((work / "eval" / "baselines.json").read_text())
    curves = curves_from_results(list(evals.values()) + [baselines])
    main = {k: v for k, v in curves.items()
            if not any(w in k for w in ("GDN (float)", "int8", "PTQ", "float +", " screen "))}
    small = f"N={_small()}"
    gdn = {k: v for k, v in curves.items() if k.startswith(f"{small} ") and " screen " not in k}
    results.mkdir(parents=True, exist_ok=True)
    plot_rd(main, results / "rd.png", "held-out astronaut, chelsea, coffee; learned codecs trained on the "
            "embedded default (scikit-image)")
    plot_rd(gdn, results / "rd_gdn.png", "GDN variants: float GDN, simplified GDN1, fixed-point GDN1")
    report = rd_report(curves, "teacher")

    def br(a: str, b: str) -> float | None:
        return bd_rate(curves[a], curves[b]) if a in curves and b in curves else None

    def bp(a: str, b: str) -> float | None:
        return bd_psnr(curves[a], curves[b]) if a in curves and b in curves else None

    widths = STUDENT["widths"]
    kd = {f"N={n}": {"bd_rate_vs_teacher_kd_pct": br("teacher", f"N={n} GDN1 + KD"),
                     "bd_rate_vs_teacher_nokd_pct": br("teacher", f"N={n} GDN1"),
                     "bd_rate_kd_vs_nokd_pct": br(f"N={n} GDN1", f"N={n} GDN1 + KD")} for n in widths}
    for v in kd.values():
        a, b = v["bd_rate_vs_teacher_kd_pct"], v["bd_rate_vs_teacher_nokd_pct"]
        v["kd_delta_pct_points"] = None if a is None or b is None else a - b
    quant = {}
    for n, recipe, mode in _quant_variants():
        label = f"N={n} GDN1 + KD, {recipe} {mode.upper()}"
        quant[label] = {"bd_psnr_vs_float_db": bp(f"N={n} GDN1 + KD", label),
                        "bd_rate_vs_float_pct": br(f"N={n} GDN1 + KD", label),
                        "per_lambda_psnr_loss_db": _per_lambda_loss(evals, n, recipe, mode)}
        if mode == "qat":  # QAT trains QAT["steps"] more steps: compare with the float model trained as long
            quant[label].update(bd_psnr_vs_float_same_steps_db=bp(_control_curve(n), label),
                                bd_rate_vs_float_same_steps_pct=br(_control_curve(n), label))
    gdn_cost = {small: {
        "gdn1_vs_gdn_float_bd_rate_pct": br(f"{small} GDN (float)", f"{small} GDN1"),
        "gdn1_vs_gdn_float_bd_psnr_db": bp(f"{small} GDN (float)", f"{small} GDN1"),
        "fixed_point_gdn1_hybrid8_vs_gdn_float_bd_rate_pct": br(f"{small} GDN (float)", f"{small} GDN1 + KD, hybrid8 QAT"),
        "fixed_point_gdn1_int8_vs_gdn_float_bd_rate_pct": br(f"{small} GDN (float)", f"{small} GDN1 + KD, int8 QAT"),
        "fixed_point_int8_vs_hybrid8_bd_rate_pct": br(f"{small} GDN1 + KD, hybrid8 QAT", f"{small} GDN1 + KD, int8 QAT"),
        "note": "the quantized curves start from distilled students; 'quantized_vs_float' isolates the cost of "
                "fixed point against the same distilled float student"}}
    cost = {}
    for name, cfg in [("teacher", LICConfig("factorized", TEACHER["N"], TEACHER["M"], "gdn"))] + \
            [(f"N={n} GDN1", student_config(n)) for n in widths]:
        cost[name] = {"N": cfg.N, "M": cfg.M, **synthesis_cost(build_lic(cfg), cfg.M)}
    models = {}
    for j in jobs:
        if j.kind not in ("train", "quantize"):
            continue
        e = evals[j.name]["entries"][0]
        rec = {**j.info, "curve": e["curve"], "mean": e["mean"], "command": "licforge " + shlex.join(j.args)}
        if j.kind == "train":
            meta = load_weights(j.out)[2]
            rec.update(steps=meta["steps"], train_wall_s=meta["wall_s"])
        else:
            rec.update(brevitas_equal_golden=e["brevitas_equal_golden"], bundle_hash=e["bundle_hash"],
                       quantize_wall_s=_quant_wall(j.out))
        models[j.name] = rec
    wall = {}
    for j in jobs:
        if j.kind == "base":
            own = [f for f in jobs if f.kind == "train" and f.name.startswith(j.name.removesuffix("base") + "l")]
            fts = [load_weights(f.out)[2]["wall_s"] for f in own]
            base_s = load_weights(j.out)[2]["wall_s"]
            wall[j.name.removesuffix("_base")] = {
                "base_steps": load_weights(j.out)[2]["steps"], "base_s": base_s,
                "fine_tune_steps": models[own[0].name]["steps"],
                "fine_tune_s_mean": sum(fts) / len(fts), "one_model_s": base_s + sum(fts) / len(fts)}
    out = {"machine": f"{os.cpu_count()} CPU cores shared with other jobs; 1 torch thread per job, "
                      f"{workers} jobs at a time, nice 10",
           "data": "embedded default: scikit-image colour photographs (models/data.py)",
           "held_out": list(baselines["images"]), "lambdas": list(LAMBDAS),
           "settings": {"teacher": TEACHER, "student": {**STUDENT, "widths": list(widths)}, "qat": QAT,
                        "base_lambda": BASE_LAMBDA, "crop": 64, "batch": 8, "seed": 0},
           "bd_rate_vs_teacher": report, "distillation": kd, "kd_screening": _kd_screening(evals, curves["teacher"]),
           "quantized_vs_float": quant, "gdn_variants": gdn_cost,
           "synthesis_cost": cost, "training_wall_s": wall, "models": models,
           "baselines": [{"curve": e["curve"], "quality": e["quality"], "mean": e["mean"]}
                         for e in baselines["entries"]]}
    (results / "lic.json").write_text(json.dumps(out, indent=1))
    return out


def _points(evals: dict, names: list[str]) -> list[tuple[float, float]]:
    """Sorted (bpp, PSNR) of the evaluated models ``names``."""
    return sorted((m["bpp"], m["psnr"]) for m in (evals[k]["entries"][0]["mean"] for k in names))


def _prefix(n: int, name: str) -> str:
    """Job prefix of a :data:`KD_SCREEN` variant, "plain" (the student without KD) or "recon1"
    (the bench's distilled student)."""
    return {"plain": f"s{n}_nokd", "recon1": f"s{n}_kd"}.get(name, f"s{n}_kdv_{name}")


def _kd_screening(evals: dict, teacher: list[tuple[float, float]]) -> dict[str, Any]:
    """BD-rate of each :data:`KD_SCREEN` variant against the teacher and against the student
    without distillation of the same seed at the same lambdas (same base/fine-tune steps, crops,
    initialisation); per arm of :data:`KD_ARMS`, the paired deltas over seeds at
    :data:`KD_SCREEN_LAMBDAS`."""
    from licforge.quant.rd import bd_rate

    def pts(name: str, n: int, lambdas: tuple[float, ...]) -> list[tuple[float, float]]:
        return _points(evals, [f"{_prefix(n, name)}_l{_lam(lam)}" for lam in lambdas])

    variants = {}
    for v in KD_SCREEN:
        for n in v["widths"]:
            test, ref = pts(v["name"], n, v["lambdas"]), pts(v["ref"], n, v["lambdas"])
            kd, nokd = bd_rate(teacher, test), bd_rate(teacher, ref)
            variants[f"N={n} {v['name']}"] = {
                "N": n, "lambdas": list(v["lambdas"]), "base_stage": v["base"], "fine_tune_stage": v["ft"],
                "teacher": v["teacher"], "base_of": v["base_of"], "seed": v["seed"], "paired_with": v["ref"],
                "bd_rate_vs_teacher_kd_pct": kd, "bd_rate_vs_teacher_nokd_pct": nokd,
                "kd_delta_pct_points": None if kd is None or nokd is None else kd - nokd,
                "bd_rate_kd_vs_nokd_pct": bd_rate(ref, test), "points": [list(p) for p in test]}
    arms, n = {}, _small()
    for arm, pairs in KD_ARMS.items():
        d = [bd_rate(pts(ref, n, KD_SCREEN_LAMBDAS), pts(test, n, KD_SCREEN_LAMBDAS)) for test, ref in pairs]
        arms[f"N={n} {arm}"] = {"pairs": [list(p) for p in pairs], "bd_rate_pct": d,
                                "mean_pct": sum(d) / len(d), "min_pct": min(d), "max_pct": max(d)}
    return {"note": "distillation screening at N=16: each variant against the student without KD of the same "
                    "seed (same initialisation, crops, steps); bd_rate_kd_vs_nokd_pct < 0: distillation saves "
                    "bits. 'arms' repeat a variant over seeds at lambdas " + ", ".join(map(str, KD_SCREEN_LAMBDAS)) +
                    "; the 'plain' arm is the student without KD against itself with another seed (the noise "
                    "a gain must exceed)",
            "variants": variants, "arms": arms}


def _quant_wall(bundle_dir: Path) -> float:
    from licforge.models.lic import read_checkpoint

    from licforge.quant.train import quant_model_path

    return float(read_checkpoint(quant_model_path(bundle_dir), "licforge-lic-quant/1")["meta"]["wall_s"])


def _per_lambda_loss(evals: dict, n: int, recipe: str, mode: str) -> dict[str, Any]:
    """PSNR of the quantized model minus its float source at each lambda, with the bpp of both."""
    out = {}
    for lam in LAMBDAS:
        q = evals.get(f"q{n}_kd_{recipe}_{mode}_l{_lam(lam)}")
        f = evals.get(f"s{n}_kd_l{_lam(lam)}")
        c = evals.get(f"c{n}_kd_l{_lam(lam)}")
        if q and f:
            qm, fm = q["entries"][0]["mean"], f["entries"][0]["mean"]
            out[_lam(lam)] = {"psnr_delta_db": qm["psnr"] - fm["psnr"], "bpp_float": fm["bpp"], "bpp_quant": qm["bpp"]}
            if c and mode == "qat":
                cm = c["entries"][0]["mean"]
                out[_lam(lam)].update(psnr_delta_vs_same_steps_db=qm["psnr"] - cm["psnr"], bpp_float_same_steps=cm["bpp"])
    return out
