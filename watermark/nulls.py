"""Unmarked null models: what a network unrelated to the key looks like to the verifier.

A null model is trained the way the owner trains the marked one, on the same data, from an
independent initialisation (a different torch seed), and deployed the same way; it is never a
fine-tune of the marked model (which would share its signs).  The verifier's threshold is
calibrated on their matched-bit counts (:mod:`watermark.verify`).

* digits: :meth:`watermark.digits.DigitsHost.null_model` (base recipe, then the embedding
  budget without a marker), deployed at ``bits`` by the owner's QAT; about 2 s each on one core;
* LIC: an N=16 student trained from scratch for a few hundred steps (:func:`lic_null_student`),
  then deployed like the marked student (:class:`watermark.lic.LICHost`: PTQ + QAT, export).

Both are cached under a folder (``<build>/watermark/nulls``): float model files, and bundles by
bit width, named by everything that fixes them (host seed and recipe, init seed, bits).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from licforge.quant.bundle import Layer, read_bundle, write_bundle
from .digits import DigitsHost
from .keys import WatermarkKey
from .layers import bundle_chain, chain_weights
from .verify import ALPHA, Calibration, calibrate_on, key_fingerprint, weights_fingerprint

__all__ = ["digits_nulls", "digits_null_tag", "digits_calibration", "lic_null_student", "lic_nulls",
           "lic_calibration", "calibration_path", "NULL_SEED", "LIC_NULL_STEPS"]

NULL_SEED = 1000
"""First initialisation seed of the null models (the owner's networks use the host seed, 0 by default)."""
LIC_NULL_STEPS = 400
"""Training steps of an LIC null student (from scratch, before the owner's QAT recipe)."""


def calibration_path(cache: Path, key: WatermarkKey, reference: list[Layer] | None, bits: int | None, count: int,
                     heldout: int, alpha: float) -> Path:
    """Where a calibration is cached: ``cache/../calibration/<key>_<mode>[_<reference>]_b<bits>_n<count>+<heldout>``."""
    mode = "direct" if reference is None else "resync"
    ref = "" if reference is None else "_" + weights_fingerprint(chain_weights(reference))
    return Path(cache).parent / "calibration" / (f"{key_fingerprint(key)}_{mode}{ref}_b{bits or 'float'}"
                                                 f"_n{count}+{heldout}_a{alpha:g}.json")


def digits_null_tag(host: DigitsHost, product: str, init_seed: int) -> str:
    """The cache name of one digits null model: product, host data seed, recipe, init seed."""
    return (f"digits_{product}_d{host.seed}_e{host.base_epochs}-{host.minconv_epochs}-{host.embed_epochs}"
            f"-q{host.qat_epochs}_s{init_seed}")


def digits_nulls(host: DigitsHost, product: str, seeds: list[int], bits: int | None, cache: Path | None = None,
                 log: Callable[[str], None] | None = print) -> list[list[Layer]]:
    """The null models of ``seeds``: their deployed layers at ``bits`` (integers; the float
    weights with ``bits=None``), trained (or read from ``cache``) on first use."""
    from licforge.models.digits import load_digits_model, save_digits_model
    from .layers import model_chain

    out, trained = [], 0
    for s in seeds:
        tag = digits_null_tag(host, product, s)
        model_file = cache / f"{tag}.pt" if cache else None
        bundle_dir = cache / f"{tag}_b{bits}" if cache and bits else None
        if bundle_dir is not None and (bundle_dir / "bundle.json").is_file():
            out.append(bundle_chain(read_bundle(bundle_dir)))
            continue
        if model_file is not None and model_file.is_file():
            net = load_digits_model(model_file)
        else:
            net = host.null_model(product, s)
            trained += 1
            if model_file is not None:
                save_digits_model(net, model_file)
        if bits is None:
            out.append(model_chain(net))
            continue
        bundle = host.deploy(net, bits, None)
        if bundle_dir is not None:
            write_bundle(bundle, bundle_dir)
        out.append(bundle_chain(bundle))
    if log and trained:
        log(f"trained {trained} digits null models ({product}){f', cached in {cache}' if cache else ''}")
    return out


def _calibration(key: WatermarkKey, reference: list[Layer] | None, nulls: Callable[[list[int]], list[list[Layer]]],
                 info: dict, bits: int | None, count: int, heldout: int, alpha: float,
                 cache: Path | None) -> tuple[Calibration, Path | None]:
    """Read the cached calibration, or make it on the chains ``nulls(seeds)`` and cache it."""
    path = calibration_path(cache, key, reference, bits, count, heldout, alpha) if cache is not None else None
    if path is not None and path.is_file():
        return Calibration.load(path), path
    seeds = list(range(NULL_SEED, NULL_SEED + count + heldout))
    cal = calibrate_on(key, nulls(seeds), count, "direct" if reference is None else "resync", reference=reference,
                       alpha=alpha, info={**info, "seeds": [seeds[0], seeds[-1]], "bits": bits})
    if path is not None:
        cal.save(path)
    return cal, path


def digits_calibration(key: WatermarkKey, reference: list[Layer] | None, host: DigitsHost, bits: int | None, *,
                       count: int = 30, heldout: int = 30, alpha: float = ALPHA, cache: Path | None = None,
                       log: Callable[[str], None] | None = print) -> tuple[Calibration, Path | None]:
    """The calibration of a digits ``key`` on ``count + heldout`` null models (seeds from
    :data:`NULL_SEED`) deployed at ``bits`` (float with None), read directly or, with a
    ``reference``, after re-synchronization against it; cached as JSON under ``cache/../calibration``
    (:func:`calibration_path`, returned with it)."""
    product = key.model.get("product", "mul")
    return _calibration(key, reference, lambda seeds: digits_nulls(host, product, seeds, bits, cache, log=log),
                        {"kind": f"digits {product} classifiers trained by the owner's recipe from independent "
                                 f"initialisations"}, bits, count, heldout, alpha, cache)


def lic_calibration(key: WatermarkKey, reference: list[Layer] | None, host, w_bits: int, *, count: int, heldout: int,
                    alpha: float = ALPHA, cache: Path | None = None,
                    log: Callable[[str], None] | None = print) -> tuple[Calibration, Path | None]:
    """:func:`digits_calibration` for an LIC key: null students of :func:`lic_nulls` (minutes each)."""
    return _calibration(key, reference, lambda seeds: lic_nulls(host, seeds, LIC_NULL_STEPS, w_bits, cache, log=log),
                        {"kind": f"N={host.cfg.N} students trained {LIC_NULL_STEPS} steps from independent "
                                 f"initialisations, deployed like the owner's"}, w_bits, count, heldout, alpha, cache)


def lic_null_student(host, init_seed: int, steps: int):
    """An N=``host.cfg.N`` float student (the host's architecture and rate-distortion ``lmbda``)
    trained from scratch for ``steps`` steps on the host's training images, torch's initialisation,
    the crops and the noise seeded by ``init_seed`` (:func:`models.lic_train.train_lic`)."""
    import torch

    from licforge.models.data import CropSampler
    from licforge.models.lic import build_lic
    from licforge.models.lic_train import TrainConfig, train_lic

    torch.manual_seed(init_seed)
    net = build_lic(host.cfg)
    cfg = TrainConfig(lmbda=host.lmbda, steps=steps, seed=init_seed)
    train_lic(net, CropSampler(host.images, cfg.crop, cfg.batch, init_seed), cfg, arch=host.cfg.to_dict(), log=None)
    return net.eval()


def lic_nulls(host, seeds: list[int], steps: int, w_bits: int, cache: Path | None = None,
              log: Callable[[str], None] | None = print) -> list[list[Layer]]:
    """The deployed layers of the LIC null students of ``seeds``: :func:`lic_null_student`, then
    the owner's deployment (``host.quantize(w_bits)``, ``host.steps`` QAT steps without a marker,
    export), trained (or read from ``cache``) on first use."""
    from licforge.models.lic import load_weights, save_weights

    out = []
    for s in seeds:
        tag = f"lic_{host.cfg.name}_l{host.lmbda:g}_st{steps}_s{s}"
        model_file = cache / f"{tag}.pt" if cache else None
        bundle_dir = cache / f"{tag}_w{w_bits}_q{host.steps}" if cache else None
        if bundle_dir is not None and (bundle_dir / "bundle.json").is_file():
            out.append(bundle_chain(read_bundle(bundle_dir)))
            continue
        if model_file is not None and model_file.is_file():
            net = load_weights(model_file)[0]
        else:
            net = lic_null_student(host, s, steps)
            if model_file is not None:
                save_weights(net, host.cfg, model_file, {"lmbda": host.lmbda, "null_seed": s, "steps": steps})
        null = host.with_student(net)
        bundle = null.export(null.qat(null.quantize(w_bits), None))
        if bundle_dir is not None:
            write_bundle(bundle, bundle_dir)
        out.append(bundle_chain(bundle))
        if log:
            log(f"LIC null student seed {s}: {steps} training steps, deployed at {w_bits}-bit weights")
    return out
