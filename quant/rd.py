"""Rate-distortion curves: Bjøntegaard deltas (piecewise cubic) and the RD plot.

BD-rate (Bjøntegaard, VCEG-M33; piecewise cubic interpolation as in JVET's reference tools):
with ``r`` the rate (bpp) and ``D`` the PSNR of each point, ``log r`` is interpolated as a
function of ``D`` by a monotone piecewise cubic (PCHIP) per curve, both are integrated over
the PSNR interval the two curves share, and

    BD-rate = exp(mean(log r_test - log r_anchor)) - 1          (in %, negative = fewer bits)
    BD-PSNR = mean(D_test - D_anchor) over the shared log-rate interval          (in dB)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["bd_rate", "bd_psnr", "curves_from_results", "rd_report", "plot_rd", "curve_style"]


def _pchip_mean(x: np.ndarray, y: np.ndarray, lo: float, hi: float) -> float:
    from scipy.interpolate import PchipInterpolator

    order = np.argsort(x)
    x, y = x[order], y[order]
    keep = np.concatenate(([True], np.diff(x) > 0))
    f = PchipInterpolator(x[keep], y[keep])
    return float(f.integrate(lo, hi) / (hi - lo))


def _overlap(a: np.ndarray, b: np.ndarray) -> tuple[float, float] | None:
    lo, hi = max(a.min(), b.min()), min(a.max(), b.max())
    return (float(lo), float(hi)) if hi > lo else None


def _mean_gap(xa: np.ndarray, ya: np.ndarray, xt: np.ndarray, yt: np.ndarray) -> float | None:
    """Mean over the shared ``x`` interval of the test curve ``yt(xt)`` minus the anchor
    ``ya(xa)`` (piecewise cubic); None when the curves share no interval or one has fewer
    than two distinct ``x``."""
    if len(np.unique(xa)) < 2 or len(np.unique(xt)) < 2:
        return None
    iv = _overlap(xa, xt)
    return None if iv is None else _pchip_mean(xt, yt, *iv) - _pchip_mean(xa, ya, *iv)


def _log_rate_psnr(points: list[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    return np.log(np.array([p[0] for p in points])), np.array([p[1] for p in points])


def bd_rate(anchor: list[tuple[float, float]], test: list[tuple[float, float]]) -> float | None:
    """BD-rate in % of ``test`` against ``anchor`` (lists of (bpp, PSNR)); None when the
    curves share no PSNR interval or have fewer than two distinct points."""
    (ra, da), (rt, dt) = _log_rate_psnr(anchor), _log_rate_psnr(test)
    gap = _mean_gap(da, ra, dt, rt)
    return None if gap is None else float((np.exp(gap) - 1.0) * 100.0)


def bd_psnr(anchor: list[tuple[float, float]], test: list[tuple[float, float]]) -> float | None:
    """BD-PSNR in dB of ``test`` against ``anchor`` (PSNR difference at equal rate)."""
    (ra, da), (rt, dt) = _log_rate_psnr(anchor), _log_rate_psnr(test)
    return _mean_gap(ra, da, rt, dt)


def curves_from_results(results: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """Group eval entries (``licforge eval`` JSON files) by curve label into sorted
    (mean bpp, mean PSNR) points."""
    curves: dict[str, list[tuple[float, float]]] = {}
    for res in results:
        for e in res["entries"]:
            curves.setdefault(e["curve"], []).append((e["mean"]["bpp"], e["mean"]["psnr"]))
    return {k: sorted(v) for k, v in curves.items()}


def rd_report(curves: dict[str, list[tuple[float, float]]], anchor: str) -> dict[str, Any]:
    """BD-rate and BD-PSNR of every curve against ``anchor``."""
    if anchor not in curves:
        raise KeyError(f"anchor curve {anchor!r} not among {sorted(curves)}")
    return {"anchor": anchor, "metric": "PSNR (RGB, 8-bit)", "interpolation": "pchip",
            "curves": {k: {"bd_rate_pct": bd_rate(curves[anchor], v), "bd_psnr_db": bd_psnr(curves[anchor], v),
                           "points": [list(p) for p in v]} for k, v in curves.items()}}


def curve_style(label: str, palette: dict[str, str]) -> dict[str, Any]:
    """Matplotlib ``color``, ``ls`` and ``marker`` of the RD curve named ``label``.  Colour by
    model family (the teacher black, each width ``N=..`` its own colour, recorded in ``palette``
    on first sight, each baseline a grey), line style by variant: distilled solid (``mix50``
    dashed), not distilled dotted, another seed dash-dot, fixed point dash-dot-dot, float GDN
    long dashes."""
    word = label.split()[0]
    if word in ("JPEG", "WebP"):
        return {"color": {"JPEG": "0.55", "WebP": "0.25"}[word], "ls": "--", "marker": "s"}
    colour = palette.setdefault(word, f"C{len(palette) - 1}")  # C0, C1 ... after the teacher's black
    if " seed " in label:
        ls = "-."
    elif "mix50" in label:
        ls = (0, (4, 2))
    elif "QAT" in label or "PTQ" in label:
        ls = (0, (5, 1, 1, 1)) if "hybrid8 QAT" in label else (0, (3, 1, 1, 1, 1, 1))
    elif "GDN (float)" in label:
        ls = (0, (6, 2))
    elif label.startswith("N=") and "KD" not in label:
        ls = ":"
    else:
        ls = "-"
    return {"color": colour, "ls": ls, "marker": "o"}


def plot_rd(curves: dict[str, list[tuple[float, float]]], out: Path, title: str = "") -> Path:
    """PSNR vs bpp, one line per curve (see :func:`curve_style`); the rate axis ends a little
    past the learned codecs' largest rate, and the PSNR axis spans the learned codecs' points with
    1 dB below them (a baseline far below them, e.g. JPEG at low rates, leaves the frame there
    instead of squeezing the learned curves into a corner)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 5.8), dpi=110)
    palette: dict[str, str] = {"teacher": "k"}
    learned = []
    for k in sorted(curves, key=lambda c: (c.split()[0] in ("JPEG", "WebP"), c)):
        pts = np.array(curves[k])
        st = curve_style(k, palette)
        ax.plot(pts[:, 0], pts[:, 1], linestyle=st["ls"], color=st["color"], marker=st["marker"], ms=3.5,
                lw=1.4, label=k)
        if st["marker"] == "o":
            learned.append(pts)
    if learned:
        top = max(p[:, 0].max() for p in learned) * 1.25
        inside = [p[p[:, 0] <= top, 1] for p in map(np.array, curves.values())]
        ax.set_xlim(0, top)
        ax.set_ylim(min(p[:, 1].min() for p in learned) - 1.0, max(v.max() for v in inside if v.size) + 0.5)
    ax.set_xlabel("bits per pixel (file size)")
    ax.set_ylabel("PSNR (dB, RGB)")
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))
    return path
