"""Watermark keys and readers: drawing, saving, validating, reading bits (no training)."""
import json

import numpy as np
import pytest
import torch

from licforge.models.digits import DigitsNet
from licforge.watermark.extract import ber, bit_error_rate, extract_bits
from licforge.watermark.keys import KeyFileError, load_key, make_key, save_key
from licforge.watermark.layers import chain_weights, model_chain


@pytest.fixture(scope="module")
def chain():
    torch.manual_seed(0)
    return model_chain(DigitsNet())


def test_model_chain_of_the_digits_classifier(chain):
    assert [(l.name, l.op) for l in chain] == [("conv1", "conv2d"), ("conv2", "conv2d"),
                                               ("flatten", "flatten"), ("fc", "linear")]
    assert {n: w.shape for n, w in chain_weights(chain).items()} == {
        "conv1": (8, 1, 3, 3), "conv2": (16, 8, 3, 3), "fc": (10, 256)}


def test_watermas_key_spreads_distinct_positions_over_layers(chain):
    key = make_key("watermas", chain, 1024, seed=3)
    assert key.payload == 1024 and set(np.unique(key.bits)) == {0, 1}
    assert len(set(key.positions)) == 1024
    assert set(key.layers) == {"conv1", "conv2", "fc"}
    per_layer = {n: len(i) for n, (i, _) in key.positions_by_layer().items()}
    assert sum(per_layer.values()) == 1024 and per_layer["fc"] > per_layer["conv2"] > per_layer["conv1"]
    again = make_key("watermas", chain, 1024, seed=3)
    assert again.positions == key.positions and np.array_equal(again.bits, key.bits)
    assert make_key("watermas", chain, 1024, seed=4).positions != key.positions


def test_key_restricted_to_layers(chain):
    key = make_key("watermas", chain, 100, seed=0, layers=["conv2"])
    assert set(key.layers) == {"conv2"} and all(n == "conv2" for n, _ in key.positions)
    with pytest.raises(ValueError, match="layer 'dec9' is not a dot layer of the model"):
        make_key("watermas", chain, 10, seed=0, layers=["dec9"])
    with pytest.raises(ValueError, match="payload 80 exceeds the 72 weights of layers"):
        make_key("watermas", chain, 80, seed=0, layers=["conv1"])


def test_uchida_key_uses_the_widest_layer(chain):
    key = make_key("uchida", chain, 64, seed=1)
    assert list(key.layers) == ["fc"] and key.projection().shape == (64, 256)
    assert np.array_equal(key.projection(), make_key("uchida", chain, 64, seed=1).projection())
    with pytest.raises(ValueError, match="Uchida payload 100 exceeds the kernel size M=72 of layer 'conv2'"):
        make_key("uchida", chain, 100, seed=1, layers=["conv2"])


@pytest.mark.parametrize("scheme", ["watermas", "uchida"])
def test_key_file_round_trip(chain, tmp_path, scheme):
    key = make_key(scheme, chain, 48, seed=5, model={"arch": "digits"}, params={"lam": 0.5})
    back = load_key(save_key(key, tmp_path / "k" / "key.json"))
    assert back.scheme == scheme and back.seed == 5 and back.positions == key.positions
    assert np.array_equal(back.bits, key.bits) and back.layers == key.layers
    assert back.params == {"lam": 0.5} and back.model == {"arch": "digits"}
    w = chain_weights(chain)
    assert np.array_equal(extract_bits(back, w), extract_bits(key, w))


def _edit(path, **changes):
    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(doc))


