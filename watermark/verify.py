"""A verdict on a suspect network: matched bits, the binomial p-value, and a decision against a
threshold calibrated on unmarked null models.

The verifier reads the key's ``n`` bits from the suspect (after re-synchronization, if asked)
and counts the ``k`` that match.  Two numbers say how surprising that is:

* the **binomial p-value** ``P(X >= k)``, ``X ~ Binomial(n, 1/2)``: the chance that a network
  unrelated to the key matches at least as many bits if each of its bits were a fair coin.  It
  is computed exactly in log space (:func:`log_binomial_tail`: a log-sum-exp of
  ``log C(n, i) - n log 2`` over ``i >= k``, so ``2**-4096`` is no underflow);
* the **calibrated decision**: a fair coin is an idealisation.  Re-synchronization aligns a
  suspect's neurons, signs and scales with the owner's reference, so that even an unmarked
  network read through it agrees with the key on more than half of the bits; networks trained
  on the same task may share sign patterns.  The Watermark-Robustness-Toolbox therefore decides
  "present" with a threshold calibrated on *unmarked null models* (trained from independent
  initialisations, never fine-tunes of the marked model, which share its signs), read exactly
  as the suspect is.  :func:`calibrate` fits a beta-binomial law to the null models' match
  counts (method of moments; a binomial when they are not over-dispersed) and sets the
  threshold at the smallest count whose upper tail under that law is ``<= alpha``;
  :func:`decide` reports the suspect's tail probability under it too, and the calibration
  records the false-positive rate on null models held out from the fit.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from licforge.quant.bundle import Layer
from .extract import extract_bits
from .keys import WatermarkKey
from .layers import chain_weights
from .resync import MERGE, resynchronize

__all__ = ["log_binomial_tail", "binomial_tail", "log_betabinomial_tail", "Calibration", "calibrate", "decide",
           "key_fingerprint", "weights_fingerprint", "read_direct", "read_resync", "calibrate_on",
           "CALIBRATION_FORMAT", "ALPHA", "MODES"]

CALIBRATION_FORMAT = "licforge-watermark-calibration/1"
MODES = ("direct", "resync")
"""How a suspect is read: at the key's coordinates, or after re-synchronization against the reference."""
ALPHA = 0.01
"""Default false-positive rate the threshold is set for (on the fitted null law)."""


def _logsumexp(terms: np.ndarray) -> float:
    top = float(np.max(terms))
    return top + math.log(float(np.sum(np.exp(terms - top))))


def _log_comb(n: int, i: np.ndarray) -> np.ndarray:
    from scipy.special import gammaln

    return gammaln(n + 1) - gammaln(i + 1) - gammaln(n - i + 1)


def log_binomial_tail(k: int, n: int, p: float = 0.5) -> float:
    """``log P(X >= k)`` for ``X ~ Binomial(n, p)``, exact in log space (0 for ``k <= 0``)."""
    if n < 0 or not 0 < p < 1:
        raise ValueError(f"need n >= 0 and 0 < p < 1, not n={n}, p={p}")
    if k <= 0:
        return 0.0
    if k > n:
        return -math.inf
    i = np.arange(k, n + 1)
    return _logsumexp(_log_comb(n, i) + i * math.log(p) + (n - i) * math.log1p(-p))


def binomial_tail(k: int, n: int, p: float = 0.5) -> float:
    """``P(X >= k)`` for ``X ~ Binomial(n, p)`` (:func:`log_binomial_tail`, exponentiated)."""
    return math.exp(log_binomial_tail(k, n, p))


def log_betabinomial_tail(k: int, n: int, a: float, b: float) -> float:
    """``log P(X >= k)`` for ``X ~ BetaBinomial(n, a, b)``, exact in log space."""
    from scipy.special import betaln

    if k <= 0:
        return 0.0
    if k > n:
        return -math.inf
    i = np.arange(k, n + 1)
    return _logsumexp(_log_comb(n, i) + betaln(i + a, n - i + b) - betaln(a, b))


