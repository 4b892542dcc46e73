"""The watermark against an informed attacker, on the digits classifier: function-preserving
obfuscation, an intercepted key, and the verdict with a p-value and a calibrated threshold.

For every product (exact ``mul`` by default; MinConv ``min`` costs ten times the CPU per null
model and only its verdicts and intercepted key are measured), scheme and payload,
:func:`run_adversary`
embeds the key in the base network (the host's recipe, :class:`watermark.digits.DigitsHost`),
deploys it at ``bits`` with the owner's QAT and measures:

* **verification**: unmarked null models, trained as the owner trains (same data, same budget)
  from independent initialisations (``nulls`` + ``heldout`` of them, seeds from ``null_seed``;
  never fine-tunes of the marked model), deployed at ``bits`` and read from their integers,
  directly and after re-synchronization against the marked model; the threshold of each
  reading is calibrated on the first ``nulls`` (:func:`watermark.verify.calibrate`) and its
  false-positive rate measured on the ``heldout`` others;
* **obfuscation** (exact CNN only: scaling and splits are not function-preserving through
  MinConv products): the marked float network's hidden neurons scaled, split, padded with
  dummy neurons and permuted (:func:`watermark.obfuscate.obfuscate`; sign flips are not exact
  through ReLU and are left out), the float logits compared, then the attacker's own deployment
  (QAT on the attacker's images, export) and, on top, magnitude pruning, fine-tuning or
  re-quantization at each strength of a sweep; every attacked network is deployed and read from
  its integers without re-synchronization (the key's coordinates read in the suspect's tensors)
  and with it (:func:`watermark.resync.resynchronize`): matched bits, BER, binomial p-value,
  the calibrated decision, and Psi (share of neurons whose origin was recovered).  For each
  attack, the strongest strength that costs the task at most ``budget`` (accuracy points against
  the owner's deployment), and all of them combined;
* **the intercepted key** (:mod:`watermark.intercept`): the cost of pushing the deployed BER to
  each of ``intercept_fractions`` with ``intercept_steps`` steps of fine-tuning against the mark.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from licforge.models.training import Marker, classifier_loss, train
from licforge.quant.bundle import Layer
from .attacks import magnitude_prune
from .digits import DigitsHost, digits_net
from .intercept import intercept_sweep
from .keys import WatermarkKey
from .layers import bundle_chain, chain_weights, load_chain_weights, model_chain
from .markers import MarkerParams
from .nulls import digits_nulls
from .obfuscate import Obfuscation, obfuscate
from .extract import ber
from .resync import MERGE, fraction_restored, live_origins, resynchronize
from .study import DigitsTarget, StudyConfig
from .verify import ALPHA, MODES, Calibration, calibrate_on, decide, read_direct, read_resync

__all__ = ["AdversaryConfig", "DigitsIntercept", "run_adversary", "verdicts", "calibrations", "within_budget"]


@dataclass(frozen=True)
class AdversaryConfig:
    """What :func:`run_adversary` sweeps (defaults: the benchmark)."""
    products: tuple[str, ...] = ("mul",)
    schemes: tuple[str, ...] = ("watermas", "uchida")
    payloads: tuple[int, ...] = (64, 256)
    bits: int = 8
    key_seed: int = 1
    obfuscation: Obfuscation = field(default_factory=Obfuscation)
    obfuscation_seed: int = 7
    prune: tuple[float, ...] = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9)
    finetune_steps: tuple[int, ...] = (200, 800, 3200)
    finetune_lr: float = 1e-3
    quant_bits: tuple[int, ...] = (6, 4, 3, 2)
    attack_qat_epochs: int = 10
    budget: float = 0.05
    merge: float = MERGE
    intercept_fractions: tuple[float, ...] = (0.1, 0.25, 0.5)
    intercept_steps: tuple[int, ...] = (0, 50, 200)
    nulls: int = 30
    heldout: int = 30
    null_seed: int = 1000
    alpha: float = ALPHA
    seed: int = 0
    params: MarkerParams = field(default_factory=MarkerParams)
    key_weights: int | None = 768


def calibrations(key: WatermarkKey, reference: list[Layer], nulls: list[list[Layer]], count: int, alpha: float,
                 merge: float = MERGE, info: dict | None = None) -> dict[str, Calibration]:
    """The ``"direct"`` and ``"resync"`` calibrations of ``key`` on the null models' chains
    (:func:`watermark.verify.calibrate_on`)."""
    return {m: calibrate_on(key, nulls, count, m, reference=reference, alpha=alpha, merge=merge, info=info)
            for m in MODES}


def verdicts(key: WatermarkKey, reference: list[Layer], chain: list[Layer], cals: dict[str, Calibration],
             truth: dict[str, np.ndarray] | None = None, merge: float = MERGE) -> dict:
    """The verdict on a deployed suspect ``chain`` read directly and after re-synchronization
    (with Psi against ``truth``, the true origins, when known, and the BER of the restoration
    with the true origins: what the attack destroyed, whatever the matching)."""
    direct = decide(key, read_direct(key, chain_weights(chain)), cals["direct"])
    bits, est = read_resync(key, reference, chain, merge)
    resync = decide(key, bits, cals["resync"])
    if truth is not None:
        live = live_origins(chain, truth)
        resync["psi"] = fraction_restored(est, live)
        _, back = resynchronize(reference, chain, merge=merge, known=live)
        resync["ber_true_origins"] = ber(key, chain_weights(back))
    return {"direct": direct, "resync": resync}


@dataclass
class DigitsIntercept:
    """The digits classifier as an :class:`watermark.intercept.InterceptTarget`: the attacker's
    loss is the cross-entropy on the attacker's images, fine-tuning Adam at ``lr`` on them,
    deployment the attacker's QAT at ``bits`` (``qat_epochs``) and export; the metric is the
    integer golden model's test accuracy."""
    host: DigitsHost
    bits: int
    qat_epochs: int
    lr: float = 1e-3
    seed: int = 5

    @property
    def deploy_bits(self) -> int:
        return self.bits

    @torch.no_grad()
    def attacker_loss(self, net: nn.Module) -> float:
        net.eval()
        return float(classifier_loss(net, self.host.attacker))

    def finetune(self, net: nn.Module, steps: int, marker: Marker | None) -> None:
        train(net, classifier_loss, self.host.attacker, steps=steps, lr=self.lr, seed=self.seed, cosine=False,
              marker=marker, desc="intercepted-key fine-tune")

    def deploy(self, net: nn.Module, key: WatermarkKey | None) -> tuple[list[Layer], dict[str, float]]:
        bundle = self.host.deploy(net, self.bits, key, epochs=self.qat_epochs, data=self.host.attacker)
        return bundle_chain(bundle), {"accuracy": self.host.bundle_accuracy(bundle)}


