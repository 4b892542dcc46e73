"""Fixed-point LIC students: Brevitas model, calibration, PTQ / QAT, the deployment bundle,
and the integer golden model of the whole network.

:class:`QuantFactorizedPrior` mirrors a factorized-prior student with simplified GDN
(``models.lic.build_lic(student_config(N))``) layer for layer::

    inq    pixels p/256 -> unsigned 8-bit at 2^-8 (the integer is the pixel)
    g_a.0  QuantConv2d 5x5/2 (bias at the accumulator scale) -> signed out_bits at 2^e
    g_a.1  QuantGDN1 (forward, simplified)           ... g_a.2 .. g_a.5 alike
    g_a.6  QuantConv2d 5x5/2 -> float accumulator y (the rate model sees y + U(-1/2, 1/2)
           in training)
    latent y -> signed latent_bits at 2^0 (integer latent symbols; straight-through round)
    g_s.0  QuantConvTranspose2d 5x5/2 -> signed out_bits, g_s.1 QuantGDN1 (inverse) ...
    g_s.6  QuantConvTranspose2d -> unsigned 8-bit at 2^-8 (the integer is the pixel)

Weight scales are powers of two from max |w| (Brevitas fixed point); activation exponents
are constants calibrated on training crops (:func:`calibrate`) from the float student; the
bit widths come from a :class:`quant.lic_recipe.Recipe`.  The bundle (:func:`export_bundle`)
holds the integers of every layer plus the entropy coder's integer tables; the integer
golden model (:func:`golden_forward`) equals the Brevitas model exactly (run it in float64,
:func:`brevitas_integers`).

A MinConv student (``config.product == "min"``, issue 15) has the same layers with signed
minimums in g_s: :class:`quant.lic_layers.QuantMinConvTranspose2d` and
``QuantGDN1(product="min")`` (norm in min form, output a shift by the norm's nearest power of
two); each such layer's weight gain ``log2_gain`` is part of the spec (``exps[layer]``), and the
bundle's layers carry ``product``/``x_shift``/``w_shift`` and ``norm_product``/``norm_x_shift``/
``norm_g_shift``/``out_product`` (contract_15).  A hybrid (``config.mul_layers``) keeps the listed
synthesis convolutions as multiplier layers (``product`` ``mul``, no gain); its inverse GDNs stay
in min form.  A student distilled with ``--gdn-out mul`` (``config.gdn_out``) keeps its inverse
GDNs' output ``x * n`` exact (``out_product`` ``mul``); the ``min`` form is a training ablation only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from brevitas.nn import QuantConv2d, QuantConvTranspose2d
from torch import Tensor, nn

from licforge.models.data import CropSampler
from licforge.models.lic import CheckpointError, LICConfig, read_checkpoint
from licforge.models.lic_train import TrainConfig, train_lic
from .bundle import Bundle, Layer
from .fixed import accumulator_bits, bits_for_range, requantize
from .golden import golden_decode, golden_encode, golden_forward  # noqa: F401 (re-exported)
from .lic_layers import QuantGDN1, QuantMinConvTranspose2d, exp_for_range, fixed_act, fixed_act_quant, min_acc_exp
from .lic_recipe import GDN_LAYERS, Recipe, parse_recipe
from .quantizers import BiasAtAccumulator, WeightFixedPoint

__all__ = ["QuantFactorizedPrior", "calibrate", "quantize_student", "export_bundle", "golden_forward",
           "golden_encode", "golden_decode", "brevitas_integers", "save_quantized", "load_quantized",
           "QUANT_FORMAT", "PIXEL_EXP", "QuantSpec"]

QUANT_FORMAT = "licforge-lic-quant/1"
PIXEL_EXP = -8  # pixel p stands for p / 256


@dataclass(frozen=True)
class QuantSpec:
    """Everything that fixes the quantized architecture: float config, recipe, exponents."""
    config: LICConfig
    recipe: Recipe
    exps: dict[str, dict[str, int]]  # layer -> {"out_exp": e} or {"norm_exp": e, "out_exp": e}, + "log2_gain" (min)


class QuantFactorizedPrior(nn.Module):
    """The fixed-point factorized-prior student (see the module doc); ``forward`` returns
    ``{"x_hat", "likelihoods": {"y"}}`` like CompressAI, so the same training loop runs it."""

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__()
        from compressai.entropy_models import EntropyBottleneck

        cfg, rec = spec.config, spec.recipe
        if cfg.arch != "factorized" or cfg.gdn != "gdn1":
            raise ValueError(f"quantization supports factorized students with gdn1, not {cfg.name}")
        self.product = cfg.product
        self.spec = spec
        n, m = cfg.N, cfg.M
        self.inq = fixed_act(PIXEL_EXP, 8, signed=False)
        self.latent_bits = rec.data["latent_bits"]
        self.latent_q = fixed_act(0, self.latent_bits, signed=True)
        enc = [(3, n), (n, n), (n, n), (n, m)]
        dec = [(m, n), (n, n), (n, n), (n, 3)]
        self.g_a = nn.Sequential(*self._stack("g_a", enc, QuantConv2d, inverse=False))
        self.g_s = nn.Sequential(*self._stack("g_s", dec, QuantConvTranspose2d, inverse=True))
        self.entropy_bottleneck = EntropyBottleneck(m)

    def _stack(self, prefix: str, chans, conv_cls, inverse: bool) -> list[nn.Module]:
        rec, exps = self.spec.recipe, self.spec.exps
        mods: list[nn.Module] = []
        for k, (cin, cout) in enumerate(chans):
            name = f"{prefix}.{2 * k}"
            bits = rec.bits(name)
            extra = {"output_padding": 1} if conv_cls is QuantConvTranspose2d else {}
            out_quant = {}
            if name != "g_a.6":  # g_a.6 returns the float accumulator; the latent quantizer follows
                signed = name != "g_s.6"
                e = PIXEL_EXP if name == "g_s.6" else exps[name]["out_exp"]
                out_quant = {"output_quant": fixed_act_quant(e, bits["out_bits"], signed)}
            minconv = prefix == "g_s" and self.spec.config.product == "min"   # the inverse GDNs' norms
            mins = minconv and name not in self.spec.config.mul_layers      # this convolution
            if mins:
                extra.update(log2_gain=exps[name]["log2_gain"], bias_quant=None)
            else:
                extra["bias_quant"] = BiasAtAccumulator
            cls = QuantMinConvTranspose2d if mins else conv_cls
            mods.append(cls(cin, cout, 5, stride=2, padding=2, bias=True, weight_quant=WeightFixedPoint,
                            weight_bit_width=bits["w_bits"], return_quant_tensor=name != "g_a.6",
                            **out_quant, **extra))
            if k < 3:
                g = f"{prefix}.{2 * k + 1}"
                gb = rec.bits(g)
                gmin = {"product": "min", "log2_gain": exps[g]["log2_gain"],
                        "out_product": self.spec.config.gdn_out} if minconv else {}
                mods.append(QuantGDN1(cout, inverse, gamma_bits=gb["gamma_bits"], norm_bits=gb["norm_bits"],
                                      norm_exp=exps[g]["norm_exp"], out_bits=gb["out_bits"],
                                      out_exp=exps[g]["out_exp"], **gmin))
        return mods

    @torch.no_grad()
    def load_float(self, net: nn.Module) -> None:
        """Copy the weights of a float student (CompressAI model with GDN1)."""
        for seq_q, seq_f in ((self.g_a, net.g_a), (self.g_s, net.g_s)):
            for mq, mf in zip(seq_q, seq_f):
                if isinstance(mq, QuantGDN1):
                    mq.load_float(mf)
                else:
                    mq.weight.copy_(mf.weight * getattr(mf, "gain", 1.0))  # a MinConv layer stores the gained weight
                    mq.bias.copy_(mf.bias)
        self.entropy_bottleneck.load_state_dict(net.entropy_bottleneck.state_dict())

    @torch.no_grad()
    def project_(self) -> None:
        """Re-impose the GDN constraints (gamma >= 0, beta >= one norm LSB)."""
        for mod in self.modules():
            if isinstance(mod, QuantGDN1):
                mod.project_()

    def forward(self, x: Tensor, trace: dict | None = None) -> dict:
        """``x`` in p/256 units.  ``trace`` (optional) receives the integer-valued QuantTensors
        of the input, the latent and the output."""
        xq = self.inq(x)
        y = self.g_a(xq)
        y_hat = self.latent_q(y)
        _, lik = self.entropy_bottleneck(y if self.training else y_hat.value)
        x_hat = self.g_s(y_hat)
        if trace is not None:
            trace.update(input=xq, latent=y_hat, output=x_hat)
        return {"x_hat": x_hat.value, "likelihoods": {"y": lik}}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` that first sizes the entropy coder's tables (empty
        until ``update()``) to those of ``state_dict``, as CompressAI models do."""
        from compressai.models.utils import update_registered_buffers

        update_registered_buffers(self.entropy_bottleneck, "entropy_bottleneck",
                                  ["_quantized_cdf", "_offset", "_cdf_length"], state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def _gdn_norm_float(gdn: nn.Module, x: Tensor) -> Tensor:
    if hasattr(gdn, "norm"):  # MinIGDN1
        return gdn.norm(x)
    c = x.shape[1]
    gamma = gdn.gamma_reparam(gdn.gamma).reshape(c, c, 1, 1)
    return nn.functional.conv2d(torch.abs(x), gamma, gdn.beta_reparam(gdn.beta))


@torch.no_grad()
def calibrate(net: nn.Module, cfg: LICConfig, recipe: Recipe, images: dict[str, np.ndarray],
              seed: int = 0) -> dict[str, dict[str, int]]:
    """Activation exponents from the float student: for every convolution output and every
    GDN norm and output, the ``percentile`` of |value| over ``crops`` random training crops
    must be representable (:func:`quant.lic_layers.exp_for_range`)."""
    cal = recipe.calibration
    sampler = CropSampler(images, cal["crop"], cal["crops"], seed=seed + 7919)
    x = sampler()
    net.eval()
    exps: dict[str, dict[str, int]] = {}

    def peak(t: Tensor) -> float:
        a = t.abs().flatten().double()
        k = max(1, int(math.ceil(cal["percentile"] / 100.0 * a.numel())))
        return float(a.kthvalue(k).values)

    h = x
    y = None
    for prefix, seq in (("g_a", net.g_a), ("g_s", net.g_s)):
        if prefix == "g_s":
            h = torch.round(y)
        for i, mod in enumerate(seq):
            name = f"{prefix}.{i}"
            if name in GDN_LAYERS:
                bits = recipe.bits(name)
                exps[name] = {"norm_exp": exp_for_range(peak(_gdn_norm_float(mod, h)), bits["norm_bits"], False)}
                h = mod(h)
                exps[name]["out_exp"] = exp_for_range(peak(h), bits["out_bits"], True)
            else:
                h = mod(h)
                if name not in ("g_a.6", "g_s.6"):
                    exps[name] = {"out_exp": exp_for_range(peak(h), recipe.bits(name)["out_bits"], True)}
            if hasattr(mod, "log2_gain"):  # a MinConv layer: its gain fixes the quantized layer too
                exps.setdefault(name, {})["log2_gain"] = int(mod.log2_gain)
        if prefix == "g_a":
            y = h
    return exps


def quantize_student(net: nn.Module, cfg: LICConfig, recipe: Recipe, images: dict[str, np.ndarray], *,
                     train: TrainConfig | None = None, seed: int = 0,
                     extra_loss: Callable[[nn.Module], Tensor] | None = None,
                     after_step: Callable[[nn.Module], None] | None = None,
                     state_path: str | Path | None = None, resume: bool = False,
                     log: Callable[[str], None] | None = print) -> tuple[QuantFactorizedPrior, dict]:
    """PTQ (``train=None``: calibrate, copy, project) or QAT (then ``train.steps`` steps of the
    rate-distortion loss with fake quantization, GDN projection after every step, then the
    user's ``after_step``).  Returns (quantized model in eval mode, training record)."""
    spec = QuantSpec(cfg, recipe, calibrate(net, cfg, recipe, images, seed))
    q = QuantFactorizedPrior(spec)
    q.load_float(net)
    record: dict = {"steps": 0, "wall_s": 0.0, "history": []}
    if train is not None:
        def project_then(m: nn.Module) -> None:
            m.project_()
            if after_step is not None:
                after_step(m)

        sampler = CropSampler(images, train.crop, train.batch, train.seed)
        arch = {"quantized": cfg.to_dict(), "recipe": recipe.name, "exps": spec.exps}
        record = train_lic(q, sampler, train, arch=arch, extra_loss=extra_loss, after_step=project_then,
                           state_path=state_path, resume=resume, desc=f"QAT {recipe.name}", log=log)
    q.eval()
    return q, record


def _exp(scale) -> int:
    s = float(scale.detach().reshape(-1)[0])
    e = math.log2(s)
    if abs(e - round(e)) > 1e-9:
        raise ValueError(f"scale {s} is not a power of two")
    return int(round(e))


@torch.no_grad()
def export_bundle(q: QuantFactorizedPrior, meta: dict[str, Any] | None = None) -> Bundle:
    """The integers of ``q`` as a deployment bundle (encoder, latent with the entropy
    coder's tables, decoder); ``q``'s entropy bottleneck must be prepared
    (:func:`prepare_entropy_coder`)."""
    q.eval()
    eb = q.entropy_bottleneck
    if eb._quantized_cdf.numel() == 0:
        raise ValueError("export_bundle: run prepare_entropy_coder(q.entropy_bottleneck) first")
    inputs: dict[str, Any] = {}
    hooks = [mod.register_forward_pre_hook(lambda m, a, n=name: inputs.__setitem__(n, a[0]))
             for seq, pre in ((q.g_a, "g_a"), (q.g_s, "g_s")) for name, mod in
             ((f"{pre}.{i}", m) for i, m in enumerate(seq))]
    try:
        q(torch.full((1, 3, 16, 16), 0.5))
    finally:
        for h in hooks:
            h.remove()
    layers: list[Layer] = []
    x_exp, x_bits = PIXEL_EXP, 8
    for prefix, seq in (("g_a", q.g_a), ("g_s", q.g_s)):
        if prefix == "g_s":
            layers.append(_latent_layer(q))
            x_exp, x_bits = 0, q.latent_bits
        for i, mod in enumerate(seq):
            name = f"{prefix}.{i}"
            if isinstance(mod, QuantGDN1):
                lay = _gdn_layer(name, mod, inputs[name], x_exp, x_bits)
            else:
                lay = _conv_layer(name, mod, inputs[name], x_exp, x_bits, q)
            layers.append(lay)
            x_exp, x_bits = lay.attrs["out_exp"], lay.attrs["out_bits"]
    cfg = q.spec.config
    model = {"arch": "bmshj2018-factorized", "N": cfg.N, "M": cfg.M, "gdn": "gdn1-simplified",
             "recipe": q.spec.recipe.name, "pad_multiple": 16, **(meta or {})}
    if cfg.product != "mul":
        model["product"] = cfg.product
    if cfg.mul_layers:
        model["mul_layers"] = list(cfg.mul_layers)
    inp = {"exp": PIXEL_EXP, "bits": 8, "signed": False, "shape": [3, None, None]}
    return Bundle(model, inp, layers)


def _conv_layer(name: str, mod: nn.Module, inp, x_exp: int, x_bits: int, q: QuantFactorizedPrior) -> Layer:
    qw = mod.quant_weight()
    w_int = qw.int().long().numpy()
    w_exp = _exp(qw.scale)
    mins = isinstance(mod, QuantMinConvTranspose2d)
    if mins:
        acc_exp, x_shift, w_shift = min_acc_exp(x_exp, w_exp, mod.log2_gain)
        b_int = mod.int_bias(inp.scale, qw.scale).numpy()
    else:
        acc_exp = x_exp + w_exp
        b_int = mod.bias_quant(mod.bias, inp, qw).int().long().numpy()
    transposed = isinstance(mod, QuantConvTranspose2d)
    if name == "g_a.6":
        out_exp, out_bits, signed = 0, q.latent_bits, True
    elif name == "g_s.6":
        out_exp, out_bits, signed = PIXEL_EXP, 8, False
    else:
        out_exp, out_bits, signed = q.spec.exps[name]["out_exp"], q.spec.recipe.bits(name)["out_bits"], True
    w_bits = q.spec.recipe.bits(name)["w_bits"]
    cin = w_int.shape[0] if transposed else w_int.shape[1]
    fan_in = cin * (9 if transposed else 25)  # taps per output: 3x3 of the sub-pixel kernel, or 5x5
    x_max = (1 << x_bits) - 1 if name == "g_a.0" else 1 << (x_bits - 1)
    b_bits = bits_for_range(int(b_int.min()), int(b_int.max()))
    # the largest term: a product, or a minimum of the shifted operands (contract_15)
    max_term = max(x_max << x_shift, (1 << (w_bits - 1)) << w_shift) if mins else (1 << (w_bits - 1)) * x_max
    attrs = {"x_exp": x_exp, "w_exp": w_exp, "acc_exp": acc_exp, "out_exp": out_exp,
             "shift": out_exp - acc_exp, "x_bits": x_bits, "w_bits": w_bits, "b_bits": b_bits,
             "out_bits": out_bits, "out_signed": signed, "relu": False, "product": "min" if mins else "mul",
             "acc_bits": accumulator_bits(max_term, fan_in, 1 << (b_bits - 1)),
             "stride": 2, "padding": 2}
    if mins:
        attrs.update(x_shift=x_shift, w_shift=w_shift, log2_gain=mod.log2_gain)
    if name == "g_a.0":
        attrs["x_signed"] = False
    if transposed:
        attrs["output_padding"] = 1
    return Layer(name, "conv_transpose2d" if transposed else "conv2d", attrs, {"weight": w_int, "bias": b_int})


def _gdn_layer(name: str, mod: QuantGDN1, inp, x_exp: int, x_bits: int) -> Layer:
    conv = mod.norm_conv
    qw = conv.quant_weight()
    gamma = qw.int().long().numpy()[:, :, 0, 0]
    gamma_exp = _exp(qw.scale)
    mins = mod.product == "min"
    if mins:
        acc_exp, nx_shift, ng_shift = min_acc_exp(x_exp, gamma_exp, conv.log2_gain)
        beta = conv.int_bias(2.0 ** x_exp, qw.scale).numpy()
    else:
        beta = conv.bias_quant(conv.bias, abs(inp), qw).int().long().numpy()
        acc_exp = x_exp + gamma_exp
    norm_shift = mod.norm_exp - acc_exp
    # (a min-form norm may round to 0 at a coarse accumulator: its output is then 0 = x * 0, no division)
    if not mins and (requantize(beta, norm_shift, mod.norm_bits, signed=False) < 1).any():
        raise ValueError(f"{name}: a beta below one norm LSB (2^{mod.norm_exp}); call project_() before export")
    out_shift = (mod.out_exp - x_exp - mod.norm_exp) if mod.inverse else (mod.out_exp + mod.norm_exp - x_exp)
    attrs = {"x_exp": x_exp, "x_bits": x_bits, "gamma_exp": gamma_exp, "gamma_bits": mod.gamma_bits,
             "beta_bits": bits_for_range(0, int(beta.max())), "norm_acc_exp": acc_exp,
             "norm_exp": mod.norm_exp, "norm_bits": mod.norm_bits, "norm_shift": norm_shift,
             "out_exp": mod.out_exp, "out_bits": mod.out_bits, "out_shift": out_shift}
    if mins:
        attrs.update(norm_product="min", norm_x_shift=nx_shift, norm_g_shift=ng_shift, out_product=mod.out_product,
                     log2_gain=conv.log2_gain)
    return Layer(name, "igdn" if mod.inverse else "gdn", attrs, {"gamma": gamma, "beta": beta})


def _latent_layer(q: QuantFactorizedPrior) -> Layer:
    eb = q.entropy_bottleneck
    med = eb.quantiles[:, 0, 1].detach()
    if not torch.equal(med, torch.round(med)):
        raise ValueError("latent: entropy-bottleneck medians are not integers; run prepare_entropy_coder")
    cdf = eb._quantized_cdf.long().numpy()
    length = eb._cdf_length.long().numpy()
    offset = eb._offset.long().numpy()
    median = med.long().numpy()
    attrs = {"x_exp": 0, "out_exp": 0, "shift": 0, "out_bits": q.latent_bits,
             "cdf_precision": int(eb.entropy_coder_precision),
             "cdf_bits": int(eb.entropy_coder_precision) + 1,
             "cdf_length_bits": bits_for_range(0, int(length.max())) - 1,
             "offset_bits": bits_for_range(int(offset.min()), int(offset.max()))}
    return Layer("latent", "latent", attrs, {"cdf": cdf, "cdf_length": length, "offset": offset,
                                             "median": median})


@torch.no_grad()
def brevitas_integers(q: QuantFactorizedPrior, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(latent integers, output pixel integers) of the Brevitas model in float64, for uint8
    ``pixels`` (N, 3, H, W): what the golden model must equal."""
    q.eval().double()
    try:
        trace: dict = {}
        q(torch.from_numpy(np.asarray(pixels, np.float64)) / 256.0, trace)
        return trace["latent"].int().long().numpy(), trace["output"].int().long().numpy()
    finally:
        q.float()


def save_quantized(q: QuantFactorizedPrior, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write the quantized model (state, config, recipe, exponents) for ``weights_only`` loading."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": QUANT_FORMAT, "config": q.spec.config.to_dict(), "recipe": q.spec.recipe.data,
                "exps": q.spec.exps, "meta": dict(meta or {}), "state_dict": q.state_dict()}, path)
    return path


def load_quantized(path: str | Path) -> tuple[QuantFactorizedPrior, dict]:
    """Read :func:`save_quantized`'s file; returns (model in eval mode, meta)."""
    ck = read_checkpoint(path, QUANT_FORMAT)
    try:
        spec = QuantSpec(LICConfig.from_dict(ck["config"]), parse_recipe(ck["recipe"], f"{path} (recipe)"),
                         ck["exps"])
        q = QuantFactorizedPrior(spec)
        q.load_state_dict(ck["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a consistent quantized model ({str(e).splitlines()[0][:160]})") from None
    q.eval()
    return q, dict(ck.get("meta", {}))
