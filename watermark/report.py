"""Report of the watermark studies: ``watermark.json``, ``watermark_adversary.json``, PNGs,
Markdown tables.

``results`` holds ``"digits"`` (:func:`watermark.study.run_study`) and/or ``"lic"``
(:func:`watermark.lic_study.run_lic_study`).  Each digits PNG (one per product) has a row
per attack (noise, pruning, fine-tuning, quantization) and two columns, BER and task accuracy
against attack strength, with WaterMAS (solid) and Uchida (dashed) side by side for every
payload; the dotted line is the 10 % BER limit.  The LIC PNG shows the deployed BER and the
PSNR against the weight bit width, marked vs control; the LIC attacks PNG is laid out like the
digits ones, with PSNR and bpp of the held-out images as the task metrics.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from licforge.tables import markdown_table
from .study import BER_LIMIT

__all__ = ["write_report", "markdown_tables", "ATTACK_AXES", "write_adversary_report", "adversary_tables"]

ATTACK_AXES = {
    "noise": "Gaussian noise sigma (x layer std)",
    "prune": "magnitude pruning rate",
    "finetune": "fine-tuning steps (attacker data)",
    "quantize": "attacker QAT bit width",
}
_HOST = {"mul": "exact CNN", "min": "MinConv CNN"}


def _plot_attacks(runs: dict, metrics: list[tuple[str, str, float]], title: str, path: Path) -> None:
    """One row per attack: BER and then each of ``metrics`` (key, axis label, factor) against
    the attack strength, WaterMAS solid and Uchida dashed, for every run that has attacks."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {k: r for k, r in runs.items() if "attacks" in r}
    cols = [("ber", "BER (%)", 100.0), *metrics]
    fig, axes = plt.subplots(len(ATTACK_AXES), len(cols), figsize=(5 * len(cols), 3.1 * len(ATTACK_AXES)))
    for row, (attack, label) in enumerate(ATTACK_AXES.items()):
        for r in runs.values():
            pts = r["attacks"][attack]
            xs = [p["strength"] for p in pts]
            style = "-" if r["scheme"] == "watermas" else "--"
            nice = f"{'WaterMAS' if r['scheme'] == 'watermas' else 'Uchida'} {r['payload']} b"
            for col, (m, _, factor) in enumerate(cols):
                axes[row, col].plot(xs, [factor * p[m] for p in pts], style, marker="o", ms=3, label=nice)
        axes[row, 0].axhline(100 * BER_LIMIT, color="k", ls=":", lw=1)
        for col, (_, ylabel, _) in enumerate(cols):
            ax = axes[row, col]
            ax.set_ylabel(ylabel)
            ax.set_xlabel(label)
            ax.grid(alpha=0.3)
            if attack == "quantize":
                ax.invert_xaxis()
            if attack == "finetune":
                ax.set_xscale("symlog", linthresh=25)
                ax.set_xlim(left=0)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot(product: str, pres: dict, path: Path) -> None:
    _plot_attacks(pres["runs"], [("accuracy", "test accuracy (%)", 100.0)],
                  f"Watermarks on the {_HOST.get(product, product)} (digits): BER and accuracy vs attack strength",
                  path)


