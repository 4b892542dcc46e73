"""Flows of the LIC slice: train a teacher or student, distill, quantize (PTQ / QAT) to a bundle.

Each flow writes its result next to a resumable training state (``<out>.state.pt``) and
records in the weight file's ``meta`` what produced it (curve label, lambda, settings,
training wall time), which ``licforge eval`` and ``plot rd`` read back.
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

from licforge.errors import UsageError
from licforge.models.data import CropSampler, load_split
from licforge.models.lic import LICConfig, build_lic, keep_multipliers, load_weights, save_weights, to_min_student
from licforge.models.lic_train import TrainConfig, teacher_reconstructions, train_lic

__all__ = ["train_model", "quantize_model", "state_path_for", "quant_model_path", "file_sha256"]


def state_path_for(out: Path) -> Path:
    """The resumable training state beside a weight file: ``x.pt`` -> ``x.state.pt``."""
    return out.with_name(out.stem + ".state.pt")


def quant_model_path(bundle_dir: Path) -> Path:
    """The Brevitas model saved beside a bundle directory ``d/``: ``d.quant.pt``."""
    bundle_dir = Path(bundle_dir)
    return bundle_dir.with_name(bundle_dir.name + ".quant.pt")


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _device_name(device: str) -> str:
    d = torch.device(device)
    return f"{d}: {torch.cuda.get_device_name(d)}" if d.type == "cuda" else "cpu"


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _teacher_targets(teacher: torch.nn.Module, teacher_sha: str, images: dict, cache: Path,
                     log: Callable[[str], None] | None, device: str = "cpu") -> list[torch.Tensor]:
    """:func:`models.lic_train.teacher_reconstructions` of ``images``, cached in ``cache``
    (``<teacher sha256>-<images sha256>.pt``, 16 hex digits each): the distillations of a
    study that share a teacher and a data set compute them once."""
    h = hashlib.sha256()
    for name, im in images.items():
        h.update(name.encode() + str(im.shape).encode() + im.tobytes())
    path = Path(cache) / f"{teacher_sha[:16]}-{h.hexdigest()[:16]}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    t0 = time.perf_counter()
    targets = teacher_reconstructions(teacher, images, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(targets, tmp)
    tmp.replace(path)
    if log is not None:
        log(f"teacher reconstructions of {len(images)} training images: {time.perf_counter() - t0:.0f} s "
            f"(cached in {path})")
    return targets


def train_model(cfg: LICConfig, tcfg: TrainConfig, out: Path, *, data: str | None = None,
                teacher: Path | None = None, init: Path | None = None, resume: bool = False,
                curve: str | None = None, half: bool = False, device: str = "cpu",
                log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Train ``cfg`` with ``tcfg`` on ``device`` (distilling from the ``teacher`` weight file when its
    weights are non-zero), starting from the weights of ``init`` (same architecture; e.g. the
    model of a neighbouring lambda) or from a seeded random initialisation; writes the
    weights to ``out`` and returns their meta record.  The training images are held on ``device``.
    Inside :func:`models.lic_train.distributed` (a torchrun launch) every process trains its share
    of each batch and rank 0 alone writes ``out`` and the state file."""
    out = Path(out)
    torch.manual_seed(tcfg.seed)  # model initialisation
    net = build_lic(cfg)
    init_meta = None
    # the training images live on the training device; the crops are cut there (no per-step copy)
    images = load_split(data, "train")
    sampler = CropSampler(images, tcfg.crop, tcfg.batch, tcfg.seed, device=device)
    if init is not None:
        init_cfg = load_weights(init)[1]
        convert = cfg.product == "min" and (init_cfg.product == "mul" or init_cfg.mul_layers != cfg.mul_layers)
        calib = CropSampler(images, tcfg.crop, 4 * tcfg.batch, tcfg.seed + 1)() if convert else None
        if convert and init_cfg.product == "mul":  # MinConv twin of a multiplier student
            twin_of = LICConfig(cfg.arch, cfg.N, cfg.M, cfg.gdn)
            net.load_state_dict(to_min_student(load_weights(init, expect=twin_of)[0], twin_of, calib,
                                               cfg.mul_layers)[0].state_dict())
        elif convert:  # MinConv layers made multipliers
            if not set(init_cfg.mul_layers) <= set(cfg.mul_layers):
                raise UsageError(f"{init}: its multiplier layers {', '.join(init_cfg.mul_layers)} cannot become "
                                 f"MinConv layers again; start from the multiplier student")
            src = replace(cfg, gdn_out=init_cfg.gdn_out, mul_layers=init_cfg.mul_layers)
            net.load_state_dict(keep_multipliers(load_weights(init, expect=src)[0], src, cfg.mul_layers,
                                                 calib)[0].state_dict())
        else:  # the same parameters whatever the GDN output's form (the ablations start from the deployed one)
            same = replace(cfg, gdn_out=init_cfg.gdn_out) if cfg.product == "min" else cfg
            net.load_state_dict(load_weights(init, expect=same)[0].state_dict())
        init_meta = {"file": str(init), "sha256": file_sha256(init)}
    tnet = tcfg_m = None
    teacher_meta = None
    if tcfg.kd_recon > 0 or tcfg.kd_latent > 0:
        if teacher is None:
            raise ValueError("distillation weights are non-zero but no --teacher was given")
        tnet, tcfg_t, _ = load_weights(teacher)
        tcfg_m = tcfg_t.M
        teacher_meta = {"file": str(teacher), "sha256": file_sha256(teacher), "config": tcfg_t.to_dict()}
    if tnet is not None and tcfg.kd_targets == "precomputed" and tcfg.kd_recon > 0:
        sampler.attach_targets(_teacher_targets(tnet, teacher_meta["sha256"], images, out.parent / "kd-targets",
                                                log if _rank_world()[0] == 0 else None, device))
    arch = {**cfg.to_dict(), "data": data or "embedded", "teacher": teacher_meta and teacher_meta["sha256"],
            "init": init_meta and init_meta["sha256"]}
    record = train_lic(net, sampler, tcfg, arch=arch, teacher=tnet, teacher_m=tcfg_m,
                       state_path=state_path_for(out), resume=resume, desc=curve or cfg.name, log=log,
                       device=device)
    rank, world = _rank_world()
    meta = {"curve": curve or cfg.name, "lmbda": tcfg.lmbda, "train": tcfg.to_dict(),
            "data": data or "embedded", "teacher": teacher_meta, "init": init_meta, "wall_s": record["wall_s"],
            "steps": record["steps"], "final": record["history"][-1] if record["history"] else {},
            "threads": torch.get_num_threads(), "device": _device_name(device), "processes": world,
            "saved": time.strftime("%Y-%m-%d %H:%M:%S")}
    if rank == 0:  # distributed training: every process holds the same weights, rank 0 writes them
        save_weights(net, cfg, out, meta, half=half)
    return meta


