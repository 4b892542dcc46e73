"""Neuron permutation keeps the function (float: up to rounding; integers: exactly) and
re-synchronization ("Find the Lady") puts a random permutation back exactly."""
import copy

import numpy as np
import pytest
import torch

from licforge.models.digits import DigitsNet
from licforge.quant.bundle import Bundle
from licforge.quant.digits import input_to_int, run_digits_golden
from licforge.quant.golden import run_layers
from licforge.quant.synthetic import random_decoder_bundle
from licforge.watermark.attacks import magnitude_prune
from licforge.watermark.layers import bundle_chain, chain_weights, model_chain
from licforge.watermark.permute import inverse, permutable_layers, permute, permute_model, random_permutation
from licforge.watermark.resync import fraction_restored, resynchronize


def _same_weights(a, b) -> bool:
    wa, wb = chain_weights(a), chain_weights(b)
    return wa.keys() == wb.keys() and all(np.array_equal(wa[n], wb[n]) for n in wa)


@pytest.mark.parametrize("exact", [True, False])
def test_float_permutation_keeps_the_logits(exact):
    torch.manual_seed(1)
    net = DigitsNet(exact=exact)
    x = torch.rand(32, 1, 8, 8)
    perms = random_permutation(model_chain(net), seed=5)
    assert set(perms) == {"conv1", "conv2"} and permutable_layers(model_chain(net)) == ["conv1", "conv2"]
    moved = copy.deepcopy(net)
    permute_model(moved, perms)
    assert not torch.equal(moved.conv2.weight, net.conv2.weight)
    with torch.no_grad():
        torch.testing.assert_close(moved(x), net(x), rtol=0, atol=1e-5)


def test_permuted_bundle_is_exactly_the_same_integer_network(digits_models, digits_bundle):
    _, _, xte, _ = digits_models.split
    x_int = input_to_int((xte * 16).round().long().numpy(), digits_bundle.input)
    chain = bundle_chain(digits_bundle)
    perms = random_permutation(chain, seed=11)
    moved = permute(chain, perms)
    assert not _same_weights(moved, chain)
    before = run_digits_golden(digits_bundle, x_int)
    after = run_digits_golden(Bundle(digits_bundle.model, digits_bundle.input, moved), x_int)
    assert before.shape == (360, 10) and np.array_equal(after, before)
    assert _same_weights(permute(moved, inverse(perms)), chain)


def test_permutation_through_igdn_keeps_a_decoder_exact():
    bundle = random_decoder_bundle(8, 6, seed=2, latent_hw=(3, 3))
    chain = bundle_chain(bundle)
    perms = random_permutation(chain, seed=3)
    assert len(perms) == 3  # every transposed convolution but the last (RGB out)
    x = np.random.default_rng(0).integers(-20, 21, size=(2, 6, 3, 3))
    assert np.array_equal(run_layers(permute(chain, perms), x), run_layers(chain, x))


def test_resync_restores_a_random_permutation_exactly(digits_bundle):
    chain = bundle_chain(digits_bundle)
    perms = random_permutation(chain, seed=21)
    suspect = permute(chain, perms)
    est, back = resynchronize(chain, suspect)
    assert fraction_restored(est, perms) == 1.0
    assert all(np.array_equal(est[n], perms[n]) for n in perms)
    assert _same_weights(back, chain)


def test_resync_against_a_float_reference_survives_pruning(digits_models, digits_bundle):
    reference = model_chain(digits_models.quantized[8])  # float latent weights of the deployed model
    suspect = permute(bundle_chain(digits_bundle), random_permutation(bundle_chain(digits_bundle), seed=8))
    pruned = magnitude_prune(chain_weights(suspect), 0.6)
    for lay in suspect:
        if lay.name in pruned:
            lay.tensors["weight"] = pruned[lay.name]
    est, _ = resynchronize(reference, suspect)
    assert fraction_restored(est, random_permutation(bundle_chain(digits_bundle), seed=8)) == 1.0


def test_bad_permutations_are_refused(digits_bundle):
    chain = bundle_chain(digits_bundle)
    with pytest.raises(ValueError, match="outputs are the network's"):
        permute(chain, {"fc": np.arange(10)})
    with pytest.raises(ValueError, match="permutation of 'conv1' is not a permutation of its 8 channels"):
        permute(chain, {"conv1": np.zeros(8, int)})
    with pytest.raises(ValueError, match="cannot permute 'flatten': not a dot layer"):
        permute(chain, {"flatten": np.arange(8)})