def _plot_lic(lic: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bits = [int(b) for b in lic["config"]["w_bits"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[1].plot(bits, [lic["control"][str(b)]["psnr"] for b in bits], "k:", marker="s", ms=4, label="control")
    for r in lic["runs"].values():
        style = "-" if r["scheme"] == "watermas" else "--"
        nice = f"{'WaterMAS' if r['scheme'] == 'watermas' else 'Uchida'} {r['payload']} b"
        dep = r["deployed"]
        axes[0].plot(bits, [100 * dep[str(b)]["ber_bundle"] for b in bits], style, marker="o", ms=4, label=nice)
        axes[1].plot(bits, [dep[str(b)]["psnr"] for b in bits], style, marker="o", ms=4, label=nice)
    top = max(100 * r["deployed"][str(b)]["ber_bundle"] for r in lic["runs"].values() for b in bits)
    axes[0].set_ylim(-1, max(10.0, 1.1 * top))
    axes[0].set_ylabel("BER of the deployed integers (%)")
    axes[1].set_ylabel("PSNR, held-out images (dB)")
    for ax in axes:
        ax.set_xlabel("weight bit width")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Watermarks in the decoder of the LIC student N={lic['N']} (key in {', '.join(lic['key_layers'])})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict, out_json: Path) -> list[Path]:
    """Write ``out_json`` and the PNGs beside it (``<stem>_<product>.png`` per digits host,
    ``<stem>_lic.png`` and, with attacks, ``<stem>_lic_attacks.png``); returns the paths."""
    out_json = Path(out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(results, indent=1))
    paths = [out_json]
    for product, pres in results.get("digits", {}).get("products", {}).items():
        png = out_json.with_name(f"{out_json.stem}_{product}.png")
        _plot(product, pres, png)
        paths.append(png)
    if "lic" in results:
        lic = results["lic"]
        png = out_json.with_name(f"{out_json.stem}_lic.png")
        _plot_lic(lic, png)
        paths.append(png)
        if any("attacks" in r for r in lic["runs"].values()):
            png = out_json.with_name(f"{out_json.stem}_lic_attacks.png")
            _plot_attacks(lic["runs"], [("psnr", "PSNR, held-out images (dB)", 1.0), ("bpp", "bpp", 1.0)],
                          f"Watermarks in the decoder of the LIC student N={lic['N']} "
                          f"({lic['attacked_w_bits']}-bit weights): BER, PSNR and bpp vs attack strength", png)
            paths.append(png)
    return paths


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f} %"


def markdown_tables(results: dict) -> str:
    """The studies' headline numbers as Markdown tables (for the README and the console)."""
    tables = []
    if "digits" in results:
        tables += _digits_tables(results["digits"])
    if "lic" in results:
        tables += _lic_tables(results["lic"])
    return "\n\n".join(markdown_table(cols, rows) for cols, rows in tables)


_Table = tuple[list[str], list[list[str]]]
"""Columns and rows of one table, cells as text."""


def _lic_tables(lic: dict) -> list[_Table]:
    bits = [str(b) for b in lic["config"]["w_bits"]]
    rows = [["control (no watermark)", f"{b}-bit", f"{c['psnr']:.2f}", f"{c['bpp']:.4f}", "–", "–", "–"]
            for b, c in ((b, lic["control"][b]) for b in bits)]
    for r in lic["runs"].values():
        for b in bits:
            d = r["deployed"][b]
            rows.append([f"{r['scheme']} {r['payload']} bits", f"{b}-bit", f"{d['psnr']:.2f}", f"{d['bpp']:.4f}",
                         _pct(d["ber_bundle"]), _pct(d.get("ber_memory_files")), _pct(d["ber_wrong_keys_mean"])])
    tables = [([f"LIC student N={lic['N']}", "weights", "PSNR (dB)", "bpp", "BER bundle", "BER decoder ROM files",
                "wrong keys, mean BER"], rows)]
    rows = []
    for r in lic["runs"].values():
        for b in bits:
            p = r["deployed"][b].get("permutation")
            if p:
                rows.append([f"{r['scheme']} {r['payload']} bits", f"{b}-bit",
                             f"{p['golden_pixel_mismatches']} of {p['pixels_checked']}", _pct(p["ber_without_resync"]),
                             _pct(p["ber_with_resync"]), _pct(p["neurons_restored"])])
    tables.append((["LIC student, permuted deployed bundle", "weights", "golden pixels changed", "BER without re-sync",
                    "BER with re-sync", "neurons restored"], rows))
    runs = [r for r in lic["runs"].values() if "attacks" in r]
    if not runs:
        return tables
    tables.append(([f"LIC student, {lic['attacked_w_bits']}-bit weights"]
                   + [f"{a}: strength for BER > 10 % (PSNR lost, bpp added)" for a in ATTACK_AXES],
                   [[f"{r['scheme']} {r['payload']} bits"]
                    + [_limit_cell(r, a, lambda h: f"{h['psnr_loss']:.2f} dB, {h['bpp_loss']:+.4f}",
                                   lambda t: f"PSNR {t['psnr']:.2f} dB") for a in ATTACK_AXES] for r in runs]))
    tables.append((["LIC student, permutation with attacks on top", "case", "BER without re-sync", "BER with re-sync",
                    "neurons restored", "PSNR (dB)", "bpp"],
                   [[f"{r['scheme']} {r['payload']} bits", case, _pct(v["ber_without_resync"]),
                     _pct(v["ber_with_resync"]), _pct(v["neurons_restored"]), f"{v['psnr']:.2f}", f"{v['bpp']:.4f}"]
                    for r in runs for case, v in r["permutation_attacks"].items()]))
    return tables


def _limit_cell(run: dict, attack: str, loss: Callable[[dict], str], metric: Callable[[dict], str]) -> str:
    """``strength (loss)`` where the BER first exceeds the limit, or what the strongest attack left."""
    hit = run["ber_above_limit"][attack]
    if hit is None:
        top = run["attacks"][attack][-1]
        return f"not reached (at {top['strength']}: BER {_pct(top['ber'])}, {metric(top)})"
    return f"{hit['strength']} ({loss(hit)})"


def _digits_tables(results: dict) -> list[_Table]:
    bits = results["config"]["deploy_bits"]
    products = results["products"].items()
    rows = []
    for product, pres in products:
        for r in pres["runs"].values():
            if "skipped" in r:
                rows.append([_HOST[product], r["scheme"], str(r["payload"]), f"not embedded: {r['skipped']}"]
                            + [""] * (len(bits) + 1))
                continue
            dep = r["deployed"]
            rows.append([_HOST[product], r["scheme"], str(r["payload"]),
                         f"{_pct(r['accuracy_marked'])} / {_pct(pres['accuracy_control'])}"]
                        + [f"{_pct(dep[str(b)]['ber_bundle'])} / {_pct(dep[str(b)].get('ber_memory_files'))}"
                           for b in bits]
                        + [_pct(dep[str(min(bits))]["ber_wrong_keys_mean"])])
    tables = [(["host", "scheme", "payload", "accuracy marked / control"]
               + [f"BER {b}-bit bundle / hex" for b in bits] + ["wrong keys, mean BER"], rows)]
    embedded = [(product, r) for product, pres in products for r in pres["runs"].values() if "skipped" not in r]
    loss, metric = lambda h: _pct(h["accuracy_loss"]), lambda t: f"accuracy {_pct(t['accuracy'])}"
    tables.append((["host", "scheme", "payload"] + [f"{a}: strength for BER > 10 % (accuracy lost)"
                                                     for a in ATTACK_AXES],
                   [[_HOST[product], r["scheme"], str(r["payload"])]
                    + [_limit_cell(r, a, loss, metric) for a in ATTACK_AXES] for product, r in embedded]))
    rows = []
    for product, r in embedded:
        for case, v in r["permutation"].items():
            if isinstance(v, dict):
                name = case if case != "deployed" else (f"deployed {v['bits']}-bit (golden logits changed: "
                                                        f"{v['golden_logit_mismatches']})")
                rows.append([_HOST[product], r["scheme"], str(r["payload"]), name, _pct(v["ber_without_resync"]),
                             _pct(v["ber_with_resync"]), _pct(v["neurons_restored"])])
    tables.append((["host", "scheme", "payload", "case", "BER without re-sync", "BER with re-sync", "neurons restored"],
                   rows))
    return tables


# ---------------------------------------------------------------------------------------------
# The informed-attacker study (watermark.adversary, watermark.lic_adversary)

_SCHEME = {"watermas": "WaterMAS", "uchida": "Uchida"}


def _payload(r: dict) -> str:
    """A run's payload, and the copies per bit of a repetition code."""
    rep = int(r.get("repeat", 1))
    return f"{r['payload']}" + (f" x{rep}" if rep > 1 else "")


def _mark(r: dict) -> str:
    """A run's mark: scheme and payload."""
    return f"{_SCHEME[r['scheme']]} {_payload(r)}"


_OBF_ATTACKS = {"prune": "magnitude pruning rate", "finetune": "fine-tuning steps", "quantize": "attacker QAT bits"}


def _adversary_hosts(results: dict) -> list[tuple[str, str, dict]]:
    """(host label, product key, runs) of every host section of the adversary results."""
    out = []
    for product, pres in results.get("digits", {}).get("products", {}).items():
        out.append((_HOST.get(product, product), product, pres["runs"]))
    if "lic" in results:
        out.append((f"LIC N={results['lic']['N']}", "lic", results["lic"]["runs"]))
    return out


def _plot_nulls(results: dict, path: Path) -> None:
    """Null-model matched-bit counts (calibration and held-out) with the thresholds, and the
    marked models' counts after each obfuscation attack, one panel per host, scheme, payload."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(h, r) for h, _, runs in _adversary_hosts(results) for r in runs.values() if "skipped" not in r]
    cols = min(4, len(panels))
    rows_ = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(4.2 * cols, 3.0 * rows_), squeeze=False)
    for ax, (host, r) in zip(axes.flat, panels):
        n = r["payload"]
        for mode, color in (("direct", "tab:blue"), ("resync", "tab:orange")):
            c = r["calibration"][mode]
            ax.hist([100 * m / n for m in c["null_matches"] + c["heldout_matches"]], bins=np.linspace(0, 100, 41),
                    alpha=0.5, color=color, label=f"nulls, {mode}")
            ax.axvline(100 * c["threshold"] / n, color=color, ls="--", lw=1)
        marked = [_verdict_rows(r)[k]["resync"]["matched"] for k in _verdict_rows(r)]
        for m in marked:
            ax.axvline(100 * m / n, color="k", lw=0.8, alpha=0.6)
        ax.set_title(f"{host}, {_mark(r)} b", fontsize=9)
        ax.set_xlabel("bits matched (%)")
        ax.set_xlim(0, 101)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Null models (histograms, dashed: calibrated thresholds) vs the marked model under attack "
                 "(black: re-synchronized)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _verdict_rows(run: dict) -> dict[str, dict]:
    """The verdicts of a run's attacked, deployed models by name (owner's deployment first)."""
    out = {"owner deployment": run["owner_deployed"]}
    obf = run.get("obfuscation")
    if obf:
        out["obfuscated"] = obf["deployed"]
        for a, best in obf["strongest_within_budget"].items():
            if best is not None:
                out[f"obfuscated + {a} {best['strength']}"] = best
        if "combined" in obf and "failed" not in obf["combined"]:
            out["obfuscated + all three"] = obf["combined"]
    return out


def _plot_obfuscation(results: dict, path: Path) -> None:
    """BER (without / with re-synchronization / true origins), Psi and the task metric against
    each attack's strength on top of the obfuscation, every run with obfuscation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(h, p, r) for h, p, runs in _adversary_hosts(results) for r in runs.values() if r.get("obfuscation")]
    attacks = [a for a in _OBF_ATTACKS if any(a in r["obfuscation"]["sweeps"] for *_, r in runs)]
    fig, axes = plt.subplots(len(runs), len(attacks), figsize=(4.6 * len(attacks), 3.0 * len(runs)), squeeze=False)
    for i, (host, product, r) in enumerate(runs):
        metric = "accuracy" if product != "lic" else "psnr"
        for j, a in enumerate(attacks):
            ax = axes[i, j]
            zero = {"prune": 0.0, "finetune": 0, "quantize": r["obfuscation"]["deployed"]["strength"]}[a]
            pts = [{**r["obfuscation"]["deployed"], "strength": zero}]  # the obfuscated model, deployed
            pts += [p for p in r["obfuscation"]["sweeps"].get(a, []) if "failed" not in p]
            xs = [p["strength"] for p in pts]
            ax.plot(xs, [100 * p["direct"]["ber"] for p in pts], "o:", ms=3, label="BER, no re-sync")
            ax.plot(xs, [100 * p["resync"]["ber"] for p in pts], "o-", ms=3, label="BER, re-synchronized")
            ax.plot(xs, [100 * p["resync"]["ber_true_origins"] for p in pts], "x--", ms=4, label="BER, true origins")
            ax.plot(xs, [100 * p["resync"]["psi"] for p in pts], "s-", ms=3, label="Psi (%)")
            ax.set_ylim(-3, 103)
            ax.set_xlabel(_OBF_ATTACKS[a])
            ax.set_title(f"{host}, {_mark(r)} b", fontsize=9)
            if a == "quantize":
                ax.invert_xaxis()
            tw = ax.twinx()
            scale = 100.0 if metric == "accuracy" else 1.0
            tw.plot(xs, [scale * p[metric] for p in pts], "k-", marker=".", lw=0.8, alpha=0.6)
            tw.set_ylabel("test accuracy (%)" if metric == "accuracy" else "PSNR (dB)", fontsize=8)
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Obfuscated (scaled, sign-flipped where exact, split, dummies, permuted) then attacked and deployed")
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _intercept_best(rows: list[dict], metric: str) -> dict[tuple[str, float], dict]:
    """Per (mode, target BER), the cheapest row (smallest ``<metric>_loss``) over fine-tuning lengths."""
    best: dict[tuple[str, float], dict] = {}
    for r in rows:
        if r["target_ber"] == 0:
            continue
        k = (r["mode"], r["target_ber"])
        if k not in best or r[f"{metric}_loss"] < best[k][f"{metric}_loss"]:
            best[k] = r
    return best


