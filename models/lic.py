"""Learned image compression models: the teacher and its students, built from CompressAI.

The teacher is CompressAI's factorized-prior model of Ballé et al. 2018
(``bmshj2018-factorized``)::

    g_a: conv5x5/2 (3->N) GDN conv5x5/2 (N->N) GDN conv5x5/2 (N->N) GDN conv5x5/2 (N->M)
    entropy bottleneck (factorized density per channel, rANS coder)
    g_s: deconv5x5/2 (M->N) IGDN deconv (N->N) IGDN deconv (N->N) IGDN deconv (N->3)

``arch="hyperprior"`` is the scale-hyperprior variant (``bmshj2018-hyperprior``).  A student
is the same architecture with one width knob ``N`` and ``M = 3N/2`` (CompressAI's
N=128/M=192 ratio) — the knob an FPGA design turns to fit a board.  ``gdn="gdn1"`` swaps
every GDN/IGDN for CompressAI's simplified ``GDN1`` (Johnston et al. 2019:
``y_i = x_i / (beta_i + sum_j gamma_ij |x_j|)``, inverse ``x_i * (...)``), the form the
hardware computes.  ``product="min"`` (with gdn1) makes the synthesis transform g_s
multiplier-free (issue 15): MinConv transposed convolutions
(:class:`models.minconv.MinConvTranspose2d`) and inverse GDN1s whose norm is a sum of signed
minimums and whose output multiplies by the norm rounded to a power of two
(:class:`models.minconv.MinIGDN1`); the encoder is unchanged.  :func:`to_min_student` converts
a multiplier student into its MinConv twin (weights copied, power-of-two gains calibrated).

Weight files (:func:`save_weights`) hold only tensors, numbers and strings, so they load
with ``torch.load(..., weights_only=True)``; :func:`load_weights` refuses a corrupt file or
one of another architecture with a :class:`CheckpointError` naming the file.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from licforge.errors import not_a_file

from .minconv import GDN_OUTS

__all__ = ["LICConfig", "student_config", "build_lic", "to_min_student", "save_weights", "load_weights",
           "read_checkpoint", "CheckpointError", "synthesis_cost", "keep_multipliers", "WEIGHTS_FORMAT", "ARCHS", "GDNS",
           "PRODUCTS", "SYNTH_CONVS"]

WEIGHTS_FORMAT = "licforge-lic-weights/1"
ARCHS = ("factorized", "hyperprior")
GDNS = ("gdn", "gdn1")
PRODUCTS = ("mul", "min")
#: the synthesis transform's convolutions, the layers ``mul_layers`` may keep as multipliers
SYNTH_CONVS = ("g_s.0", "g_s.2", "g_s.4", "g_s.6")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class LICConfig:
    """Architecture of a LIC model: ``arch`` (factorized | hyperprior), widths ``N``, ``M``,
    the normalisation ``gdn`` (gdn = CompressAI's float GDN, gdn1 = simplified GDN), the
    synthesis transform's ``product`` (mul, or min: MinConv, factorized gdn1 only) and, for
    ``min``, the form of the inverse GDN1's output ``gdn_out`` (:data:`models.minconv.GDN_OUTS`:
    shift, multiplier-free; mul, exact; both deployed; min, a training-only ablation) and ``mul_layers``, the synthesis
    convolutions (of :data:`SYNTH_CONVS`) that stay multiplier layers in a MinConv model (a
    hybrid: the inverse GDNs and the other convolutions multiplier-free)."""
    arch: str = "factorized"
    N: int = 128
    M: int = 192
    gdn: str = "gdn"
    product: str = "mul"
    gdn_out: str = "shift"
    mul_layers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, not {self.arch!r}")
        if self.gdn not in GDNS:
            raise ValueError(f"gdn must be one of {GDNS}, not {self.gdn!r}")
        if self.product not in PRODUCTS:
            raise ValueError(f"product must be one of {PRODUCTS}, not {self.product!r}")
        if self.product == "min" and (self.arch, self.gdn) != ("factorized", "gdn1"):
            raise ValueError(f"product 'min' needs arch factorized and gdn gdn1, not {self.arch}/{self.gdn}")
        if self.gdn_out not in GDN_OUTS:
            raise ValueError(f"gdn-out must be one of {GDN_OUTS}, not {self.gdn_out!r}")
        if self.gdn_out != "shift" and self.product != "min":
            raise ValueError(f"gdn-out {self.gdn_out!r} is a form of the MinConv inverse GDN; it needs product 'min'")
        bad = [x for x in self.mul_layers if x not in SYNTH_CONVS]
        if bad or len(set(self.mul_layers)) != len(self.mul_layers):
            raise ValueError(f"mul-layers must be distinct synthesis convolutions among {', '.join(SYNTH_CONVS)}, "
                             f"not {' '.join(map(str, self.mul_layers))}")
        if self.mul_layers and self.product != "min":
            raise ValueError("mul-layers keeps layers of a MinConv synthesis as multipliers; it needs product 'min'")
        object.__setattr__(self, "mul_layers", tuple(sorted(self.mul_layers)))
        for k in ("N", "M"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or not 2 <= v <= 1024:
                raise ValueError(f"{k} must be an integer between 2 and 1024, not {v!r}")

    def to_dict(self) -> dict[str, Any]:
        """The fields; ``product`` only when not ``mul``, ``gdn_out`` only when not ``shift``,
        ``mul_layers`` only when not empty (the records of earlier files stay as they were)."""
        d = asdict(self)
        if self.product == "mul":
            del d["product"]
        if self.gdn_out == "shift":
            del d["gdn_out"]
        d["mul_layers"] = list(self.mul_layers)
        if not self.mul_layers:
            del d["mul_layers"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LICConfig":
        return cls(**{k: d[k] for k in ("arch", "N", "M", "gdn")}, product=d.get("product", "mul"),
                   gdn_out=d.get("gdn_out", "shift"), mul_layers=tuple(d.get("mul_layers", ())))

    @property
    def name(self) -> str:
        return (f"{self.arch}_N{self.N}_M{self.M}_{self.gdn}" + ("_min" if self.product == "min" else "")
                + ("_mul" + "".join(x[4:] for x in self.mul_layers) if self.mul_layers else "")
                + ("" if self.gdn_out == "shift" else f"_out{self.gdn_out}"))


def student_config(n: int, gdn: str = "gdn1", arch: str = "factorized", product: str = "mul") -> LICConfig:
    """A student of width ``n``: ``M = 3n/2`` (rounded up), simplified GDN by default."""
    return LICConfig(arch, int(n), (3 * int(n) + 1) // 2, gdn, product)


def build_lic(cfg: LICConfig) -> nn.Module:
    """A CompressAI model for ``cfg`` (untrained)."""
    from compressai.layers import GDN1
    from compressai.models import FactorizedPrior, ScaleHyperprior

    net = (FactorizedPrior if cfg.arch == "factorized" else ScaleHyperprior)(cfg.N, cfg.M)
    if cfg.gdn == "gdn1":
        for seq, inverse in ((net.g_a, False), (net.g_s, True)):
            for i in (1, 3, 5):
                seq[i] = GDN1(cfg.N, inverse=inverse)
    if cfg.product == "min":
        from .minconv import MinConvTranspose2d, MinIGDN1

        for i, mod in enumerate(net.g_s):
            if f"g_s.{i}" in cfg.mul_layers:
                continue
            if isinstance(mod, nn.ConvTranspose2d):
                net.g_s[i] = MinConvTranspose2d(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride,
                                                mod.padding, mod.output_padding)
            else:
                net.g_s[i] = MinIGDN1(cfg.N, out=cfg.gdn_out)
    return net


@torch.no_grad()
def to_min_student(net: nn.Module, cfg: LICConfig, calib: torch.Tensor,
                   mul_layers: tuple[str, ...] = ()) -> tuple[nn.Module, LICConfig, list[float]]:
    """The MinConv twin (``product="min"``) of a multiplier gdn1 student: every weight copied,
    then each synthesis layer fitted (:meth:`models.minconv.MinConvTranspose2d.fit_gain_`: weight
    scale and power-of-two output scale) so that its sum of minimums, on the features the twin's
    earlier layers produce from the rounded latents of ``calib`` (crops in p/256 units), matches
    the parent's sum of products on the parent's own features (so each layer also absorbs the
    drift of those before it).  The convolutions in ``mul_layers`` stay multiplier layers with the
    parent's weights (a hybrid, :class:`LICConfig`).  Returns (twin in eval mode, its config, the
    relative RMS error of each layer's fit: for a kept layer, of its output on the twin's features)."""
    if cfg.product != "mul" or cfg.gdn != "gdn1" or cfg.arch != "factorized":
        raise ValueError(f"to_min_student converts a factorized gdn1 multiplier student, not {cfg.name}")
    mcfg = LICConfig(cfg.arch, cfg.N, cfg.M, cfg.gdn, "min", mul_layers=tuple(mul_layers))
    twin = build_lic(mcfg)
    missing, unexpected = twin.load_state_dict(net.state_dict(), strict=False)
    if unexpected or any(not k.endswith("log2_gain") for k in missing):
        raise ValueError(f"to_min_student: state dicts differ ({missing[:3]}, {unexpected[:3]})")
    twin.eval()
    net.eval()
    h = hp = torch.round(twin.g_a(calib))
    errors = []
    for mod, par in zip(twin.g_s, net.g_s):
        if isinstance(par, nn.ConvTranspose2d):
            target = par(hp) - par.bias.view(1, -1, 1, 1)
        else:  # the GDN1 norm's sum: gamma |x|
            c = hp.shape[1]
            target = nn.functional.conv2d(hp.abs(), par.gamma_reparam(par.gamma).reshape(c, c, 1, 1))
        errors.append(mod.fit_gain_(h, target) if hasattr(mod, "fit_gain_")
                      else _rel_rms(mod(h) - mod.bias.view(1, -1, 1, 1), target))
        h, hp = mod(h), par(hp)
    return twin, mcfg, errors


def _rel_rms(got: torch.Tensor, target: torch.Tensor) -> float:
    return float(((got - target) ** 2).mean().sqrt() / target.pow(2).mean().sqrt().clamp_min(1e-30))


def keep_multipliers(net: nn.Module, cfg: LICConfig, mul_layers: tuple[str, ...], calib: torch.Tensor,
                     steps: int = 400) -> tuple[nn.Module, LICConfig, list[float]]:
    """A MinConv student with the synthesis convolutions ``mul_layers`` turned (back) into
    multiplier layers: every other weight copied; each new multiplier layer, from zero weights
    and the MinConv layer's bias, fitted by Adam (``steps`` steps, lr 1e-2, full batch) to the
    MinConv layer's output on the student's own features of ``calib``'s rounded latents (crops
    in p/256 units).  Returns (hybrid in eval mode, its config, the relative RMS error of each
    new layer's fit, in the order of ``g_s``)."""
    if cfg.product != "min":
        raise ValueError(f"keep_multipliers converts a MinConv student, not {cfg.name}")
    hcfg = replace(cfg, mul_layers=tuple(sorted(set(cfg.mul_layers) | set(mul_layers))))
    new = [x for x in hcfg.mul_layers if x not in cfg.mul_layers]
    hybrid = build_lic(hcfg)
    sd = hybrid.state_dict()
    sd.update({k: v for k, v in net.state_dict().items() if k in sd and not k.startswith(tuple(x + "." for x in new))})
    hybrid.load_state_dict(sd)
    net.eval()
    errors = []
    with torch.no_grad():
        h = torch.round(net.g_a(calib))
    for i, (mod, src) in enumerate(zip(hybrid.g_s, net.g_s)):
        with torch.no_grad():
            target = src(h)
        if f"g_s.{i}" in new:
            with torch.no_grad():
                mod.weight.zero_()
                mod.bias.copy_(src.bias)
            opt = torch.optim.Adam(mod.parameters(), lr=1e-2)
            for _ in range(steps):
                opt.zero_grad()
                ((mod(h) - target) ** 2).mean().backward()
                opt.step()
            with torch.no_grad():
                errors.append(_rel_rms(mod(h), target))
        h = target
    hybrid.eval()
    return hybrid, hcfg, errors


def save_weights(net: nn.Module, cfg: LICConfig, path: str | Path, meta: dict[str, Any] | None = None,
                 half: bool = False) -> Path:
    """Write ``net``'s weights (fp16 when ``half``) with its config and ``meta`` (curve label,
    lambda, training record ...) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().clone()
          for k, v in net.state_dict().items()}
    torch.save({"format": WEIGHTS_FORMAT, "config": cfg.to_dict(), "meta": dict(meta or {}),
                "state_dict": sd}, path)
    return path


def _load_error(e: Exception) -> str:
    """The cause in one short line: for a file the weights-only unpickler refuses, its reason
    (e.g. ``Unsupported operand 103`` for text), not torch's advice to load it unsafely."""
    msg = str(e)
    m = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", msg)
    return f"{type(e).__name__}: " + (f"unpickler: {m.group(1)}" if m else (msg.splitlines() or [""])[0])[:120]


def read_checkpoint(path: str | Path, fmt: str, writer: str | None = None) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` of a licforge checkpoint of format ``fmt``,
    or a :class:`CheckpointError` saying what is wrong with the file; ``writer`` names what
    writes that format (default: the LIC commands)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {not_a_file(path)}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated / non-torch files
        raise CheckpointError(f"{path}: not a readable checkpoint ({_load_error(e)}); the file is corrupt or "
                              f"truncated, train or copy it again") from None
    if not isinstance(ck, dict) or ck.get("format") != fmt:
        got = ck.get("format") if isinstance(ck, dict) else type(ck).__name__
        writer = writer or f"licforge {'train/distill' if fmt == WEIGHTS_FORMAT else 'quantize'}"
        raise CheckpointError(f"{path}: format {got!r}, expected {fmt!r} (a file written by {writer})")
    return ck


def load_weights(path: str | Path, expect: LICConfig | None = None) -> tuple[nn.Module, LICConfig, dict]:
    """Load a weight file; returns (model in eval mode, config, meta).

    ``expect``: the architecture the caller needs; a file of another one is refused."""
    ck = read_checkpoint(path, WEIGHTS_FORMAT)
    try:
        cfg = LICConfig.from_dict(ck["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad architecture record {ck.get('config')!r} ({e})") from None
    if expect is not None and cfg != expect:
        raise CheckpointError(f"{path}: architecture {cfg.name} does not match the requested "
                              f"{expect.name}; pass the matching --N/--M/--gdn/--arch or another file")
    net = build_lic(cfg)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in ck["state_dict"].items()}
    try:
        net.load_state_dict(sd)
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: weights do not fit architecture {cfg.name} "
                              f"({str(e).splitlines()[0][:160]})") from None
    net.eval()
    return net, cfg, dict(ck.get("meta", {}))


@torch.no_grad()
def synthesis_cost(net: nn.Module, m: int) -> dict[str, float]:
    """Parameters and multiply-accumulates per output pixel of the synthesis transform g_s.

    A transposed convolution costs ``Cin * Cout * K**2`` MACs per input position (the
    sub-pixel form computes exactly these taps); a (simplified) GDN ``C**2`` per position
    (its 1x1 gamma convolution).  Counted on a 4x4 latent, divided by the 64x64 output.
    """
    counts = {"conv": 0, "gdn": 0}

    def hook(mod, inp, out):
        x = inp[0]
        if isinstance(mod, nn.ConvTranspose2d):
            counts["conv"] += mod.in_channels * mod.out_channels * mod.kernel_size[0] * mod.kernel_size[1] \
                * x.shape[2] * x.shape[3]
        elif isinstance(mod, nn.Conv2d):
            counts["conv"] += out.shape[1] * mod.in_channels // mod.groups * mod.kernel_size[0] \
                * mod.kernel_size[1] * out.shape[2] * out.shape[3]
        else:  # GDN family
            counts["gdn"] += x.shape[1] ** 2 * x.shape[2] * x.shape[3]

    handles = [mod.register_forward_hook(hook) for mod in net.g_s
               if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d)) or hasattr(mod, "gamma")]
    try:
        y = net.g_s(torch.zeros(1, m, 4, 4))
    finally:
        for h in handles:
            h.remove()
    pixels = y.shape[2] * y.shape[3]
    params = sum(p.numel() for p in net.g_s.parameters())
    return {"params": int(params), "macs_per_pixel": (counts["conv"] + counts["gdn"]) / pixels,
            "conv_macs_per_pixel": counts["conv"] / pixels, "gdn_macs_per_pixel": counts["gdn"] / pixels}