def key_fingerprint(key: WatermarkKey) -> str:
    """sha256 (16 hex digits) of what makes a key read the bits it reads: scheme, seed, bits,
    layers, positions (and the bit of each position, for a repetition code)."""
    doc = {"scheme": key.scheme, "seed": int(key.seed), "bits": "".join(map(str, key.bits.tolist())),
           "layers": key.layers, "positions": [[n, int(i)] for n, i in key.positions]}
    if key.repeat > 1:
        doc["groups"] = key.groups.tolist()
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def weights_fingerprint(weights: dict[str, np.ndarray]) -> str:
    """sha256 (16 hex digits) of named weight tensors (the reference a suspect is re-synchronized against)."""
    h = hashlib.sha256()
    for name in sorted(weights):
        a = np.ascontiguousarray(np.asarray(weights[name], np.float64))
        h.update(name.encode() + str(a.shape).encode() + a.tobytes())
    return h.hexdigest()[:16]


@dataclass
class Calibration:
    """The null law of the matched-bit count for one key and one way of reading it.

    ``mode`` names the reading (``"direct"``, or ``"resync"`` against ``reference``);
    ``null_matches`` are the calibration null models' counts, ``heldout_matches`` those of the
    null models held out from the fit; ``a``, ``b`` the fitted beta-binomial (``b = 0`` means a
    binomial with ``p = a``); ``threshold`` the smallest count decided "present"."""
    key: str
    payload: int
    mode: str
    alpha: float
    null_matches: list[int]
    a: float
    b: float
    threshold: int
    reference: str | None = None
    heldout_matches: list[int] = field(default_factory=list)
    nulls: dict = field(default_factory=dict)
    format: str = CALIBRATION_FORMAT

    def log_tail(self, k: int) -> float:
        """``log P(X >= k)`` under the fitted null law."""
        if self.b == 0:
            return log_binomial_tail(k, self.payload, min(max(self.a, 1e-12), 1 - 1e-12))
        return log_betabinomial_tail(k, self.payload, self.a, self.b)

    @property
    def false_positive_rate(self) -> float | None:
        """Share of the held-out null models decided "present" (None without held-out models)."""
        if not self.heldout_matches:
            return None
        return float(np.mean([m >= self.threshold for m in self.heldout_matches]))

    def to_dict(self) -> dict:
        return {**asdict(self), "false_positive_rate": self.false_positive_rate}

    def save(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: Path) -> "Calibration":
        """Read a calibration file; ValueError naming the file if it is not one."""
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"calibration file {path}: cannot read it ({e})") from None
        if not isinstance(doc, dict) or doc.get("format") != CALIBRATION_FORMAT:
            got = doc.get("format") if isinstance(doc, dict) else None
            raise ValueError(f"calibration file {path}: format {got!r}, "
                             f"expected {CALIBRATION_FORMAT!r}")
        doc.pop("false_positive_rate", None)
        try:
            return cls(**doc)
        except TypeError as e:
            raise ValueError(f"calibration file {path}: {e}; write it again") from None


def _fit(matches: Sequence[int], n: int) -> tuple[float, float]:
    """Beta-binomial ``(a, b)`` by the method of moments, or ``(p, 0)`` (a binomial) when the
    counts are not over-dispersed."""
    m = np.asarray(matches, np.float64)
    mean, var = float(m.mean()), float(m.var(ddof=1)) if len(m) > 1 else 0.0
    p = min(max(mean / n, 0.5 / n), 1 - 0.5 / n)
    binom_var = n * p * (1 - p)
    if n == 1 or var <= binom_var:
        return p, 0.0
    # beta-binomial: var = n p (1 - p) (1 + (n - 1) rho), rho = 1 / (a + b + 1) the intra-class correlation
    rho = (var / binom_var - 1) / (n - 1)
    if rho >= 1:
        return p, 0.0
    s = 1 / rho - 1
    return p * s, (1 - p) * s


