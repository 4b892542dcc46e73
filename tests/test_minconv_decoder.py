"""The multiplier-free (MinConv) LIC decoder of issue 15 in RTL: comparator arrays and the
leading-one detector against quant.golden; the min engine and the shift GDN in cocotb
(random extremes, bubbles, back-pressure) and a real bitstream through the whole MinConv
student decoder, 0 mismatches; the plan counts no DSP; Yosys maps no DSP; the refusals."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from amaranth import Module, Signal, signed, unsigned
from amaranth.sim import Simulator

from licforge.quant.bundle import decoder_layers, read_bundle, write_bundle
from licforge.quant.golden import lane_dot, pow2_round
from licforge.quant.synthetic import random_decoder_bundle
from licforge.rtl.conv_transpose import ConvTransposeEngine
from licforge.rtl.gdn import GdnUnit, pow2_exponent
from licforge.rtl.perf import frame_report
from licforge.rtl.plan import LayerPlan, plan_decoder
from licforge.sim.layer_chain import simulate_chain
from licforge.sim.stimulus import extreme_ints
from helpers import require_simulator, simulate_mac_array


def _min_array_sums(x_shape, w_shape, x_shift, w_shift, xv, wv, x_magnitude=False):
    """``mac_array(product="min")`` of 2 lanes x 3 rows x 5 inputs driven with the vectors
    ``xv`` (k, 2, 5), ``wv`` (k, 3, 5), one a cycle: the sums (k, 2, 3)."""
    return simulate_mac_array(x_shape, w_shape, 2, 3, 5, list(zip(xv, wv)), product="min", x_shift=x_shift,
                              w_shift=w_shift, x_magnitude=x_magnitude)[0]


@pytest.mark.parametrize("x_shape,w_shape,x_shift,w_shift,x_magnitude", [
    (signed(8), signed(8), 0, 0, False),        # a transposed convolution's taps
    (signed(8), signed(7), 0, 1, False),        # half-range weights shifted up
    (signed(6), signed(8), 2, 0, False),        # small latents shifted up
    (unsigned(10), unsigned(7), 0, 3, False),   # |x| and gamma (no sign)
    (signed(10), unsigned(7), 0, 0, True),      # a GDN norm: |x| read from x, and gamma
    (signed(8), unsigned(7), 1, 0, True),
])
def test_min_array_equals_golden_lane_dot_on_extremes(x_shape, w_shape, x_shift, w_shift, x_magnitude):
    rng = np.random.default_rng(x_shape.width * 10 + w_shift)
    k = 40

    def draw(shape, size):
        v = extreme_ints(rng, size, shape.width + (0 if shape.signed else 1))
        return np.abs(v).clip(max=(1 << shape.width) - 1) if not shape.signed else v

    xv, wv = draw(x_shape, (k, 2, 5)), draw(w_shape, (k, 3, 5))
    got = _min_array_sums(x_shape, w_shape, x_shift, w_shift, xv, wv, x_magnitude)
    xs = np.abs(xv) if x_magnitude else xv
    exp = lane_dot(xs[:, :, None, :], wv[:, None, :, :], "min", x_shift, w_shift)
    assert got.shape == exp.shape == (k, 2, 3) and np.array_equal(got, exp)
    assert np.abs(exp).max() > 0


def test_leading_one_detector_equals_golden_pow2_round_on_every_12_bit_norm():
    n = Signal(12)
    e, zero = pow2_exponent(n)
    got = []

    async def tb(ctx):
        for v in range(1 << 12):
            ctx.set(n, v)
            got.append(-1 if ctx.get(zero) else ctx.get(e))

    sim = Simulator(Module())
    sim.add_testbench(tb)
    sim.run()
    assert np.array_equal(np.array(got), pow2_round(np.arange(1 << 12)))


@pytest.fixture(scope="module")
def min_bundle(tmp_path_factory):
    """A random N=8, M=8 MinConv decoder (every transposed convolution min, every inverse GDN
    min norm and shift output), pushed to the extremes: g_s.4 (weights shifted by 1) gets a
    third of its weights at the 8-bit rails (+-127) and biases at the 16-bit rails, g_s.3
    gamma entries at the maximum and its channel 0 a zero norm (beta 0, gamma row 0), which
    the shift GDN must turn into y = 0."""
    b = random_decoder_bundle(8, 8, seed=5, product="min")
    rng = np.random.default_rng(5)
    conv = b.layer("g_s.4")
    w = conv.tensors["weight"]
    pick = rng.random(w.shape)
    conv.tensors["weight"] = np.where(pick < 0.15, -127, np.where(pick < 0.3, 127, w))
    conv.attrs["b_bits"] = 16   # biases at both 16-bit rails: channels 0 and 1 saturate low and high
    conv.tensors["bias"][:2] = [-(1 << 15), (1 << 15) - 1]
    gdn = b.layer("g_s.3")
    g = gdn.tensors["gamma"]
    g[rng.random(g.shape) < 0.2] = (1 << (gdn.attrs["gamma_bits"] - 1)) - 1
    g[0], gdn.tensors["beta"][0] = 0, 0
    out = tmp_path_factory.mktemp("minconv") / "bundle"
    write_bundle(b, out)
    return read_bundle(out)


def test_min_engine_with_lanes_random_extremes_bubbles_and_back_pressure(min_bundle, tmp_path_factory, sim_cache):
    """g_s.4 (8 -> 8 channels, weights shifted by 1) at PI=4, PO=2 and 2 output pixels a
    cycle, frames back to back, against quant.golden (run_layers)."""
    require_simulator("verilator")
    lay = min_bundle.layer("g_s.4")
    dut = ConvTransposeEngine.for_layer(lay, pi=4, po=2, pp=2, max_width=8)
    assert (dut.dsps, dut.multipliers, dut.comparators, dut.w_shift) == (0, 0, 16, 1)
    work = tmp_path_factory.getbasetemp() / "min_convt_build"
    x = extreme_ints(np.random.default_rng(21), (2, 8, 3, 5), 8)   # two frames of 3 x 5, back to back
    r = simulate_chain(dut, min_bundle.path, [lay.name], x, work=work, timeout_cycles=200_000, seed=21,
                       p_valid=0.7, p_ready=0.4, cache_dir=sim_cache)
    assert r.report["checked"] == 2 * 8 * 4 * 3 * 5 and r.report["mismatches"] == 0, r.report
    out = np.load(f"{r.report['run_dir']}/outputs.npy")
    assert (out == 127).any() and (out == -128).any()   # both rails of the requantizer are reached


def test_shift_gdn_random_extremes_bubbles_and_back_pressure(min_bundle, tmp_path_factory, sim_cache):
    """g_s.3 (min norm, y = x << e) at PI=4, PO=2, against quant.golden; a zero norm gives 0
    and the largest norms shift by norm_bits."""
    require_simulator("verilator")
    from licforge.quant.golden import gdn_norm_int

    lay = min_bundle.layer("g_s.3")
    a = lay.attrs
    dut = GdnUnit.for_layer(lay, pi=4, po=2)
    assert (dut.dsps, dut.multipliers, dut.comparators, dut.shifters) == (0, 0, 8, 2)
    x = extreme_ints(np.random.default_rng(31), (2, 8, 3, 5), 8)
    r = simulate_chain(dut, min_bundle.path, [lay.name], x, work=tmp_path_factory.getbasetemp() / "min_gdn_build",
                       timeout_cycles=100_000, frame_ports=False, seed=31, p_valid=0.6, p_ready=0.5,
                       cache_dir=sim_cache)
    assert r.report["checked"] == x.size and r.report["mismatches"] == 0, r.report
    out = np.load(f"{r.report['run_dir']}/outputs.npy")
    e = pow2_round(gdn_norm_int(x, lay.tensors["gamma"], lay.tensors["beta"], a["norm_shift"], a["norm_bits"],
                                "min", a["norm_x_shift"], a["norm_g_shift"]))
    assert (e[:, 0] == -1).all() and (out[:, 0] == 0).all() and (x[:, 0] != 0).any()
    assert (e == a["norm_bits"]).any()


def test_min_norm_gdn_with_exact_output_random_extremes_bubbles_and_back_pressure(tmp_path_factory, sim_cache):
    """The inverse GDN of a --gdn-out mul student (min norm, y = x * n exact): g_s.3 of a random
    N=8 decoder at PI=4, PO=2, inputs at the rails, against quant.golden: comparators for the
    norm, one multiplier per output lane, no shifter."""
    require_simulator("verilator")
    b = random_decoder_bundle(8, 8, seed=6, product="min", gdn_out="mul")
    out = tmp_path_factory.mktemp("minconv_mulout") / "bundle"
    write_bundle(b, out)
    bundle = read_bundle(out)
    lay = bundle.layer("g_s.3")
    assert (lay.attrs["norm_product"], lay.attrs["out_product"]) == ("min", "mul")
    dut = GdnUnit.for_layer(lay, pi=4, po=2)
    assert (dut.multipliers, dut.comparators, dut.shifters) == (2, 8, 0)
    x = extreme_ints(np.random.default_rng(32), (2, 8, 3, 5), 8)
    r = simulate_chain(dut, bundle.path, [lay.name], x, work=tmp_path_factory.getbasetemp() / "min_mulout_build",
                       timeout_cycles=100_000, frame_ports=False, seed=32, p_valid=0.6, p_ready=0.5,
                       cache_dir=sim_cache)
    assert r.report["checked"] == x.size and r.report["mismatches"] == 0, r.report
    with pytest.raises(ValueError, match="gdn_out .* must be 'shift' or 'mul', not 'min'"):
        random_decoder_bundle(8, 8, product="min", gdn_out="min")


def test_yosys_maps_no_dsp_for_min_blocks_with_dsp_inference_on(tmp_path):
    """A MinConv engine (N=4, PI = PO = 2) through synth_xilinx -family xcup and synth_ecp5,
    and a shift GDN through synth_ecp5, with DSP inference on: no DSP48E2, no MULT18X18D; the
    multiplier twin of the engine takes one MULT18 per product (the check can fail)."""
    from licforge.rtl.emit import write_verilog
    from licforge.rtl.yosys import ECP5, synthesize

    mins, muls = (random_decoder_bundle(4, 4, seed=3, product=p) for p in ("min", "mul"))
    runs = [("min_convt", ConvTransposeEngine.for_layer(mins.layer("g_s.2"), pi=2, po=2, max_width=4), ("xcup", ECP5)),
            ("min_gdn", GdnUnit.for_layer(mins.layer("g_s.3"), pi=2, po=2), (ECP5,)),
            ("mul_convt", ConvTransposeEngine.for_layer(muls.layer("g_s.2"), pi=2, po=2, max_width=4), (ECP5,))]
    got = {}
    for name, blk, families in runs:
        src = write_verilog(blk, name, tmp_path / name)
        for family in families:
            got[name, family] = synthesize(src, name, family=family)["resources"]
    assert got["min_convt", "xcup"]["DSP"] == 0 and got["min_convt", "xcup"]["LUT"] > 0, got
    assert got["min_convt", ECP5]["MULT18"] == got["min_gdn", ECP5]["MULT18"] == 0, got
    assert got["mul_convt", ECP5]["MULT18"] == runs[2][1].multipliers == 4


def test_plan_counts_comparators_and_shifters_not_dsps():
    """The MinConv twin of a decoder gets the multiplier decoder's plan, with every multiplier
    a comparator or a shifter and 0 DSPs (packing asked for or not); a mixed bundle packs its
    multiplier layers only; a packed min layer is refused."""
    twins = {p: decoder_layers(random_decoder_bundle(16, 16, seed=0, product=p)) for p in ("mul", "min")}
    plans = {p: plan_decoder(layers, 16, 2) for p, layers in twins.items()}
    assert [(p.pi, p.po, p.pp) for p in plans["min"]] == [(p.pi, p.po, p.pp) for p in plans["mul"]]
    assert [p.comparators + p.shifters for p in plans["min"]] == [p.multipliers for p in plans["mul"]]
    assert all(p.dsps == p.multipliers == 0 for p in plan_decoder(twins["min"], 16, 2, pack=True))
    rep, mul = frame_report(plans["min"], 1080, 1920), frame_report(plans["mul"], 1080, 1920)
    assert (rep["dsps"], rep["multipliers"], rep["dsp_efficiency_steady"], rep["dsp_efficiency"]) == (0, 0, None, None)
    assert plans["min"][4].comparators == 16 * 2 and rep["comparators"] == sum(p.comparators for p in plans["min"])
    assert rep["shifters"] == sum(p.po * p.pp for p in plans["min"] if p.op == "igdn") > 0
    assert rep["fps"] == mul["fps"] and mul["dsps"] == mul["multipliers"] == rep["comparators"] + rep["shifters"]
    # the benchmark's sweep picks the MinConv decoder's parallelisms by comparator lanes (it
    # compared a None DSP efficiency with 0.9 and stopped bench decoder's synth section)
    from licforge.bench.decoder import design_table, format_design_table, parallelism_sweep
    assert parallelism_sweep(random_decoder_bundle(16, 16, seed=0, product="min")) == \
        parallelism_sweep(random_decoder_bundle(16, 16, seed=0, product="mul")) == [(16, 2), (16, 4)]
    row = design_table(read_bundle(MIN_STUDENT), [(16, 2)])[0]
    assert (row["multipliers"], row["1080p"]["dsp_efficiency_steady"]) == (0, None)
    assert format_design_table([row]).splitlines()[-1].endswith("| n/a (no DSP) |")
    mixed = copy.deepcopy(twins["mul"])
    mixed[0] = twins["min"][0]
    packed = plan_decoder(mixed, 16, 2, pack=True)
    assert not packed[0].pack and packed[0].dsps == 0 and all(p.pack for p in packed[1:])
    with pytest.raises(ValueError, match=r"layer c: pack puts two multiplications into one DSP; its 'min' products"):
        LayerPlan("c", "conv_transpose2d", 16, 16, 0, 16, 2, 1, True, 8, 8, "min")


def test_refusals_name_the_layer_and_the_fix():
    from licforge.errors import UsageError
    from licforge.rtl.project import build_decoder

    b = random_decoder_bundle(4, 4, seed=3, product="min")
    conv, gdn = b.layer("g_s.2"), b.layer("g_s.3")
    with pytest.raises(ValueError, match=r"layer g_s.2: pack puts two multiplications into one DSP48E2; a 'min' "
                                         r"product is a comparator and uses no DSP: build it with pack=False"):
        ConvTransposeEngine.for_layer(conv, pi=2, po=2, pack=True, max_width=4)
    with pytest.raises(ValueError, match=r"layer g_s.3: pack .* a 'min' norm_product is a comparator"):
        GdnUnit.for_layer(gdn, pack=True)
    bad = copy.deepcopy(conv)
    bad.attrs.update(x_shift=1, w_shift=2)
    with pytest.raises(ValueError, match=r"layer g_s.2: x_shift and w_shift align two power-of-two scales: at most "
                                         r"one of them is non-zero, not 1 and 2"):
        ConvTransposeEngine.for_layer(bad, pi=2, po=2, max_width=4)
    bad.attrs.update(product="xnor", x_shift=0, w_shift=0)
    with pytest.raises(ValueError, match=r"^layer g_s.2: product 'xnor' is not supported by the RTL generator"):
        ConvTransposeEngine.for_layer(bad, pi=2, po=2, max_width=4)
    ablation = copy.deepcopy(gdn)
    ablation.attrs["out_product"] = "min"
    with pytest.raises(ValueError, match=r"^layer g_s.3: out_product 'min' is not supported by the RTL generator "
                                         r"\(GdnUnit: one of \('mul', 'shift'\)\)"):
        GdnUnit.for_layer(ablation)
    b.layers[b.layers.index(gdn)] = ablation
    with pytest.raises(UsageError, match=r"layer g_s.3: out_product 'min' is not supported by the RTL generator's "
                                         r"plan"):
        build_decoder(b, 2, 3)
    fwd = copy.deepcopy(gdn)
    fwd.op = "gdn"
    with pytest.raises(ValueError, match="the forward GDN .inverse=False. multiplies and divides"):
        GdnUnit.for_layer(fwd)


MIN_STUDENT = Path(__file__).resolve().parent.parent / "models/checkpoints/bundles/student_n16_min_hybrid8"


def test_real_bitstream_of_a_held_out_crop_through_the_min_decoder_rtl(tmp_path, capsys, sim_cache):
    """The MinConv N=16 student: ``licforge encode`` of a held-out crop (32 x 48: latents
    2 x 3), then ``licforge decode`` with the golden model and with the decoder RTL in
    Verilator: 0 mismatches, identical PNGs."""
    require_simulator("verilator")
    from PIL import Image

    from licforge.flows.cli import main
    from licforge.models.data import embedded_images

    crop = embedded_images("held-out")["chelsea"][100:132, 150:198]
    Image.fromarray(crop).save(tmp_path / "crop.png")
    f = tmp_path / "crop.licf"
    assert main(["encode", str(MIN_STUDENT), str(tmp_path / "crop.png"), "--out", str(f)]) == 0
    assert main(["decode", str(f), "--out", str(tmp_path / "golden.png")]) == 0
    assert main(["--build", str(sim_cache.parent), "decode", str(f), "--rtl", "--pi", "4", "--po", "4",
                 "--max-width", "4", "--out", str(tmp_path / "rtl.png")]) == 0
    out = capsys.readouterr().out
    assert "decoder RTL (PI=4, PO=4, verilator)" in out and "0 mismatches against the golden decoder" in out
    assert (tmp_path / "rtl.png").read_bytes() == (tmp_path / "golden.png").read_bytes()
