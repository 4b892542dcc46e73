"""The watermark benchmark (``licforge bench watermark``): the removal study on the digits
classifier and the LIC student (embedding, deployment, attacks, re-synchronization, read back
from the deployed memory files; ``watermark.json`` and its plots) and the informed-attacker
study (function-preserving obfuscation, the intercepted key, verdicts against thresholds
calibrated on null models; ``watermark_adversary.json`` and its plots)."""
from __future__ import annotations

import json
from pathlib import Path

from licforge.watermark.deployed import decoder_weights, lic_metric, memory_weights
from licforge.watermark.report import adversary_tables, markdown_tables, write_adversary_report, write_report

__all__ = ["watermark_study", "STUDIES"]

STUDIES = ("removal", "adversary")


def _merge(results: Path, res: dict) -> dict:
    """``res`` with the hosts it lacks kept from an existing ``results`` file."""
    if results.is_file():
        kept = json.loads(results.read_text())
        res = {h: res[h] if h in res else kept[h] for h in ("digits", "lic") if h in res or h in kept}
    return res


def watermark_study(results: Path, build_dir: Path, quick: bool = False, hosts: tuple[str, ...] = ("digits", "lic"),
                    products: tuple[str, ...] = ("mul", "min"), studies: tuple[str, ...] = STUDIES) -> dict:
    """Run the studies for the hosts asked, write ``results`` (``watermark.json``) and
    ``watermark_adversary.json`` beside it (+ PNGs), print the tables; returns
    ``{study: results}``.  The section of a host not run is kept from an existing file
    (``--hosts lic`` refreshes the LIC sections only)."""
    work = Path(build_dir) / "watermark"
    out: dict = {}
    if "removal" in studies:
        res: dict = {}
        if "digits" in hosts:
            from licforge.watermark.study import StudyConfig, run_study

            cfg = StudyConfig(products=products)
            if quick:
                cfg = StudyConfig(products=products, payloads=(64,), noise=(0.0, 0.5, 1.0, 2.0), noise_seeds=1,
                                  prune=(0.0, 0.5, 0.9), finetune_steps=(0, 100), quant_bits=(8, 4, 2),
                                  perm_finetune_steps=50, wrong_keys=5)
            res["digits"] = run_study(cfg, memory_weights=lambda b, tag: memory_weights(b, work / "rtl" / tag))
        if "lic" in hosts:
            from licforge.watermark.lic import LICHost
            from licforge.watermark.lic_study import LICStudyConfig, run_lic_study

            host = LICHost(steps=20 if quick else LICHost.steps)
            cfg = LICStudyConfig()
            if quick:
                cfg = LICStudyConfig(w_bits=(8, 4), wrong_keys=5, noise=(0.0, 1.0), prune=(0.0, 0.9),
                                     finetune_steps=(0, 20), quant_bits=(8, 2), attack_qat_steps=5,
                                     perm_finetune_steps=10)
            res["lic"] = run_lic_study(host, cfg, metric=lambda b, tag: lic_metric(b, work / "lic" / tag / "bundle"),
                                       memory_weights=lambda b, tag: decoder_weights(b, work / "lic" / tag / "rtl"))
        res = _merge(results, res)
        paths = write_report(res, results)
        print(markdown_tables(res))
        print("wrote " + ", ".join(map(str, paths)))
        out["removal"] = res
    if "adversary" in studies:
        adv_json = results.with_name(f"{results.stem}_adversary.json")
        res = {}
        if "digits" in hosts:
            from licforge.watermark.adversary import AdversaryConfig, run_adversary

            adv_products = tuple(p for p in products if p == "mul") or products  # MinConv: on request only
            cfg = AdversaryConfig(products=adv_products)
            if quick:
                cfg = AdversaryConfig(products=adv_products, payloads=(64,), prune=(0.5,), finetune_steps=(200,),
                                      quant_bits=(4,), intercept_fractions=(0.25,), intercept_steps=(0,),
                                      nulls=5, heldout=5)
            res["digits"] = run_adversary(cfg, cache=work / "nulls")
        if "lic" in hosts:
            from licforge.watermark.lic_adversary import LICAdversaryConfig, run_lic_adversary

            cfg = LICAdversaryConfig.quick() if quick else LICAdversaryConfig()
            res["lic"] = run_lic_adversary(cfg, cache=work / "nulls",
                                           metric=lambda b, tag: lic_metric(b, work / "lic_adversary" / tag / "bundle"))
        res = _merge(adv_json, res)
        paths = write_adversary_report(res, adv_json)
        print(adversary_tables(res))
        print("wrote " + ", ".join(map(str, paths)))
        out["adversary"] = res
    return out
