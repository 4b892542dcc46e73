"""The informed attacker on the N=16 LIC student: obfuscation, the intercepted key, verdicts.

The owner's student (:class:`watermark.lic.LICHost`) carries a ``payload``-bit key in its
decoder, embedded during QAT at ``w_bits``-bit weights, and is deployed as a bundle.  For each
scheme, :func:`run_lic_adversary` measures, with PSNR and bpp of real bitstreams of the held-out
images decoded by the integer golden model (``metric``, injected):

* **verification**: LIC null students trained from scratch for ``null_steps`` steps from
  independent initialisations and deployed like the owner's (:func:`watermark.nulls.lic_nulls`),
  read directly and after re-synchronization; thresholds calibrated on ``nulls`` of them, the
  false-positive rate measured on ``heldout`` others (a few: each costs minutes of CPU);
* **obfuscation**, in the order the layers allow.  On the float parameters of the marked
  Brevitas student: positive scaling and sign flips of every neuron that reaches the next
  convolution through GDN1 / inverse GDN1 (``g_a.0/2/4``, ``g_s.0/2/4``; exact in float, the
  float outputs are compared), then the attack that needs the trainable model (none, fine-tuning
  on the attacker's crops, or re-quantization at fewer weight bits with ``attack_qat_steps``) and
  the export, whose power-of-two scales round (the deployed pixels are compared with the owner's:
  the difference is stated).  On the exported bundle's integers: split neurons, dummy neurons and
  cancelling pairs, a permutation of every hidden layer (the latent's channels included), exact:
  the golden model's pixels are checked unchanged; then, for the pruning attack, magnitude
  pruning of the integers.  Every attacked bundle is read without and with re-synchronization
  (BER, Psi, the BER with the true origins, binomial p-value, calibrated verdict) and measured;
  for each attack the strongest strength costing at most ``budget_db`` of PSNR, and the three
  combined (fine-tuning, re-quantization, the integer obfuscation, pruning);
* **the intercepted key** (:mod:`watermark.intercept`) on the marked student: PSNR and bpp cost of
  pushing the deployed BER to each of ``intercept_fractions``.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from licforge.models.training import Marker, train
from licforge.quant.bundle import Bundle, Layer
from .adversary import calibrations, verdicts
from .attacks import magnitude_prune
from .intercept import intercept_sweep
from .keys import WatermarkKey
from .layers import bundle_chain, chain_forward, chain_weights, model_chain
from .lic import LICHost, float_student, student_chain
from .markers import MarkerParams, bind_marker
from .nulls import LIC_NULL_STEPS, NULL_SEED, lic_nulls
from .obfuscate import Obfuscation, obfuscate
from .study import BER_LIMIT

__all__ = ["LICAdversaryConfig", "LICIntercept", "run_lic_adversary", "scale_and_flip_student"]


@dataclass(frozen=True)
class LICAdversaryConfig:
    """What :func:`run_lic_adversary` sweeps."""
    schemes: tuple[str, ...] = ("watermas", "uchida")
    payload: int = 256
    w_bits: int = 8
    qat_steps: int = 150
    key_seed: int = 1
    params: MarkerParams = MarkerParams(uchida_lam=1.0)
    key_weights: int | None = 768
    obfuscation_seed: int = 7
    prune: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5)
    finetune_steps: tuple[int, ...] = (50, 200, 600)
    finetune_lr: float = 1e-3
    quant_bits: tuple[int, ...] = (7, 6, 4)
    attack_qat_steps: int = 50
    budget_db: float = 1.0
    intercept_fractions: tuple[float, ...] = (0.1, 0.25, 0.5)
    intercept_steps: tuple[int, ...] = (0, 50)
    null_steps: int = LIC_NULL_STEPS
    nulls: int = 6
    heldout: int = 4
    alpha: float = 0.01
    seed: int = 0
    check_crops: int = 2

    @classmethod
    def quick(cls) -> "LICAdversaryConfig":
        """A smoke run: one scheme, one strength per attack, two null students."""
        return cls(schemes=("watermas",), qat_steps=20, prune=(0.5,), finetune_steps=(20,), quant_bits=(4,),
                   attack_qat_steps=5, intercept_fractions=(0.25,), intercept_steps=(0,), null_steps=50, nulls=2,
                   heldout=1)


def scale_and_flip_student(host: LICHost, q: nn.Module, seed: int,
                           w_bits: int) -> tuple[LICHost, nn.Module, list[Layer]]:
    """The attacker's re-deployment of the quantized student ``q`` after scaling every neuron that
    reaches the next convolution through a GDN (log-uniform in [1/2, 2]) and flipping half of
    them (:func:`watermark.obfuscate.obfuscate` on :func:`watermark.lic.student_chain`): the
    edited parameters as a float student, its host, and its PTQ at ``w_bits`` (activation
    exponents calibrated again on the edited student), with the edited float chain."""
    chain, _ = obfuscate(student_chain(q), Obfuscation(split=0, dummies=0, cancel=0, permute=False), seed)
    edited = host.with_student(float_student(host.net, chain, q.entropy_bottleneck))
    return edited, edited.quantize(w_bits), chain


def _float_output(chain: list[Layer], crops: torch.Tensor) -> np.ndarray:
    """A student chain's float function (no quantization, no rounding of the latent) on ``crops``."""
    return chain_forward([l for l in chain if l.op != "latent"], crops.numpy().astype(np.float64))