def test_bad_key_files_name_the_file_and_the_problem(chain, tmp_path):
    p = save_key(make_key("watermas", chain, 8, seed=0), tmp_path / "key.json")
    with pytest.raises(KeyFileError, match="not found"):
        load_key(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{ truncated")
    with pytest.raises(KeyFileError, match="bad.json: not valid JSON"):
        load_key(bad)
    _edit(p, bits="0101")
    with pytest.raises(KeyFileError, match="'bits' must be a string of 8 '0'/'1' characters"):
        load_key(p)
    p = save_key(make_key("watermas", chain, 8, seed=0), tmp_path / "key.json")
    _edit(p, positions=[["fc", 99999]] + json.loads(p.read_text())["positions"][1:])
    with pytest.raises(KeyFileError, match=r"position \('fc', 99999\) is outside the key's layers"):
        load_key(p)
    _edit(p, format="something-else")
    with pytest.raises(KeyFileError, match="format is 'something-else'"):
        load_key(p)


def test_readers_on_known_weights(chain):
    key = make_key("watermas", chain, 40, seed=2)
    w = {n: np.zeros_like(a) for n, a in chain_weights(chain).items()}
    for n, (idx, k) in key.positions_by_layer().items():
        w[n].reshape(-1)[idx] = np.where(key.bits[k] == 1, 3, -3)
    assert ber(key, w) == 0.0
    n0, i0 = key.positions[0]
    w[n0].reshape(-1)[i0] *= -1
    assert ber(key, w) == 1 / 40
    assert bit_error_rate(key, 1 - key.bits) == 1.0
    with pytest.raises(ValueError, match=r"layer 'fc': weight shape \[10, 255\] != the key's \[10, 256\]"):
        extract_bits(key, {**w, "fc": np.zeros((10, 255))})


def test_key_refuses_another_network(chain):
    key = make_key("uchida", chain, 16, seed=0)
    other = chain_weights(model_chain(DigitsNet(c1=8, c2=8)))
    with pytest.raises(ValueError, match=r"layer 'fc': weight shape \[10, 128\] != the key's \[10, 256\]; "
                                          r"was the key made for another network\?"):
        extract_bits(key, other)


def test_repetition_key_spreads_every_bit_over_several_positions(chain, tmp_path):
    key = make_key("watermas", chain, 48, seed=5, repeat=3)
    plain = make_key("watermas", chain, 48, seed=5)
    assert key.payload == 48 and key.repeat == 3 and plain.repeat == 1
    assert len(set(key.positions)) == 144 and np.array_equal(np.bincount(key.groups), np.full(48, 3))
    assert np.array_equal(key.bits, plain.bits)  # same bits; repeat=1 draws the key it always drew
    assert np.array_equal(plain.groups, np.arange(48)) and np.array_equal(key.position_bits, key.bits[key.groups])
    back = load_key(save_key(key, tmp_path / "key.json"))
    assert back.positions == key.positions and np.array_equal(back.groups, key.groups) and back.repeat == 3
    _edit(tmp_path / "key.json", groups=[0] * 144)
    with pytest.raises(KeyFileError, match=r"'groups' must name every bit 0..47 3 times"):
        load_key(tmp_path / "key.json")
    with pytest.raises(ValueError, match="payload 30 x repeat 3 exceeds the 72 weights of layers"):
        make_key("watermas", chain, 30, seed=0, layers=["conv1"], repeat=3)
    with pytest.raises(ValueError, match="repeat must be a positive number of WaterMAS weights per bit, not 2 for "
                                         "a uchida key"):
        make_key("uchida", chain, 16, seed=0, repeat=2)


def test_repetition_is_read_by_a_soft_majority(chain):
    """A bit reads the sign of the sum of its copies, each relative to its layer's largest weight:
    one surviving copy at the floor outvotes two small regrown copies of the wrong sign (a hard
    majority of signs would read it wrong); a bit whose copies are all zero reads 0."""
    key = make_key("watermas", chain, 40, seed=2, repeat=3)
    w = {n: np.zeros_like(a) for n, a in chain_weights(chain).items()}
    for n in w:
        w[n].reshape(-1)[0] = 8.0  # every layer's largest magnitude: 8
    sign = 2.0 * key.position_bits - 1
    first = np.array([list(key.groups).index(g) for g in range(40)])  # one copy of each bit
    vals = np.where(np.isin(np.arange(120), first), 2.0 * sign, -0.25 * sign)
    for n, (idx, k) in key.positions_by_layer().items():
        sel = [j for j, (m, _) in enumerate(key.positions) if m == n]
        w[n].reshape(-1)[idx] = vals[sel]
    assert ber(key, w) == 0.0
    hard = np.array([np.sum(vals[key.groups == g] > 0) >= 2 for g in range(40)])
    assert np.mean(hard != key.bits) == 1.0
    for n, (idx, k) in key.positions_by_layer().items():
        w[n].reshape(-1)[idx] = 0.0
    assert np.array_equal(extract_bits(key, w), np.zeros(40, np.uint8))
