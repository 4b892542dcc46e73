"""The watermark study on the digits classifier: embed, deploy, attack, re-synchronize.

For every product (exact ``mul``, MinConv ``min``), scheme (WaterMAS, Uchida) and payload,
:func:`run_study` measures

* imperceptibility: test accuracy of the marked float network vs the control network
  (same base, same extra training, no marker);
* deployment: BER read from the bundle's integers and from the memory init files written
  beside the Verilog (``memory_weights``, injected by the caller:
  :func:`watermark.deployed.memory_weights` is the real one), and the integer golden model's
  accuracy, at each deployed bit width; plus the mean BER of ``wrong_keys`` wrong keys (other
  seeds) on the same integers;
* attacks on the marked float network, each a sweep of strengths, with BER and accuracy:
  Gaussian noise (sigma relative to each layer's std, mean over ``noise_seeds`` draws),
  magnitude pruning (rate per layer), fine-tuning on the attacker's data (steps, Adam at
  ``finetune_lr``), quantization (Brevitas QAT by the attacker at each bit width, without the
  key, then export; BER from the integers, accuracy of the golden model);
* for each attack, the weakest strength of the sweep that pushes the BER above 10 % and the
  accuracy lost at that strength;
* permutation: BER without / with re-synchronization and the fraction of neurons put back,
  on the float network, with pruning or fine-tuning applied after the permutation, and on
  the deployed bundle (whose golden model output must not change at all).

The attack sweeps (:func:`attack_sweeps`, :func:`ber_above_limit`, :func:`resync_row`) see
the host through :class:`AttackTarget`; the LIC study (:mod:`watermark.lic_study`) runs the
same sweeps on an LIC student, with the BER read from its bundle and PSNR / bpp as metrics.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Protocol

import numpy as np
import torch
from torch import nn

from licforge.quant.bundle import Bundle, Layer
from licforge.quant.digits import input_to_int, run_digits_golden
from .attacks import gaussian_noise, magnitude_prune
from .digits import DigitsHost
from .extract import ber
from .keys import WatermarkKey, make_key
from .layers import bundle_chain, chain_weights, load_chain_weights, model_chain
from .markers import MarkerParams
from .permute import permute, permute_model, random_permutation
from .resync import fraction_restored, resynchronize
from licforge.models.training import classifier_loss, train

__all__ = ["StudyConfig", "run_study", "first_above", "BER_LIMIT", "AttackTarget", "SweepConfig", "DigitsTarget",
           "attack_sweeps", "ber_above_limit", "resync_row"]

BER_LIMIT = 0.10


@dataclass(frozen=True)
class StudyConfig:
    """What :func:`run_study` sweeps (defaults: the benchmark)."""
    products: tuple[str, ...] = ("mul", "min")
    schemes: tuple[str, ...] = ("watermas", "uchida")
    payloads: tuple[int, ...] = (64, 256)
    deploy_bits: tuple[int, ...] = (8, 6, 4)
    noise: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0)
    noise_seeds: int = 3
    prune: tuple[float, ...] = (0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
    finetune_steps: tuple[int, ...] = (0, 25, 50, 100, 200, 400, 800, 1600)
    finetune_lr: float = 1e-3
    quant_bits: tuple[int, ...] = (8, 6, 5, 4, 3, 2)
    attack_qat_epochs: int = 10
    perm_finetune_steps: int = 200
    wrong_keys: int = 20
    key_seed: int = 1
    perm_seed: int = 7
    seed: int = 0
    params: MarkerParams = field(default_factory=MarkerParams)


def first_above(rows: list[dict], limit: float = BER_LIMIT) -> dict | None:
    """The first row (weakest strength) whose BER exceeds ``limit``, or None."""
    return next((r for r in rows if r["ber"] > limit), None)


class SweepConfig(Protocol):
    """The strengths :func:`attack_sweeps` runs (fields of :class:`StudyConfig` and
    :class:`watermark.lic_study.LICStudyConfig`)."""
    noise: tuple[float, ...]
    noise_seeds: int
    prune: tuple[float, ...]
    finetune_steps: tuple[int, ...]
    quant_bits: tuple[int, ...]


class AttackTarget(Protocol):
    """A host as the attack sweeps see it: where the watermark is read from, what the task
    metrics are, and the attacker's fine-tuning and quantization (:class:`DigitsTarget`,
    :class:`watermark.lic_study.LICTarget`)."""

    def chain(self, net: nn.Module) -> list[Layer]:
        """The layers the watermark is read from once ``net`` is released (float weights or
        the integers of its bundle)."""

    def score(self, net: nn.Module, label: str) -> dict[str, float]:
        """The task metrics of ``net`` (``label`` names the measurement, e.g. ``noise_0.5``)."""

    def finetune(self, net: nn.Module, steps: int, on_step: Callable[[int, nn.Module], None] | None = None) -> None:
        """``steps`` steps of training on the attacker's data, ``net`` in place, without the key."""

    def requantize(self, net: nn.Module, bits: int, label: str) -> tuple[list[Layer], dict[str, float]]:
        """The attacker's quantization of ``net`` at ``bits``: the deployed layers and their task metrics."""


