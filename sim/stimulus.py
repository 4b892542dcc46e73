"""Random test stimulus for the RTL: signed integers weighted towards their extremes."""
from __future__ import annotations

import numpy as np

__all__ = ["extreme_ints"]


def extreme_ints(rng: np.random.Generator, shape: tuple[int, ...], bits: int) -> np.ndarray:
    """Random signed ``bits``-bit integers (int64) of which about a third are the extremes
    -2^(b-1), 0 and 2^(b-1)-1 (11 % each), the rest uniform over the whole range."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    v = rng.integers(lo, hi + 1, size=shape)
    pick = rng.random(shape)
    return np.where(pick < 0.11, lo, np.where(pick < 0.22, 0, np.where(pick < 0.33, hi, v))).astype(np.int64)
