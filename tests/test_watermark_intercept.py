"""The intercepted key: the attacker flips exactly the bits it chose, the cheapest first, and its
own marker holds them through fine-tuning."""
import numpy as np
import pytest
import torch

from licforge.models.digits import DigitsNet
from licforge.models.training import train
from licforge.watermark.extract import ber, extract_bits
from licforge.watermark.intercept import forge_uchida, forge_watermas
from licforge.watermark.layers import chain_weights, model_chain
from licforge.watermark.markers import bind_marker
from licforge.watermark.keys import make_key
from licforge.watermark.watermas import magnitude_floor


class SquaredWeights:
    """A stand-in attacker whose loss is the sum of squared weights (a flip to a small magnitude
    is cheapest where the weight is largest), deploying at 8 bits."""
    deploy_bits = 8

    def attacker_loss(self, net):
        return float(sum((p.detach() ** 2).sum() for p in net.parameters()))


@pytest.fixture()
def marked():
    torch.manual_seed(0)
    net = DigitsNet()
    key = make_key("watermas", model_chain(net), 64, seed=4, params={"lam": 1.0})
    bind_marker(key, net, write=True)
    return net, key


def test_watermas_overwrite_flips_the_cheapest_bits_and_holds_them(marked):
    net, key = marked
    before = {n: w.copy() for n, w in chain_weights(model_chain(net)).items()}
    forged = forge_watermas(key, net, 16, SquaredWeights())
    assert forged.payload == 16 and forged.params["lam"] == 0.0
    assert ber(key, chain_weights(model_chain(net))) == 16 / 64
    mags = np.array([abs(before[n].reshape(-1)[i]) for n, i in key.positions])
    chosen = {key.positions.index(p) for p in forged.positions}
    assert chosen == set(np.argsort(-mags, kind="stable")[:16].tolist())  # the largest weights gain most
    mods = dict(net.named_modules())
    for (n, i), b in zip(forged.positions, forged.bits):
        w = float(mods[n].weight.detach().reshape(-1)[i])
        assert (w > 0) == bool(b) and abs(w) == pytest.approx(magnitude_floor(mods[n].weight, 8, 1.5))
    x, y = torch.rand(128, 1, 8, 8), torch.randint(0, 10, (128,))
    train(net, lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]), (x, y), steps=20, lr=1e-2,
          marker=bind_marker(forged, net))
    assert np.array_equal(extract_bits(forged, chain_weights(model_chain(net))), forged.bits)


def test_uchida_minimal_move_flips_the_smallest_margins():
    torch.manual_seed(1)
    net = DigitsNet()
    key = make_key("uchida", model_chain(net), 32, seed=2)
    key.bits = extract_bits(key, chain_weights(model_chain(net)))  # the network carries the key
    w_bar = chain_weights(model_chain(net))["fc"].mean(0)
    margins = np.abs(key.projection() @ w_bar)
    fc_before = net.fc.weight.detach().clone()
    forged = forge_uchida(key, net, 8)
    flipped = np.flatnonzero(forged.bits != key.bits)
    assert sorted(flipped.tolist()) == sorted(np.argsort(margins)[:8].tolist())
    read = extract_bits(key, chain_weights(model_chain(net)))
    assert np.array_equal(read[flipped], 1 - key.bits[flipped])
    step = net.fc.weight.detach() - fc_before
    assert torch.allclose(step, step[:1].expand_as(step))  # the same shift on every kernel: the mean moves