@dataclass
class DigitsTarget:
    """The digits classifier as an :class:`AttackTarget`: the BER is read from the float
    weights, the metric is the test accuracy; fine-tuning is Adam at ``cfg.finetune_lr`` on
    the attacker's split, quantization is Brevitas QAT on it (``cfg.attack_qat_epochs``)."""
    host: DigitsHost
    cfg: StudyConfig

    def chain(self, net: nn.Module) -> list[Layer]:
        """The float weights."""
        return model_chain(net)

    def score(self, net: nn.Module, label: str) -> dict[str, float]:
        """``{"accuracy"}`` on the test split."""
        return {"accuracy": self.host.accuracy(net)}

    def finetune(self, net: nn.Module, steps: int, on_step: Callable[[int, nn.Module], None] | None = None) -> None:
        """Adam on the attacker's split, constant learning rate."""
        train(net, classifier_loss, self.host.attacker, steps=steps, lr=self.cfg.finetune_lr, seed=self.cfg.seed + 3,
              cosine=False, on_step=on_step, desc="fine-tune attack")

    def requantize(self, net: nn.Module, bits: int, label: str) -> tuple[list[Layer], dict[str, float]]:
        """Brevitas QAT on the attacker's split (no key), export; accuracy of the golden model."""
        bundle = self.host.deploy(net, bits, None, epochs=self.cfg.attack_qat_epochs, data=self.host.attacker)
        return bundle_chain(bundle), {"accuracy": self.host.bundle_accuracy(bundle)}


def _with_weights(net: nn.Module, weights: Mapping[str, np.ndarray]) -> nn.Module:
    out = copy.deepcopy(net)
    load_chain_weights(out, weights)
    return out


def _row(target: AttackTarget, key: WatermarkKey, strength: float, net: nn.Module, label: str) -> dict:
    return {"strength": strength, "ber": ber(key, chain_weights(target.chain(net))), **target.score(net, label)}


def _noise(target: AttackTarget, net: nn.Module, key: WatermarkKey, cfg: SweepConfig) -> list[dict]:
    w0 = chain_weights(model_chain(net))
    rows = []
    for s in cfg.noise:
        draws = [_row(target, key, s, _with_weights(net, gaussian_noise(w0, s, seed)), f"noise_{s}_{seed}")
                 for seed in range(cfg.noise_seeds)]
        rows.append({k: s if k == "strength" else float(np.mean([d[k] for d in draws])) for k in draws[0]})
    return rows


def _prune(target: AttackTarget, net: nn.Module, key: WatermarkKey, cfg: SweepConfig) -> list[dict]:
    w0 = chain_weights(model_chain(net))
    return [_row(target, key, r, _with_weights(net, magnitude_prune(w0, r)), f"prune_{r}") for r in cfg.prune]


