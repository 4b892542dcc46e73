"""The deployment bundle: round trip, and refusal of truncated / edited / inconsistent ones."""
import json

import numpy as np
import pytest

from licforge.quant.bundle import BundleError, Bundle, Layer, read_bundle, write_bundle


def test_round_trip_keeps_every_integer(digits_bundle, tmp_path):
    out = tmp_path / "copy"
    h = write_bundle(Bundle(digits_bundle.model, digits_bundle.input, digits_bundle.layers), out)
    back = read_bundle(out)
    assert back.hash == h == digits_bundle.hash
    for a, b in zip(digits_bundle.layers, back.layers):
        assert a.attrs == b.attrs
        for t in a.tensors:
            assert np.array_equal(a.tensors[t], b.tensors[t])


def test_truncated_tensor_is_refused(digits_bundle, copy_bundle):
    d = copy_bundle(digits_bundle)
    f = d / "conv2.weight.npy"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(BundleError, match=r"conv2\.weight\.npy: content does not match"):
        read_bundle(d)


def test_missing_tensor_file_is_refused(digits_bundle, copy_bundle):
    d = copy_bundle(digits_bundle)
    (d / "fc.weight.npy").unlink()
    with pytest.raises(BundleError, match=r"fc\.weight\.npy: missing"):
        read_bundle(d)


def test_edited_manifest_is_refused(digits_bundle, copy_bundle):
    d = copy_bundle(digits_bundle)
    m = json.loads((d / "bundle.json").read_text())
    m["layers"][0]["attrs"]["shift"] += 1
    (d / "bundle.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="hash mismatch"):
        read_bundle(d)


def test_corrupt_manifest_is_refused(digits_bundle, copy_bundle):
    d = copy_bundle(digits_bundle)
    (d / "bundle.json").write_text("{not json")
    with pytest.raises(BundleError, match=r"bundle\.json: not valid JSON"):
        read_bundle(d)


def test_out_of_range_weights_are_refused(tmp_path):
    w = np.array([[[[200]]]])
    lay = Layer("c", "conv2d", {"x_exp": 0, "w_exp": 0, "acc_exp": 0, "out_exp": 0, "shift": 0,
                                "w_bits": 8, "x_bits": 8, "out_bits": 8, "acc_bits": 16, "relu": False,
                                "product": "mul", "stride": 1, "padding": 0}, {"weight": w})
    with pytest.raises(BundleError, match=r"outside the 8-bit range \[-127, 127\]"):
        write_bundle(Bundle({}, {}, [lay]), tmp_path / "x")


def test_inconsistent_shift_is_refused(tmp_path):
    lay = Layer("c", "linear", {"x_exp": -4, "w_exp": -6, "acc_exp": -10, "out_exp": -3, "shift": 5,
                                "w_bits": 8, "x_bits": 8, "out_bits": 8, "acc_bits": 16, "relu": False,
                                "product": "mul"}, {"weight": np.zeros((2, 2), np.int64)})
    with pytest.raises(BundleError, match="shift 5 != out_exp - acc_exp = 7"):
        write_bundle(Bundle({}, {}, [lay]), tmp_path / "x")


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="bundle.json: not found"):
        read_bundle(tmp_path)