@dataclass
class LICIntercept:
    """The LIC student as an :class:`watermark.intercept.InterceptTarget`: the attacker's loss is
    the rate-distortion loss on 16 of the attacker's crops (eval mode), fine-tuning QAT steps on
    them (GDN constraints kept), deployment the export of the already quantized student."""
    host: LICHost
    metric: Callable[[Bundle, str], dict]
    bits: int
    lr: float = 1e-3
    tag: str = "intercept"
    calls: int = 0

    @property
    def deploy_bits(self) -> int:
        return self.bits

    @torch.no_grad()
    def attacker_loss(self, net: nn.Module) -> float:
        net.eval()
        return float(self.host.loss(net, (self.host.attacker[:16],)))

    def finetune(self, net: nn.Module, steps: int, marker: Marker | None) -> None:
        torch.manual_seed(self.host.seed + 5)
        train(net, self.host.loss, (self.host.attacker,), steps=steps, lr=self.lr, batch=self.host.batch,
              seed=self.host.seed + 5, cosine=False, marker=marker, on_step=lambda k, m: m.project_(),
              desc="intercepted-key fine-tune")

    def deploy(self, net: nn.Module, key: WatermarkKey | None) -> tuple[list[Layer], dict[str, float]]:
        bundle = self.host.export(copy.deepcopy(net))
        self.calls += 1
        return bundle_chain(bundle), self.metric(bundle, f"{self.tag}_{self.calls}")