def _finetune(target: AttackTarget, net: nn.Module, key: WatermarkKey, cfg: SweepConfig) -> list[dict]:
    rows = []

    def record(k: int, m: nn.Module) -> None:
        if k in cfg.finetune_steps:
            rows.append(_row(target, key, k, m, f"finetune_{k}"))

    if 0 in cfg.finetune_steps:
        record(0, net)
    target.finetune(copy.deepcopy(net), max(cfg.finetune_steps), record)
    return rows


def _quantize(target: AttackTarget, net: nn.Module, key: WatermarkKey, cfg: SweepConfig) -> list[dict]:
    rows = []
    for b in cfg.quant_bits:
        chain, score = target.requantize(net, b, f"quantize_{b}")
        rows.append({"strength": b, "ber": ber(key, chain_weights(chain)), **score})
    return rows


def attack_sweeps(target: AttackTarget, net: nn.Module, key: WatermarkKey, cfg: SweepConfig) -> dict[str, list[dict]]:
    """The four removal attacks on ``net``, each a sweep of strengths (module docstring): rows
    ``{"strength", "ber", <task metrics>}``, weakest strength first.  Noise and pruning act on
    every dot layer's weights; the noise row is the mean over ``cfg.noise_seeds`` draws."""
    return {"noise": _noise(target, net, key, cfg), "prune": _prune(target, net, key, cfg),
            "finetune": _finetune(target, net, key, cfg), "quantize": _quantize(target, net, key, cfg)}


def ber_above_limit(attacks: dict[str, list[dict]], reference: dict[str, float],
                    higher_is_better: Mapping[str, bool]) -> dict[str, dict | None]:
    """For each attack, the weakest strength whose BER exceeds :data:`BER_LIMIT` (None if
    none does) and the task loss there against the unattacked ``reference`` metrics:
    ``<metric>_loss`` is ``reference - attacked`` for a metric where higher is better,
    ``attacked - reference`` otherwise (e.g. bits per pixel)."""
    out: dict[str, dict | None] = {}
    for attack, rows in attacks.items():
        hit = first_above(rows)
        out[attack] = None if hit is None else {"strength": hit["strength"], "ber": hit["ber"], **{
            f"{m}_loss": (reference[m] - hit[m]) * (1 if up else -1) for m, up in higher_is_better.items()}}
    return out


def resync_row(reference: list[Layer], suspect: list[Layer], truth: Mapping[str, np.ndarray],
               key: WatermarkKey) -> dict:
    """BER of ``suspect`` (permuted by ``truth``) without and with re-synchronization against
    ``reference``, and the fraction of neurons put back in place."""
    est, back = resynchronize(reference, suspect)
    return {"ber_without_resync": ber(key, chain_weights(suspect)),
            "ber_with_resync": ber(key, chain_weights(back)),
            "neurons_restored": fraction_restored(est, truth)}


def _permutation(host, net, key, bundle: Bundle, cfg) -> dict:
    reference = model_chain(net)
    perms = random_permutation(reference, cfg.perm_seed)
    permuted = copy.deepcopy(net)
    permute_model(permuted, perms)
    out = {"float": resync_row(reference, model_chain(permuted), perms, key),
           "float_logits_max_abs_diff": float((host_logits(host, net) - host_logits(host, permuted)).abs().max())}
    pruned = magnitude_prune(chain_weights(model_chain(permuted)), 0.5)
    out["float_then_prune_0.5"] = resync_row(reference, model_chain(_with_weights(permuted, pruned)), perms, key)
    tuned = copy.deepcopy(permuted)
    train(tuned, classifier_loss, host.attacker, steps=cfg.perm_finetune_steps, lr=cfg.finetune_lr,
          seed=cfg.seed + 4, cosine=False)
    out[f"float_then_finetune_{cfg.perm_finetune_steps}"] = resync_row(reference, model_chain(tuned), perms, key)
    deployed = bundle_chain(bundle)
    moved = permute(deployed, perms)
    pixels = (host.data["x_test"] * 16).round().long().numpy()
    x_int = input_to_int(pixels, bundle.input)
    same = run_digits_golden(bundle, x_int)
    perm_out = run_digits_golden(Bundle(bundle.model, bundle.input, moved), x_int)
    out["deployed"] = {"bits": bundle.model["bits"], "golden_logit_mismatches": int((same != perm_out).sum()),
                       **resync_row(reference, moved, perms, key)}
    return out


