"""Rate-distortion training of LIC models, with knowledge distillation and resumable state.

Loss per step (``x`` a batch of crops in ``p / 256`` units, ``x_hat`` the reconstruction)::

    bpp  = sum(-log2 likelihoods) / (batch * H * W)                  bits per pixel
    D    = 255**2 * mean((x_hat - x)**2)                             MSE on the 0..255 scale
    KD_x = 255**2 * mean((x_hat - x_hat_teacher)**2)                 reconstruction distillation
    KD_y = mean((A(y) - y_teacher)**2)                               latent distillation
    loss = bpp + lambda * (dist_weight * D + kd_recon * KD_x) + kd_latent * KD_y

(``dist_weight = 1 - kd_recon`` interpolates between the image and the teacher's
reconstruction at a constant total distortion weight.)

Adam (``optimizer="sgd"``: plain SGD, for runs whose equality across process counts is
checked), gradients clipped to norm ``clip`` (0 = off; under DDP the norm is that of the averaged
gradients, the same on every process), learning rate :func:`lr_at`; the entropy
bottleneck's density parameters use ``eb_lr_mult`` times that rate (its initial density is
broad, ~4 bits per latent element: with the shared rate a wide model spends most of a short
run at several bits per pixel).

``A`` is a learned 1x1 convolution from the student's M latent channels to the teacher's
(trained with the student, discarded after); a student that keeps the teacher's M (as PRIM's
students do) is compared directly, ``A`` the identity.  The teacher is frozen and runs in eval mode
(rounded latents).  Its reconstructions come from a whole-teacher pass on every batch
(``kd_targets="online"``) or from one pass on each whole training image before the first step
(``"precomputed"``, :func:`teacher_reconstructions`: they are cropped with the images, so a
reconstruction-distillation step costs what a step without a teacher costs; on one CPU core an
N=16 step with the N=128 teacher online is ~20x slower).  The latent term needs the teacher's
latents of each crop (the analysis transform is not shift-invariant, so a whole-image latent does
not crop): unless an online reconstruction pass gives them anyway, only the teacher's analysis
transform ``g_a`` runs on the batch (about 0.45 of a whole-teacher pass for the N=128 teacher).
``extra_loss(net)`` is added to the loss and ``after_step(net)`` runs
after every optimiser step (watermark embedding, projections).

A step whose gradients are not finite (a NaN or an overflow, e.g. under bf16) is skipped: no
optimiser step, its loss terms left out of the logged averages, the number of such steps logged
(``skipped``); :data:`MAX_SKIPPED_IN_A_ROW` of them in a row stop the run with a
``FloatingPointError``.  (Without the skip one NaN step turns every weight, and every state file
written after it, into NaN.)

``ema`` > 0 keeps an exponential moving average of the weights (decay ``ema``, warmed up over the
first steps) and returns it instead of the last step's weights: the average of a noisy run (a
MinConv student's loss swings by up to 1.5 dB between 100-step windows) and one that a loss spike
in the last steps barely moves.

After every step CompressAI's auxiliary loss (``aux``: the entropy
bottleneck's ``quantiles`` pulled to its tail-mass targets, data-independent) takes one step of
its own Adam at ``aux_lr`` (0 = off), on the quantiles only.  The quantiles do not enter the
training-mode forward (the noise replaces rounding around the medians), so the aux step leaves
the trained weights and losses unchanged; it keeps ``compress()`` of a float model usable and is
logged (``aux``).  (``quant.codec.prepare_entropy_coder`` re-fits the quantiles by bisection before
an export anyway.)  The quantiles stay listed in the main optimiser's first group, so the state
files of earlier runs load, but never receive a gradient there.

``amp=True``: the analysis/synthesis transforms (and the adapter, and the teacher) run under
``torch.autocast(device, torch.bfloat16)``; the entropy models run with autocast off on fp32
inputs, and the rate, distortion and distillation terms are computed in fp32 from fp32 casts.
It works on CUDA and on the CPU (faster there only on CPUs with bf16 instructions, e.g. AVX512-BF16
or AMX).

Randomness: crop positions and flips come from the crop sampler's generator; the entropy
models' training noise from torch's global generator (``noise="global"``, the default) or, with
``noise="sample"``, from a generator seeded by (``seed``, step) that draws the noise of the whole
global batch, of which each process takes its samples' slice, so the noise is a function of the
global sample (needed for several processes to train like one).  The generators' states are in
the training state file, so ``resume=True`` continues exactly where an interrupted run stopped;
so does the averaging window of the logged losses (its sums are in the state file too).

Several GPUs or machines: launch ``licforge train``/``distill`` with ``torchrun``, e.g. one
machine with 8 GPUs::

    torchrun --standalone --nproc_per_node 8 -m licforge.flows.cli --threads 4 train --device cuda \
        --batch 64 --crop 256 --steps 200000 --out teacher.pt

(several machines: ``--nnodes K --node_rank i --rdzv_backend c10d --rdzv_endpoint HOST:PORT`` instead
of ``--standalone``, and an ``--out`` on a shared file system).  :func:`train_lic` runs under
``torch.nn.parallel.DistributedDataParallel`` whenever a process group is initialised (the CLI
does it from torchrun's environment: nccl on cuda, each process on ``cuda:LOCAL_RANK``, gloo on the
CPU): ``batch`` is the global batch, every process draws the same global batch from the seeded
sampler and trains on its ``batch / world`` crops, gradients are averaged, the logged terms are
averaged over processes, the aux step runs on the unwrapped model (the same on every process),
and only rank 0 logs and writes the state file.  ``resume=True`` restores the same state on every
process (the number of processes may change between runs).
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import CropSampler, psnr_from_mse
from .lic import CheckpointError, read_checkpoint

__all__ = ["TrainConfig", "rd_terms", "train_lic", "STATE_FORMAT", "lr_at", "teacher_reconstructions", "torchrun_env", "distributed"]

STATE_FORMAT = "licforge-lic-train/1"
#: a run stops (FloatingPointError) after this many steps in a row with non-finite gradients
MAX_SKIPPED_IN_A_ROW = 20


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
    aux_lr: float = 1e-3
    amp: bool = False
    optimizer: str = "adam"
    noise: str = "global"
    kd_targets: str = "online"
    ema: float = 0.0

    def __post_init__(self) -> None:
        for k in ("lmbda", "lr"):
            if not getattr(self, k) > 0:
                raise ValueError(f"{k} must be positive, not {getattr(self, k)}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', not {self.optimizer!r}")
        if self.kd_targets not in ("online", "precomputed"):
            raise ValueError(f"kd_targets must be 'online' or 'precomputed', not {self.kd_targets!r}")
        if self.noise not in ("global", "sample"):
            raise ValueError(f"noise must be 'global' or 'sample', not {self.noise!r}")
        for k in ("kd_recon", "kd_latent", "dist_weight", "clip", "eb_lr_mult", "aux_lr"):
            if getattr(self, k) < 0:
                raise ValueError(f"{k} must be >= 0, not {getattr(self, k)}")
        for k in ("steps", "batch"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, not {getattr(self, k)}")
        if self.crop < 16 or self.crop % 16:
            raise ValueError(f"crop must be a multiple of 16 (>= 16), not {self.crop}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema must be a decay in [0, 1) (0 = off, e.g. 0.999), not {self.ema}")

    def to_dict(self) -> dict[str, Any]:
        """The settings; ``ema`` only when on (the records and cache keys of earlier runs stay as
        they were)."""
        d = asdict(self)
        if not self.ema:
            del d["ema"]
        return d

    def differences(self, saved: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """The settings in which the ``to_dict()`` of another run, ``saved``, differs from this
        one: name -> (saved, this).  A setting missing from ``saved`` (a run made before it
        existed) counts as its default, so older state files resume when it is left at that."""
        defaults = {f.name: f.default for f in fields(self)}
        now = asdict(self)
        diff = {k: (saved.get(k, defaults[k]), v) for k, v in now.items() if saved.get(k, defaults[k]) != v}
        diff.update({k: (v, None) for k, v in saved.items() if k not in now})
        return diff


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
    bits = sum(torch.log(lik.float()).sum() for lik in out["likelihoods"].values()) / -math.log(2)
    mse = torch.mean((out["x_hat"].float() - x) ** 2) * 255.0 ** 2
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
        """The mean of every term over the steps added since the last call, the steps skipped for
        non-finite gradients left out (their number is ``skipped``, when any); empties the window."""
        skipped = self.sums.get("skipped", 0.0)
        kept = self.steps - skipped
        avg = {k: (v if k == "skipped" else v / kept if kept else math.nan) for k, v in self.sums.items()}
        self.sums, self.steps = {}, 0
        return avg


@dataclass
class _Progress:
    """Where a run stands: steps done, logged windows, training wall time, the open window."""
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    wall_s: float = 0.0
    window: _LossWindow = field(default_factory=_LossWindow)


class _WeightAverage:
    """An exponential moving average of a model's weights (Polyak averaging), kept beside the
    trained ones: after step ``t`` of a run (1-based, counted from its first step, resumes
    included) every floating-point entry of the state dict becomes ``d * avg + (1 - d) * w`` with
    ``d = min(decay, (1 + t) / (10 + t))`` (the early steps weigh more, so that a short fine-tune is
    not held at its initial weights); other entries are copied.  A loss spike in the last steps
    moves the average by ``1 - d`` of its size per step only."""

    def __init__(self, net: nn.Module, decay: float) -> None:
        self.decay = decay
        self.avg = {k: v.detach().clone() for k, v in net.state_dict().items()}

    def update(self, net: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in net.state_dict().items():
                if v.is_floating_point():
                    self.avg[k].lerp_(v, 1 - d)
                else:
                    self.avg[k] = v.detach().clone()


def _world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) of a process launched by ``torchrun`` (its ``RANK``,
    ``WORLD_SIZE`` and ``LOCAL_RANK`` environment variables); None otherwise."""
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    if not all(k in os.environ for k in keys):
        return None
    rank, world, local = (int(os.environ[k]) for k in keys)
    return rank, world, local


