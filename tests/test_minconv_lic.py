"""Issue 15: the MinConv LIC decoder's integer semantics (contract_15) and its exact chain.

The golden functions against direct definitions (loops over taps, Python integers), the
float MinConv layers against the same definitions, and the committed MinConv student:
Brevitas (float64) == integer golden model on crops of every held-out image, as integers.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from licforge.errors import UsageError
from licforge.models.data import embedded_images
from licforge.models.lic import LICConfig, build_lic, load_weights, save_weights, student_config
from licforge.models.minconv import (MinConvTranspose2d, MinIGDN1, min_conv2d, min_conv_transpose2d,
                                     pow2_round_ste, signed_min_matmul)
from licforge.quant.bundle import read_bundle
from licforge.quant.fixed import requantize
from licforge.quant.golden import conv_transpose2d_int, golden_forward, igdn_int, pow2_round, run_layers
from licforge.quant.lic import brevitas_integers, export_bundle, load_quantized
from licforge.quant.synthetic import random_decoder_bundle

ROOT = Path(__file__).resolve().parent.parent
MIN_BUNDLE = ROOT / "models" / "checkpoints" / "bundles" / "student_n16_min_hybrid8"


def _convt_min_loops(x, w, stride, padding, output_padding, x_shift=0, w_shift=0):
    """conv_transpose2d by its definition (every input pixel scatters K*K taps), products
    replaced by sign(x) sign(w) min(|x| << x_shift, |w| << w_shift)."""
    n, c, h, wd = x.shape
    _, o, k, _ = w.shape
    ho, wo = (h - 1) * stride - 2 * padding + k + output_padding, (wd - 1) * stride - 2 * padding + k + output_padding
    acc = np.zeros((n, o, ho + 2 * k, wo + 2 * k), np.int64)
    xa, wa = np.abs(x) << x_shift, np.abs(w) << w_shift
    for i in range(h):
        for j in range(wd):
            for ky in range(k):
                for kx in range(k):
                    t = np.sign(x[:, :, i, j])[:, :, None] * np.sign(w[:, :, ky, kx])[None] \
                        * np.minimum(xa[:, :, i, j][:, :, None], wa[:, :, ky, kx][None])
                    acc[:, :, stride * i - padding + ky + k, stride * j - padding + kx + k] += t.sum(1)
    return acc[:, :, k:k + ho, k:k + wo]


def _pow2_def(n: int) -> int:
    if n == 0:
        return -1
    length = n.bit_length()
    return length - 1 + ((n >> (length - 2)) & 1 if length >= 2 else 0)


@pytest.mark.parametrize("shape,k,stride,padding,op,xs,ws", [
    ((2, 3, 3, 4), 5, 2, 2, 1, 0, 0), ((1, 4, 5, 3), 5, 2, 2, 1, 2, 0), ((1, 2, 4, 4), 3, 2, 1, 1, 0, 1),
    ((1, 3, 3, 3), 4, 2, 1, 0, 1, 0), ((1, 2, 2, 5), 5, 3, 2, 2, 0, 0)])
def test_golden_min_conv_transpose_is_the_definition(shape, k, stride, padding, op, xs, ws):
    rng = np.random.default_rng(k * 10 + stride)
    x = rng.integers(-128, 128, size=shape)
    x[0, 0, 0, 0], x[0, -1, -1, -1] = -128, 0  # extremes and a zero (sign 0)
    w = rng.integers(-127, 128, size=(shape[1], 3, k, k))
    ref = _convt_min_loops(x, w, stride, padding, op, xs, ws)
    got = conv_transpose2d_int(x, w, stride, padding, op, "min", xs, ws)
    assert got.shape == ref.shape and np.array_equal(got, ref)
    # the float path (training) computes the same numbers
    fl = min_conv_transpose2d(torch.from_numpy(x << xs).double(), torch.from_numpy(w << ws).double(), stride, padding, op)
    assert np.array_equal(fl.numpy().astype(np.int64), ref)
    # the product path is untouched: a transposed convolution
    ref_mul = torch.nn.functional.conv_transpose2d(torch.from_numpy(x).double(), torch.from_numpy(w).double(),
                                                   stride=stride, padding=padding, output_padding=op)
    assert np.array_equal(conv_transpose2d_int(x, w, stride, padding, op), ref_mul.numpy().astype(np.int64))


def test_pow2_round_is_the_leading_one_rule():
    n = np.concatenate([np.arange(0, 5000), [2**31 - 1, 2**31, 3 * 2**30, 3 * 2**30 - 1, 2**52 + 2**51]])
    assert np.array_equal(pow2_round(n), [_pow2_def(int(v)) for v in n])
    assert list(pow2_round(np.array([0, 1, 2, 3, 5, 6, 11, 12]))) == [-1, 0, 1, 2, 2, 3, 3, 4]
    with pytest.raises(ValueError, match=r"\[0, 2\*\*53\)"):
        pow2_round(np.array([-1]))
    # the float rounding of training agrees on the real value of an integer norm at any scale
    v = torch.tensor([0.0, 3 * 2.0**-7, 5 * 2.0**-7, 1.0, 1.5, 0.74])
    assert torch.equal(pow2_round_ste(v), torch.tensor([0.0, 2.0**-5, 2.0**-5, 1.0, 2.0, 0.5]))


def test_golden_igdn_min_norm_and_shift_output_are_the_definition():
    rng = np.random.default_rng(3)
    c = 6
    x = rng.integers(-128, 128, size=(1, c, 3, 4))
    x[0, :, 0, 0] = 0  # a pixel whose norm is beta alone
    gamma = np.where(rng.random((c, c)) < 0.5, rng.integers(0, 128, (c, c)), 0)
    beta = rng.integers(0, 40, c)
    beta[0] = 0  # a norm that can be 0: y = 0
    for nxs, ngs in ((0, 0), (2, 0), (0, 1)):
        acc = np.minimum((np.abs(x[0]) << nxs)[None], (gamma << ngs)[:, :, None, None]).sum(1) + beta[:, None, None]
        n = requantize(acc, 5, 8, signed=False)
        p = np.array([0 if v == 0 else 1 << _pow2_def(int(v)) for v in n.ravel()]).reshape(n.shape)
        ref = requantize(x[0] * p, 3, 8, signed=True)
        got = igdn_int(x, gamma, beta, norm_shift=5, norm_bits=8, out_shift=3, out_bits=8, norm_product="min",
                       norm_x_shift=nxs, norm_g_shift=ngs, out_product="shift")
        assert np.array_equal(got[0], ref), (nxs, ngs)
        assert (got[0][:, 0, 0] == 0).all() and (n == 0).any()
        mul = igdn_int(x, gamma, beta, norm_shift=5, norm_bits=8, out_shift=3, out_bits=8, norm_product="min",
                       norm_x_shift=nxs, norm_g_shift=ngs)
        assert np.array_equal(mul[0], requantize(x[0] * n, 3, 8, signed=True))
    with pytest.raises(ValueError, match="out_product"):
        igdn_int(x, gamma, beta, norm_shift=5, norm_bits=8, out_shift=3, out_bits=8, out_product="div")


def test_synthetic_min_decoder_marks_every_layer_and_runs_as_defined():
    b = random_decoder_bundle(6, 8, seed=2, product="min", latent_hw=(2, 3))
    convs = [l for l in b.layers if l.op == "conv_transpose2d"]
    gdns = [l for l in b.layers if l.op == "igdn"]
    assert len(convs) == 4 and len(gdns) == 3 and b.model["product"] == "min"
    assert all(l.attrs["product"] == "min" and min(l.attrs["x_shift"], l.attrs["w_shift"]) == 0 for l in convs)
    assert [(l.attrs["x_shift"], l.attrs["w_shift"]) for l in convs] == [(2, 0), (0, 0), (0, 1), (0, 0)]
    assert all((l.attrs["norm_product"], l.attrs["out_product"]) == ("min", "shift") for l in gdns)
    mul = random_decoder_bundle(6, 8, seed=2, latent_hw=(2, 3))
    assert all("norm_product" not in l.attrs and l.attrs.get("product", "mul") == "mul" for l in mul.layers)
    x = np.random.default_rng(0).integers(-32, 32, size=(1, 8, 2, 3))
    for lay in b.layers:  # each layer against the definition, on the previous layer's output
        a, t = lay.attrs, lay.tensors
        if lay.op == "conv_transpose2d":
            acc = _convt_min_loops(x, t["weight"], 2, 2, 1, a["x_shift"], a["w_shift"]) + t["bias"][None, :, None, None]
            ref = requantize(acc, a["shift"], a["out_bits"], a["out_signed"])
        else:
            ref = igdn_int(x, t["gamma"], t["beta"], norm_shift=a["norm_shift"], norm_bits=a["norm_bits"],
                           out_shift=a["out_shift"], out_bits=a["out_bits"], norm_product="min",
                           out_product="shift")
        got = run_layers([lay], x)
        assert np.array_equal(got, ref), lay.name
        x = got
    assert x.shape == (1, 3, 32, 48) and 0 <= x.min() and x.max() <= 255 and x.std() > 0


def test_signed_min_gradients_flow_to_the_smaller_operand():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=g, dtype=torch.float64)
    w = torch.randn(3, 7, generator=g, dtype=torch.float64)
    w[0, 0] = x[0, 0]  # a tie: half the gradient to each operand, as torch.minimum
    x1, w1 = x.clone().requires_grad_(), w.clone().requires_grad_()
    x2, w2 = x.clone().requires_grad_(), w.clone().requires_grad_()
    up = torch.randn(5, 3, generator=g, dtype=torch.float64)
    (signed_min_matmul(x1, w1) * up).sum().backward()
    naive = torch.sign(x2)[:, None] * torch.sign(w2) * torch.minimum(x2.abs()[:, None], w2.abs())
    (naive.sum(-1) * up).sum().backward()
    assert torch.allclose(x1.grad, x2.grad) and torch.allclose(w1.grad, w2.grad)


def test_min_student_checkpoint_restores_its_products(tmp_path):
    cfg = student_config(4, product="min")
    assert cfg.name.endswith("_min") and LICConfig.from_dict(cfg.to_dict()) == cfg
    assert "product" not in student_config(4).to_dict()  # multiplier records unchanged
    with pytest.raises(ValueError, match="product 'min' needs"):
        LICConfig("factorized", 4, 6, "gdn", "min")
    torch.manual_seed(0)
    net = build_lic(cfg)
    net.g_s[2].log2_gain.fill_(3)
    save_weights(net, cfg, tmp_path / "m.pt")
    back, cfg2, _ = load_weights(tmp_path / "m.pt")
    assert cfg2 == cfg and int(back.g_s[2].log2_gain) == 3
    assert [type(m) for m in back.g_s] == [MinConvTranspose2d, MinIGDN1] * 3 + [MinConvTranspose2d]
    assert all(type(m).__name__ != "MinConvTranspose2d" for m in back.g_a)  # the encoder keeps its products
    y = torch.randn(1, 6, 2, 2)
    with torch.no_grad():
        ref = min_conv_transpose2d(y, back.g_s[0].weight * back.g_s[0].gain, 2, 2, 1) / back.g_s[0].gain
        assert torch.allclose(back.g_s[0](y), ref + back.g_s[0].bias.view(1, -1, 1, 1))
        n = back.g_s[1].norm(y[:, :4])
        assert torch.allclose(back.g_s[1](y[:, :4]), y[:, :4] * pow2_round_ste(n))
    assert torch.equal(min_conv2d(torch.ones(1, 1, 3, 3), torch.full((1, 1, 3, 3), 0.5), padding=1)[0, 0, 1, 1],
                       torch.tensor(4.5))


def test_gdn_output_ablations_compute_their_forms_and_are_never_quantized(tmp_path, capsys):
    """--gdn-out: the inverse GDN1's output x*n as a shift (n rounded to a power of two), exact,
    or in min form sign(x) min(|x|, n); one set of parameters serves the three (a distill init of
    one form loads into another), and the min form (a clamp) cannot be quantized."""
    from licforge.flows.cli import main
    from licforge.models.lic_train import TrainConfig
    from licforge.quant.train import train_model

    with pytest.raises(ValueError, match="gdn-out 'min' is a form of the MinConv inverse GDN; it needs product 'min'"):
        LICConfig("factorized", 4, 6, "gdn1", "mul", "min")
    with pytest.raises(ValueError, match="gdn-out must be one of"):
        LICConfig("factorized", 4, 6, "gdn1", "min", "clamp")
    assert "gdn_out" not in student_config(4, product="min").to_dict()
    torch.manual_seed(1)
    shift = student_config(4, product="min")
    net = build_lic(shift)
    save_weights(net, shift, tmp_path / "shift.pt")
    x = torch.randn(2, 4, 3, 5) * 4
    forms = {}
    for out in ("shift", "mul", "min"):
        cfg = LICConfig("factorized", 4, 6, "gdn1", "min", out)
        assert (out == "shift") == (cfg.name == shift.name) and LICConfig.from_dict(cfg.to_dict()) == cfg
        meta = train_model(cfg, TrainConfig(steps=1, crop=32, batch=2, lr=1e-9), tmp_path / f"{out}.pt",
                           init=tmp_path / "shift.pt", log=None)
        got, gcfg, _ = load_weights(tmp_path / f"{out}.pt")
        assert gcfg == cfg and meta["init"]["file"].endswith("shift.pt")
        with torch.no_grad():
            forms[out] = (got.g_s[1](x), got.g_s[1].norm(x))
    assert all(torch.allclose(forms[o][1], forms["shift"][1], atol=1e-5) for o in forms)  # one parameter set
    y, n = forms["shift"]
    assert torch.equal(y, x * pow2_round_ste(n)) and not torch.allclose(y, x * n)  # n to a power of two
    assert torch.allclose(forms["mul"][0], x * forms["mul"][1])
    y, n = forms["min"]
    assert (n > 0).all() and torch.equal(y, torch.sign(x) * torch.minimum(x.abs(), n))
    assert (y.abs() < x.abs()).any() and (y == x).any()  # it clamps some values and passes others
    assert main(["quantize", str(tmp_path / "min.pt"), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "min.pt: its inverse GDN output is in 'min' form (a clamp), a training ablation" in err
    assert "distill with --gdn-out shift or mul" in err


@pytest.fixture(scope="module")
def min_bundle():
    return read_bundle(MIN_BUNDLE)


@pytest.fixture(scope="module")
def min_quant():
    return load_quantized(Path(f"{MIN_BUNDLE}.quant.pt"))[0]


def test_committed_min_bundle_carries_the_contract_attrs(min_bundle, min_quant):
    assert min_bundle.model["product"] == "min" and min_quant.product == "min"
    for lay in min_bundle.layers:
        if lay.name.startswith("g_a") or lay.op == "latent":
            assert lay.attrs.get("product", "mul") == "mul" and "norm_product" not in lay.attrs, lay.name
        elif lay.op == "conv_transpose2d":
            a = lay.attrs
            assert a["product"] == "min" and min(a["x_shift"], a["w_shift"]) == 0, lay.name
            assert a["acc_exp"] == min(a["x_exp"], a["w_exp"]) - a["log2_gain"], lay.name
        else:
            assert (lay.attrs["norm_product"], lay.attrs["out_product"]) == ("min", "shift"), lay.name
    again = export_bundle(min_quant)
    assert [(l.name, l.attrs) for l in again.layers] == [(l.name, l.attrs) for l in min_bundle.layers]
    assert all(np.array_equal(a.tensors[t], b.tensors[t]) for a, b in zip(again.layers, min_bundle.layers)
               for t in a.tensors)


def test_min_student_brevitas_equals_golden_on_held_out_crops(min_bundle, min_quant):
    for name, img in embedded_images("held-out").items():
        h, w = img.shape[:2]
        px = np.ascontiguousarray(img[h // 2 - 48:h // 2 + 48, w // 2 - 64:w // 2 + 64].transpose(2, 0, 1))[None]
        px = px.astype(np.int64)
        lat_b, out_b = brevitas_integers(min_quant, px)
        lat_g, out_g = golden_forward(min_bundle, px)
        assert lat_g.shape == (1, 24, 6, 8) and out_g.shape == px.shape, name
        assert np.array_equal(lat_b, lat_g), name
        assert np.array_equal(out_b, out_g), name
        assert 0 <= out_g.min() and out_g.max() <= 255 and out_g.std() > 10, name  # an image, not a constant


def test_qonnx_refuses_the_min_student_by_name():
    from licforge.quant.qonnx import export_synthesis

    with pytest.raises(UsageError, match=r"layer g_s\.0: product 'min' is not supported by QONNX export"):
        export_synthesis(f"{MIN_BUNDLE}.quant.pt", "/nonexistent")


def test_conversion_fits_each_min_layer_and_distill_converts_a_multiplier_init(tmp_path):
    from licforge.models.data import CropSampler
    from licforge.models.lic import to_min_student
    from licforge.models.lic_train import TrainConfig
    from licforge.quant.train import train_model

    torch.manual_seed(0)
    cfg = student_config(4)
    parent = build_lic(cfg).eval()
    with torch.no_grad():  # an untrained encoder's latents all round to 0: make them speak
        parent.g_a[6].weight.mul_(50.0)
    calib = CropSampler({k: v[:96, :96] for k, v in embedded_images("train").items()}, 32, 4, 1)()
    twin, mcfg, errors = to_min_student(parent, cfg, calib)
    assert mcfg == student_config(4, product="min") and len(errors) == 7
    assert all(0 <= e < 1 for e in errors)  # every fitted layer beats predicting zero
    with pytest.raises(ValueError, match="converts a factorized gdn1 multiplier"):
        to_min_student(twin, mcfg, calib)
    save_weights(parent, cfg, tmp_path / "mul.pt")
    meta = train_model(mcfg, TrainConfig(steps=1, crop=32, batch=2), tmp_path / "min.pt", init=tmp_path / "mul.pt",
                       log=None)
    net, got, _ = load_weights(tmp_path / "min.pt")
    assert got == mcfg and meta["init"]["file"].endswith("mul.pt")
    assert any(int(m.log2_gain) != 0 for m in net.g_s)


def test_held_out_rd_measures_a_curve_one_db_below_the_twin(tmp_path):
    """``bench.minconv_lic.held_out_rd`` on an eval file whose MinConv curve is the twin's
    points 1 dB lower: BD-PSNR -1 dB, every point 1 dB below the twin at its rate, no BD-rate
    against the twin (no shared PSNR interval), and a missing JPEG curve refused by name."""
    from licforge.bench.minconv_lic import held_out_rd

    twin = [(0.2, 27.0), (0.25, 27.5), (0.3, 27.8), (0.35, 28.0)]
    jpeg = [(0.15, 22.0), (0.25, 25.0), (0.4, 28.0), (0.6, 30.0)]
    entries = [{"curve": "mc", "mean": {"bpp": b, "psnr": p - 1.0}} for b, p in twin]
    entries += [{"curve": "JPEG (Pillow)", "mean": {"bpp": b, "psnr": p}} for b, p in jpeg]
    f = tmp_path / "eval.json"
    f.write_text(json.dumps({"entries": entries}))
    rd = held_out_rd(f, twin, ["mc"])
    assert rd["mc"]["bd_psnr_vs_twin_db"] == pytest.approx(-1.0, abs=1e-9)
    assert [p["psnr_gap_at_equal_rate_db"] for p in rd["mc"]["per_point"]] == pytest.approx([-1.0] * 4, abs=1e-9)
    assert rd["mc"]["bd_rate_vs_twin_pct"] is None   # PSNR 26-27 dB against 27-28 dB: no shared interval
    assert rd["mc"]["rate_over_twin_via_jpeg_pct"] > 0 > rd["twin_bd_rate_vs_jpeg_pct"]
    f.write_text(json.dumps({"entries": entries[:4]}))
    with pytest.raises(KeyError, match="no curve \\[.JPEG \\(Pillow\\).\\]"):
        held_out_rd(f, twin, ["mc"])
