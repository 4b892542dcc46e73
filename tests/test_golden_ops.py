"""Integer golden operators of the LIC chain against their definitions."""
import numpy as np
import pytest
import torch

from licforge.quant.fixed import requantize, saturate
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


def _convt_definition(x: np.ndarray, w: np.ndarray, s: int, p: int, op: int) -> np.ndarray:
    """Transposed convolution by its definition, in int64: every input pixel scatters its
    kernel-weighted copy to the output (then the padding is cropped)."""
    n, _, h, wd = x.shape
    cout, k = w.shape[1], w.shape[2]
    full = np.zeros((n, cout, (h - 1) * s + k + op, (wd - 1) * s + k + op), np.int64)
    for ky in range(k):
        for kx in range(k):
            full[:, :, ky:ky + s * (h - 1) + 1:s, kx:kx + s * (wd - 1) + 1:s] += np.einsum(
                "ncij,co->noij", x, w[:, :, ky, kx])
    ho, wo = (h - 1) * s - 2 * p + k + op, (wd - 1) * s - 2 * p + k + op
    return full[:, :, p:p + ho, p:p + wo]


@pytest.mark.parametrize("x_max,w_max,dtype", [(330, 127, torch.float32), (1 << 20, 127, torch.float64),
                                               (1 << 40, 1 << 14, torch.int64)])
def test_fast_integer_paths_are_exact_in_each_dtype(x_max, w_max, dtype):
    """The transposed convolution runs in float32, float64 or int64 by the bound on its sums
    (quant.golden.exact_dtype); each path equals the int64 definition, and requantizing the
    float accumulator (power-of-two scaling, round half to even) equals quant.fixed.requantize,
    ties of both parities included."""
    from licforge.quant.bundle import Layer
    from licforge.quant.golden import exact_dtype, run_layer

    rng = np.random.default_rng(x_max % 97)
    x = rng.integers(-x_max, x_max + 1, (2, 16, 5, 7))
    x[0, :, 0, 0] = x_max
    w = rng.integers(-w_max, w_max + 1, (16, 3, 5, 5))
    w[:, 0] = w_max  # one output channel at the bound
    assert exact_dtype(x_max * int(np.abs(w).sum(axis=(0, 2, 3)).max())) == dtype
    ref = _convt_definition(x, w, 2, 2, 1)
    assert np.array_equal(conv_transpose2d_int(x, w, 2, 2, 1), ref)
    bias = rng.integers(-1000, 1000, 3)
    lay = Layer("t", "conv_transpose2d", {"stride": 2, "padding": 2, "output_padding": 1, "shift": 3,
                                         "out_bits": 20, "out_signed": True}, {"weight": w, "bias": bias})
    acc = ref + bias[None, :, None, None]
    assert (acc % 8 == 4).sum() > 50 and ((acc >> 3) % 2 == 0)[acc % 8 == 4].any()
    assert np.array_equal(run_layer(lay, x), requantize(acc, 3, 20))


def test_float32_is_refused_when_torch_may_round_it():
    from licforge.quant.golden import exact_dtype

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")  # TF32 / bfloat16 allowed: not exact
        assert exact_dtype(1000) == torch.float64
    finally:
        torch.set_float32_matmul_precision(before)
    assert exact_dtype(1000) == torch.float32 and exact_dtype(1 << 24) == torch.float64


@pytest.mark.parametrize("k,s,p,shape", [(5, 2, 2, (2, 3, 9, 12)), (3, 1, 1, (1, 4, 5, 6)), (4, 2, 1, (1, 2, 7, 5)),
                                         (5, 2, 0, (1, 3, 11, 8)), (3, 3, 2, (1, 2, 10, 13))])
def test_conv2d_int_equals_definition(k, s, p, shape):
    from licforge.quant.golden import conv2d_int

    g = torch.Generator().manual_seed(k * 10 + s + p)
    x = torch.randint(-512, 512, shape, generator=g)
    w = torch.randint(-127, 128, (5, shape[1], k, k), generator=g)
    ref = torch.nn.functional.conv2d(x.double(), w.double(), stride=s, padding=p)
    got = conv2d_int(x.numpy(), w.numpy(), s, p)
    assert got.dtype == np.int64 and got.shape == tuple(ref.shape)
    assert np.array_equal(got, ref.long().numpy())


def test_gdn_float_division_equals_the_integer_definition():
    """Forward GDN rounds x * 2**k / n in float64 when that is exact (quant.golden._gdn):
    every residue of x modulo n, ties of both parities among them, equals div_round_half_even."""
    beta = np.array([2, 4, 6, 10, 1000, 4095])  # gamma = 0, norm shift 0: n = beta
    x = np.broadcast_to(np.arange(-9000, 9000)[None, None, :, None], (1, 6, 18000, 1)).copy()
    for k in (0, 3):
        got = gdn_int(x, np.zeros((6, 6), np.int64), beta, norm_shift=0, norm_bits=13, out_shift=-k, out_bits=16)
        num, den = x << k, beta[None, :, None, None]
        assert ((2 * num) % den == 0).any()  # exact halves are among the cases
        assert np.array_equal(got, saturate(div_round_half_even(num, den), 16))