@contextlib.contextmanager
def distributed(device: str):
    """Join the process group of a ``torchrun`` launch for the time of the block and yield the
    device this process trains on: ``cuda`` -> ``cuda:LOCAL_RANK`` with the nccl backend, ``cpu``
    with gloo.  Without torchrun, or when the process group is already initialised (an enclosing
    block), it yields ``device`` and does nothing else.  Inside the block :func:`train_lic` trains
    under DistributedDataParallel."""
    import torch.distributed as dist

    env = torchrun_env()
    if env is None or dist.is_initialized():
        yield device if env is None else _local_device(device, env[2])
        return

    _, world, local = env
    if torch.device(device).type == "cuda" and torch.device(device).index is not None and world > 1:
        raise ValueError(f"under torchrun every process takes the GPU of its LOCAL_RANK: use --device cuda, "
                         f"not {device}")
    dev = torch.device(_local_device(device, local))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", device_id=dev)
    else:
        dist.init_process_group("gloo")
    try:
        yield str(dev)
        dist.barrier()  # no rank tears the group down while another still talks to it
    finally:
        dist.destroy_process_group()


def _local_device(device: str, local: int) -> str:
    """``cuda`` -> ``cuda:local`` (the GPU of torchrun's LOCAL_RANK); any other device as given."""
    dev = torch.device(device)
    if dev.type != "cuda" or dev.index is not None:
        return device
    if local >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK {local}: this machine has {torch.cuda.device_count()} CUDA GPU(s); "
                         f"launch at most that many processes per node (--nproc_per_node)")
    return f"cuda:{local}"


