"""GdnUnit (inverse GDN) RTL == quant.golden.igdn_int, zero mismatches; throughput."""
import numpy as np
import pytest
from amaranth.sim import Simulator

from flows.decoder import extreme_pixels
from quant.bundle import read_bundle, write_bundle
from quant.golden import run_layer
from quant.synthetic import random_decoder_bundle
from rtl.gdn import GdnUnit, gamma_layout
from sim.layer_chain import simulate_chain
from tests.conftest import require_simulator


def test_gamma_layout_holds_every_entry_once():
    lay = gamma_layout(6, pi=3, po=2)
    assert lay.shape == (2 * 3, 6, 2)
    assert len({tuple(v) for v in lay.reshape(-1, 2).tolist()}) == 36
    assert lay[1].tolist() == [[0, 3], [0, 4], [0, 5], [1, 3], [1, 4], [1, 5]]  # o=0, g=1


def test_forward_gdn_is_refused_with_the_reason():
    b = random_decoder_bundle(4, 4, seed=0)
    lay = b.layer("g_s.1")
    lay.op = "gdn"
    with pytest.raises(ValueError, match="inverse GDN .'igdn'. only"):
        GdnUnit.for_layer(lay)


@pytest.fixture(scope="module")
def gdn_bundle(tmp_path_factory):
    """Synthetic N=8 decoder; its first inverse GDN gets gamma entries at the 8-bit maximum."""
    b = random_decoder_bundle(8, 8, seed=7)
    g = b.layer("g_s.1").tensors["gamma"]
    g[np.random.default_rng(7).random(g.shape) < 0.25] = 127
    out = tmp_path_factory.mktemp("gdn") / "bundle"
    write_bundle(b, out)
    return read_bundle(out)


def test_gdn_random_extremes_with_bubbles_and_back_pressure(gdn_bundle, tmp_path_factory):
    require_simulator("verilator")
    lay = gdn_bundle.layer("g_s.1")
    dut = GdnUnit.for_layer(lay, pi=4, po=2)
    x = extreme_pixels(np.random.default_rng(3), (1, 8, 6, 7), lay.attrs["x_bits"])
    r = simulate_chain(dut, gdn_bundle.path, [lay.name], x, work=tmp_path_factory.getbasetemp() / "gdn_build",
                       timeout_cycles=100_000, frame_ports=False, seed=3, p_valid=0.6, p_ready=0.4)
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
    x = extreme_pixels(np.random.default_rng(1), (1, 4, 1, 40), 8)
    out, when = _stream(dut, x[0, :, 0].T.tolist())
    assert np.array_equal(np.array(out).T[None, :, None, :], run_layer(lay, x))
    assert np.diff(when).tolist() == [1] * 39          # fully pipelined
    assert when[0] == dut.latency + 1                  # accept, then the pipeline


def test_partial_parallelism_takes_c_over_pi_times_c_over_po_cycles_and_holds_under_stall():
    b = random_decoder_bundle(4, 4, seed=1)
    lay = b.layer("g_s.1")
    dut = GdnUnit.for_layer(lay, pi=2, po=1)           # (4/2) * (4/1) = 8 cycles a pixel
    x = extreme_pixels(np.random.default_rng(4), (1, 4, 1, 12), 8)
    out, when = _stream(dut, x[0, :, 0].T.tolist())
    assert np.array_equal(np.array(out).T[None, :, None, :], run_layer(lay, x))
    assert set(np.diff(when).tolist()) == {8}
    stalled, _ = _stream(dut, x[0, :, 0].T.tolist(), ready_pattern=lambda c: int(c % 23 > 17))
    assert stalled == out


def test_gdn_on_real_student_tensors():
    """The student's second inverse GDN on the tensors a held-out image crop produces."""
    require_simulator("verilator")
    from flows.decoder import check_block
    from flows.decoder_bench import STUDENT_DIR, student_bundles
    from models.data import embedded_images

    if not student_bundles():
        pytest.skip(f"no trained student bundle in {STUDENT_DIR}/<name>/bundle.json yet")
    bundle = read_bundle(student_bundles()[0])
    img = embedded_images("held-out")["coffee"][100:164, 200:296]
    r = check_block(bundle, "gdn", layer="g_s.3", pi=4, po=2, image=img, seed=2, p_valid=0.7, p_ready=0.5)
    assert r["input_shape"] == [1, 16, 16, 24] and r["checked"] == 16 * 16 * 24 and r["mismatches"] == 0
