"""The verdict: the binomial p-value (exact, in log space) against a direct sum, the null law
and threshold calibrated on null-model counts, and the decision."""
import math
from fractions import Fraction
from math import comb

import numpy as np
import pytest

from licforge.watermark.keys import WatermarkKey
from licforge.watermark.verify import (Calibration, binomial_tail, calibrate, decide, key_fingerprint,
                                       log_betabinomial_tail, log_binomial_tail, read_direct)


def _direct(k: int, n: int, p: Fraction = Fraction(1, 2)) -> Fraction:
    return sum((comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(max(k, 0), n + 1)), Fraction(0))


@pytest.mark.parametrize("k,n", [(64, 64), (56, 64), (40, 64), (32, 64), (0, 64), (1, 1), (200, 256), (256, 256),
                                 (129, 256), (17, 20)])
def test_binomial_p_value_equals_the_direct_sum(k, n):
    exact = _direct(k, n)
    assert math.isclose(binomial_tail(k, n), float(exact), rel_tol=1e-12)
    assert math.isclose(log_binomial_tail(k, n), math.log(exact), rel_tol=1e-12, abs_tol=1e-12)


def test_p_value_in_log_space_does_not_underflow():
    assert log_binomial_tail(65, 64) == -math.inf and log_binomial_tail(-3, 64) == 0.0
    assert math.isclose(log_binomial_tail(4096, 4096) / math.log(10), -4096 * math.log10(2), rel_tol=1e-12)
    exact = _direct(3000, 4096, Fraction(3, 5))  # far below float's range in between, not at the end
    assert math.isclose(log_binomial_tail(3000, 4096, 0.6), math.log(exact.numerator) - math.log(exact.denominator),
                        rel_tol=1e-10)


def test_beta_binomial_tail_equals_the_direct_sum():
    n, a, b, k = 30, 3.0, 2.0, 21
    lbeta = lambda x, y: math.lgamma(x) + math.lgamma(y) - math.lgamma(x + y)  # noqa: E731
    direct = sum(comb(n, i) * math.exp(lbeta(i + a, n - i + b) - lbeta(a, b)) for i in range(k, n + 1))
    assert math.isclose(math.exp(log_betabinomial_tail(k, n, a, b)), direct, rel_tol=1e-10)


def _key(n: int = 64) -> WatermarkKey:
    rng = np.random.default_rng(0)
    return WatermarkKey("watermas", 9, rng.integers(0, 2, n).astype(np.uint8),
                        {"fc": {"op": "linear", "shape": [4, 32]}},
                        [("fc", int(i)) for i in rng.choice(128, n, replace=False)])


def test_threshold_is_the_smallest_count_with_tail_below_alpha():
    key = _key()
    binomial_like = [30, 33, 31, 34, 32, 29, 35, 32]  # variance below n p (1-p): a binomial law
    cal = calibrate(key, binomial_like, mode="direct", alpha=0.01, heldout=[31, 47, 30])
    assert cal.b == 0 and math.isclose(cal.a, np.mean(binomial_like) / 64)
    assert binomial_tail(cal.threshold, 64, cal.a) <= 0.01 < binomial_tail(cal.threshold - 1, 64, cal.a)
    assert cal.false_positive_rate == pytest.approx(1 / 3)
    spread = [20, 44, 28, 38, 31, 40, 25, 35]  # over-dispersed: a beta-binomial, a higher threshold
    wide = calibrate(key, spread, mode="direct", alpha=0.01)
    assert wide.b > 0 and wide.threshold > cal.threshold
    assert wide.log_tail(wide.threshold) <= math.log(0.01) < wide.log_tail(wide.threshold - 1)
    with pytest.raises(ValueError, match="at least 2 null models"):
        calibrate(key, [30], mode="direct")


def test_decision_and_calibration_file(tmp_path):
    key = _key()
    cal = calibrate(key, [30, 33, 31, 34, 32, 29, 35, 32], mode="resync", reference="abc")
    loaded = Calibration.load(cal.save(tmp_path / "cal.json"))
    assert loaded.to_dict() == cal.to_dict() and loaded.key == key_fingerprint(key)
    bits = key.bits.copy()
    bits[:5] ^= 1
    v = decide(key, bits, loaded)
    assert v["matched"] == 59 and v["ber"] == 5 / 64 and v["present"]
    assert math.isclose(v["p_binomial"], float(_direct(59, 64)), rel_tol=1e-12)
    assert not decide(key, np.where(np.arange(64) < 32, key.bits, 1 - key.bits), loaded)["present"]
    other = WatermarkKey("watermas", 10, key.bits, key.layers, key.positions)
    with pytest.raises(ValueError, match="the calibration is for key"):
        decide(other, bits, loaded)
    with pytest.raises(ValueError, match="format None"):
        (tmp_path / "bad.json").write_text("{}")
        Calibration.load(tmp_path / "bad.json")


def test_direct_reading_of_a_widened_layer_uses_the_keys_coordinates():
    key = _key()
    w = np.where(np.random.default_rng(1).random((4, 32)) < 0.5, -3, 3)
    wide = np.concatenate([np.concatenate([w, np.ones((4, 8), int)], axis=1), -np.ones((2, 40), int)])
    assert np.array_equal(read_direct(key, {"fc": wide}), read_direct(key, {"fc": w}))