class _SampleNoise:
    """The entropy models' training noise as a function of the global sample: at every step a
    generator on the training device is seeded with (``seed``, step) and draws the noise of the
    whole global batch (``world`` times the local batch), of which this process takes the
    slice of its samples (rank ``rank``)."""

    def __init__(self, seed: int, device: str | torch.device, rank: int, world: int) -> None:
        self.seed, self.rank, self.world = seed, rank, world
        self.gen = torch.Generator(device=device)
        self.local = 0

    def start(self, step: int, local_batch: int) -> None:
        self.gen.manual_seed((self.seed * 1_000_003 + step) % (2 ** 63 - 1))
        self.local = local_batch

    def draw(self, shape: tuple[int, ...], dim: int, like: Tensor) -> Tensor:
        """Uniform(-1/2, 1/2) noise of this process's samples: ``shape`` with the local batch
        at ``dim``, cut from the global batch's noise."""
        full = list(shape)
        full[dim] = self.local * self.world
        u = torch.rand(full, generator=self.gen, device=like.device, dtype=torch.float32) - 0.5
        return u.narrow(dim, self.rank * self.local, self.local).to(like.dtype)


def _fp32_forward(forward: Callable, device_type: str, *args, **kwargs):
    """``forward`` with autocast off and its floating-point tensor arguments cast to fp32."""
    args = tuple(a.float() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args)
    with torch.autocast(device_type, enabled=False):
        return forward(*args, **kwargs)


