"""GdnUnit RTL == quant.golden.igdn_int (inverse) and gdn_int (forward), zero mismatches;
the forward GDN's divider exhaustively; throughput and latency."""
import copy

import numpy as np
import pytest
from amaranth import Module, Signal, signed, unsigned
from amaranth.sim import Simulator

from licforge.sim.stimulus import extreme_ints
from licforge.quant.bundle import read_bundle, write_bundle
from licforge.quant.fixed import saturate
from licforge.quant.golden import div_round_half_even, run_layer
from licforge.quant.synthetic import random_decoder_bundle
from licforge.rtl.gdn import GdnUnit, divide_round_half_even, gamma_layout
from licforge.sim.layer_chain import simulate_chain
from helpers import require_simulator


def test_gamma_layout_holds_every_entry_once():
    lay = gamma_layout(6, pi=3, po=2)
    assert lay.shape == (2 * 3, 6, 2)
    assert len({tuple(v) for v in lay.reshape(-1, 2).tolist()}) == 36
    assert lay[1].tolist() == [[0, 3], [0, 4], [0, 5], [1, 3], [1, 4], [1, 5]]  # o=0, g=1


def _forward(lay, out_shift: int, coarser_norm: int = 0):
    """A synthetic inverse-GDN layer turned into a forward GDN with ``out_shift``, its norm
    ``coarser_norm`` bits coarser (smaller divisors)."""
    fwd = copy.deepcopy(lay)
    fwd.op = "gdn"
    fwd.attrs["out_shift"] = out_shift
    fwd.attrs["norm_shift"] += coarser_norm
    return fwd


def test_forward_gdn_refuses_a_zero_norm_and_the_inverse_a_divider():
    lay = _forward(random_decoder_bundle(4, 4, seed=0).layer("g_s.1"), -6)
    lay.tensors["beta"][1] = 0
    with pytest.raises(ValueError, match="norm >= 1"):
        GdnUnit.for_layer(lay)
    with pytest.raises(ValueError, match="div_bits"):
        GdnUnit.for_layer(random_decoder_bundle(4, 4, seed=0).layer("g_s.1"), div_bits=2)


@pytest.mark.parametrize("x_bits,n_bits,num_shift,den_shift,out_bits,per_stage",
                         [(6, 5, 3, 0, 4, 1), (6, 5, 0, 2, 5, 2), (5, 6, 4, 0, 8, 3), (7, 4, 2, 0, 3, 1),
                          (5, 4, 6, 0, 6, 5)])
