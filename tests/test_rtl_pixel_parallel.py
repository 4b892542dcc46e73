"""Output-pixel parallelism (PP lanes) and two 8-bit products per DSP48E2 (packing): the
multiplier array bit-exact on extreme operands, Yosys's DSP count, the engines with lanes
against the golden model under Amaranth's simulator, and a whole decoder with lanes and
packing on Verilator (cocotb: a real bitstream, extreme latents, bubbles, back-pressure,
frames back to back), each with its cycles against the analytical model."""
import random

import numpy as np
import pytest
from amaranth import Module, Signal, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out
from amaranth.sim import Simulator

from licforge.quant.bundle import read_bundle, write_bundle
from licforge.quant.golden import run_layer
from licforge.quant.synthetic import random_decoder_bundle
from licforge.rtl.conv_transpose import ConvTransposeEngine
from licforge.rtl.gdn import GdnUnit
from licforge.rtl.mac_pipe import mac_array, pack_chunk, packed_dsps, product_pairs
from licforge.rtl.perf import frame_timeline
from licforge.rtl.plan import LayerPlan
from licforge.sim.stimulus import extreme_ints
from helpers import require_simulator, simulate_mac_array


def test_pack_chunk_bounds():
    """8x8 signed: 7 low products sum inside [-2^17, 2^17); |x| of 10 bits times gamma: one;
    a 10-bit packed operand does not fit the 27-bit A port, a 19-bit shared one not the B port."""
    assert pack_chunk(signed(8), signed(8)) == 7
    assert pack_chunk(signed(8), unsigned(10)) == 1
    assert pack_chunk(unsigned(8), signed(8)) == 4
    assert pack_chunk(unsigned(10), signed(8)) == 0 and pack_chunk(signed(10), signed(8)) == 0
    assert pack_chunk(signed(8), signed(19)) == 0


@pytest.mark.parametrize("lanes,rows,lane_ok", [(3, 3, True), (4, 1, True), (1, 3, True), (2, 5, False), (5, 4, True)])
def test_product_pairs_cover_every_dot_product_once(lanes, rows, lane_ok):
    dest = []
    for kind, p, o in product_pairs(lanes, rows, True, lane_ok):
        dest += {"row": [(p, o), (p, o + 1)], "lane": [(p, o), (p + 1, o)], "one": [(p, o)]}[kind]
    assert sorted(dest) == [(p, o) for p in range(lanes) for o in range(rows)]
    pairs, single = packed_dsps(lanes, rows, 16, True, lane_ok)
    assert 2 * pairs + single == 16 * lanes * rows
    if lane_ok and lanes % 2 == 0:
        assert single == 0


def _mac_vectors(m_lanes, m_rows, n, x_shape, w_shape, pack, vectors):
    """Drive ``mac_array`` (enable high) with ``vectors`` (x, w) and return its sums, one cycle
    apart, as an int array (vectors, lanes, rows), and its latency."""
    return simulate_mac_array(x_shape, w_shape, m_lanes, m_rows, n, vectors, pack=pack)


@pytest.mark.parametrize("shapes", ["conv", "gdn"])
def test_packed_mac_array_is_bit_exact_on_extremes(shapes):
    """3 lanes x 3 rows x 9 inputs: row pairs, lane pairs and a lone product.  The operands are
    random with the extremes, and all -128 (9 x 2^14 in the low field would overflow its 18
    bits: the trees split after 4); the sums equal numpy's, with the latency of the unpacked
    array."""
    rng = np.random.default_rng(3)
    if shapes == "conv":
        xs, ws, xlim, wlim = signed(8), signed(8), (-128, 127), (-128, 127)
    else:  # a GDN: |x| unsigned 10 bits times gamma (row pairs only: |x| does not fit the A port)
        xs, ws, xlim, wlim = unsigned(10), signed(8), (0, 1023), (-128, 127)
    full = [(np.full((3, 9), xv), np.full((3, 9), wv)) for xv in xlim for wv in wlim]
    vecs = full + [(extreme_ints(rng, (3, 9), 8) if shapes == "conv" else rng.choice([0, 1, 512, 1023], (3, 9)),
                    extreme_ints(rng, (3, 9), 8)) for _ in range(30)]
    got, depth = _mac_vectors(3, 3, 9, xs, ws, True, vecs)
    exp = np.array([np.einsum("pi,oi->po", x.astype(np.int64), w.astype(np.int64)) for x, w in vecs])
    assert depth == 2 + 4 and np.array_equal(got, exp)   # operand registers, products, 4 tree levels


