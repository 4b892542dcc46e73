"""Issue 15: MinConv students that keep some synthesis convolutions as multipliers
(``--mul-layers``): the record, the conversions both ways, and the exact chain with per-layer
products (Brevitas == golden, the bundle's ``product`` of each layer, the planner's DSPs)."""
import numpy as np
import pytest
import torch
from torch import nn

from licforge.errors import UsageError
from licforge.flows.cli import main
from licforge.models.data import CropSampler, embedded_images
from licforge.models.lic import (LICConfig, build_lic, keep_multipliers, load_weights, save_weights, student_config,
                                 SYNTH_CONVS, to_min_student)
from licforge.models.minconv import MinConvTranspose2d, MinIGDN1
from licforge.quant.synthetic import random_decoder_bundle


def _hybrid(n: int, *layers: str) -> LICConfig:
    return LICConfig("factorized", n, (3 * n + 1) // 2, "gdn1", "min", mul_layers=layers)


def _calib():
    return CropSampler({k: v[:96, :96] for k, v in embedded_images("train").items()}, 32, 4, 1)()


def test_the_record_names_sorts_and_refuses_mul_layers(tmp_path):
    cfg = _hybrid(4, "g_s.6", "g_s.0")
    assert cfg.mul_layers == ("g_s.0", "g_s.6") and cfg.name == "factorized_N4_M6_gdn1_min_mul06"
    assert cfg.to_dict()["mul_layers"] == ["g_s.0", "g_s.6"] and LICConfig.from_dict(cfg.to_dict()) == cfg
    assert "mul_layers" not in student_config(4, product="min").to_dict()  # MinConv records unchanged
    with pytest.raises(ValueError, match="mul-layers must be distinct synthesis convolutions among g_s.0, g_s.2, "
                                         "g_s.4, g_s.6, not g_s.1"):
        _hybrid(4, "g_s.1")
    with pytest.raises(ValueError, match="not g_s.2 g_s.2"):
        _hybrid(4, "g_s.2", "g_s.2")
    with pytest.raises(ValueError, match="it needs product 'min'"):
        LICConfig("factorized", 4, 6, "gdn1", "mul", mul_layers=("g_s.0",))
    torch.manual_seed(0)
    save_weights(build_lic(cfg), cfg, tmp_path / "h.pt")
    net, back, _ = load_weights(tmp_path / "h.pt")
    assert back == cfg
    assert [type(m) for m in net.g_s] == [nn.ConvTranspose2d, MinIGDN1, MinConvTranspose2d, MinIGDN1,
                                          MinConvTranspose2d, MinIGDN1, nn.ConvTranspose2d]
    assert main(["distill", "--N", "4", "--product", "min", "--mul-layers", "g_s.3", "--steps", "1",
                 "--out", str(tmp_path / "x.pt")]) == 2
    # the torch-free random bundles name their convolutions as the models do, and refuse the same names
    synth = random_decoder_bundle(4, 6, product="min", mul_layers=SYNTH_CONVS[:1])
    assert tuple(l.name for l in synth.layers if l.op == "conv_transpose2d") == SYNTH_CONVS
    assert [l.attrs.get("product") for l in synth.layers if l.op == "conv_transpose2d"] == ["mul", "min", "min", "min"]
    with pytest.raises(ValueError, match="mul_layers are convolutions of a 'min' decoder"):
        random_decoder_bundle(4, 6, product="min", mul_layers=("g_s.1",))


def test_conversions_keep_or_fit_the_multiplier_layers(tmp_path, capsys):
    """From the multiplier parent the kept layers keep its weights; from a MinConv student each
    new multiplier layer is fitted to the MinConv layer's output (closer than predicting its bias);
    distill converts either init, and refuses to turn a multiplier layer back into MinConv."""
    from licforge.models.lic_train import TrainConfig
    from licforge.quant.train import train_model

    torch.manual_seed(0)
    cfg = student_config(4)
    parent = build_lic(cfg).eval()
    with torch.no_grad():  # an untrained encoder's latents all round to 0: make them speak
        parent.g_a[6].weight.mul_(50.0)
    calib = _calib()
    twin, hcfg, errors = to_min_student(parent, cfg, calib, ("g_s.6",))
    assert hcfg == _hybrid(4, "g_s.6") and len(errors) == 7 and all(0 <= e < 1 for e in errors)
    assert torch.equal(twin.g_s[6].weight, parent.g_s[6].weight) and type(twin.g_s[6]) is nn.ConvTranspose2d
    mins, mcfg, _ = to_min_student(parent, cfg, calib)
    both, bcfg, fit = keep_multipliers(mins, mcfg, ("g_s.0", "g_s.6"), calib)
    assert bcfg == _hybrid(4, "g_s.0", "g_s.6") and len(fit) == 2
    with torch.no_grad():
        h = torch.round(mins.g_a(calib))
        target = mins.g_s[0](h)
        got = both.g_s[0](h)
        bias_only = mins.g_s[0].bias.view(1, -1, 1, 1).expand_as(target)
        rms = lambda a: float(((a - target) ** 2).mean().sqrt())  # noqa: E731
        assert rms(got) < 0.5 * rms(bias_only) and fit[0] == pytest.approx(rms(got) / float(target.pow(2).mean().sqrt()))
        assert torch.equal(both.g_s[2].weight, mins.g_s[2].weight) and int(both.g_s[2].log2_gain) == int(mins.g_s[2].log2_gain)
    save_weights(mins, mcfg, tmp_path / "min.pt")
    save_weights(parent, cfg, tmp_path / "mul.pt")
    for init in ("min.pt", "mul.pt"):
        train_model(bcfg, TrainConfig(steps=1, crop=32, batch=2, lr=1e-9), tmp_path / f"h_{init}", init=tmp_path / init,
                    log=None)
        assert load_weights(tmp_path / f"h_{init}")[1] == bcfg
    with pytest.raises(UsageError, match="h_min.pt: its multiplier layers g_s.0, g_s.6 cannot become MinConv layers "
                                         "again; start from the multiplier student"):
        train_model(_hybrid(4, "g_s.6"), TrainConfig(steps=1, crop=32, batch=2), tmp_path / "back.pt",
                    init=tmp_path / "h_min.pt", log=None)


def _ptq_brevitas_equals_golden(cfg: LICConfig, seed: int):
    """PTQ (hybrid8) of a random student of ``cfg`` (its latents scaled up to use their range) and its
    bundle; asserts Brevitas == golden as integers on a held-out crop of coffee (130 x 80, padded) with
    non-zero latents and varied pixels; returns (bundle, golden pixels)."""
    from licforge.quant.codec import pad_image, prepare_entropy_coder
    from licforge.quant.golden import golden_forward
    from licforge.quant.lic import brevitas_integers, export_bundle, quantize_student
    from licforge.quant.lic_recipe import load_recipe

    torch.manual_seed(seed)
    net = build_lic(cfg)
    with torch.no_grad():
        net.g_a[6].weight.mul_(20.0)
    train = {k: v[:256, :256] for k, v in embedded_images("train").items()}
    q, _ = quantize_student(net, cfg, load_recipe("hybrid8"), train)
    prepare_entropy_coder(q.entropy_bottleneck)
    bundle = export_bundle(q)
    px = pad_image(embedded_images("held-out")["coffee"][100:180, 200:330])
    lat_b, out_b = brevitas_integers(q, px)
    lat_g, out_g = golden_forward(bundle, px)
    assert np.array_equal(lat_b, lat_g) and np.array_equal(out_b, out_g)
    assert np.abs(lat_g).max() > 0 and len(np.unique(out_g)) > 10
    return bundle, out_g


def test_hybrid_bundle_marks_each_layer_and_brevitas_equals_golden():
    """PTQ of an N=8 hybrid (g_s.0 and g_s.6 multipliers): each layer's product in the bundle,
    golden == Brevitas as integers on a held-out crop, and the planner's DSPs only in the
    multiplier layers."""
    from licforge.quant.bundle import decoder_layers
    from licforge.rtl.perf import plan_for_target

    bundle, out_g = _ptq_brevitas_equals_golden(_hybrid(8, "g_s.0", "g_s.6"), seed=4)
    assert bundle.model["product"] == "min" and bundle.model["mul_layers"] == ["g_s.0", "g_s.6"]
    products = {l.name: l.attrs.get("product", l.attrs.get("norm_product")) for l in bundle.layers
                if l.name.startswith("g_s")}
    assert products == {"g_s.0": "mul", "g_s.1": "min", "g_s.2": "min", "g_s.3": "min", "g_s.4": "min",
                        "g_s.5": "min", "g_s.6": "mul"}
    assert all("log2_gain" not in bundle.layer(n).attrs for n in ("g_s.0", "g_s.6"))
    assert out_g.shape == (1, 3, 80, 144)
    r = plan_for_target(decoder_layers(bundle), fps=30, height=720, width=1280, dsp_budget=2520)
    assert r["ok"] and {p.name for p in r["plan"] if p.dsps} == {"g_s.0", "g_s.6"}
    assert not plan_for_target(decoder_layers(bundle), fps=30, height=720, width=1280, dsp_budget=0)["ok"]


def test_exact_gdn_output_bundle_and_brevitas_equals_golden():
    """PTQ of an N=8 MinConv student whose inverse GDNs keep the output x*n exact (--gdn-out mul):
    norms in min form, outputs products in the bundle, golden == Brevitas as integers on a held-out
    crop, and the planner's DSPs only in the inverse GDNs (one x*n product per output lane)."""
    from licforge.quant.bundle import decoder_layers
    from licforge.rtl.perf import plan_for_target

    bundle, _ = _ptq_brevitas_equals_golden(LICConfig("factorized", 8, 12, "gdn1", "min", "mul"), seed=5)
    gdns = {l.name: (l.attrs["norm_product"], l.attrs["out_product"]) for l in bundle.layers
            if l.op == "igdn"}
    assert gdns == {"g_s.1": ("min", "mul"), "g_s.3": ("min", "mul"), "g_s.5": ("min", "mul")}
    assert all(bundle.layer(f"g_s.{i}").attrs["product"] == "min" for i in (0, 2, 4, 6))
    r = plan_for_target(decoder_layers(bundle), fps=30, height=720, width=1280, dsp_budget=2520)
    assert r["ok"] and {p.name for p in r["plan"] if p.dsps} == {"g_s.1", "g_s.3", "g_s.5"}
    assert all(p.dsps == p.po * p.pp for p in r["plan"] if p.dsps)


def test_bench_hybrid_twin_and_its_lut_ratios(tmp_path):
    """bench minconv-lic's hybrid decoder is the MinConv twin with g_s.0/g_s.6 multipliers (same
    seed: the same random weights, its inverse GDNs in min form); its LUT ratios are taken
    without DSPs (its multipliers in LUTs) against the multiplier decoder with and without DSPs."""
    from licforge.bench.minconv_lic import _ratios, twin_bundles

    from licforge.bench.minconv_lic import hybrid_what

    b = twin_bundles(tmp_path, n=4, m=4, products=("min", "hybrid", "hybrid0", "gdnmul", "hybrid0gdnmul",
                                                  "hybrid02gdnmul", "hybrid026gdnmul"))
    assert b["hybrid"].model["mul_layers"] == ["g_s.0", "g_s.6"] and b["hybrid0"].model["mul_layers"] == ["g_s.0"]
    assert [l.attrs.get("product") for l in b["hybrid"].layers if l.op == "conv_transpose2d"] == \
        ["mul", "min", "min", "mul"]
    assert [l.attrs.get("product") for l in b["hybrid0"].layers if l.op == "conv_transpose2d"] == \
        ["mul", "min", "min", "min"]
    for name in ("g_s.1", "g_s.3", "g_s.5"):   # the same random gamma, in min form with a shift output
        hy, mn = b["hybrid"].layer(name), b["min"].layer(name)
        assert np.array_equal(hy.tensors["gamma"], mn.tensors["gamma"])
        assert (hy.attrs["norm_product"], hy.attrs["out_product"]) == ("min", "shift")
    assert np.array_equal(b["hybrid"].layer("g_s.2").tensors["weight"], b["min"].layer("g_s.2").tensors["weight"])
    # gdnmul: every convolution MinConv, the inverse GDNs' norms in min form and their outputs x*n exact
    assert [l.attrs.get("product") for l in b["gdnmul"].layers if l.op == "conv_transpose2d"] == ["min"] * 4
    assert {(l.attrs["norm_product"], l.attrs["out_product"]) for l in b["gdnmul"].layers if l.op == "igdn"} == \
        {("min", "mul")}
    assert [l.attrs.get("product", l.attrs.get("out_product")) for l in b["hybrid0gdnmul"].layers] == \
        ["mul", "mul", "min", "mul", "min", "mul", "min"]
    assert hybrid_what("hybrid0gdnmul") == "g_s.0 multipliers, exact inverse-GDN outputs x*n"
    assert [l.attrs.get("product", l.attrs.get("out_product")) for l in b["hybrid02gdnmul"].layers] == \
        ["mul", "mul", "mul", "mul", "min", "mul", "min"]
    assert hybrid_what("hybrid02gdnmul") == "g_s.0 and g_s.2 multipliers, exact inverse-GDN outputs x*n"
    assert [l.attrs.get("product", l.attrs.get("out_product")) for l in b["hybrid026gdnmul"].layers] == \
        ["mul", "mul", "mul", "mul", "min", "mul", "mul"]
    assert hybrid_what("hybrid026gdnmul") == "g_s.0, g_s.2 and g_s.6 multipliers, exact inverse-GDN outputs x*n"
    res = lambda lut, ff: {"LUT": lut, "FF": ff}  # noqa: E731
    runs = [{"product": "mul", "family": "xcup", "dsp": True, "resources": res(5000, 1000)},
            {"product": "mul", "family": "xcup", "dsp": False, "resources": res(16000, 1000)},
            {"product": "hybrid", "family": "xcup", "dsp": False, "resources": res(9600, 900)},
            {"product": "hybrid", "family": "xcup", "dsp": True, "resources": res(6000, 900)},
            {"product": "hybrid0", "family": "xcup", "dsp": False, "resources": res(8000, 800)}]
    assert _ratios(runs) == {"xcup_lut_hybrid_over_mul_dsp": 1.92, "xcup_ff_hybrid_over_mul_dsp": 0.9,
                             "xcup_lut_hybrid_over_mul_nodsp": 0.6, "xcup_ff_hybrid_over_mul_nodsp": 0.9,
                             "xcup_lut_hybrid0_over_mul_dsp": 1.6, "xcup_ff_hybrid0_over_mul_dsp": 0.8,
                             "xcup_lut_hybrid0_over_mul_nodsp": 0.5, "xcup_ff_hybrid0_over_mul_nodsp": 0.8}


HYBRID = "models/checkpoints/bundles/student_n16_min_mul06_hybrid8"


@pytest.mark.parametrize("path,gdn_out,dsps", [
    (HYBRID, "shift", {"g_s.0": 6, "g_s.6": 48}),
    ("models/checkpoints/bundles/student_n16_min_mul0_hybrid8", "shift", {"g_s.0": 6}),
    ("models/checkpoints/bundles/student_n16_min_mul0_outmul_hybrid8", "mul",
     {"g_s.0": 6, "g_s.1": 1, "g_s.3": 1, "g_s.5": 2}),
    ("models/checkpoints/bundles/student_n16_min_mul02_outmul_hybrid8", "mul",
     {"g_s.0": 6, "g_s.1": 1, "g_s.2": 16, "g_s.3": 1, "g_s.5": 2}),
    ("models/checkpoints/bundles/student_n16_min_mul026_outmul_hybrid8", "mul",
     {"g_s.0": 6, "g_s.1": 1, "g_s.2": 16, "g_s.3": 1, "g_s.5": 2, "g_s.6": 48})])
def test_committed_hybrids_brevitas_equal_golden_and_plan_their_dsps_at_1080p30(path, gdn_out, dsps, capsys):
    """The committed N=16 hybrids (g_s.0 and g_s.6 multipliers; g_s.0 alone; g_s.0 and the inverse
    GDNs' outputs x*n; g_s.0, g_s.2 and the outputs; g_s.6 too): Brevitas (float64) == golden on crops
    of every embedded held-out image, as integers; at 1080p30 the planner gives them 54, 6, 10, 26
    and 74 DSPs, against 161 for the multiplier student and 0 for the MinConv one."""
    from pathlib import Path

    from licforge.quant.bundle import decoder_layers, read_bundle
    from licforge.quant.golden import golden_forward
    from licforge.quant.lic import brevitas_integers, load_quantized
    from licforge.rtl.perf import plan_for_target

    root = Path(__file__).resolve().parent.parent
    bundle = read_bundle(root / path)
    q = load_quantized(root / f"{path}.quant.pt")[0]
    convs = [k for k in dsps if k in ("g_s.0", "g_s.2", "g_s.4", "g_s.6")]
    assert q.spec.config.mul_layers == tuple(convs) and bundle.model["mul_layers"] == convs
    assert q.spec.config.gdn_out == gdn_out
    assert {bundle.layer(f"g_s.{i}").attrs["out_product"] for i in (1, 3, 5)} == {gdn_out}
    for name, img in embedded_images("held-out").items():
        h, w = img.shape[:2]
        px = np.ascontiguousarray(img[h // 2 - 48:h // 2 + 48, w // 2 - 64:w // 2 + 64].transpose(2, 0, 1))[None]
        lat_b, out_b = brevitas_integers(q, px.astype(np.int64))
        lat_g, out_g = golden_forward(bundle, px.astype(np.int64))
        assert np.array_equal(lat_b, lat_g) and np.array_equal(out_b, out_g), name
        assert out_g.std() > 10, name
    r = plan_for_target(decoder_layers(bundle), fps=30, height=1080, width=1920, dsp_budget=2520)
    assert r["ok"] and r["report"]["dsps"] == sum(dsps.values())
    assert main(["inspect", str(root / path)]) == 0   # the listing names each layer's products
    rows = {l.split()[0]: l.split()[2:5] for l in capsys.readouterr().out.splitlines()[2:]}
    assert rows["g_s.0"][0] == "product=mul" and rows["g_s.2"][0] == f"product={'mul' if 'g_s.2' in dsps else 'min'}"
    assert rows["g_s.3"][:2] == ["norm_product=min", f"out_product={gdn_out}"]
    assert {p.name: p.dsps for p in r["plan"] if p.dsps} == dsps


@pytest.mark.parametrize("bundle,split", [
    (HYBRID, []), ("models/checkpoints/bundles/student_n16_min_mul0_outmul_hybrid8", []),
    ("models/checkpoints/bundles/student_n16_min_mul02_outmul_hybrid8", ["--split-products"])])
def test_real_bitstream_of_a_held_out_crop_through_the_hybrid_decoder_rtl(bundle, split, tmp_path, capsys, sim_cache):
    """``licforge encode`` of a held-out crop (32 x 48) with a committed hybrid, then ``licforge
    decode`` with the golden model and with the decoder RTL in Verilator: 0 mismatches, same PNG.
    The first hybrid has multiplier engines in g_s.0 and g_s.6, comparator engines and shift GDNs
    between; the second a multiplier engine in g_s.0, comparator engines after it, and GDNs with a
    norm of minimums and an exact output product; the third multiplier engines in g_s.0 and g_s.2,
    built with their products and the GDN outputs' in two stages (--split-products, the LUT build)."""
    from PIL import Image

    from helpers import require_simulator

    require_simulator("verilator")
    crop = embedded_images("held-out")["chelsea"][100:132, 150:198]
    Image.fromarray(crop).save(tmp_path / "crop.png")
    f = tmp_path / "crop.licf"
    assert main(["encode", bundle, str(tmp_path / "crop.png"), "--out", str(f)]) == 0
    assert main(["decode", str(f), "--out", str(tmp_path / "golden.png")]) == 0
    assert main(["--build", str(sim_cache.parent), "decode", str(f), "--rtl", "--pi", "4", "--po", "4",
                 "--max-width", "4", "--out", str(tmp_path / "rtl.png"), *split]) == 0
    out = capsys.readouterr().out
    assert "0 mismatches against the golden decoder" in out and ("split products" in out) == bool(split)
    if split:   # without --rtl there is no decoder RTL to build
        assert main(["decode", str(f), *split, "--out", str(tmp_path / "g.png")]) == 2
        assert "--split-products builds the decoder RTL with two-stage multipliers: give --rtl too" in \
            capsys.readouterr().err
    assert (tmp_path / "rtl.png").read_bytes() == (tmp_path / "golden.png").read_bytes()