def test_divider_is_exact_on_every_operand_pair(x_bits, n_bits, num_shift, den_shift, out_bits, per_stage):
    """Every (x, n >= 1) of small widths, one pair a cycle, against div_round_half_even + saturate."""
    m = Module()
    x, n = Signal(signed(x_bits)), Signal(unsigned(n_bits))
    y, stages = divide_round_half_even(m, x, n, num_shift=num_shift, den_shift=den_shift, out_bits=out_bits,
                                       bits_per_stage=per_stage, enable=1, name="div")
    assert stages == -(-(out_bits - 1) // per_stage)
    xs, ns = np.meshgrid(np.arange(-(1 << (x_bits - 1)), 1 << (x_bits - 1)), np.arange(1, 1 << n_bits))
    xs, ns = xs.ravel(), ns.ravel()
    exp = saturate(div_round_half_even(xs << num_shift, ns << den_shift), out_bits, signed=True)
    got = []

    async def tb(ctx):
        for k in range(len(xs) + stages - 1):
            if k < len(xs):
                ctx.set(x, int(xs[k]))
                ctx.set(n, int(ns[k]))
            await ctx.tick()
            if k >= stages - 1:
                got.append(ctx.get(y))

    sim = Simulator(m)
    sim.add_clock(1e-8)
    sim.add_testbench(tb)
    sim.run()
    assert np.array_equal(np.array(got), exp)


@pytest.fixture(scope="module")
def gdn_bundle(tmp_path_factory):
    """Synthetic N=8 decoder; its first inverse GDN gets gamma entries at the 8-bit maximum."""
    b = random_decoder_bundle(8, 8, seed=7)
    g = b.layer("g_s.1").tensors["gamma"]
    g[np.random.default_rng(7).random(g.shape) < 0.25] = 127
    out = tmp_path_factory.mktemp("gdn") / "bundle"
    write_bundle(b, out)
    return read_bundle(out)


def test_gdn_random_extremes_with_bubbles_and_back_pressure(gdn_bundle, tmp_path_factory, sim_cache):
    require_simulator("verilator")
    lay = gdn_bundle.layer("g_s.1")
    dut = GdnUnit.for_layer(lay, pi=4, po=2)
    x = extreme_ints(np.random.default_rng(3), (1, 8, 6, 7), lay.attrs["x_bits"])
    r = simulate_chain(dut, gdn_bundle.path, [lay.name], x, work=tmp_path_factory.getbasetemp() / "gdn_build",
                       timeout_cycles=100_000, frame_ports=False, seed=3, p_valid=0.6, p_ready=0.4, cache_dir=sim_cache)
    assert r.report["checked"] == x.size and r.report["mismatches"] == 0
    y = np.load(f"{r.report['run_dir']}/outputs.npy")
    assert np.array_equal(y, run_layer(lay, x))
    assert (y == 127).any() and (y == -128).any()  # the output saturates at both rails


def _stream(dut, pixels: list[list[int]], ready_pattern=None) -> tuple[list, list[int]]:
    """Drive ``pixels`` back to back; return the outputs and the cycle of each."""
    out, when = [], []

    async def tb(ctx):
        k, cycle = 0, 0
        while len(out) < len(pixels):
            ctx.set(dut.i.valid, k < len(pixels))
            if k < len(pixels):
                ctx.set(dut.i.payload, pixels[k])
            ready = 1 if ready_pattern is None else ready_pattern(cycle)
            ctx.set(dut.o.ready, ready)
            await ctx.delay(1e-9)
            k += k < len(pixels) and ctx.get(dut.i.ready)
            if ready and ctx.get(dut.o.valid):
                out.append(list(ctx.get(dut.o.payload)))
                when.append(cycle)
            await ctx.tick()
            cycle += 1

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(tb)
    sim.run()
    return out, when


def test_full_parallelism_is_one_pixel_per_cycle():
    b = random_decoder_bundle(4, 4, seed=1)
    lay = b.layer("g_s.3")
    dut = GdnUnit.for_layer(lay, pi=4, po=4)
    x = extreme_ints(np.random.default_rng(1), (1, 4, 1, 40), 8)
    out, when = _stream(dut, x[0, :, 0].T.tolist())
    assert np.array_equal(np.array(out).T[None, :, None, :], run_layer(lay, x))
    assert np.diff(when).tolist() == [1] * 39          # fully pipelined
    assert when[0] == dut.latency + 1                  # accept, then the pipeline


def test_partial_parallelism_takes_c_over_pi_times_c_over_po_cycles_and_holds_under_stall():
    b = random_decoder_bundle(4, 4, seed=1)
    lay = b.layer("g_s.1")
    dut = GdnUnit.for_layer(lay, pi=2, po=1)           # (4/2) * (4/1) = 8 cycles a pixel
    x = extreme_ints(np.random.default_rng(4), (1, 4, 1, 12), 8)
    out, when = _stream(dut, x[0, :, 0].T.tolist())
    assert np.array_equal(np.array(out).T[None, :, None, :], run_layer(lay, x))
    assert set(np.diff(when).tolist()) == {8}
    stalled, _ = _stream(dut, x[0, :, 0].T.tolist(), ready_pattern=lambda c: int(c % 23 > 17))
    assert stalled == out


def test_gdn_on_real_student_tensors(tmp_path, lic_bundle, sim_cache):
    """The student's second inverse GDN on the tensors a held-out image crop produces."""
    require_simulator("verilator")
    from licforge.sim.decode import check_block
    from licforge.models.data import embedded_images

    bundle = lic_bundle
    img = embedded_images("held-out")["coffee"][100:164, 200:296]
    r = check_block(bundle, "gdn", tmp_path, layer="g_s.3", pi=4, po=2, image=img, seed=2, p_valid=0.7, p_ready=0.5,
                    cache_dir=sim_cache)
    assert r["input_shape"] == [1, 16, 16, 24] and r["checked"] == 16 * 16 * 24 and r["mismatches"] == 0


@pytest.mark.parametrize("out_shift,coarser_norm,div_bits", [(-9, 0, 1), (-6, 0, 3), (1, 4, 2)])
def test_forward_gdn_full_parallelism_is_one_pixel_per_cycle(out_shift, coarser_norm, div_bits):
    """Forward GDN (a numerator shift, or a denominator shift), the divider 1 to 3 bits a stage."""
    lay = _forward(random_decoder_bundle(4, 4, seed=1).layer("g_s.3"), out_shift, coarser_norm)
    dut = GdnUnit.for_layer(lay, pi=4, po=4, div_bits=div_bits)
    x = extreme_ints(np.random.default_rng(5), (1, 4, 1, 40), 8)
    out, when = _stream(dut, x[0, :, 0].T.tolist())
    exp = run_layer(lay, x)
    assert np.array_equal(np.array(out).T[None, :, None, :], exp)
    assert len(np.unique(exp)) > 3                     # not all saturated or zero
    assert out_shift != -9 or ((exp == 127).any() and (exp == -128).any())  # quotients past both rails
    assert np.diff(when).tolist() == [1] * 39
    assert when[0] == dut.latency + 1 == 7 + 2 + -(-7 // div_bits) + 1


def test_forward_gdn_random_extremes_and_real_tensors_of_the_student_encoder(tmp_path, lic_bundle, sim_cache):
    """The student's analysis GDNs g_a.1/3/5 (forward, a division): random inputs with
    -2^(b-1), 0, 2^(b-1)-1, and the tensors the golden encoder makes of a held-out crop;
    random bubbles and back-pressure, three parallelisms.  (Its norms, >= 1641 LSB, keep
    |y| well inside 8 bits: saturation is checked on the synthetic layers above.)"""
    require_simulator("verilator")
    from licforge.sim.decode import check_block
    from licforge.models.data import embedded_images

    bundle = lic_bundle
    img = embedded_images("held-out")["coffee"][100:164, 200:296]
    g1 = bundle.layer("g_a.1")
    assert g1.op == "gdn" and g1.attrs["x_bits"] == 10
    r = check_block(bundle, "gdn", tmp_path, layer="g_a.1", pi=4, po=2, height=32, width=48, seed=11, p_valid=0.7,
                    p_ready=0.5, cache_dir=sim_cache)
    assert r["checked"] == 16 * 32 * 48 and r["mismatches"] == 0
    for name, (pi, po), hw in (("g_a.1", (4, 2), (32, 48)), ("g_a.3", (8, 4), (16, 24)), ("g_a.5", (2, 8), (8, 12))):
        r = check_block(bundle, "gdn", tmp_path, layer=name, pi=pi, po=po, image=img, seed=2, p_valid=0.7, p_ready=0.5,
                        cache_dir=sim_cache)
        assert r["input_shape"] == [1, 16, *hw] and r["checked"] == 16 * hw[0] * hw[1] and r["mismatches"] == 0