def _obfuscation(host: LICHost, q: nn.Module, key: WatermarkKey, cals: dict, owner: dict, cfg: LICAdversaryConfig,
                 metric: Callable[[Bundle, str], dict], tag: str, log: Callable[[str], None]) -> dict:
    """The obfuscation attacks on the marked student ``q`` (module docstring)."""
    reference = model_chain(q)
    crops = host.data[:cfg.check_crops]
    pixels = (crops * 256).round().long().numpy()
    edited, flipped, chain = scale_and_flip_student(host, q, cfg.obfuscation_seed, cfg.w_bits)
    ref_out, obf_out = _float_output(student_chain(q), crops), _float_output(chain, crops)
    owner_b, flipped_b = host.export(copy.deepcopy(q)), host.export(copy.deepcopy(flipped))
    own_px, flip_px = chain_forward(owner_b.layers, pixels), chain_forward(flipped_b.layers, pixels)
    out: dict = {"function": {
        "float_max_abs_diff": float(np.abs(obf_out - ref_out).max()), "float_max_abs": float(np.abs(ref_out).max()),
        "deployed_pixels_changed": int((own_px != flip_px).sum()), "pixels_checked": int(own_px.size),
        "deployed_pixel_max_abs_diff": int(np.abs(own_px.astype(np.int64) - flip_px).max()),
        "flipped_metric": metric(flipped_b, f"{tag}_scaled_flipped")}}
    spec = Obfuscation(scale=False, flip=False, integer=True)

    def integer_obfuscation(bundle: Bundle) -> tuple[Bundle, dict]:
        chain, truth = obfuscate(bundle_chain(bundle), spec, cfg.obfuscation_seed + 1)
        return Bundle(bundle.model, bundle.input, chain), truth

    split_b, truth = integer_obfuscation(flipped_b)
    split_px = chain_forward(split_b.layers, pixels)
    out["function"]["split_pixels_changed"] = int((split_px != flip_px).sum())
    out["widths"] = {n: int(len(o)) for n, o in truth.items()}
    log(f"  [{tag}] obfuscation: {out['function']}, widths {out['widths']}")
    target_steps = sorted(cfg.finetune_steps)

    def row(attack: str, strength, bundle: Bundle, truth: dict) -> dict:
        r = {"strength": strength, **metric(bundle, f"{tag}_{attack}_{strength}"),
             **verdicts(key, reference, bundle.layers, cals, truth)}
        log(f"  [{tag}] obfuscated + {attack} {strength}: PSNR {r['psnr']:.2f} dB, bpp {r['bpp']:.4f}, BER direct "
            f"{r['direct']['ber']:.3f} / re-sync {r['resync']['ber']:.3f} (true origins "
            f"{r['resync']['ber_true_origins']:.3f}), Psi {r['resync']['psi']:.3f}, present {r['resync']['present']}")
        return r

    def requantized(q_from: nn.Module, bits: int) -> nn.Module:
        """``q_from``'s parameters at ``bits``-bit weights (exponents calibrated on the edited
        student), ``attack_qat_steps`` of fine-tuning."""
        qb = edited.quantize(bits)
        qb.load_state_dict(q_from.state_dict())
        _finetune(host, qb, cfg.attack_qat_steps, cfg)
        return qb

    out["deployed"] = row("none", cfg.w_bits, split_b, truth)
    sweeps: dict[str, list[dict]] = {"prune": [row("prune", p, _pruned(split_b, p), truth) for p in cfg.prune],
                                     "finetune": [], "quantize": []}
    tuned = copy.deepcopy(flipped)
    done = 0
    for s in target_steps:
        _finetune(host, tuned, s - done, cfg)
        done = s
        sweeps["finetune"].append(row("finetune", s, *integer_obfuscation(host.export(copy.deepcopy(tuned)))))
    for bits in cfg.quant_bits:
        sweeps["quantize"].append(row("quantize", bits, *integer_obfuscation(host.export(requantized(flipped, bits)))))
    out["sweeps"] = sweeps
    best = {a: next((r for r in reversed(rows) if owner["psnr"] - r["psnr"] <= cfg.budget_db), None)
            for a, rows in sweeps.items()}
    out["strongest_within_budget"] = best
    comb = copy.deepcopy(flipped)
    if best["finetune"] is not None:
        _finetune(host, comb, int(best["finetune"]["strength"]), cfg)
    bits = int(best["quantize"]["strength"]) if best["quantize"] is not None else cfg.w_bits
    if best["quantize"] is not None:
        comb = requantized(comb, bits)
    b, t = integer_obfuscation(host.export(comb))
    p = best["prune"]["strength"] if best["prune"] is not None else None
    out["combined"] = {"prune": p, "finetune": best["finetune"] and best["finetune"]["strength"], "bits": bits,
                       **row("combined", "combined", _pruned(b, p) if p else b, t)}
    return out