class _EntropyModels:
    """Training-time overrides on the entropy models (CompressAI ``EntropyModel`` instances) of the
    trained model and the teacher, removed by :meth:`remove`: with ``amp`` their forward runs in
    fp32 outside autocast; with ``noise`` the trained model's training noise comes from it
    (``EntropyBottleneck``: values laid out (C, 1, batch * h * w); ``GaussianConditional``:
    (batch, C, h, w))."""

    def __init__(self, net: nn.Module, teacher: nn.Module | None, *, amp: bool, device_type: str,
                 noise: _SampleNoise | None) -> None:
        from compressai.entropy_models import EntropyBottleneck, EntropyModel, GaussianConditional

        self._patched: list[tuple[nn.Module, str]] = []
        for model in (net, teacher):
            for m in model.modules() if model is not None else ():
                if not isinstance(m, EntropyModel):
                    continue
                if amp:
                    self._set(m, "forward", functools.partial(_fp32_forward, type(m).forward.__get__(m), device_type))
                if noise is not None and model is net:
                    if isinstance(m, EntropyBottleneck):
                        self._set(m, "quantize", functools.partial(_eb_quantize, m, noise))
                    elif isinstance(m, GaussianConditional):
                        self._set(m, "quantize", functools.partial(_gc_quantize, m, noise))
                    else:
                        self.remove()
                        raise ValueError(f"noise='sample' does not know the layout of {type(m).__name__}")

    def _set(self, m: nn.Module, name: str, fn: Callable) -> None:
        object.__setattr__(m, name, fn)
        self._patched.append((m, name))

    def remove(self) -> None:
        for m, name in self._patched:
            m.__dict__.pop(name, None)
        self._patched = []


def _eb_quantize(m: nn.Module, noise: _SampleNoise, inputs: Tensor, mode: str, means: Tensor | None = None) -> Tensor:
    if mode != "noise":
        return type(m).quantize(m, inputs, mode, means)
    c, _, n = inputs.shape
    hw = n // noise.local
    return inputs + noise.draw((c, noise.local, hw), 1, inputs).reshape(inputs.shape)


def _gc_quantize(m: nn.Module, noise: _SampleNoise, inputs: Tensor, mode: str, means: Tensor | None = None) -> Tensor:
    if mode != "noise":
        return type(m).quantize(m, inputs, mode, means)
    return inputs + noise.draw(tuple(inputs.shape), 0, inputs)


class _Trainee(nn.Module):
    """What one training step differentiates (and DistributedDataParallel wraps): the model
    and the latent adapter; returns the model's output and the adapted latent (or None)."""

    def __init__(self, net: nn.Module, adapter: nn.Module | None, latent: _Latent | None) -> None:
        super().__init__()
        self.net = net
        self.adapter = adapter
        self._latent = latent

    def forward(self, x: Tensor) -> tuple[dict, Tensor | None]:
        out = self.net(x)
        return out, self.adapter(self._latent.value) if self.adapter is not None else None


