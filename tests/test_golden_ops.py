"""Integer golden operators of the LIC chain against their definitions."""
import numpy as np
import pytest
import torch

from licforge.quant.fixed import requantize
from licforge.quant.golden import (conv_transpose2d_int, div_round_half_even, gdn_int, igdn_int, subpixel_taps)


def test_subpixel_taps_of_the_5x5_stride2_decoder():
    assert subpixel_taps(5, 2, 2, 0) == [(0, 1), (2, 0), (4, -1)]
    assert subpixel_taps(5, 2, 2, 1) == [(1, 1), (3, 0)]


@pytest.mark.parametrize("k,s,p,op,shape", [(5, 2, 2, 1, (2, 3, 4, 5)), (3, 2, 1, 1, (1, 2, 3, 3)),
                                            (4, 2, 1, 0, (1, 2, 3, 2)), (5, 1, 2, 0, (1, 2, 4, 4))])
def test_conv_transpose2d_int_equals_definition(k, s, p, op, shape):
    g = torch.Generator().manual_seed(k * 10 + s)
    x = torch.randint(-128, 128, shape, generator=g)
    w = torch.randint(-127, 128, (shape[1], 3, k, k), generator=g)
    ref = torch.nn.functional.conv_transpose2d(x.double(), w.double(), stride=s, padding=p, output_padding=op)
    got = conv_transpose2d_int(x.numpy(), w.numpy(), s, p, op)
    assert got.dtype == np.int64 and got.shape == tuple(ref.shape)
    assert np.array_equal(got, ref.long().numpy())


def test_div_round_half_even():
    num = np.array([5, 7, 6, 10, -5, -7, 3, 9])
    den = np.array([2, 2, 4, 4, 2, 2, 6, 6])
    # 2.5, 3.5, 1.5, 2.5, -2.5, -3.5, 0.5, 1.5
    assert div_round_half_even(num, den).tolist() == [2, 4, 2, 2, -2, -4, 0, 2]


def test_igdn_and_gdn_match_float_formula():
    rng = np.random.default_rng(0)
    x = rng.integers(-128, 128, (2, 4, 3, 3))
    gamma = rng.integers(0, 128, (4, 4))
    beta = rng.integers(1 << 10, 1 << 12, 4)
    acc = beta[None, :, None, None] + np.einsum("ij,njhw->nihw", gamma, np.abs(x))
    n = requantize(acc, 6, 8, signed=False)
    y = igdn_int(x, gamma, beta, norm_shift=6, norm_bits=8, out_shift=7, out_bits=8)
    assert np.array_equal(y, requantize(x * n, 7, 8))
    z = gdn_int(x, gamma, beta, norm_shift=6, norm_bits=8, out_shift=-9, out_bits=8)
    exact = torch.round(torch.from_numpy(x * 2.0 ** 9 / n)).long().clamp(-128, 127).numpy()
    assert np.array_equal(z, exact)
