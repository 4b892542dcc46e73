"""ConvTransposeEngine (generated Verilog, cocotb) == quant.golden, zero mismatches."""
import json
import re

import numpy as np
import pytest

from licforge.sim.decode import check_block
from licforge.sim.stimulus import extreme_ints
from licforge.rtl.perf import frame_timeline
from licforge.quant.bundle import read_bundle, write_bundle
from licforge.quant.golden import conv_transpose2d_int, run_layer, subpixel_taps
from licforge.quant.bundle import decoder_layers
from licforge.quant.synthetic import random_decoder_bundle
from licforge.rtl.conv_transpose import ConvTransposeEngine, conv_weight_layout, phase_taps
from licforge.rtl.plan import LayerPlan
from licforge.sim.layer_chain import simulate_chain
from helpers import require_simulator

STUDENT_DIR = "models/checkpoints/bundles"


@pytest.mark.parametrize("phase", [0, 1])
def test_phase_taps_are_the_golden_subpixel_taps(phase):
    assert phase_taps(phase) == subpixel_taps(5, 2, 2, phase)
    assert [len(phase_taps(p)) for p in (0, 1)] == [3, 2]


def test_weight_layout_holds_every_weight_once():
    lay = conv_weight_layout(6, 4, pi=3, po=2)
    assert lay.shape == (25 * 2 * 2, 6, 4)
    keys = {tuple(v) for v in lay.reshape(-1, 4).tolist()}
    assert len(keys) == 6 * 4 * 25
    # first word: phase (0, 0), output group 0, first row and column tap (kernel 0, 0), input group 0
    assert lay[0].tolist() == [[0, 0, 0, 0], [1, 0, 0, 0], [2, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0], [2, 1, 0, 0]]


def test_engine_rejects_parallelism_that_does_not_divide_channels():
    w = np.zeros((6, 4, 5, 5), np.int64)
    with pytest.raises(ValueError, match=r"pi must divide the 6 input channels: one of \[1, 2, 3, 6\], not 4"):
        ConvTransposeEngine(w, np.zeros(4, np.int64), shift=4, x_bits=8, w_bits=8, b_bits=8, out_bits=8, pi=4)


@pytest.fixture(scope="module")
def extreme_bundle(tmp_path_factory):
    """A synthetic N=8 decoder whose third layer has a third of its weights at the extremes
    and extreme biases, so that accumulators and the requantizer's saturation are exercised."""
    b = random_decoder_bundle(8, 8, seed=5)
    lay = b.layer("g_s.2")
    rng = np.random.default_rng(5)
    w = lay.tensors["weight"]
    pick = rng.random(w.shape)
    lay.tensors["weight"] = np.where(pick < 0.15, -127, np.where(pick < 0.3, 127, w))
    bias = lay.tensors["bias"]
    bias[:2] = [-(1 << (lay.attrs["b_bits"] - 1)), (1 << (lay.attrs["b_bits"] - 1)) - 1]
    out = tmp_path_factory.mktemp("convt") / "bundle"
    write_bundle(b, out)
    return read_bundle(out)