def host_logits(host: DigitsHost, net) -> torch.Tensor:
    """Float logits of ``net`` on the test split."""
    net.eval()
    with torch.no_grad():
        return net(host.data["x_test"])


def run_study(cfg: StudyConfig = StudyConfig(), *, memory_weights: Callable[[Bundle, str], dict] | None = None,
              log: Callable[[str], None] = print, host: DigitsHost | None = None) -> dict:
    """Run the study (see the module docstring); returns a JSON-ready dict."""
    host = host or DigitsHost(seed=cfg.seed)
    res: dict = {"config": {**asdict(cfg), "params": asdict(cfg.params)},
                 "split": {k: int(len(v)) for k, v in host.data.items() if k.startswith("x_")},
                 "recipe": {"base_epochs": host.base_epochs, "minconv_epochs": host.minconv_epochs,
                            "embed_epochs": host.embed_epochs, "qat_epochs": host.qat_epochs},
                 "ber_limit": BER_LIMIT, "products": {}}
    for product in cfg.products:
        base = host.train_base(product)
        control = host.continue_training(copy.deepcopy(base), None)
        pres = {"accuracy_base": host.accuracy(base), "accuracy_control": host.accuracy(control),
                "control_deployed_accuracy": {str(b): host.bundle_accuracy(host.deploy(control, b, None))
                                              for b in cfg.deploy_bits}, "runs": {}}
        log(f"[{product}] base {pres['accuracy_base']:.2%}, control {pres['accuracy_control']:.2%}, "
            f"control deployed {pres['control_deployed_accuracy']}")
        for scheme in cfg.schemes:
            for payload in cfg.payloads:
                pres["runs"][f"{scheme}/{payload}"] = _run(host, base, product, scheme, payload, cfg,
                                                           memory_weights, log)
        res["products"][product] = pres
    return res


def _run(host, base, product, scheme, payload, cfg, memory_weights, log) -> dict:
    tag = f"[{product} {scheme} {payload} bits]"
    try:
        net, key = host.embed(base, scheme, payload, cfg.key_seed, params=cfg.params)
    except ValueError as e:  # e.g. an Uchida payload beyond the layer's kernel size
        log(f"{tag} not embedded: {e}")
        return {"scheme": scheme, "payload": payload, "skipped": str(e)}
    wrong = [make_key(scheme, model_chain(net), payload, cfg.key_seed + 1000 + k) for k in range(cfg.wrong_keys)]
    run = {"scheme": scheme, "payload": payload, "key_layers": sorted(key.layers),
           "accuracy_marked": host.accuracy(net), "ber_float": ber(key, chain_weights(model_chain(net))),
           "deployed": {}}
    log(f"{tag} marked accuracy {run['accuracy_marked']:.2%}, float BER {run['ber_float']:.3f}")
    for b in cfg.deploy_bits:
        bundle = host.deploy(net, b, key)
        ints = chain_weights(bundle_chain(bundle))
        row = {"ber_bundle": ber(key, ints), "ber_wrong_keys_mean": float(np.mean([ber(k, ints) for k in wrong])),
               "accuracy": host.bundle_accuracy(bundle)}
        if memory_weights is not None:
            row["ber_memory_files"] = ber(key, memory_weights(bundle, f"{product}_{scheme}_{payload}_b{b}"))
        run["deployed"][str(b)] = row
        log(f"{tag} deployed {b}-bit: {row}")
        if b == min(cfg.deploy_bits):
            low_bundle = bundle
    run["attacks"] = attack_sweeps(DigitsTarget(host, cfg), net, key, cfg)
    run["ber_above_limit"] = ber_above_limit(run["attacks"], {"accuracy": run["accuracy_marked"]}, {"accuracy": True})
    log(f"{tag} BER > {BER_LIMIT:.0%} first at: {run['ber_above_limit']}")
    run["permutation"] = _permutation(host, net, key, low_bundle, cfg)
    log(f"{tag} permutation: {run['permutation']}")
    return run