def _stream(dut, x: np.ndarray, *, p_valid=1.0, p_ready=1.0, seed=0, frame=True) -> tuple[np.ndarray, int]:
    """Frames ``x`` (n, C, H, W) back to back through an engine under Amaranth's simulator;
    returns the output beats and the cycles to the last one, counted as :mod:`sim.harness`
    counts them (its first beat is offered in cycle 1)."""
    n, _, h, w = x.shape
    pixels = [x[f, :, r, c].tolist() for f in range(n) for r in range(h) for c in range(w)]
    scale = 2 if isinstance(dut, ConvTransposeEngine) else 1
    n_out = n * h * w * scale * scale
    rng = random.Random(seed)
    got, cycles = [], [0]

    async def tb(ctx):
        if frame:
            ctx.set(dut.width, w)
            if isinstance(dut, ConvTransposeEngine):
                ctx.set(dut.height, h)
            await ctx.tick()   # the frame size a cycle before the first pixel (the engines register it)
        k = cyc = 0
        while len(got) < n_out and cyc < 100_000:
            offer = k < len(pixels) and rng.random() < p_valid
            take = rng.random() < p_ready
            ctx.set(dut.i.valid, offer)
            if offer:
                ctx.set(dut.i.payload, pixels[k])
            ctx.set(dut.o.ready, take)
            await ctx.delay(1e-9)
            k += offer and ctx.get(dut.i.ready)
            if take and ctx.get(dut.o.valid):
                got.append(list(ctx.get(dut.o.payload)))
            await ctx.tick()
            cyc += 1
        cycles[0] = cyc + 1

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(tb)
    sim.run()
    return np.array(got), cycles[0]


def test_conv_lanes_bound_by_the_output_stream():
    """6 -> 4 channels at full channel parallelism (G = 1) with PP=8 lanes on 5 columns: a block
    computes in 15 or 10 cycles but leaves in 2 x 5 beats, so the output stream sets the pace;
    two frames back to back take the model's cycles exactly, and the same pixels under stalls."""
    b = random_decoder_bundle(4, 6, seed=2)
    lay = b.layer("g_s.0")
    x = extreme_ints(np.random.default_rng(7), (2, 6, 3, 5), 8)
    dut = ConvTransposeEngine.for_layer(lay, pi=6, po=4, pp=8, pack=True, max_width=8)
    assert (dut.dsp_pairs, dut.dsp_single) == (6 * 2 * 8, 0)
    out, cycles = _stream(dut, x)
    assert np.array_equal(out.reshape(2, 6, 10, 4).transpose(0, 3, 1, 2), run_layer(lay, x))
    plan = LayerPlan(lay.name, lay.op, 6, 4, 0, 6, 4, 8, True)
    assert plan.frame_cycles(3, 5) == 3 * (max(15, 10) + max(10, 10))
    assert cycles == frame_timeline([plan], 3, 5, frames=2)["cycles"]
    stalled, _ = _stream(dut, x, p_valid=0.6, p_ready=0.4, seed=1)
    assert np.array_equal(stalled, out)


