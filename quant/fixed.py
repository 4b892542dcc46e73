"""Fixed-point arithmetic of the number-format contract (DESIGN.md), in integers only.

Every value in a deployed licforge network is an integer ``q`` with a power-of-two scale
``2**e``; the real number it stands for is ``q * 2**e``.  Requantization moves an
accumulator from scale ``2**e_acc`` to ``2**e_out``: it multiplies by ``2**(e_acc - e_out)``,
i.e. shifts right by ``shift = e_out - e_acc`` bits, rounds half to even (what
Brevitas's fixed-point quantizers compute with ``torch.round``) and saturates to the output
bit width.  These functions are the reference the RTL ``Requantizer`` is checked against.
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "check_bits",
    "int_range",
    "shift_round_half_even",
    "saturate",
    "requantize",
    "bits_for_range",
    "accumulator_bits",
]


def check_bits(bits: int, name: str = "bits", low: int = 1, high: int = 32) -> int:
    """Return ``bits`` if it is an int in ``[low, high]``; else raise ValueError naming it."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, not {bits!r}")
    if not low <= int(bits) <= high:
        raise ValueError(f"{name} must be between {low} and {high}, not {bits}")
    return int(bits)


def int_range(bits: int, signed: bool, narrow: bool = False) -> tuple[int, int]:
    """Smallest and largest integer of a ``bits``-wide (signed / narrow-range) format."""
    check_bits(bits, low=1, high=64)
    if signed:
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        return (lo + 1 if narrow else lo), hi
    return 0, (1 << bits) - 1


def shift_round_half_even(acc: np.ndarray, shift: int) -> np.ndarray:
    """``acc * 2**-shift`` rounded half to even, for int64 ``acc``.

    ``shift > 0``: arithmetic right shift by ``shift`` bits; the dropped bits ``r`` round the
    floor ``q`` up when ``r > 2**(shift-1)``, or when ``r == 2**(shift-1)`` and ``q`` is odd.
    ``shift <= 0``: exact left shift by ``-shift`` bits.
    """
    acc = np.asarray(acc, dtype=np.int64)
    shift = int(shift)
    if shift <= 0:
        return acc << np.int64(-shift)
    q = acc >> np.int64(shift)
    r = acc - (q << np.int64(shift))
    half = np.int64(1) << np.int64(shift - 1)
    up = (r > half) | ((r == half) & ((q & 1) == 1))
    return q + up.astype(np.int64)


def saturate(v: np.ndarray, bits: int, signed: bool = True, narrow: bool = False) -> np.ndarray:
    """Clamp integers to the range of a ``bits``-wide format."""
    lo, hi = int_range(bits, signed, narrow)
    return np.clip(np.asarray(v, dtype=np.int64), lo, hi)


def requantize(acc: np.ndarray, shift: int, bits: int, signed: bool = True,
               narrow: bool = False) -> np.ndarray:
    """Shift right with round-half-to-even, then saturate: the RTL ``Requantizer``'s function."""
    return saturate(shift_round_half_even(acc, shift), bits, signed, narrow)


def bits_for_range(lo: int, hi: int) -> int:
    """Bits of the smallest two's-complement format that holds every integer in ``[lo, hi]``."""
    bits = 1
    while not (-(1 << (bits - 1)) <= lo and hi <= (1 << (bits - 1)) - 1):
        bits += 1
    return bits


def accumulator_bits(max_abs_term: int, fan_in: int, max_abs_bias: int = 0) -> int:
    """Bits that no sum of ``fan_in`` terms of magnitude ``<= max_abs_term`` (plus a bias) can
    overflow: the accumulator width is derived, never guessed (DESIGN.md)."""
    bound = int(max_abs_term) * int(fan_in) + int(max_abs_bias)
    return bits_for_range(-bound, bound)
