"""The watermark study on an LIC student: deployment at several weight widths, with the key in
the decoder layers (:mod:`watermark.lic`).

For every weight width, :func:`run_lic_study` deploys an unmarked control and, for every
scheme and payload, a marked student (embedded during QAT), and reports

* imperceptibility: PSNR and bpp of real bitstreams decoded by the integer golden model
  (``metric(bundle, tag)``, injected by the caller), marked vs control;
* the BER read from the bundle's integers and from the decoder's ROM files
  (``memory_weights(bundle, tag)``, injected: :mod:`watermark.deployed` gives the real one), and
  the mean BER of wrong keys on the same integers;
* permutation of the deployed bundle (encoder and decoder channels; the latent's entropy
  tables move with them): whether the integer golden model's pixels change (they must
  not), the BER without re-synchronization, and with re-synchronization against the owner's
  marked model;
* the removal attacks of the digits study (:func:`watermark.study.attack_sweeps`) on the
  marked student deployed at the widest ``w_bits`` (:class:`LICTarget`): Gaussian noise
  (sigma relative to each layer's std) and magnitude pruning on every convolution's weights,
  fine-tuning on the attacker's data (QAT steps without the key, Adam at ``finetune_lr``), and
  re-quantization at each of ``quant_bits`` (the marked weights at the new width, then
  ``attack_qat_steps`` such steps).  Every attacked model is exported; the BER is read from
  its bundle's integers and PSNR / bpp measured on its bitstreams (``metric``).  For each
  attack, the weakest strength that pushes the BER above 10 % and the PSNR lost / bpp added
  there (:func:`watermark.study.ber_above_limit`).  The attacker's data are crops of the
  held-out images, the same images the PSNR is measured on (the embedded default has no third
  split): the PSNR after fine-tuning or re-quantization is optimistic for the attacker, so the
  PSNR lost there is a lower bound;
* permutation with attacks on top (:func:`permuted_attacks`): the deployed bundle permuted
  then pruned, and the student fine-tuned then permuted, each re-synchronized.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Callable, Mapping

import numpy as np
import torch
from torch import nn

from licforge.quant.bundle import Bundle, Layer
from licforge.quant.golden import run_layers
from .attacks import magnitude_prune
from .extract import ber
from .keys import WatermarkKey
from .layers import bundle_chain, chain_weights, model_chain
from .lic import DECODER_LAYERS, LICHost
from .markers import MarkerParams, bind_marker
from .permute import permute, random_permutation
from .study import BER_LIMIT, attack_sweeps, ber_above_limit, resync_row
from licforge.models.training import train

__all__ = ["LICStudyConfig", "LICTarget", "permuted_attacks", "permutation_resync", "run_lic_study"]


@dataclass(frozen=True)
class LICStudyConfig:
    """What :func:`run_lic_study` sweeps."""
    schemes: tuple[str, ...] = ("watermas", "uchida")
    payloads: tuple[int, ...] = (256,)
    w_bits: tuple[int, ...] = (8, 6, 4)
    wrong_keys: int = 20
    key_seed: int = 1
    perm_seed: int = 7
    # Uchida at lam 0.1 left 3 % of 256 bits wrong after 150 QAT steps (8-bit weights); 1.0 left none
    params: MarkerParams = MarkerParams(uchida_lam=1.0)
    # attack sweeps (few strengths: every point is a bundle export and an evaluation of the
    # held-out images on the integer golden model, about 4 s on one core)
    noise: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0)
    noise_seeds: int = 1
    prune: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 0.9, 0.97)
    finetune_steps: tuple[int, ...] = (0, 50, 200, 600, 2000)
    finetune_lr: float = 1e-3
    quant_bits: tuple[int, ...] = (8, 6, 4, 3, 2)
    attack_qat_steps: int = 50
    perm_prune: float = 0.5
    perm_finetune_steps: int = 200


@dataclass
class LICTarget:
    """The LIC student as a :class:`watermark.study.AttackTarget`: an attacked Brevitas model
    is exported (:meth:`LICHost.export`, on a copy); the BER is read from the bundle's
    integers and ``metric(bundle, tag_label)`` gives PSNR and bpp on the held-out images."""
    host: LICHost
    cfg: LICStudyConfig
    metric: Callable[[Bundle, str], dict]
    tag: str

    def deploy(self, q: nn.Module) -> Bundle:
        """The bundle of a copy of ``q`` (``q`` itself, possibly mid-training, is untouched)."""
        return self.host.export(copy.deepcopy(q))

    def chain(self, q: nn.Module) -> list[Layer]:
        """The layers of ``q``'s bundle (integer weights)."""
        return bundle_chain(self.deploy(q))

    def score(self, q: nn.Module, label: str) -> dict[str, float]:
        """``metric`` of ``q``'s bundle: PSNR and bpp of the held-out images."""
        return self.metric(self.deploy(q), f"{self.tag}_{label}")

    def finetune(self, q: nn.Module, steps: int, on_step: Callable[[int, nn.Module], None] | None = None) -> None:
        """QAT steps on the attacker's crops (rate-distortion loss, constant ``finetune_lr``, GDN
        constraints re-imposed after every step), without the key; the global torch generator
        (the entropy bottleneck's training noise) seeded first, like :meth:`LICHost.qat`."""
        def step(k: int, m: nn.Module) -> None:
            m.project_()
            if on_step is not None:
                on_step(k, m)

        torch.manual_seed(self.host.seed + 3)
        train(q, self.host.loss, (self.host.attacker,), steps=steps, lr=self.cfg.finetune_lr, batch=self.host.batch,
              seed=self.host.seed + 3, cosine=False, on_step=step, desc="LIC fine-tune attack")

    def requantize(self, q: nn.Module, bits: int, label: str) -> tuple[list[Layer], dict[str, float]]:
        """``q``'s parameters in the student quantized at ``bits``-bit weights (activation exponents
        of the owner's calibration), ``attack_qat_steps`` of :meth:`finetune`, export."""
        qb = self.host.quantize(bits)
        qb.load_state_dict(q.state_dict())
        self.finetune(qb, self.cfg.attack_qat_steps)
        bundle = self.deploy(qb)
        return bundle_chain(bundle), self.metric(bundle, f"{self.tag}_{label}")


