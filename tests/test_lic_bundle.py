"""The LIC deployment bundle: layer graph, entropy-coder tables, and refusal of bad bundles."""
import json

import numpy as np
import pytest

from licforge.flows.cli import main
from licforge.quant.bundle import Bundle, BundleError, Layer, read_bundle, write_bundle
from licforge.quant.codec import encode_image
from licforge.quant.lic_recipe import RecipeError, load_recipe, parse_recipe
from licforge.quant.bundle import decoder_layers
from licforge.quant.synthetic import random_decoder_bundle

CHAIN = ["g_a.0", "g_a.1", "g_a.2", "g_a.3", "g_a.4", "g_a.5", "g_a.6", "latent",
         "g_s.0", "g_s.1", "g_s.2", "g_s.3", "g_s.4", "g_s.5", "g_s.6"]


def test_layer_graph_matches_the_contract(lic_bundle):
    assert [l.name for l in lic_bundle.layers] == CHAIN
    assert [l.op for l in lic_bundle.layers[:8]] == ["conv2d", "gdn"] * 3 + ["conv2d", "latent"]
    assert lic_bundle.input == {"exp": -8, "bits": 8, "signed": False, "shape": [3, None, None]}
    # the decoder chain is the one quant.synthetic makes for the RTL tests
    synth = random_decoder_bundle(16, 24)
    assert [(l.name, l.op) for l in decoder_layers(lic_bundle)] == [(l.name, l.op) for l in synth.layers]
    for mine, ref in zip(decoder_layers(lic_bundle), synth.layers):
        assert set(ref.attrs) <= set(mine.attrs), mine.name
    last = lic_bundle.layer("g_s.6")
    assert (last.attrs["out_signed"], last.attrs["out_bits"], last.attrs["out_exp"]) == (False, 8, -8)
    assert lic_bundle.layer("g_s.0").tensors["weight"].shape == (24, 16, 5, 5)  # (Cin, Cout, K, K)
    g0 = lic_bundle.layer("g_a.0").attrs
    assert (g0["x_exp"], g0["stride"], g0["padding"], g0["product"]) == (-8, 2, 2, "mul")
    lat = lic_bundle.layer("latent")
    assert (lat.attrs["x_exp"], lat.attrs["out_exp"], lat.attrs["shift"]) == (0, 0, 0)
    cdf = lat.tensors["cdf"]
    assert cdf.shape[0] == 24 and (cdf[:, 0] == 0).all()
    ends = cdf[np.arange(24), lat.tensors["cdf_length"] - 1]
    assert (ends == 1 << lat.attrs["cdf_precision"]).all()  # every table ends at 2^16
    for gdn in ("g_a.1", "g_s.5"):
        t = lic_bundle.layer(gdn).tensors
        assert (t["gamma"] >= 0).all() and (t["beta"] > 0).all()


def test_truncated_latent_table_is_refused(lic_bundle, copy_bundle):
    d = copy_bundle(lic_bundle)
    f = d / "latent.cdf.npy"
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(BundleError, match=r"latent\.cdf\.npy: content does not match the manifest's sha256"):
        read_bundle(d)


def test_edited_shift_is_refused(lic_bundle, copy_bundle):
    d = copy_bundle(lic_bundle)
    m = json.loads((d / "bundle.json").read_text())
    m["layers"][8]["attrs"]["shift"] += 1
    (d / "bundle.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"bundle\.json: hash mismatch"):
        read_bundle(d)


def test_table_outside_its_declared_width_is_refused(lic_bundle, tmp_path):
    layers = [Layer(l.name, l.op, dict(l.attrs), dict(l.tensors)) for l in lic_bundle.layers]
    lat = next(l for l in layers if l.op == "latent")
    lat.tensors["cdf"] = lat.tensors["cdf"].copy()
    lat.tensors["cdf"][0, 1] = 1 << 17
    with pytest.raises(BundleError, match=r"tensor latent\.cdf has values in \[0, 131072\], outside the 17-bit"):
        write_bundle(Bundle(lic_bundle.model, lic_bundle.input, layers), tmp_path / "x")


def test_bundle_without_tables_cannot_encode(lic_bundle, tmp_path):
    layers = [Layer(l.name, l.op, dict(l.attrs), {} if l.op == "latent" else dict(l.tensors))
              for l in lic_bundle.layers]
    out = tmp_path / "notables"
    write_bundle(Bundle(lic_bundle.model, lic_bundle.input, layers), out)
    b = read_bundle(out)
    with pytest.raises(BundleError, match=r"layer 'latent' lacks the entropy coder tables \['cdf', 'cdf_length', "
                                          r"'offset', 'median'\]"):
        encode_image(b, np.zeros((16, 16, 3), np.uint8))


def test_cli_inspect_and_its_refusal(lic_bundle, copy_bundle, capsys):
    rc = main(["inspect", str(lic_bundle.path)])
    out = capsys.readouterr().out
    assert rc == 0 and f"valid, hash {lic_bundle.hash}" in out and "g_s.6" in out
    d = copy_bundle(lic_bundle)
    (d / "g_s.3.gamma.npy").unlink()
    rc = main(["inspect", str(d)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "g_s.3.gamma.npy: missing" in lines[0]


def test_recipes_load_and_bad_ones_name_the_key(tmp_path):
    r = load_recipe("hybrid8")
    assert r.bits("g_s.2") == {"w_bits": 8, "out_bits": 10}
    assert r.bits("g_s.6")["out_bits"] == 8 and r.bits("g_a.6")["out_bits"] == 8
    assert load_recipe("hybrid6").bits("g_a.0")["w_bits"] == 8 and load_recipe("hybrid6").bits("g_a.2")["w_bits"] == 6
    data = json.loads(json.dumps(r.data))
    data["gdn"]["norm_bits"] = 40
    with pytest.raises(RecipeError, match=r"x\.json: gdn\.norm_bits must be an integer between 2 and 16, not 40"):
        parse_recipe(data, "x.json")
    data = json.loads(json.dumps(r.data))
    data["layers"] = {"g_s.9": {"w_bits": 8}}
    with pytest.raises(RecipeError, match=r"layers\.g_s\.9: no such layer"):
        parse_recipe(data, "x.json")
    for key, value, needle in (("percentile", "high", r"calibration\.percentile must be a number in \[50, 100\], not 'high'"),
                               ("crop", 72, r"calibration\.crop must be a multiple of 16 \(the transform's stride\), not 72")):
        data = json.loads(json.dumps(r.data))
        data["calibration"][key] = value
        with pytest.raises(RecipeError, match=needle):
            parse_recipe(data, "x.json")
    with pytest.raises(RecipeError, match=r"--recipe nope: no such file or recipe \(built-in: \['hybrid6', 'hybrid8', 'int8'\]\)"):
        load_recipe("nope")