def _optimizer(net: nn.Module, adapter: nn.Module | None, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, list[Tensor]]:
    """Adam (or plain SGD) over two parameter groups, each with its learning-rate multiplier
    ``mult``: the entropy bottleneck's density parameters (``cfg.eb_lr_mult``) and everything
    else, the latent adapter included (1); also returns all of them, in clipping order.  (The
    bottleneck's ``quantiles`` are in the first group but get no gradient from the main loss:
    the aux optimiser trains them.)"""
    eb = [p for n, p in net.named_parameters() if n.startswith("entropy_bottleneck.") and not n.endswith("quantiles")]
    eb_ids = {id(p) for p in eb}
    rest = [p for p in net.parameters() if id(p) not in eb_ids]
    rest += list(adapter.parameters()) if adapter is not None else []
    kind = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.SGD
    opt = kind([{"params": rest, "mult": 1.0}, {"params": eb, "mult": cfg.eb_lr_mult}], lr=cfg.lr)
    return opt, rest + eb


def _quantiles(net: nn.Module) -> list[tuple[str, Tensor]]:
    return [(n, p) for n, p in net.named_parameters() if n.endswith("quantiles")]


def _aux_optimizer(net: nn.Module, cfg: TrainConfig) -> torch.optim.Adam | None:
    """Adam at ``cfg.aux_lr`` over the entropy bottlenecks' quantiles (None when off or none)."""
    q = [p for _, p in _quantiles(net)]
    return torch.optim.Adam(q, lr=cfg.aux_lr) if q and cfg.aux_lr > 0 else None


def _aux_loss(net: nn.Module) -> Tensor:
    """CompressAI's ``aux_loss``: the entropy bottlenecks' quantile losses (any model, the
    quantized one included)."""
    from compressai.entropy_models import EntropyBottleneck

    return sum(m.loss() for m in net.modules() if isinstance(m, EntropyBottleneck))


def _state(progress: _Progress, *, net: nn.Module, opt: torch.optim.Optimizer, aux_opt: torch.optim.Optimizer | None,
           adapter: nn.Module | None, sampler: CropSampler, arch: dict[str, Any], cfg: TrainConfig,
           device: str | torch.device, ema: _WeightAverage | None) -> dict:
    """The training state file's contents: everything :func:`_restore` needs to continue exactly."""
    return {"format": STATE_FORMAT, "arch": arch, "train": cfg.to_dict(), "step": progress.step,
            "model": net.state_dict(), "optimizer": opt.state_dict(),
            "aux_optimizer": aux_opt.state_dict() if aux_opt is not None else {},
            "adapter": adapter.state_dict() if adapter is not None else {},
            "sampler": sampler.state(), "torch_rng": torch.get_rng_state(), "history": progress.history,
            "window": progress.window.state(), "ema": ema.avg if ema is not None else {},
            "cuda_rng": torch.cuda.get_rng_state(device) if torch.device(device).type == "cuda" else None,
            "wall_s": progress.wall_s}


def _restore(state_path: Path | None, *, net: nn.Module, opt: torch.optim.Optimizer,
             aux_opt: torch.optim.Optimizer | None, adapter: nn.Module | None, sampler: CropSampler,
             arch: dict[str, Any], cfg: TrainConfig, device: str | torch.device,
             ema: _WeightAverage | None) -> _Progress:
    """Load the state file written by an interrupted run of the same ``arch`` and ``cfg`` into the
    model, optimisers, adapter, sampler and random generators; returns the run's progress.
    (A state file written before the aux optimiser existed resumes with a fresh one.)"""
    if state_path is None or not state_path.is_file():
        raise CheckpointError(f"--resume: no training state at {state_path}; start without --resume")
    st = read_checkpoint(state_path, STATE_FORMAT)
    diff = cfg.differences(st["train"])
    if st["arch"] != arch or diff:
        raise CheckpointError(f"{state_path}: was made for {st['arch']} with other settings "
                              f"{diff or ''} than this run ({arch}); resume with the same arguments")
    net.load_state_dict(st["model"])
    opt.load_state_dict(st["optimizer"])
    if aux_opt is not None and st.get("aux_optimizer"):
        aux_opt.load_state_dict(st["aux_optimizer"])
    if adapter is not None:
        adapter.load_state_dict(st["adapter"])
    if ema is not None:
        ema.avg = {k: v.to(device) for k, v in st["ema"].items()}
    sampler.restore(st["sampler"])
    torch.set_rng_state(st["torch_rng"])
    if st.get("cuda_rng") is not None and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(st["cuda_rng"], device)
    return _Progress(int(st["step"]), list(st["history"]), float(st["wall_s"]),
                     _LossWindow.from_state(st.get("window")))