def test_gdn_lanes_in_amaranth_match_golden_and_the_model():
    """An inverse GDN of 4 channels, PI=4, PO=1, PP=3 packed (lane pairs: 8-bit inputs), rows of
    5 pixels (blocks of 3 + 2): the cycles of the row timeline, and a frame more takes the
    steady-state cycles, exactly."""
    b = random_decoder_bundle(4, 6, seed=2)
    lay = b.layer("g_s.1")
    x = extreme_ints(np.random.default_rng(8), (2, 4, 3, 5), lay.attrs["x_bits"])
    dut = GdnUnit.for_layer(lay, pi=4, po=1, pp=3, pack=True)
    assert dut.dsp_pairs == 4 * 1 and dut.dsp_single == 4 * 1 and dut.dsps == 4 + 4 + 3
    out, cycles = _stream(dut, x)
    assert np.array_equal(out.reshape(2, 3, 5, 4).transpose(0, 3, 1, 2), run_layer(lay, x))
    plan = LayerPlan(lay.name, lay.op, 4, 4, 0, 4, 1, 3, True)
    one = _stream(dut, x[:1])[1]
    model = [frame_timeline([plan], 3, 5, frames=n)["cycles"] for n in (1, 2)]
    assert (one, cycles) == tuple(model)
    assert cycles - one == plan.frame_cycles(3, 5) == 3 * (4 + 4)
    stalled, _ = _stream(dut, x, p_valid=0.5, p_ready=0.5, seed=2)
    assert np.array_equal(stalled, out)


class _MacTop(wiring.Component):
    """A multiplier array with registered operands and sums, for Yosys: ``lanes`` x ``rows`` x
    ``n`` products of 8 x 8 bits (``pack``, ``split`` as in ``mac_array``), each sum in a
    ``word``-bit field of the output."""

    def __init__(self, lanes: int, rows: int, n: int, word: int, *, pack: bool = False, split: bool = False) -> None:
        self.lanes, self.rows, self.n, self.word, self.pack, self.split = lanes, rows, n, word, pack, split
        super().__init__({"x": In(lanes * n * 8), "w": In(rows * n * 8), "s": Out(lanes * rows * word)})

    def elaborate(self, platform) -> Module:
        m = Module()
        n = self.n
        x = [[self.x.word_select(p * n + i, 8).as_signed() for i in range(n)] for p in range(self.lanes)]
        w = [[self.w.word_select(o * n + i, 8).as_signed() for i in range(n)] for o in range(self.rows)]
        sums, _ = mac_array(m, x, w, 1, "mac", pack=self.pack, split=self.split)
        flat = [s for lane in sums for s in lane]
        for k, s in enumerate(flat):
            m.d.sync += self.s.word_select(k, self.word).eq(s)
        return m


def test_yosys_split_product_takes_fewer_luts_without_dsps(tmp_path):
    """Built from LUTs (-nodsp), an 8 x 8 product split in two stages takes fewer LUTs than in one:
    197 against 287 LUT4 (synth_ecp5), 119 against 134 LUTs (synth_xilinx -family xcup)."""
    from amaranth.back import verilog

    from licforge.rtl.yosys import synthesize

    luts = {}
    for split in (False, True):
        (tmp_path / f"p{int(split)}.v").write_text(verilog.convert(_MacTop(1, 1, 1, 16, split=split), name="p"))
        for fam, key in (("ecp5", "LUT4"), ("xcup", "LUT")):
            res = synthesize([tmp_path / f"p{int(split)}.v"], "p", family=fam, dsp=False)["resources"]
            assert res["MULT18" if fam == "ecp5" else "DSP"] == 0
            luts[fam, split] = res[key]
    assert luts == {("ecp5", False): 287, ("xcup", False): 134, ("ecp5", True): 197, ("xcup", True): 119}


def test_yosys_maps_two_packed_products_to_one_dsp(tmp_path):
    """synth_xilinx -family xcup: 24 products in 12 DSP48E2 (row pairs, and the odd row's lane pair)."""
    from amaranth.back import verilog

    from licforge.rtl.yosys import synthesize

    (tmp_path / "mac.v").write_text(verilog.convert(_MacTop(2, 3, 4, 24, pack=True), name="mac"))
    rep = synthesize([tmp_path / "mac.v"], "mac", family="xcup")
    assert rep["resources"]["DSP"] == 12 == sum(packed_dsps(2, 3, 4, True, True))