def calibrate(key: WatermarkKey, null_matches: Sequence[int], *, mode: str, alpha: float = ALPHA,
              heldout: Sequence[int] = (), reference: str | None = None, nulls: dict | None = None) -> Calibration:
    """Fit the null law to ``null_matches`` and set the threshold (module docstring)."""
    if len(null_matches) < 2:
        raise ValueError(f"calibration needs at least 2 null models, got {len(null_matches)}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), not {alpha}")
    n = key.payload
    a, b = _fit(null_matches, n)
    cal = Calibration(key_fingerprint(key), n, mode, float(alpha), [int(m) for m in null_matches], a, b, n + 1,
                      reference, [int(m) for m in heldout], dict(nulls or {}))
    cal.threshold = next((k for k in range(n + 1) if cal.log_tail(k) <= math.log(alpha)), n + 1)
    return cal


def decide(key: WatermarkKey, bits: np.ndarray, calibration: Calibration | None = None) -> dict:
    """The verdict on ``bits`` read with ``key``: matched bits, BER, binomial p-value and, with a
    calibration, the threshold, the tail probability under the null law and the decision."""
    bits = np.asarray(bits)
    if bits.shape != key.bits.shape:
        raise ValueError(f"{bits.size} bits read, the key has {key.payload}")
    n, k = key.payload, int(np.sum(bits == key.bits))
    out = {"payload": n, "matched": k, "ber": 1 - k / n, "log10_p_binomial": log_binomial_tail(k, n) / math.log(10)}
    out["p_binomial"] = 10 ** out["log10_p_binomial"]
    if calibration is not None:
        if calibration.key != key_fingerprint(key) or calibration.payload != n:
            raise ValueError(f"the calibration is for key {calibration.key} ({calibration.payload} bits), "
                             f"not this key ({key_fingerprint(key)})")
        out.update(threshold=calibration.threshold, mode=calibration.mode,
                   log10_p_null=calibration.log_tail(k) / math.log(10),
                   present=k >= calibration.threshold)
    return out


def read_direct(key: WatermarkKey, weights: Mapping[str, np.ndarray]) -> np.ndarray:
    """The key's bits read at its coordinates in ``weights`` (a chain's, or read back from memory
    init files), without re-synchronization: a layer wider than the key's (split or dummy neurons)
    is read in its leading ``shape`` entries."""
    cut = {}
    for name, w in weights.items():
        want = key.layers.get(name, {}).get("shape")
        cut[name] = np.asarray(w)[tuple(slice(0, s) for s in want)] if want else w
    return extract_bits(key, cut)


def read_resync(key: WatermarkKey, reference: list[Layer], chain: list[Layer],
                merge: float = MERGE) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The key's bits read after re-synchronizing ``chain`` against ``reference``
    (:func:`watermark.resync.resynchronize`), and the estimated origin of every neuron."""
    est, back = resynchronize(reference, chain, merge=merge)
    return extract_bits(key, chain_weights(back)), est


def calibrate_on(key: WatermarkKey, nulls: Sequence[list[Layer]], count: int, mode: str, *,
                 reference: list[Layer] | None = None, alpha: float = ALPHA, merge: float = MERGE,
                 info: dict | None = None) -> Calibration:
    """:func:`calibrate` on null models' chains read with ``mode`` (``"resync"``: against
    ``reference``): the first ``count`` fit the threshold, the others are held out."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if mode == "resync" and reference is None:
        raise ValueError("a re-synchronized reading needs the reference")
    def read(c: list[Layer]) -> np.ndarray:
        return read_direct(key, chain_weights(c)) if mode == "direct" else read_resync(key, reference, c, merge)[0]

    matches = [int(np.sum(read(c) == key.bits)) for c in nulls]
    return calibrate(key, matches[:count], mode=mode, alpha=alpha, heldout=matches[count:],
                     reference=None if mode == "direct" else weights_fingerprint(chain_weights(reference)),
                     nulls=info)