def _mean_terms(terms: dict[str, Tensor], world: int) -> dict[str, float]:
    """The loss terms as numbers, averaged over the processes when there are several."""
    if world == 1:
        return {k: float(v) for k, v in terms.items()}
    import torch.distributed as dist

    t = torch.stack([v.float() for v in terms.values()])
    dist.all_reduce(t)
    return dict(zip(terms, (t / world).tolist()))


def _train_step(model: nn.Module, net: nn.Module, x: Tensor, cfg: TrainConfig, opt: torch.optim.Optimizer,
                params: list[Tensor], *, teacher: nn.Module | None, latents: tuple[_Latent, _Latent] | None,
                aux_opt: torch.optim.Optimizer | None = None, extra_loss: Callable[[nn.Module], Tensor] | None = None,
                world: int = 1, target: Tensor | None = None) -> dict[str, float]:
    """One optimiser step of ``model`` (``net`` with its adapter, perhaps DDP-wrapped) on batch
    ``x`` (at the learning rates already set), then one aux step on ``net``'s quantiles;
    ``target``: the teacher's reconstruction of ``x`` when precomputed (the teacher then runs
    its analysis transform only, and only for the latent term); returns
    the loss terms of the batch (averaged over the ``world`` processes): ``loss``, ``bpp``,
    ``mse`` and, when used, ``kd_recon``, ``kd_latent``, ``extra``, ``aux``."""
    net.train()
    amp = torch.autocast(x.device.type, dtype=torch.bfloat16) if cfg.amp else contextlib.nullcontext()
    with amp:
        out, adapted = model(x)
        with torch.no_grad():
            if cfg.kd_recon > 0 and target is None:
                target = teacher(x)["x_hat"]      # fills the teacher's latent too
            elif adapted is not None:
                teacher.g_a(x)                    # the latent alone
    bpp, mse = rd_terms(out, x)
    loss = bpp + cfg.lmbda * cfg.dist_weight * mse
    terms = {"loss": loss, "bpp": bpp.detach(), "mse": mse.detach()}
    if cfg.kd_recon > 0:
        kd_x = torch.mean((out["x_hat"].float() - target.float()) ** 2) * 255.0 ** 2
        loss = loss + cfg.lmbda * cfg.kd_recon * kd_x
        terms["kd_recon"] = kd_x.detach()
    if adapted is not None:
        kd_y = torch.mean((adapted.float() - latents[1].value.float()) ** 2)
        loss = loss + cfg.kd_latent * kd_y
        terms["kd_latent"] = kd_y.detach()
    if extra_loss is not None:
        extra = extra_loss(net)
        loss = loss + extra
        terms["extra"] = extra.detach()
    terms["loss"] = loss.detach()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.clip > 0:
        norm = nn.utils.clip_grad_norm_(params, cfg.clip)
    else:
        norm = nn.utils.get_total_norm([q.grad for q in params if q.grad is not None])
    finite = bool(torch.isfinite(norm))
    if finite:
        opt.step()
    else:
        terms["skipped"] = torch.tensor(1.0)
    if aux_opt is not None:
        aux_opt.zero_grad(set_to_none=True)
        aux = _aux_loss(net)
        if finite and torch.isfinite(aux):
            aux.backward()
            aux_opt.step()
        terms["aux"] = aux.detach()
    return _mean_terms(terms, world)


def _log_line(desc: str, step: int, cfg: TrainConfig, avg: dict[str, float], wall_s: float) -> str:
    """The progress line of a logged window: mean loss terms, PSNR, time spent and left."""
    left = wall_s / max(1, step) * (cfg.steps - step)
    kd = "".join(f" {k} {avg[k]:.3f}" for k in ("kd_recon", "kd_latent", "extra") if k in avg)
    aux = f" aux {avg['aux']:.2f}" if "aux" in avg else ""
    skip = f", skipped {avg['skipped']:.0f} steps (non-finite gradients)" if avg.get("skipped") else ""
    psnr = psnr_from_mse(max(avg["mse"], 1e-12))
    return (f"{desc}: step {step}/{cfg.steps} loss {avg['loss']:.4f} bpp {avg['bpp']:.4f} "
            f"mse {avg['mse']:.2f} ({psnr:.2f} dB){kd}{aux}{skip} | {wall_s:.0f} s, ~{left:.0f} s left")