def test_engine_random_extremes_with_bubbles_and_back_pressure(extreme_bundle, tmp_path_factory, sim_cache):
    require_simulator("verilator")
    lay = extreme_bundle.layer("g_s.2")
    dut = ConvTransposeEngine.for_layer(lay, pi=4, po=2, max_width=8)
    work = tmp_path_factory.getbasetemp() / "convt_build"
    runs = [(11, (2, 3, 5), 0.7, 0.4), (12, (3, 1, 1), 1.0, 0.5), (13, (1, 2, 8), 1.0, 1.0)]
    for seed, (n, h, w), p_valid, p_ready in runs:  # n frames of h x w, back to back
        x = extreme_ints(np.random.default_rng(seed), (n, 8, h, w), 8)
        r = simulate_chain(dut, extreme_bundle.path, [lay.name], x, work=work, timeout_cycles=200_000, seed=seed,
                           p_valid=p_valid, p_ready=p_ready, cache_dir=sim_cache)
        print(f"seed {seed} {n}x{h}x{w}: {r.report['checked']} checked, {r.report['mismatches']} mismatches, "
              f"{r.report['cycles']} cycles")
        assert r.report["checked"] == n * 8 * 4 * h * w and r.report["mismatches"] == 0
        out = np.load(f"{r.report['run_dir']}/outputs.npy")
        assert out.shape == (n, 8, 2 * h, 2 * w)
        if seed == 11:  # saturation at both rails is exercised
            assert (out == 127).any() and (out == -128).any()
        if p_ready == 1.0 and p_valid == 1.0:  # 25 h w (Cin/PI)(Cout/PO) cycles plus the first rows' wait
            plan = LayerPlan(lay.name, lay.op, 8, 8, 0, 4, 2)
            assert r.report["cycles"] == frame_timeline([plan], h, w)["cycles"] >= 25 * h * w * 2 * 4
    # VPI sees the harness (the top module) alone, the engine's signals are Verilator's to
    # optimize (sim.runner: --no-public-flat-rw and a control file); cocotb's default made
    # every signal public, which slowed a whole decoder's simulation 5.8x
    syms = "".join(f.read_text() for f in r.build_dir.glob("Vtop__Syms*.cpp"))
    assert r.build_dir.parent == sim_cache
    assert set(re.findall(r"(__Vscopep_\w+)->varInsert", syms)) == {"__Vscopep_TOP", "__Vscopep_harness"}


def test_engine_amaranth_simulation_matches_golden():
    """The same generator under Amaranth's simulator (no HDL simulator needed)."""
    from amaranth.sim import Simulator

    b = random_decoder_bundle(4, 6, seed=2)
    lay = decoder_layers(b)[0]  # 6 -> 4 channels
    x = extreme_ints(np.random.default_rng(2), (1, 6, 2, 3), 8)
    dut = ConvTransposeEngine.for_layer(lay, pi=3, po=2, max_width=4)
    got = []

    async def tb(ctx):
        ctx.set(dut.width, 3)
        ctx.set(dut.height, 2)
        ctx.set(dut.o.ready, 1)
        await ctx.tick()   # the frame size a cycle before the first pixel (the engine registers it)
        pixels = [x[0, :, r, c].tolist() for r in range(2) for c in range(3)]
        k = 0
        while len(got) < 24:
            ctx.set(dut.i.valid, k < len(pixels))
            if k < len(pixels):
                ctx.set(dut.i.payload, pixels[k])
            await ctx.delay(1e-9)
            k += k < len(pixels) and ctx.get(dut.i.ready)
            if ctx.get(dut.o.valid):
                got.append(list(ctx.get(dut.o.payload)))
            await ctx.tick()

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(tb)
    sim.run()
    exp = run_layer(lay, x)[0].reshape(4, -1).T
    assert np.array_equal(np.array(got), exp)
    assert conv_transpose2d_int(x, lay.tensors["weight"], 2, 2, 1).shape == (1, 4, 4, 6)


def test_engine_on_real_student_tensors(tmp_path, lic_bundle, sim_cache):
    """The student's second transposed convolution on the tensors a held-out image crop
    produces (real bitstream -> latents -> golden layers), with back-pressure."""
    require_simulator("verilator")
    from licforge.models.data import embedded_images

    bundle = lic_bundle
    img = embedded_images("held-out")["astronaut"][200:264, 180:276]
    r = check_block(bundle, "convt", tmp_path, layer="g_s.2", pi=8, po=2, image=img, seed=1, p_valid=1.0, p_ready=0.5,
                    cache_dir=sim_cache)
    print(json.dumps({k: r[k] for k in ("checked", "mismatches", "cycles", "input_shape")}))
    assert r["input_shape"] == [1, 16, 8, 12] and r["checked"] == 16 * 16 * 24 and r["mismatches"] == 0
