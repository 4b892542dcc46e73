"""The watermark study on an LIC student: deployment at several weight widths, with the key in
the decoder layers (:mod:`watermark.lic`).

For every weight width, :func:`run_lic_study` deploys an unmarked control and, for every
scheme and payload, a marked student (embedded during QAT), and reports

* imperceptibility: PSNR and bpp of real bitstreams decoded by the integer golden model
  (``metric(bundle, tag)``, injected by the caller), marked vs control;
* the BER read from the bundle's integers and from the decoder's ROM files
  (``memory_weights(bundle, tag)``, injected: ``watermark/`` does not import ``rtl/``), and
  the mean BER of wrong keys on the same integers;
* permutation of the deployed bundle (encoder and decoder channels; the latent's entropy
  tables move with them): whether the integer golden model's pixels change (they must
  not), the BER without re-synchronization, and with re-synchronization against the owner's
  marked model.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from quant.bundle import Bundle
from quant.golden import run_layers
from .extract import ber
from .layers import bundle_chain, chain_weights, model_chain
from .lic import DECODER_LAYERS, LICHost
from .markers import MarkerParams, bind_marker
from .permute import permute, random_permutation
from .resync import fraction_restored, resynchronize

__all__ = ["LICStudyConfig", "run_lic_study"]


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


def _permutation(q, bundle: Bundle, key, cfg: LICStudyConfig, host: LICHost) -> dict:
    chain = bundle_chain(bundle)
    perms = random_permutation(chain, cfg.perm_seed)
    moved = permute(chain, perms)
    pixels = (host.data[:2] * 256).round().long().numpy()
    same = run_layers(chain, pixels)
    after = run_layers(moved, pixels)
    est, back = resynchronize(model_chain(q), moved)
    return {"golden_pixel_mismatches": int((same != after).sum()), "pixels_checked": int(same.size),
            "ber_without_resync": ber(key, chain_weights(moved)), "ber_with_resync": ber(key, chain_weights(back)),
            "neurons_restored": fraction_restored(est, perms)}


def run_lic_study(host: LICHost, cfg: LICStudyConfig = LICStudyConfig(), *,
                  metric: Callable[[Bundle, str], dict], memory_weights: Callable[[Bundle, str], dict] | None = None,
                  log: Callable[[str], None] = print) -> dict:
    """Run the LIC study (see the module docstring); returns a JSON-ready dict."""
    res: dict = {"config": {**asdict(cfg), "params": asdict(cfg.params)}, "student": host.weights.name,
                 "N": host.cfg.N, "M": host.cfg.M, "lmbda": host.lmbda, "key_layers": list(DECODER_LAYERS),
                 "qat": {"steps": host.steps, "lr": host.lr, "crops": host.crops, "crop": host.crop,
                         "batch": host.batch}, "control": {}, "runs": {}}
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
                    row["permutation"] = _permutation(copy.deepcopy(q), bundle, key, cfg, host)
                run["deployed"][str(b)] = row
                log(f"[LIC {scheme} {payload} bits, {b}-bit weights] {row}")
            res["runs"][f"{scheme}/{payload}"] = run
    return res