def _pruned(bundle: Bundle, rate: float) -> Bundle:
    """``bundle`` with the ``rate`` fraction of every layer's smallest integer weights set to zero."""
    w = magnitude_prune(chain_weights(bundle.layers), rate)
    return Bundle(bundle.model, bundle.input, [Layer(l.name, l.op, l.attrs, {**l.tensors, "weight": w[l.name].astype(
        np.int64)}) if l.name in w else l for l in bundle.layers])


def _finetune(host: LICHost, q: nn.Module, steps: int, cfg: LICAdversaryConfig) -> None:
    """``steps`` QAT steps on the attacker's crops (constant ``finetune_lr``, GDN constraints kept)."""
    if steps <= 0:
        return
    torch.manual_seed(host.seed + 3)
    train(q, host.loss, (host.attacker,), steps=steps, lr=cfg.finetune_lr, batch=host.batch, seed=host.seed + 3,
          cosine=False, on_step=lambda k, m: m.project_(), desc="LIC fine-tune attack")


def run_lic_adversary(cfg: LICAdversaryConfig = LICAdversaryConfig(), *, metric: Callable[[Bundle, str], dict],
                      cache: Path | None = None, log: Callable[[str], None] = print,
                      host: LICHost | None = None) -> dict:
    """Run the LIC study (module docstring); returns a JSON-ready dict."""
    host = host or LICHost(steps=cfg.qat_steps, seed=cfg.seed)
    seeds = list(range(NULL_SEED, NULL_SEED + cfg.nulls + cfg.heldout))
    nulls = lic_nulls(host, seeds, cfg.null_steps, cfg.w_bits, cache, log=log)
    info = {"kind": f"N={host.cfg.N} students trained {cfg.null_steps} steps from independent initialisations, "
                    f"deployed like the owner's", "seeds": [seeds[0], seeds[-1]], "w_bits": cfg.w_bits}
    res: dict = {"config": {**asdict(cfg), "params": asdict(cfg.params)}, "student": host.weights.name,
                 "N": host.cfg.N, "M": host.cfg.M, "ber_limit": BER_LIMIT, "runs": {}}
    for scheme in cfg.schemes:
        params = cfg.params.spread(cfg.payload, cfg.key_weights)
        key = host.key(scheme, cfg.payload, cfg.key_seed, params.for_scheme(scheme), params.repeat(scheme))
        q = host.quantize(cfg.w_bits)
        host.qat(q, bind_marker(key, q, write=scheme == "watermas"))
        tag = f"{scheme}_{cfg.payload}"
        owner_b = host.export(copy.deepcopy(q))
        owner = metric(owner_b, f"{tag}_owner")
        reference = model_chain(q)
        cals = calibrations(key, reference, nulls, cfg.nulls, cfg.alpha, info=info)
        run = {"scheme": scheme, "payload": cfg.payload, "repeat": key.repeat, "key_layers": sorted(key.layers),
               "owner": owner,
               "calibration": {m: c.to_dict() for m, c in cals.items()},
               "owner_deployed": verdicts(key, reference, owner_b.layers, cals)}
        log(f"[LIC adversary {tag}] owner {owner}; thresholds direct {cals['direct'].threshold}, re-sync "
            f"{cals['resync'].threshold} of {cfg.payload}")
        run["obfuscation"] = _obfuscation(host, q, key, cals, owner, cfg, metric, tag, log)
        target = LICIntercept(host, metric, cfg.w_bits, cfg.finetune_lr, f"{tag}_intercept")
        run["intercept"] = intercept_sweep(target, q, key, cfg.intercept_fractions, cfg.intercept_steps,
                                           {"psnr": owner["psnr"], "bpp": owner["bpp"]},
                                           {"psnr": True, "bpp": False}, log=log)
        res["runs"][scheme] = run
    return res