def _wrap(trainee: _Trainee, net: nn.Module, device: str | torch.device) -> nn.Module:
    """``trainee`` under DistributedDataParallel (the quantiles left out: the aux step updates
    them the same way on every process); ``trainee`` itself without a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return trainee
    from torch.nn.parallel import DistributedDataParallel as DDP

    DDP._set_params_and_buffers_to_ignore_for_model(trainee, [f"net.{n}" for n, _ in _quantiles(net)])
    dev = torch.device(device)
    return DDP(trainee, device_ids=[dev] if dev.type == "cuda" else None, forward_sync_buffers=False)


def teacher_reconstructions(teacher: nn.Module, images: dict[str, np.ndarray],
                            device: str | torch.device = "cpu") -> list[Tensor]:
    """The frozen ``teacher``'s reconstruction of each whole image (eval mode: rounded latents),
    float32 (3, H, W) in ``p / 256`` units on the CPU; each image is padded to a multiple of 64
    by edge replication and the reconstruction cropped back.  One forward pass per image: a
    distillation that crops these (``TrainConfig.kd_targets = "precomputed"``) costs no teacher
    pass per step, and its targets differ from a per-crop pass only within the teacher's
    receptive field of a crop's border (the whole image is the teacher's context)."""
    out = []
    teacher.eval()
    with torch.no_grad():
        for im in images.values():
            x = torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)[None].float().to(device) / 256.0
            h, w = x.shape[-2:]
            xp = F.pad(x, (0, -w % 64, 0, -h % 64), mode="replicate")
            out.append(teacher(xp)["x_hat"][0, :, :h, :w].float().cpu())
    return out


def train_lic(net: nn.Module, sampler: CropSampler, cfg: TrainConfig, *, arch: dict[str, Any],
              teacher: nn.Module | None = None, teacher_m: int | None = None,
              extra_loss: Callable[[nn.Module], Tensor] | None = None,
              after_step: Callable[[nn.Module], None] | None = None,
              state_path: str | Path | None = None, resume: bool = False, save_every: int = 250,
              log_every: int = 100, desc: str = "train", log: Callable[[str], None] | None = print,
              device: str | torch.device = "cpu") -> dict:
    """Train ``net`` in place for ``cfg.steps`` steps on ``device`` (a sampler on another device
    has its crops moved there; give it ``device`` to cut them there); returns the training record
    (``history`` of logged windows, ``wall_s``, ``steps``); ``net`` is back on the CPU when it returns,
    holding the moving average of its weights when ``cfg.ema`` is set (:class:`_WeightAverage`;
    the state file keeps both the trained weights and the average, so a resume continues both).

    Every ``log_every`` steps, and after the last, the mean of each loss term over the steps
    since the previous window is appended to ``history`` (with ``step``) and passed to ``log``.
    ``arch`` identifies the model in the state file (a resumed run must match it and ``cfg``);
    ``teacher`` (with ``teacher_m`` latent channels) is required when a distillation weight is
    non-zero.  The state file is written every ``save_every`` steps and at the end.

    With an initialised process group (see :func:`distributed`) this is one of ``world``
    processes: ``cfg.batch`` (the global batch) must split evenly between them and
    ``cfg.noise`` must be ``"sample"``; only rank 0 logs and writes the state file.
    """
    if (cfg.kd_recon > 0 or cfg.kd_latent > 0) and teacher is None:
        raise ValueError("kd_recon/kd_latent > 0 need a teacher")
    if cfg.crop != sampler.crop or cfg.batch != sampler.batch:
        raise ValueError(f"sampler crops {sampler.batch}x{sampler.crop} differ from cfg {cfg.batch}x{cfg.crop}")
    rank, world = _world()
    if world > 1 and cfg.batch % world:
        raise ValueError(f"the batch of {cfg.batch} does not split between {world} processes; "
                         f"use a multiple of {world}")
    if world > 1 and cfg.noise != "sample":
        raise ValueError("several processes train like one only with the noise drawn per global sample "
                         "(TrainConfig noise='sample')")
    local_batch = cfg.batch // world
    adapter = None
    if cfg.kd_latent > 0:
        student_m = net.g_a[-1].out_channels
        adapter = nn.Identity() if student_m == teacher_m else nn.Conv2d(student_m, int(teacher_m), 1).to(device)
    net.to(device)
    if teacher is not None:
        teacher.to(device)
    opt, params = _optimizer(net, adapter, cfg)
    aux_opt = _aux_optimizer(net, cfg)
    state_path = Path(state_path) if state_path is not None else None
    ema = _WeightAverage(net, cfg.ema) if cfg.ema else None
    parts = {"net": net, "opt": opt, "aux_opt": aux_opt, "adapter": adapter, "sampler": sampler, "arch": arch,
             "cfg": cfg, "device": device, "ema": ema}
    if resume:
        progress = _restore(state_path, **parts)
    else:
        torch.manual_seed(cfg.seed)
        progress = _Progress()
    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        if cfg.kd_targets == "precomputed" and cfg.kd_recon > 0 and not sampler.has_targets:
            t0 = time.perf_counter()
            sampler.attach_targets(teacher_reconstructions(teacher, sampler.images, device))
            if log is not None and rank == 0:
                log(f"{desc}: teacher reconstructions of {len(sampler.images)} training images "
                    f"({time.perf_counter() - t0:.0f} s), cropped with the images from now on")
    latents = (_Latent(net), _Latent(teacher)) if adapter is not None else None
    noise = _SampleNoise(cfg.seed, device, rank, world) if cfg.noise == "sample" else None
    entropy = _EntropyModels(net, teacher, amp=cfg.amp, device_type=torch.device(device).type, noise=noise)
    model = _wrap(_Trainee(net, adapter, latents[0] if latents else None), net, device)

    def save() -> None:
        if state_path is not None and rank == 0:
            state_path.parent.mkdir(parents=True, exist_ok=True)
            _save_state(state_path, _state(progress, **parts))

    t_start = time.perf_counter() - progress.wall_s
    in_a_row = 0  # steps skipped in a row for non-finite gradients
    try:
        while progress.step < cfg.steps:
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, progress.step) * g["mult"]
            x, target = sampler.sample(part=(rank, world) if world > 1 else None)
            x = x.to(device, non_blocking=True)
            target = None if target is None else target.to(device, non_blocking=True)
            if noise is not None:
                noise.start(progress.step, local_batch)
            terms = _train_step(model, net, x, cfg, opt, params, teacher=teacher,
                                latents=latents, aux_opt=aux_opt, extra_loss=extra_loss, world=world, target=target)
            if after_step is not None:
                after_step(net)
            progress.step += 1
            if ema is not None:
                ema.update(net, progress.step)
            in_a_row = in_a_row + 1 if "skipped" in terms else 0
            if in_a_row >= MAX_SKIPPED_IN_A_ROW:
                raise FloatingPointError(
                    f"{desc}: steps {progress.step - in_a_row + 1}-{progress.step} all gave non-finite gradients and were "
                    f"skipped; the weights are still those of step {progress.step - in_a_row}, and so are the state "
                    f"file's; lower --lr, drop --bf16 or check the data")
            progress.window.add({"skipped": 1.0} if "skipped" in terms else terms)
            progress.wall_s = time.perf_counter() - t_start
            if progress.step % log_every == 0 or progress.step == cfg.steps:
                avg = progress.window.take()
                progress.history.append({"step": progress.step, **avg})
                if log is not None and rank == 0:
                    log(_log_line(desc, progress.step, cfg, avg, progress.wall_s))
            if progress.step % save_every == 0 and progress.step < cfg.steps:
                save()
    finally:
        for lat in latents or ():
            lat.remove()
        entropy.remove()
    save()
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # the state file is complete when any process returns
    if ema is not None:
        net.load_state_dict(ema.avg)
    net.eval().cpu()
    if teacher is not None:
        teacher.cpu()
    return {"history": progress.history, "wall_s": progress.wall_s, "steps": progress.step}