def _with_chain_weights(chain: list[Layer], weights: Mapping[str, np.ndarray]) -> list[Layer]:
    """``chain`` with the weights of the layers in ``weights`` replaced (cast to the chain's dtype)."""
    return [Layer(l.name, l.op, l.attrs, {**l.tensors, "weight": np.asarray(weights[l.name]).astype(
        l.tensors["weight"].dtype)}) if l.name in weights else l for l in chain]


def permuted_attacks(target: LICTarget, q: nn.Module, key: WatermarkKey, cfg: LICStudyConfig) -> dict:
    """Permutation with pruning or fine-tuning on top, re-synchronized against ``q``.

    Pruning: the deployed bundle is permuted, then the ``perm_prune`` fraction of every
    layer's smallest integer weights is zeroed.  Fine-tuning: the student is fine-tuned
    (:meth:`LICTarget.finetune`, ``perm_finetune_steps``) and its bundle permuted; Adam and
    the loss are equivariant under a function-preserving permutation, so this is the
    fine-tuning of the permuted student (the Brevitas student with GDN cannot be permuted in
    place; its bundle can, exactly).  Each row: BER without / with re-synchronization, neurons
    restored, and PSNR / bpp of the attacked bundle."""
    reference = model_chain(q)
    bundle = target.deploy(q)
    perms = random_permutation(bundle_chain(bundle), cfg.perm_seed)
    moved = permute(bundle_chain(bundle), perms)
    pruned = _with_chain_weights(moved, magnitude_prune(chain_weights(moved), cfg.perm_prune))
    tuned = copy.deepcopy(q)
    target.finetune(tuned, cfg.perm_finetune_steps)
    tuned_bundle = target.deploy(tuned)
    cases = {f"permuted_then_pruned_{cfg.perm_prune}": Bundle(bundle.model, bundle.input, pruned),
             f"finetuned_{cfg.perm_finetune_steps}_then_permuted":
                 Bundle(tuned_bundle.model, tuned_bundle.input, permute(bundle_chain(tuned_bundle), perms))}
    return {case: {**resync_row(reference, b.layers, perms, key), **target.metric(b, f"{target.tag}_{case}")}
            for case, b in cases.items()}