def quantize_model(weights: Path, recipe_name: str, out_dir: Path, *, qat: TrainConfig | None,
                   data: str | None = None, resume: bool = False, curve: str | None = None,
                   extra_loss: Callable | None = None, after_step: Callable | None = None,
                   log: Callable[[str], None] | None = print, parent: Path | None = None) -> dict[str, Any]:
    """PTQ (``qat=None``) or QAT of a float student; writes the bundle to ``out_dir`` and the
    Brevitas model to :func:`quant_model_path` ``(out_dir)``; returns the bundle's meta.
    ``parent``: the bundle this student descends from (e.g. the multiplier twin of a MinConv
    student), named with its hash in the new bundle's metadata."""
    from licforge.quant.bundle import read_bundle, write_bundle
    from licforge.quant.codec import prepare_entropy_coder
    from licforge.quant.lic import export_bundle, quantize_student, save_quantized
    from licforge.quant.lic_recipe import load_recipe

    out_dir = Path(out_dir)
    net, cfg, fmeta = load_weights(weights)
    if cfg.arch != "factorized" or cfg.gdn != "gdn1":
        raise UsageError(f"{weights}: a {cfg.name} model; quantization takes factorized students with the "
                         f"simplified GDN (train one with 'licforge distill --gdn gdn1')")
    if cfg.gdn_out == "min":
        raise UsageError(f"{weights}: its inverse GDN output is in 'min' form (a clamp), a training ablation; "
                         f"the bundle, golden model and RTL compute the 'shift' and 'mul' forms (distill with "
                         f"--gdn-out shift or mul)")
    recipe = load_recipe(recipe_name)
    images = load_split(data, "train")
    t0 = time.perf_counter()
    q, record = quantize_student(net, cfg, recipe, images, train=qat, extra_loss=extra_loss,
                                 after_step=after_step,
                                 state_path=state_path_for(quant_model_path(out_dir)) if qat else None,
                                 resume=resume, log=log)
    prepare_entropy_coder(q.entropy_bottleneck)
    mode = "qat" if qat is not None else "ptq"
    meta = {"curve": curve or f"{fmeta.get('curve', cfg.name)} {recipe.name} {mode}",
            "lmbda": fmeta.get("lmbda"), "mode": mode, "recipe": recipe.name,
            "qat": qat.to_dict() if qat is not None else None, "source": str(weights),
            "source_sha256": file_sha256(weights), "wall_s": time.perf_counter() - t0,
            "qat_wall_s": record["wall_s"]}
    lineage = {}
    if parent is not None:
        meta["parent"] = lineage["parent"] = {"bundle": Path(parent).name, "hash": read_bundle(parent).hash}
    bundle = export_bundle(q, {"source": meta["source"], "source_sha256": meta["source_sha256"],
                               "mode": mode, "lmbda": meta["lmbda"], **lineage})
    meta["bundle_hash"] = write_bundle(bundle, out_dir)
    save_quantized(q, quant_model_path(out_dir), meta)
    return meta