@pytest.fixture(scope="module")
def extreme_bundle(tmp_path_factory):
    """Synthetic N=8 decoder: g_s.2 with a third of its weights at +-127 and extreme biases,
    g_s.1 with a quarter of its gammas at 127 (saturation at both rails)."""
    b = random_decoder_bundle(8, 8, seed=5)
    lay = b.layer("g_s.2")
    rng = np.random.default_rng(5)
    w = lay.tensors["weight"]
    pick = rng.random(w.shape)
    lay.tensors["weight"] = np.where(pick < 0.15, -127, np.where(pick < 0.3, 127, w))
    lay.tensors["bias"][:2] = [-(1 << (lay.attrs["b_bits"] - 1)), (1 << (lay.attrs["b_bits"] - 1)) - 1]
    g = b.layer("g_s.1").tensors["gamma"]
    g[rng.random(g.shape) < 0.25] = 127
    out = tmp_path_factory.mktemp("lanes") / "bundle"
    write_bundle(b, out)
    return read_bundle(out)


def test_conv_lanes_packed_on_extremes(extreme_bundle):
    """PI=4, PO=2, PP=3 packed on the extreme weights: frames back to back of ragged widths
    (blocks cut at the row end; a 1-pixel row), bubbles and back-pressure; saturation at both
    rails; always ready, the model's cycles exactly."""
    lay = extreme_bundle.layer("g_s.2")
    dut = ConvTransposeEngine.for_layer(lay, pi=4, po=2, pp=3, pack=True, max_width=8)
    plan = LayerPlan(lay.name, lay.op, 8, 8, 0, 4, 2, 3, True)
    for seed, (n, h, w), p_valid, p_ready in [(21, (2, 3, 5), 0.7, 0.4), (22, (3, 2, 1), 1.0, 0.5),
                                             (23, (2, 2, 8), 1.0, 1.0)]:
        x = extreme_ints(np.random.default_rng(seed), (n, 8, h, w), 8)
        out, cycles = _stream(dut, x, p_valid=p_valid, p_ready=p_ready, seed=seed)
        y = out.reshape(n, 2 * h, 2 * w, 8).transpose(0, 3, 1, 2)
        assert np.array_equal(y, run_layer(lay, x)), seed
        if seed == 21:
            assert (y == 127).any() and (y == -128).any()
        if p_valid == p_ready == 1.0:
            assert cycles == frame_timeline([plan], h, w, frames=n)["cycles"]


def test_gdn_lanes_packed_on_extreme_gammas(extreme_bundle):
    """An inverse GDN with PI=4, PO=2, PP=3 packed (gamma pairs), rows of 7 pixels (blocks of
    3 + 3 + 1), two frames back to back with bubbles and back-pressure: saturation at both rails."""
    lay = extreme_bundle.layer("g_s.1")
    dut = GdnUnit.for_layer(lay, pi=4, po=2, pp=3, pack=True)
    assert dut.dsp_pairs == 4 * 3 and dut.dsp_single == 0
    x = extreme_ints(np.random.default_rng(4), (2, 8, 3, 7), lay.attrs["x_bits"])
    out, _ = _stream(dut, x, p_valid=0.6, p_ready=0.4, seed=4)
    y = out.reshape(2, 3, 7, 8).transpose(0, 3, 1, 2)
    assert np.array_equal(y, run_layer(lay, x))
    assert (y == 127).any() and (y == -128).any()


#: a plan of the committed N=16 student with lanes and packing in every kind of layer: row pairs,
#: lane pairs and a lone product (g_s.6: PO=3, PP=3), GDNs with 2 and 3 lanes
LANES_N16 = {"g_s.0": (6, 2, 1), "g_s.1": (4, 4, 2), "g_s.2": (8, 4, 2), "g_s.3": (8, 2, 3), "g_s.4": (16, 4, 2),
             "g_s.5": (16, 4, 2), "g_s.6": (8, 3, 3)}


