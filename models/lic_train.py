"""Rate-distortion training of LIC models, with knowledge distillation and resumable state.

Loss per step (``x`` a batch of crops in ``p / 256`` units, ``x_hat`` the reconstruction)::

    bpp  = sum(-log2 likelihoods) / (batch * H * W)                  bits per pixel
    D    = 255**2 * mean((x_hat - x)**2)                             MSE on the 0..255 scale
    KD_x = 255**2 * mean((x_hat - x_hat_teacher)**2)                 reconstruction distillation
    KD_y = mean((A(y) - y_teacher)**2)                               latent distillation
    loss = bpp + lambda * (dist_weight * D + kd_recon * KD_x) + kd_latent * KD_y

(``dist_weight = 1 - kd_recon`` interpolates between the image and the teacher's
reconstruction at a constant total distortion weight.)

Adam, gradients clipped to norm ``clip`` (0 = off), learning rate :func:`lr_at`; the entropy
bottleneck's density parameters use ``eb_lr_mult`` times that rate (its initial density is
broad, ~4 bits per latent element: with the shared rate a wide model spends most of a short
run at several bits per pixel).

``A`` is a learned 1x1 convolution from the student's M latent channels to the teacher's
(trained with the student, discarded after).  The teacher is frozen and runs in eval mode
(rounded latents).  ``extra_loss(net)`` is added to the loss and ``after_step(net)`` runs
after every optimiser step (watermark embedding, projections).

All randomness (crop positions, flips, the entropy bottleneck's training noise) comes from
the crop sampler's generator and torch's global generator, both saved in the training state
file, so ``resume=True`` continues exactly where an interrupted run stopped; so does the
averaging window of the logged losses (its sums are in the state file too).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .data import CropSampler
from .lic import CheckpointError, read_checkpoint

__all__ = ["TrainConfig", "rd_terms", "train_lic", "STATE_FORMAT", "lr_at"]

STATE_FORMAT = "licforge-lic-train/1"


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run (all of them enter the resume check)."""
    lmbda: float = 0.0130
    steps: int = 2000
    lr: float = 1e-3
    crop: int = 64
    batch: int = 8
    seed: int = 0
    kd_recon: float = 0.0
    kd_latent: float = 0.0
    dist_weight: float = 1.0
    clip: float = 1.0
    eb_lr_mult: float = 10.0

    def __post_init__(self) -> None:
        for k in ("lmbda", "lr"):
            if not getattr(self, k) > 0:
                raise ValueError(f"{k} must be positive, not {getattr(self, k)}")
        for k in ("kd_recon", "kd_latent", "dist_weight", "clip", "eb_lr_mult"):
            if getattr(self, k) < 0:
                raise ValueError(f"{k} must be >= 0, not {getattr(self, k)}")
        for k in ("steps", "batch"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, not {getattr(self, k)}")
        if self.crop < 16 or self.crop % 16:
            raise ValueError(f"crop must be a multiple of 16 (>= 16), not {self.crop}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of step ``step`` (0-based): a linear warm-up from ``lr / 10`` over the
    first ``min(100, steps / 10)`` steps (GDN layers of wide models diverge without it),
    ``lr`` up to 80 % of the steps, then a cosine decay to ``lr / 20`` (no scheduler state)."""
    warm = min(100, cfg.steps // 10)
    if step < warm:
        return cfg.lr * (0.1 + 0.9 * step / warm)
    knee = int(0.8 * cfg.steps)
    if step < knee:
        return cfg.lr
    t = (step - knee) / max(1, cfg.steps - knee)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def rd_terms(out: dict, x: Tensor) -> tuple[Tensor, Tensor]:
    """(bits per pixel, MSE on the 0..255 scale) of a CompressAI-style forward output."""
    n, _, h, w = x.shape
    bits = sum(torch.log(lik).sum() for lik in out["likelihoods"].values()) / -math.log(2)
    mse = torch.mean((out["x_hat"] - x) ** 2) * 255.0 ** 2
    return bits / (n * h * w), mse


class _Latent:
    """Captures the output of a model's analysis transform ``g_a`` (forward hook)."""

    def __init__(self, net: nn.Module) -> None:
        self.value: Tensor | None = None
        self._h = net.g_a.register_forward_hook(self._hook)

    def _hook(self, mod, inp, out) -> None:
        self.value = out.value if hasattr(out, "value") else out

    def remove(self) -> None:
        self._h.remove()


def _save_state(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # an interrupted save never leaves a truncated state file


class _LossWindow:
    """Sums of the loss terms over the steps since the last logged average.

    Its sums and step count are part of the training state, so that a run resumed in the
    middle of a window logs the same average as an uninterrupted one.
    """

    def __init__(self, sums: dict[str, float] | None = None, steps: int = 0) -> None:
        self.sums = dict(sums or {})
        self.steps = steps

    @classmethod
    def from_state(cls, state: dict | None) -> _LossWindow:
        """The window saved by :meth:`state`; an empty one for ``None`` (a state file written
        before windows were saved: its average covers the steps run since the resume)."""
        return cls() if state is None else cls(state["sums"], int(state["steps"]))

    def state(self) -> dict[str, Any]:
        """The sums and the step count, for the training state file."""
        return {"sums": dict(self.sums), "steps": self.steps}

    def add(self, terms: dict[str, float]) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1

    def take(self) -> dict[str, float]:
        """The mean of every term over the steps added since the last call; empties the window."""
        avg = {k: v / self.steps for k, v in self.sums.items()}
        self.sums, self.steps = {}, 0
        return avg


@dataclass
class _Progress:
    """Where a run stands: steps done, logged windows, training wall time, the open window."""
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    wall_s: float = 0.0
    window: _LossWindow = field(default_factory=_LossWindow)


def _optimizer(net: nn.Module, adapter: nn.Module | None, cfg: TrainConfig) -> tuple[torch.optim.Adam, list[Tensor]]:
    """Adam over two parameter groups, each with its learning-rate multiplier ``mult``: the
    entropy bottleneck's density parameters (``cfg.eb_lr_mult``) and everything else, the
    latent adapter included (1); also returns all of them, in clipping order."""
    eb = [p for n, p in net.named_parameters() if n.startswith("entropy_bottleneck.") and not n.endswith("quantiles")]
    eb_ids = {id(p) for p in eb}
    rest = [p for p in net.parameters() if id(p) not in eb_ids]
    rest += list(adapter.parameters()) if adapter is not None else []
    opt = torch.optim.Adam([{"params": rest, "mult": 1.0}, {"params": eb, "mult": cfg.eb_lr_mult}], lr=cfg.lr)
    return opt, rest + eb


def _state(progress: _Progress, *, net: nn.Module, opt: torch.optim.Optimizer, adapter: nn.Module | None,
           sampler: CropSampler, arch: dict[str, Any], cfg: TrainConfig, device: str | torch.device) -> dict:
    """The training state file's contents: everything :func:`_restore` needs to continue exactly."""
    return {"format": STATE_FORMAT, "arch": arch, "train": cfg.to_dict(), "step": progress.step,
            "model": net.state_dict(), "optimizer": opt.state_dict(),
            "adapter": adapter.state_dict() if adapter is not None else {},
            "sampler": sampler.state(), "torch_rng": torch.get_rng_state(), "history": progress.history,
            "window": progress.window.state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if torch.device(device).type == "cuda" else None,
            "wall_s": progress.wall_s}


def _restore(state_path: Path | None, *, net: nn.Module, opt: torch.optim.Optimizer, adapter: nn.Module | None,
             sampler: CropSampler, arch: dict[str, Any], cfg: TrainConfig, device: str | torch.device) -> _Progress:
    """Load the state file written by an interrupted run of the same ``arch`` and ``cfg`` into the
    model, optimiser, adapter, sampler and random generators; returns the run's progress."""
    if state_path is None or not state_path.is_file():
        raise CheckpointError(f"--resume: no training state at {state_path}; start without --resume")
    st = read_checkpoint(state_path, STATE_FORMAT)
    if st["arch"] != arch or st["train"] != cfg.to_dict():
        diff = {k: (st["train"].get(k), v) for k, v in cfg.to_dict().items() if st["train"].get(k) != v}
        raise CheckpointError(f"{state_path}: was made for {st['arch']} with other settings "
                              f"{diff or ''} than this run ({arch}); resume with the same arguments")
    net.load_state_dict(st["model"])
    opt.load_state_dict(st["optimizer"])
    if adapter is not None:
        adapter.load_state_dict(st["adapter"])
    sampler.restore(st["sampler"])
    torch.set_rng_state(st["torch_rng"])
    if st.get("cuda_rng") is not None and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(st["cuda_rng"], device)
    return _Progress(int(st["step"]), list(st["history"]), float(st["wall_s"]),
                     _LossWindow.from_state(st.get("window")))


def _train_step(net: nn.Module, x: Tensor, cfg: TrainConfig, opt: torch.optim.Optimizer, params: list[Tensor], *,
                teacher: nn.Module | None, adapter: nn.Module | None, latents: tuple[_Latent, _Latent] | None,
                extra_loss: Callable[[nn.Module], Tensor] | None) -> dict[str, float]:
    """One optimiser step on batch ``x`` (at the learning rates already set); returns the loss
    terms of the batch: ``loss``, ``bpp``, ``mse`` and, when used, ``kd_recon``, ``kd_latent``,
    ``extra``."""
    net.train()
    out = net(x)
    bpp, mse = rd_terms(out, x)
    loss = bpp + cfg.lmbda * cfg.dist_weight * mse
    terms = {"loss": 0.0, "bpp": float(bpp.detach()), "mse": float(mse.detach())}
    if teacher is not None:
        with torch.no_grad():
            ref = teacher(x)
        if cfg.kd_recon > 0:
            kd_x = torch.mean((out["x_hat"] - ref["x_hat"]) ** 2) * 255.0 ** 2
            loss = loss + cfg.lmbda * cfg.kd_recon * kd_x
            terms["kd_recon"] = float(kd_x.detach())
        if adapter is not None:
            lat_s, lat_t = latents
            kd_y = torch.mean((adapter(lat_s.value) - lat_t.value) ** 2)
            loss = loss + cfg.kd_latent * kd_y
            terms["kd_latent"] = float(kd_y.detach())
    if extra_loss is not None:
        extra = extra_loss(net)
        loss = loss + extra
        terms["extra"] = float(extra.detach())
    terms["loss"] = float(loss.detach())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.clip > 0:
        nn.utils.clip_grad_norm_(params, cfg.clip)
    opt.step()
    return terms


def _log_line(desc: str, step: int, cfg: TrainConfig, avg: dict[str, float], wall_s: float) -> str:
    """The progress line of a logged window: mean loss terms, PSNR, time spent and left."""
    left = wall_s / max(1, step) * (cfg.steps - step)
    kd = "".join(f" {k} {avg[k]:.3f}" for k in ("kd_recon", "kd_latent", "extra") if k in avg)
    psnr = 10 * math.log10(255.0 ** 2 / max(avg["mse"], 1e-12))
    return (f"{desc}: step {step}/{cfg.steps} loss {avg['loss']:.4f} bpp {avg['bpp']:.4f} "
            f"mse {avg['mse']:.2f} ({psnr:.2f} dB){kd} | {wall_s:.0f} s, ~{left:.0f} s left")


def train_lic(net: nn.Module, sampler: CropSampler, cfg: TrainConfig, *, arch: dict[str, Any],
              teacher: nn.Module | None = None, teacher_m: int | None = None,
              extra_loss: Callable[[nn.Module], Tensor] | None = None,
              after_step: Callable[[nn.Module], None] | None = None,
              state_path: str | Path | None = None, resume: bool = False, save_every: int = 250,
              log_every: int = 100, desc: str = "train", log: Callable[[str], None] | None = print,
              device: str | torch.device = "cpu") -> dict:
    """Train ``net`` in place for ``cfg.steps`` Adam steps on ``device`` (the crops are sampled
    on the CPU and moved there); returns the training record (``history`` of logged windows,
    ``wall_s``, ``steps``); ``net`` is back on the CPU when it returns.

    Every ``log_every`` steps, and after the last, the mean of each loss term over the steps
    since the previous window is appended to ``history`` (with ``step``) and passed to ``log``.
    ``arch`` identifies the model in the state file (a resumed run must match it and ``cfg``);
    ``teacher`` (with ``teacher_m`` latent channels) is required when a distillation weight is
    non-zero.  The state file is written every ``save_every`` steps and at the end.
    """
    if (cfg.kd_recon > 0 or cfg.kd_latent > 0) and teacher is None:
        raise ValueError("kd_recon/kd_latent > 0 need a teacher")
    if cfg.crop != sampler.crop or cfg.batch != sampler.batch:
        raise ValueError(f"sampler crops {sampler.batch}x{sampler.crop} differ from cfg {cfg.batch}x{cfg.crop}")
    adapter = None
    if cfg.kd_latent > 0:
        student_m = net.g_a[-1].out_channels
        adapter = nn.Conv2d(student_m, int(teacher_m), 1).to(device)
    net.to(device)
    if teacher is not None:
        teacher.to(device)
    opt, params = _optimizer(net, adapter, cfg)
    state_path = Path(state_path) if state_path is not None else None
    parts = {"net": net, "opt": opt, "adapter": adapter, "sampler": sampler, "arch": arch, "cfg": cfg,
             "device": device}
    if resume:
        progress = _restore(state_path, **parts)
    else:
        torch.manual_seed(cfg.seed)
        progress = _Progress()
    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    latents = (_Latent(net), _Latent(teacher)) if adapter is not None else None

    def save() -> None:
        if state_path is not None:
            state_path.parent.mkdir(parents=True, exist_ok=True)
            _save_state(state_path, _state(progress, **parts))

    t_start = time.perf_counter() - progress.wall_s
    try:
        while progress.step < cfg.steps:
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, progress.step) * g["mult"]
            x = sampler().to(device, non_blocking=True)
            terms = _train_step(net, x, cfg, opt, params, teacher=teacher, adapter=adapter, latents=latents,
                                extra_loss=extra_loss)
            if after_step is not None:
                after_step(net)
            progress.step += 1
            progress.window.add(terms)
            progress.wall_s = time.perf_counter() - t_start
            if progress.step % log_every == 0 or progress.step == cfg.steps:
                avg = progress.window.take()
                progress.history.append({"step": progress.step, **avg})
                if log is not None:
                    log(_log_line(desc, progress.step, cfg, avg, progress.wall_s))
            if progress.step % save_every == 0 and progress.step < cfg.steps:
                save()
    finally:
        for lat in latents or ():
            lat.remove()
    save()
    net.eval().cpu()
    if teacher is not None:
        teacher.cpu()
    return {"history": progress.history, "wall_s": progress.wall_s, "steps": progress.step}
