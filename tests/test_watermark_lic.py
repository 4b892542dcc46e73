"""Watermarks on the committed LIC student: the key in the decoder layers, embedded during
QAT, read back exactly from the bundle; permuting the deployed LIC bundle leaves its integer
golden model unchanged and re-synchronization undoes it."""
import numpy as np
import pytest
import torch

from quant.golden import run_layers
from watermark.extract import ber
from watermark.layers import bundle_chain, chain_weights, model_chain
from watermark.lic import DECODER_LAYERS, LICHost
from watermark.markers import bind_marker
from watermark.permute import permute, random_permutation
from watermark.resync import fraction_restored, resynchronize


@pytest.fixture(scope="module")
def host():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield LICHost(steps=3, crops=16)
    torch.set_num_threads(before)


def test_watermas_in_the_decoder_survives_4bit_deployment(host):
    key = host.key("watermas", 512, seed=1)
    assert set(key.layers) == set(DECODER_LAYERS)  # only what the decoder hardware holds
    q = host.quantize(4)
    marker = bind_marker(key, q, write=True)
    bundle = host.export(host.qat(q, marker))
    ints = chain_weights(bundle_chain(bundle))
    assert max(np.abs(ints[n]).max() for n in ("g_s.0", "g_s.2", "g_s.4")) <= 7  # 4-bit weights
    assert ber(key, ints) == 0.0
    assert 0.4 <= np.mean([ber(host.key("watermas", 512, seed=100 + k), ints) for k in range(10)]) <= 0.6


def test_permuted_lic_bundle_keeps_its_pixels_and_resyncs(lic_bundle, lic_quant):
    chain = bundle_chain(lic_bundle)
    perms = random_permutation(chain, seed=4)
    assert "g_a.6" in perms and "g_s.6" not in perms  # latent channels move too; RGB stays
    moved = permute(chain, perms)
    pixels = np.random.default_rng(0).integers(0, 256, size=(1, 3, 32, 32))
    assert np.array_equal(run_layers(moved, pixels), run_layers(chain, pixels))
    est, back = resynchronize(model_chain(lic_quant), moved)
    assert fraction_restored(est, perms) == 1.0
    assert all(np.array_equal(chain_weights(back)[n], w) for n, w in chain_weights(chain).items())
