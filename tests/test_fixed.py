"""The number-format contract: round half to even, saturation, derived accumulator widths."""
import numpy as np
import pytest
import torch

from licforge.quant.fixed import accumulator_bits, bits_for_range, check_bits, int_range, requantize, shift_round_half_even


def test_round_half_even_exact_cases():
    acc = np.array([4, 5, 6, 7, 12, 13, 14, -4, -5, -6, -7, -12, -13, -14])
    # acc / 4: 1, 1.25, 1.5, 1.75, 3, 3.25, 3.5, -1, -1.25, -1.5, -1.75, -3, -3.25, -3.5
    assert shift_round_half_even(acc, 2).tolist() == [1, 1, 2, 2, 3, 3, 4, -1, -1, -2, -2, -3, -3, -4]


def test_round_half_even_matches_torch_round_on_random():
    rng = np.random.default_rng(0)
    acc = rng.integers(-(1 << 20), 1 << 20, size=20000)
    for shift in (1, 3, 7, 12):
        ref = torch.round(torch.from_numpy(acc).double() / 2 ** shift).long().numpy()
        assert np.array_equal(shift_round_half_even(acc, shift), ref)


def test_left_shift_for_non_positive_shift():
    assert shift_round_half_even(np.array([3, -3]), -2).tolist() == [12, -12]
    assert shift_round_half_even(np.array([3, -3]), 0).tolist() == [3, -3]


def test_saturation_and_ranges():
    assert int_range(8, True) == (-128, 127)
    assert int_range(8, True, narrow=True) == (-127, 127)
    assert int_range(4, False) == (0, 15)
    assert requantize(np.array([1000, -1000, 255, 256]), 1, 8).tolist() == [127, -128, 127, 127]
    assert requantize(np.array([1000, -1000]), 0, 4, signed=False).tolist() == [15, 0]


def test_accumulator_bits_are_derived():
    assert bits_for_range(-128, 127) == 8
    assert bits_for_range(-129, 127) == 9
    # 9 products of 8-bit x 8-bit: |sum| <= 9 * 2^14 = 147456 -> 19 bits
    assert accumulator_bits(1 << 14, 9) == 19


@pytest.mark.parametrize("bad", [0, 33, -1])
def test_check_bits_rejects_impossible_widths(bad):
    with pytest.raises(ValueError, match=f"bits must be between 1 and 32, not {bad}"):
        check_bits(bad)
