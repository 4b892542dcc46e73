"""The watermark study on the digits classifier: embed, deploy, attack, re-synchronize.

For every product (exact ``mul``, MinConv ``min``), scheme (WaterMAS, Uchida) and payload,
:func:`run_study` measures

* imperceptibility: test accuracy of the marked float network vs the control network
  (same base, same extra training, no marker);
* deployment: BER read from the bundle's integers and from the memory init files written
  beside the Verilog (``memory_weights``, injected by the caller because ``watermark/``
  does not import ``rtl/``), and the integer golden model's accuracy, at each deployed bit
  width; plus the mean BER of ``wrong_keys`` wrong keys (other seeds) on the same integers;
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
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch

from quant.bundle import Bundle
from quant.digits import input_to_int, run_digits_golden
from .attacks import gaussian_noise, magnitude_prune
from .digits import DigitsHost
from .extract import ber
from .keys import make_key
from .layers import bundle_chain, chain_weights, load_chain_weights, model_chain
from .markers import MarkerParams
from .permute import permute, permute_model, random_permutation
from .resync import fraction_restored, resynchronize
from .train import classifier_loss, train

__all__ = ["StudyConfig", "run_study", "first_above", "BER_LIMIT"]

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


def _with_weights(net, weights):
    out = copy.deepcopy(net)
    load_chain_weights(out, weights)
    return out


def _noise(host, net, key, cfg):
    w0 = chain_weights(model_chain(net))
    rows = []
    for s in cfg.noise:
        draws = [gaussian_noise(w0, s, seed) for seed in range(cfg.noise_seeds)]
        rows.append({"strength": s, "ber": float(np.mean([ber(key, w) for w in draws])),
                     "accuracy": float(np.mean([host.accuracy(_with_weights(net, w)) for w in draws]))})
    return rows


def _prune(host, net, key, cfg):
    w0 = chain_weights(model_chain(net))
    rows = []
    for r in cfg.prune:
        w = magnitude_prune(w0, r)
        rows.append({"strength": r, "ber": ber(key, w), "accuracy": host.accuracy(_with_weights(net, w))})
    return rows


def _finetune(host, net, key, cfg):
    rows = []

    def record(k, m):
        if k in cfg.finetune_steps:
            rows.append({"strength": k, "ber": ber(key, chain_weights(model_chain(m))), "accuracy": host.accuracy(m)})

    if 0 in cfg.finetune_steps:
        record(0, net)
    victim = copy.deepcopy(net)
    train(victim, classifier_loss, host.attacker, steps=max(cfg.finetune_steps), lr=cfg.finetune_lr,
          seed=cfg.seed + 3, cosine=False, on_step=record, desc="fine-tune attack")
    return rows


def _quantize(host, net, key, cfg):
    rows = []
    for b in cfg.quant_bits:
        bundle = host.deploy(net, b, None, epochs=cfg.attack_qat_epochs, data=host.attacker)
        rows.append({"strength": b, "ber": ber(key, chain_weights(bundle_chain(bundle))),
                     "accuracy": host.bundle_accuracy(bundle)})
    return rows


def _resync_row(reference, suspect, truth, key) -> dict:
    est, back = resynchronize(reference, suspect)
    return {"ber_without_resync": ber(key, chain_weights(suspect)),
            "ber_with_resync": ber(key, chain_weights(back)),
            "neurons_restored": fraction_restored(est, truth)}


def _permutation(host, net, key, bundle: Bundle, cfg) -> dict:
    reference = model_chain(net)
    perms = random_permutation(reference, cfg.perm_seed)
    permuted = copy.deepcopy(net)
    permute_model(permuted, perms)
    out = {"float": _resync_row(reference, model_chain(permuted), perms, key),
           "float_logits_max_abs_diff": float((host_logits(host, net) - host_logits(host, permuted)).abs().max())}
    pruned = magnitude_prune(chain_weights(model_chain(permuted)), 0.5)
    out["float_then_prune_0.5"] = _resync_row(reference, model_chain(_with_weights(permuted, pruned)), perms, key)
    tuned = copy.deepcopy(permuted)
    train(tuned, classifier_loss, host.attacker, steps=cfg.perm_finetune_steps, lr=cfg.finetune_lr,
          seed=cfg.seed + 4, cosine=False)
    out[f"float_then_finetune_{cfg.perm_finetune_steps}"] = _resync_row(reference, model_chain(tuned), perms, key)
    deployed = bundle_chain(bundle)
    moved = permute(deployed, perms)
    pixels = (host.data["x_test"] * 16).round().long().numpy()
    x_int = input_to_int(pixels, bundle.input)
    same = run_digits_golden(bundle, x_int)
    perm_out = run_digits_golden(Bundle(bundle.model, bundle.input, moved), x_int)
    out["deployed"] = {"bits": bundle.model["bits"], "golden_logit_mismatches": int((same != perm_out).sum()),
                       **_resync_row(reference, moved, perms, key)}
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
    run["attacks"] = {"noise": _noise(host, net, key, cfg), "prune": _prune(host, net, key, cfg),
                      "finetune": _finetune(host, net, key, cfg), "quantize": _quantize(host, net, key, cfg)}
    run["ber_above_limit"] = {}
    for attack, rows in run["attacks"].items():
        hit = first_above(rows)
        run["ber_above_limit"][attack] = None if hit is None else {
            "strength": hit["strength"], "ber": hit["ber"],
            "accuracy_loss": run["accuracy_marked"] - hit["accuracy"]}
    log(f"{tag} BER > {BER_LIMIT:.0%} first at: {run['ber_above_limit']}")
    run["permutation"] = _permutation(host, net, key, low_bundle, cfg)
    log(f"{tag} permutation: {run['permutation']}")
    return run