def within_budget(rows: list[dict], reference: float, budget: float) -> dict | None:
    """The last row (strongest strength, rows weakest first) whose accuracy is at most ``budget``
    below ``reference``."""
    ok = [r for r in rows if "accuracy" in r and reference - r["accuracy"] <= budget + 1e-12]
    return ok[-1] if ok else None


def _with(net: nn.Module, weights: dict) -> nn.Module:
    out = copy.deepcopy(net)
    load_chain_weights(out, weights)
    return out


def _obfuscation(host: DigitsHost, net: nn.Module, key: WatermarkKey, cals: dict, owner_acc: float,
                 cfg: AdversaryConfig, log: Callable[[str], None]) -> dict:
    """The obfuscation attacks on the marked float network (module docstring)."""
    reference = model_chain(net)
    obf_chain, truth = obfuscate(reference, cfg.obfuscation, cfg.obfuscation_seed)
    obf = digits_net(obf_chain)
    x = host.data["x_test"]
    with torch.no_grad():
        logit_diff = float((net(x) - obf(x)).abs().max())
    target = DigitsTarget(host, StudyConfig(finetune_lr=cfg.finetune_lr, attack_qat_epochs=cfg.attack_qat_epochs,
                                            seed=cfg.seed))
    plain_b = host.deploy(net, cfg.bits, None, epochs=cfg.attack_qat_epochs, data=host.attacker)
    obf_b = host.deploy(obf, cfg.bits, None, epochs=cfg.attack_qat_epochs, data=host.attacker)
    pixels = (x * 16).round().long().numpy()
    from licforge.quant.digits import input_to_int, run_digits_golden

    pred = [run_digits_golden(b, input_to_int(pixels, b.input)).argmax(1) for b in (plain_b, obf_b)]
    out: dict = {"widths": {n: int(len(o)) for n, o in truth.items()},
                 "function": {"float_logits_max_abs_diff": logit_diff,
                              "float_accuracy": [host.accuracy(net), host.accuracy(obf)],
                              "deployed_accuracy": [host.bundle_accuracy(plain_b), host.bundle_accuracy(obf_b)],
                              "deployed_predictions_changed": int((pred[0] != pred[1]).sum()),
                              "test_images": int(len(x))}}
    log(f"  obfuscated widths {out['widths']}: {out['function']}")

    def row(attack: str, strength, net_or_chain, width: int = cfg.bits) -> dict:
        """The verdicts on one attacked network: a deployed chain, or a float network that the
        attacker's QAT deploys at ``width`` bits."""
        try:
            if isinstance(net_or_chain, list):
                chain, acc = net_or_chain, host.bundle_accuracy(obf_b)
            else:
                chain, score = target.requantize(net_or_chain, width, attack)
                acc = score["accuracy"]
        except ValueError as e:  # Brevitas export of a collapsed low-bit network
            log(f"  obfuscated + {attack} {strength}: not deployable ({e})")
            return {"strength": strength, "failed": str(e)}
        r = {"strength": strength, "accuracy": acc, **verdicts(key, reference, chain, cals, truth, cfg.merge)}
        log(f"  obfuscated + {attack} {strength}: accuracy {acc:.3f}, BER direct {r['direct']['ber']:.3f} / "
            f"re-sync {r['resync']['ber']:.3f} (true origins {r['resync']['ber_true_origins']:.3f}), Psi "
            f"{r['resync']['psi']:.3f}, p {r['resync']['p_binomial']:.1e}, present {r['resync']['present']}")
        return r

    out["deployed"] = row("none", cfg.bits, bundle_chain(obf_b))
    w0 = chain_weights(model_chain(obf))
    tuned: dict[int, nn.Module] = {}
    target.finetune(copy.deepcopy(obf), max(cfg.finetune_steps),
                    lambda k, m: tuned.__setitem__(k, copy.deepcopy(m)) if k in cfg.finetune_steps else None)
    sweeps = {"prune": [row("prune", r, _with(obf, magnitude_prune(w0, r))) for r in cfg.prune],
              "finetune": [row("finetune", s, tuned[s]) for s in cfg.finetune_steps],
              "quantize": [row("quantize", b, obf, b) for b in cfg.quant_bits]}
    out["sweeps"] = sweeps
    best = {a: within_budget(rows, owner_acc, cfg.budget) for a, rows in sweeps.items()}
    out["strongest_within_budget"] = best
    comb = copy.deepcopy(obf)
    if best["prune"] is not None:
        comb = _with(comb, magnitude_prune(chain_weights(model_chain(comb)), best["prune"]["strength"]))
    if best["finetune"] is not None:
        target.finetune(comb, int(best["finetune"]["strength"]))
    bits = int(best["quantize"]["strength"]) if best["quantize"] is not None else cfg.bits
    out["combined"] = {"prune": best["prune"] and best["prune"]["strength"],
                       "finetune": best["finetune"] and best["finetune"]["strength"], "bits": bits,
                       **row("combined", "combined", comb, bits)}
    return out


