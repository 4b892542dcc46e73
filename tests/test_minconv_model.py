"""MinConv layers compute sign(x) sign(w) min(|x|, |w|) sums, on floats and on integers."""
import numpy as np
import torch

from licforge.models.minconv import MinConv2d, MinLinear, min_conv2d, signed_min_matmul


def brute_force(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    out = np.zeros((x.shape[0], w.shape[0]))
    for n in range(x.shape[0]):
        for o in range(w.shape[0]):
            out[n, o] = sum(np.sign(a) * np.sign(b) * min(abs(a), abs(b)) for a, b in zip(x[n], w[o]))
    return out


def test_signed_min_matmul_matches_definition():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 7, generator=g), torch.randn(3, 7, generator=g)
    assert np.allclose(signed_min_matmul(x, w).numpy(), brute_force(x.numpy(), w.numpy()), atol=1e-6)


def test_integer_and_float_paths_agree():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-8, 8, (2, 3, 6, 6), generator=g)
    w = torch.randint(-8, 8, (4, 3, 3, 3), generator=g)
    yi = min_conv2d(x, w, stride=2, padding=1)
    yf = min_conv2d(x.double(), w.double(), stride=2, padding=1)
    assert yi.dtype == torch.int64 and yi.shape == (2, 4, 3, 3)
    assert torch.equal(yi, yf.long())


def test_gain_is_a_power_of_two_shift():
    layer = MinLinear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.01, -0.02, 0.03, 0.01], [0.02, 0.02, -0.01, 0.0]]))
    k = layer.set_gain_from(torch.full((8, 4), 0.5))
    assert k == round(np.log2(0.5 / 0.015))  # mean |w| = 0.015
    x = torch.full((1, 4), 0.5)
    expected = brute_force(x.numpy(), (layer.weight * 2.0 ** k).detach().numpy()) / 2.0 ** k
    assert np.allclose(layer(x).detach().numpy(), expected)


def test_minconv2d_trains():
    torch.manual_seed(0)
    layer = MinConv2d(1, 2, 3, padding=1, bias=False)
    x = torch.randn(4, 1, 5, 5)
    loss = layer(x).pow(2).mean()
    loss.backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