def _plot_intercept(results: dict, path: Path) -> None:
    """Task cost against the deployed BER the key-holding attacker reached, per scheme."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hosts = [(h, p, runs) for h, p, runs in _adversary_hosts(results)
             if any("intercept" in r for r in runs.values())]
    fig, axes = plt.subplots(1, len(hosts), figsize=(4.8 * len(hosts), 3.4), squeeze=False)
    for ax, (host, product, runs) in zip(axes.flat, hosts):
        metric = "accuracy" if product != "lic" else "psnr"
        scale = 100.0 if metric == "accuracy" else 1.0
        for r in runs.values():
            if "intercept" not in r:
                continue
            best = _intercept_best(r["intercept"], metric)
            for mode in sorted({m for m, _ in best}):
                pts = sorted((v for (m, _), v in best.items() if m == mode), key=lambda v: v["target_ber"])
                style = "-" if r["scheme"] == "watermas" else "--"
                ax.plot([100 * p["ber"] for p in pts], [scale * p[f"{metric}_loss"] for p in pts], style, marker="o",
                        ms=4, label=f"{_mark(r)} b, {mode}")
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xlabel("deployed BER reached (%)")
        ax.set_ylabel("accuracy lost (points)" if metric == "accuracy" else "PSNR lost (dB)")
        ax.set_title(f"{host}: the intercepted key", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_adversary_report(results: dict, out_json: Path) -> list[Path]:
    """Write ``out_json`` and its PNGs (``<stem>_nulls.png``, ``<stem>_obfuscation.png``,
    ``<stem>_intercept.png``); returns the paths."""
    out_json = Path(out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(results, indent=1))
    paths = [out_json]
    for suffix, plot in (("nulls", _plot_nulls), ("obfuscation", _plot_obfuscation), ("intercept", _plot_intercept)):
        png = out_json.with_name(f"{out_json.stem}_{suffix}.png")
        plot(results, png)
        paths.append(png)
    return paths


def _p(v: dict) -> str:
    return f"1e{v['log10_p_binomial']:.0f}" if v["log10_p_binomial"] < -3 else f"{v['p_binomial']:.2g}"


def adversary_tables(results: dict) -> str:
    """The informed-attacker study's headline numbers as Markdown tables."""
    tables: list[_Table] = []
    rows = []
    for host, _, runs in _adversary_hosts(results):
        for r in runs.values():
            if "skipped" in r:
                continue
            d, s = r["calibration"]["direct"], r["calibration"]["resync"]
            fp = lambda c: f"{round(c['false_positive_rate'] * len(c['heldout_matches']))}/{len(c['heldout_matches'])}"  # noqa: E731
            rows.append([host, _SCHEME[r["scheme"]], _payload(r),
                         f"{min(d['null_matches'])}–{max(d['null_matches'])} / {min(s['null_matches'])}–"
                         f"{max(s['null_matches'])}", f"{d['threshold']} / {s['threshold']}", f"{fp(d)} / {fp(s)}",
                         f"{r['owner_deployed']['direct']['matched']} (p {_p(r['owner_deployed']['direct'])})"])
    tables.append((["host", "scheme", "payload", "null matches, direct / re-sync", "threshold (alpha 0.01)",
                    "held-out nulls decided present", "owner's deployment: matched"], rows))
    rows = []
    for host, product, runs in _adversary_hosts(results):
        metric, unit = ("accuracy", 100.0) if product != "lic" else ("psnr", 1.0)
        for r in runs.values():
            if not r.get("obfuscation"):
                continue
            for name, v in _verdict_rows(r).items():
                if name == "owner deployment":
                    continue
                rv = v["resync"]
                rows.append([host, _mark(r), name, f"{unit * v[metric]:.1f}",
                             _pct(v["direct"]["ber"]), _pct(rv["ber"]), _pct(rv["ber_true_origins"]),
                             _pct(rv["psi"]), _p(rv), "present" if rv["present"] else "absent"])
    if rows:
        tables.append((["host", "mark", "attack (deployed)", "accuracy (%) / PSNR (dB)", "BER without re-sync",
                        "BER re-synchronized", "BER, true origins", "Psi", "p (binomial)", "verdict"], rows))
    rows = []
    fractions: set[float] = set()
    for host, product, runs in _adversary_hosts(results):
        metric = "accuracy" if product != "lic" else "psnr"
        for r in runs.values():
            if "intercept" not in r:
                continue
            fractions |= {x["target_ber"] for x in r["intercept"] if x["target_ber"] > 0}

            def cost(v: dict) -> str:
                if metric == "accuracy":
                    return f"{100 * v['accuracy_loss']:+.1f} pts"
                return f"{v['psnr_loss']:+.2f} dB, {v['bpp_loss']:+.4f} bpp"

            base = [x for x in r["intercept"] if x["target_ber"] == 0]
            alone = "; ".join(f"{cost(x)} ({x['steps']} steps)" for x in base)
            best = _intercept_best(r["intercept"], metric)
            for mode in sorted({m for m, _ in best}):
                cells = {f: f"{_pct(v['ber'])}: {cost(v)} ({v['steps']} steps)"
                         for (m, f), v in best.items() if m == mode}
                rows.append((host, _mark(r), mode, alone, cells))
    if rows:
        order = sorted(fractions)
        tables.append((["host", "mark", "first move", "attacker's pipeline alone (BER 0)"]
                       + [f"target BER {100 * f:.0f} %: reached, cost" for f in order],
                       [[h, m, mode, alone] + [cells.get(f, "") for f in order] for h, m, mode, alone, cells in rows]))
    return "\n\n".join(markdown_table(cols, rows) for cols, rows in tables)