def test_whole_image_decode_with_lanes_and_packing(lic_bundle, tmp_path, sim_cache):
    """The committed N=16 student's decoder with PP > 1 and packed DSPs (one Verilator build):
    a whole photograph (chelsea, resized to 128x85) through a real bitstream, bit-exact, its
    cycles within 1 % of the model; then two frames of extreme latents back to back with
    bubbles and back-pressure."""
    require_simulator("verilator")
    from PIL import Image

    from licforge.models.data import embedded_images
    from licforge.quant.bundle import decoder_layers
    from licforge.quant.codec import decode_latents, encode_image
    from licforge.quant.eval import psnr
    from licforge.rtl.plan import layer_formats, layer_shapes
    from licforge.sim.decode import rtl_decode

    layers = decoder_layers(lic_bundle)
    plan = [LayerPlan(*s[:5], *LANES_N16[s[0]], True, *f) for s, f in zip(layer_shapes(layers), layer_formats(layers))]
    assert [p.dsp_split for p in plan] == [(6, 0), (16, 8), (32, 0), (24, 6), (64, 0), (64, 8), (32, 8)]
    img = np.asarray(Image.fromarray(embedded_images("held-out")["chelsea"]).resize((128, 85), Image.LANCZOS))
    lat, (hh, ww) = decode_latents(lic_bundle, encode_image(lic_bundle, img))
    assert lat.shape == (1, 24, 6, 8)
    pix, rep = rtl_decode(lic_bundle, lat, tmp_path, plan=plan, max_width=8, cache_dir=sim_cache)
    print({k: rep[k] for k in ("mismatches", "cycles", "model_cycles", "dsps", "sim_cycles_per_s")})
    assert rep["mismatches"] == 0 and rep["dsps"] == 268
    assert abs(rep["model_cycles"] / rep["cycles"] - 1) < 0.01
    assert psnr(pix[0, :, :hh, :ww].transpose(1, 2, 0), img) > 20
    lat = extreme_ints(np.random.default_rng(9), (2, 24, 2, 3), 8)
    _, rep = rtl_decode(lic_bundle, lat, tmp_path, plan=plan, max_width=8, p_valid=0.7, p_ready=0.5, seed=3,
                        cache_dir=sim_cache)
    assert rep["mismatches"] == 0 and rep["checked"] == 2 * 3 * 32 * 48


@pytest.mark.parametrize("xs,ws", [(signed(8), signed(8)), (unsigned(10), signed(8)), (signed(8), unsigned(12))])
def test_split_products_are_bit_exact_one_cycle_later(xs, ws):
    """split=True (multipliers built from LUTs): each product as two registered half-width
    products and their registered sum, exact for every signedness at the operands' extremes,
    with one cycle more than the unsplit array (3 + 2 tree levels for 4 inputs)."""
    rng = np.random.default_rng(9)
    ends = lambda s: [-(1 << (s.width - 1)), -1, 0, 1, (1 << (s.width - 1)) - 1] if s.signed \
        else [0, 1, (1 << s.width) - 2, (1 << s.width) - 1]   # noqa: E731
    vecs = [(rng.choice(ends(xs), (2, 4)), rng.choice(ends(ws), (3, 4))) for _ in range(40)]
    got, depth = simulate_mac_array(xs, ws, 2, 3, 4, vecs, split=True)
    exp = np.array([np.einsum("pi,oi->po", x.astype(np.int64), w.astype(np.int64)) for x, w in vecs])
    assert depth == 3 + 2 and np.array_equal(got, exp)
    m = Module()
    m._MustUse__silence = True   # refused before any use
    with pytest.raises(ValueError, match="split products are multipliers built from LUTs: a 'mul' product without "
                                         "pack, not 'min'"):
        mac_array(m, [[Signal(xs)]], [[Signal(ws)]], 1, "mac", product="min", split=True)


