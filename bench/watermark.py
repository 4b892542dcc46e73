"""The watermark benchmark: the digits and LIC studies (embedding, deployment, attacks,
re-synchronization), read back from the deployed memory files; writes ``watermark.json``
and its plots (``licforge bench watermark``)."""
from __future__ import annotations

import json
from pathlib import Path

from licforge.watermark.deployed import decoder_weights, lic_metric, memory_weights
from licforge.watermark.report import markdown_tables, write_report

__all__ = ["watermark_study"]


def watermark_study(results: Path, build_dir: Path, quick: bool = False, hosts: tuple[str, ...] = ("digits", "lic"),
                    products: tuple[str, ...] = ("mul", "min")) -> dict:
    """Run the digits and/or LIC studies, write ``results`` (+ PNGs), print the tables.  The
    section of a host not run is kept from an existing ``results`` file (``--hosts lic``
    refreshes the LIC section only)."""
    work = Path(build_dir) / "watermark"
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
    if results.is_file():  # hosts not run this time keep their section of an existing file
        kept = json.loads(results.read_text())
        res = {h: res[h] if h in res else kept[h] for h in ("digits", "lic") if h in res or h in kept}
    paths = write_report(res, results)
    print(markdown_tables(res))
    print("wrote " + ", ".join(map(str, paths)))
    return res