def permutation_resync(q: nn.Module, bundle: Bundle, key: WatermarkKey, cfg: LICStudyConfig, host: LICHost) -> dict:
    """Permute the deployed ``bundle``'s channels (seed ``cfg.perm_seed``): the golden pixels of two
    training crops must not change; BER without and with re-synchronization against ``q``."""
    chain = bundle_chain(bundle)
    perms = random_permutation(chain, cfg.perm_seed)
    moved = permute(chain, perms)
    pixels = (host.data[:2] * 256).round().long().numpy()
    same = run_layers(chain, pixels)
    after = run_layers(moved, pixels)
    return {"golden_pixel_mismatches": int((same != after).sum()), "pixels_checked": int(same.size),
            **resync_row(model_chain(q), moved, perms, key)}


def run_lic_study(host: LICHost, cfg: LICStudyConfig = LICStudyConfig(), *,
                  metric: Callable[[Bundle, str], dict], memory_weights: Callable[[Bundle, str], dict] | None = None,
                  log: Callable[[str], None] = print) -> dict:
    """Run the LIC study (see the module docstring); returns a JSON-ready dict."""
    res: dict = {"config": {**asdict(cfg), "params": asdict(cfg.params)}, "student": host.weights.name,
                 "N": host.cfg.N, "M": host.cfg.M, "lmbda": host.lmbda, "key_layers": list(DECODER_LAYERS),
                 "qat": {"steps": host.steps, "lr": host.lr, "crops": host.crops, "crop": host.crop,
                         "batch": host.batch}, "control": {}, "runs": {}}
    res["attacked_w_bits"], res["ber_limit"] = max(cfg.w_bits), BER_LIMIT
    for b in cfg.w_bits:
        res["control"][str(b)] = metric(host.export(host.qat(host.quantize(b), None)), f"control_w{b}")
        log(f"[LIC control {b}-bit weights] {res['control'][str(b)]}")
    for scheme in cfg.schemes:
        for payload in cfg.payloads:
            key = host.key(scheme, payload, cfg.key_seed, cfg.params.for_scheme(scheme))
            wrong = [host.key(scheme, payload, cfg.key_seed + 1000 + k) for k in range(cfg.wrong_keys)]
            run = {"scheme": scheme, "payload": payload, "key_layers": sorted(key.layers), "deployed": {}}
            for b in cfg.w_bits:
                q = host.quantize(b)
                bundle = host.export(host.qat(q, bind_marker(key, q, write=scheme == "watermas")))
                ints = chain_weights(bundle_chain(bundle))
                tag = f"{scheme}_{payload}_w{b}"
                row = {"ber_bundle": ber(key, ints),
                       "ber_wrong_keys_mean": float(np.mean([ber(k, ints) for k in wrong])), **metric(bundle, tag)}
                if memory_weights is not None:
                    row["ber_memory_files"] = ber(key, memory_weights(bundle, tag))
                if b == min(cfg.w_bits):
                    row["permutation"] = permutation_resync(copy.deepcopy(q), bundle, key, cfg, host)
                if b == max(cfg.w_bits):
                    marked = q
                run["deployed"][str(b)] = row
                log(f"[LIC {scheme} {payload} bits, {b}-bit weights] {row}")
            _attack(run, marked, key, cfg, LICTarget(host, cfg, metric, f"{scheme}_{payload}_w{max(cfg.w_bits)}"), log)
            res["runs"][f"{scheme}/{payload}"] = run
    return res


def _attack(run: dict, q: nn.Module, key: WatermarkKey, cfg: LICStudyConfig, target: LICTarget,
            log: Callable[[str], None]) -> None:
    """The attack sweeps and permutation-with-attacks of one marked student ``q`` into ``run``."""
    tag = f"[LIC {run['scheme']} {run['payload']} bits, attacks]"
    run["attacks"] = attack_sweeps(target, q, key, cfg)
    ref = run["deployed"][str(max(cfg.w_bits))]
    run["ber_above_limit"] = ber_above_limit(run["attacks"], {"psnr": ref["psnr"], "bpp": ref["bpp"]},
                                             {"psnr": True, "bpp": False})
    log(f"{tag} BER > {BER_LIMIT:.0%} first at: {run['ber_above_limit']}")
    run["permutation_attacks"] = permuted_attacks(target, q, key, cfg)
    log(f"{tag} permutation with attacks on top: {run['permutation_attacks']}")