def test_split_products_engines_equal_golden_and_take_their_extra_stages():
    """A multiplier engine and inverse GDNs built with split_products: the golden model's pixels
    under stalls, and at full rate the unsplit unit's cycles plus one per split stage (the
    engine's products 1; a multiplier GDN's norm and x*n 2; a min-norm GDN's x*n alone 1), as
    the row timeline (rtl.perf) counts them, exactly."""
    b = random_decoder_bundle(4, 6, seed=2)
    bo = random_decoder_bundle(4, 6, seed=2, product="min", gdn_out="mul")
    x6 = extreme_ints(np.random.default_rng(10), (2, 6, 3, 5), 8)
    cases = [(ConvTransposeEngine, b.layer("g_s.0"), x6, dict(pi=3, po=2, pp=2, max_width=8), 1),
             (GdnUnit, b.layer("g_s.1"), None, dict(pi=2, po=2, pp=2), 2),
             (GdnUnit, bo.layer("g_s.1"), None, dict(pi=2, po=2, pp=2), 1)]
    for cls, lay, x, kw, extra in cases:
        x = x if x is not None else extreme_ints(np.random.default_rng(11), (2, 4, 3, 5), lay.attrs["x_bits"])
        plain, split = cls.for_layer(lay, **kw), cls.for_layer(lay, split_products=True, **kw)
        assert split.latency == plain.latency + extra and split.deployment()["split_products"]
        out, cycles = _stream(split, x)
        ref, ref_cycles = _stream(plain, x)
        n, c, h, w = x.shape
        s = 2 if cls is ConvTransposeEngine else 1
        cout = lay.tensors["weight"].shape[1] if s == 2 else c
        assert np.array_equal(out.reshape(n, s * h, s * w, cout).transpose(0, 3, 1, 2), run_layer(lay, x)), lay.name
        assert cycles == ref_cycles + extra, lay.name
        a = lay.attrs
        plan = LayerPlan(lay.name, lay.op, c, cout, 0, kw["pi"], kw["po"], kw["pp"],
                         product=a.get("product", a.get("norm_product", "mul")), out_product=a.get("out_product", "mul"))
        assert [frame_timeline([plan], h, w, frames=2, split=sp)["cycles"] for sp in (False, True)] == \
            [ref_cycles, cycles], lay.name   # the row timeline counts the split stages
        stalled, _ = _stream(split, x, p_valid=0.6, p_ready=0.5, seed=3)
        assert np.array_equal(stalled, out), lay.name


def test_split_products_refusals_name_the_fix():
    """Nothing to split, or products packed into DSPs: refused with what to do."""
    from licforge.rtl.decoder import Decoder
    from licforge.rtl.plan import plan_decoder
    from licforge.quant.bundle import decoder_layers

    m = random_decoder_bundle(4, 6, seed=2, product="min")
    with pytest.raises(ValueError, match="a 'mul' engine without pack, not 'min'"):
        ConvTransposeEngine(m.layer("g_s.2").tensors["weight"], m.layer("g_s.2").tensors["bias"], shift=4, x_bits=8,
                            w_bits=8, b_bits=16, out_bits=8, product="min", split_products=True)
    g = m.layer("g_s.1")
    with pytest.raises(ValueError, match="this unit has none"):
        GdnUnit(g.tensors["gamma"], g.tensors["beta"], x_bits=8, gamma_bits=8, beta_bits=16, norm_shift=4,
                norm_bits=10, out_shift=4, out_bits=8, norm_product="min", out_product="shift", split_products=True)
    assert not GdnUnit.for_layer(g, pi=2, split_products=True).deployment()["split_products"]   # nothing: as built
    layers = decoder_layers(random_decoder_bundle(4, 6, seed=2))
    plan = plan_decoder(layers, 2, 3, pack=True)
    with pytest.raises(ValueError, match=r"packs two products per DSP in g_s.0, g_s.1, g_s.2, g_s.3, g_s.4, g_s.5, g_s.6: plan "
                                         r"without packing \(--no-pack\)"):
        Decoder(layers, plan=plan, split_products=True)


def test_sim_convt_split_products_from_the_command_line(tmp_path, capsys, sim_cache):
    """``licforge sim convt --split-products``: the split multiplier engine in Verilator against
    the golden model, every output checked; at full rate one cycle more than the one-stage
    engine's 2,427 (measured: 2,427 and 2,428 for this input)."""
    from licforge.flows.cli import main

    require_simulator("verilator")
    assert main(["--build", str(tmp_path), "sim", "convt", "synthetic:8:8", "--pi", "4", "--po", "2",
                 "--p-valid", "1", "--p-ready", "1", "--split-products"]) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert out == ("convt g_s.0 (PI=4, PO=2, PP=1, split products) on verilator: seed 0, input [1, 8, 3, 4], "
                   "384 outputs checked, 0 mismatches, 2428 cycles")
