"""WaterMAS and Uchida on the digits classifier: embed, deploy (QAT), read back from the
bundle's integers and from the weight-ROM init files; wrong keys read noise."""
import copy

import numpy as np
import pytest
import torch

from licforge.models.digits import DigitsNet
from licforge.models.training import classifier_loss, train
from licforge.quant.digits import export_digits_bundle, quantize_digits
from licforge.rtl.weight_rom import read_weight_roms, write_weight_roms
from licforge.watermark.attacks import magnitude_prune
from licforge.watermark.digits import DigitsHost, digits_net
from licforge.watermark.extract import ber
from licforge.watermark.keys import make_key
from licforge.watermark.layers import bundle_chain, chain_weights, load_chain_weights, model_chain
from licforge.watermark.obfuscate import Obfuscation, obfuscate
from licforge.watermark.resync import resynchronize
from licforge.watermark.markers import MarkerParams, bind_marker
from licforge.watermark.watermas import WaterMAS


@pytest.fixture(scope="module")
def one_thread():
    """The classifier is tiny: one thread is fastest and leaves the other core free."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def host(one_thread):
    return DigitsHost(seed=0, embed_epochs=8, qat_epochs=3)


@pytest.fixture(scope="module")
def base(digits_models):
    """The unmarked base: the committed exact CNN (not trained here)."""
    return digits_models.exact


@pytest.fixture(scope="module")
def runs(host, base):
    """scheme -> (marked float net, key, 4-bit deployed bundle), 64 bits each."""
    out = {}
    for scheme in ("watermas", "uchida"):
        net, key = host.embed(base, scheme, 64, key_seed=1)
        out[scheme] = (net, key, host.deploy(net, 4, key))
    return out


@pytest.fixture(params=["watermas", "uchida"])
def marked(request, runs):
    """(scheme, marked float net, key, 4-bit deployed bundle)."""
    return (request.param, *runs[request.param])


def test_embedding_is_exact_and_cheap(host, base, marked):
    scheme, net, key, _ = marked
    assert ber(key, chain_weights(model_chain(net))) == 0.0
    assert host.accuracy(net) >= 0.85  # 360 held-out images; unmarked base is ~0.97
    if scheme == "watermas":
        assert set(key.layers) == {"conv1", "conv2", "fc"}  # spread over several layers
    else:
        assert list(key.layers) == ["fc"]


def test_ber_is_zero_on_the_unattacked_deployed_integers(marked):
    _, _, key, bundle = marked
    ints = chain_weights(bundle_chain(bundle))
    assert bundle.model["bits"] == 4 and max(np.abs(w).max() for w in ints.values()) <= 7
    assert ber(key, ints) == 0.0


def test_wrong_keys_read_about_half_the_bits_wrong(marked):
    scheme, _, key, bundle = marked
    ints = chain_weights(bundle_chain(bundle))
    wrong = [ber(make_key(scheme, bundle_chain(bundle), 64, seed=1000 + k), ints) for k in range(20)]
    assert 0.4 <= np.mean(wrong) <= 0.6 and min(wrong) > 0.15


def test_ber_is_zero_from_the_weight_rom_files(marked, tmp_path):
    _, _, key, bundle = marked
    ints = chain_weights(bundle_chain(bundle))
    write_weight_roms(ints, tmp_path, lanes=8, bits=4)
    back = read_weight_roms(tmp_path)
    assert all(np.array_equal(back[n], ints[n]) for n in ints)
    assert ber(key, back) == 0.0
    # the files are what is read: flip one key weight's sign in the conv1 ROM
    if key.scheme == "watermas" and "conv1" in key.layers:
        idx, _ = key.positions_by_layer()["conv1"]
        w = ints["conv1"].copy()
        w.reshape(-1)[idx[0]] *= -1
        write_weight_roms({**ints, "conv1": w}, tmp_path, lanes=8, bits=4)
        assert ber(key, read_weight_roms(tmp_path)) == 1 / 64


def test_watermas_keeps_key_weights_unchanged_through_qat(host, runs):
    net, key, _ = runs["watermas"]
    x, y = host.owner
    q = quantize_digits(net, 6, x, y, qat_epochs=0, progress=False)
    marker = bind_marker(key, q)
    before = {n: v.clone() for n, v in marker.frozen.items()}
    train(q, classifier_loss, (x[:256], y[:256]), steps=8, lr=5e-3, marker=marker)
    for n, p in marker.params.items():
        assert torch.equal(p.detach().reshape(-1)[marker.index[n]], before[n])
    assert ber(key, chain_weights(bundle_chain(export_digits_bundle(q, x)))) == 0.0


def test_watermas_embedded_during_minconv_qat(host, digits_models):
    """Embedding straight into a Brevitas MinConv model during QAT (no float embedding)."""
    x, y = host.owner
    q = quantize_digits(digits_models.minconv, 6, x, y, qat_epochs=0, progress=False)
    key = make_key("watermas", model_chain(q), 128, seed=9)
    marker = bind_marker(key, q, write=True)
    train(q, classifier_loss, (x, y), steps=20, lr=5e-4, marker=marker)
    bundle = export_digits_bundle(q, x)
    assert bundle.model["product"] == "min"
    assert ber(key, chain_weights(bundle_chain(bundle))) == 0.0
    assert host.bundle_accuracy(bundle) >= 0.8


def test_markers_refuse_the_wrong_host():
    torch.manual_seed(0)
    net = DigitsNet()
    key = make_key("watermas", model_chain(net), 32, seed=0)
    with pytest.raises(ValueError, match="does not carry this WaterMAS key: .* have the wrong sign"):
        bind_marker(key, net)  # an unmarked network: about half the signs disagree
    with pytest.raises(ValueError, match=r"layer 'conv2': the key is for shape \[16, 8, 3, 3\], the model's is \[8, 8, 3, 3\]"):
        WaterMAS(key, DigitsNet(c2=8))


def test_repetition_reads_every_bit_after_obfuscation_and_pruning(host, base):
    """Obfuscation (scaling, splits, dummies, permutation), then 50 % magnitude pruning and the
    attacker's 8-bit QAT: the down-scaled neurons lose key weights, so a key of one weight per bit
    reads 4 of 64 bits wrong even re-synchronized; the same 64 bits written 12 times each and read
    by a soft majority come back whole."""
    wrong = {}
    for repeat in (1, 12):
        net, key = host.embed(base, "watermas", 64, key_seed=1, params=MarkerParams(watermas_repeat=repeat))
        reference = model_chain(net)
        obf = digits_net(obfuscate(reference, Obfuscation(), 7)[0])
        pruned = copy.deepcopy(obf)
        load_chain_weights(pruned, magnitude_prune(chain_weights(model_chain(obf)), 0.5))
        suspect = bundle_chain(host.deploy(pruned, 8, None, epochs=3, data=host.attacker))
        wrong[repeat] = round(64 * ber(key, chain_weights(resynchronize(reference, suspect)[1])))
    assert wrong == {1: 4, 12: 0}