def run_adversary(cfg: AdversaryConfig = AdversaryConfig(), *, cache: Path | None = None,
                  log: Callable[[str], None] = print, host: DigitsHost | None = None) -> dict:
    """Run the digits study (module docstring); returns a JSON-ready dict.  ``cache``: folder of
    the null models (``<build>/watermark/nulls``)."""
    host = host or DigitsHost(seed=cfg.seed)
    res: dict = {"config": {**asdict(cfg), "params": asdict(cfg.params)}, "products": {}}
    for product in cfg.products:
        base = host.train_base(product)
        seeds = list(range(cfg.null_seed, cfg.null_seed + cfg.nulls + cfg.heldout))
        nulls = digits_nulls(host, product, seeds, cfg.bits, cache, log=log)
        info = {"kind": f"digits {product} classifiers, owner's recipe from independent initialisations",
                "seeds": [seeds[0], seeds[-1]], "bits": cfg.bits}
        pres: dict = {"runs": {}}
        for scheme in cfg.schemes:
            for payload in cfg.payloads:
                tag = f"[adversary {product} {scheme} {payload} bits]"
                try:
                    net, key = host.embed(base, scheme, payload, cfg.key_seed,
                                          params=cfg.params.spread(payload, cfg.key_weights))
                except ValueError as e:
                    log(f"{tag} not embedded: {e}")
                    pres["runs"][f"{scheme}/{payload}"] = {"scheme": scheme, "payload": payload, "skipped": str(e)}
                    continue
                reference = model_chain(net)
                owner = host.deploy(net, cfg.bits, key)
                owner_acc = host.bundle_accuracy(owner)
                cals = calibrations(key, reference, nulls, cfg.nulls, cfg.alpha, cfg.merge, info)
                run = {"scheme": scheme, "payload": payload, "repeat": key.repeat,
                       "accuracy_marked": host.accuracy(net),
                       "owner_deployed_accuracy": owner_acc,
                       "calibration": {m: c.to_dict() for m, c in cals.items()},
                       "owner_deployed": verdicts(key, reference, bundle_chain(owner), cals)}
                log(f"{tag} owner {owner_acc:.3f}; thresholds direct {cals['direct'].threshold}, re-sync "
                    f"{cals['resync'].threshold} of {payload}; held-out false positives "
                    f"{cals['direct'].false_positive_rate:.3f} / {cals['resync'].false_positive_rate:.3f}")
                if product == "mul":
                    run["obfuscation"] = _obfuscation(host, net, key, cals, owner_acc, cfg, log)
                target = DigitsIntercept(host, cfg.bits, cfg.attack_qat_epochs, cfg.finetune_lr)
                run["intercept"] = intercept_sweep(target, net, key, cfg.intercept_fractions, cfg.intercept_steps,
                                                   {"accuracy": owner_acc}, {"accuracy": True}, log=log)
                pres["runs"][f"{scheme}/{payload}"] = run
        res["products"][product] = pres
    return res
