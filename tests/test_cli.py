"""The command line: one grammar, generated files, Yosys reports, and one-line errors with exit code 2."""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from licforge.flows.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("args,needle", [
    (["rtl", "minconv", "--bits", "0"], "--bits must be between 2 and 32, not 0"),
    (["rtl", "mac", "--bits", "33"], "--bits must be between 2 and 32, not 33"),
    (["rtl", "minconv", "--lanes", "0"], "--lanes must be between 1 and 1024, not 0"),
    (["synth", "no/such/file.v"], "no/such/file.v: not found"),
    # a folder or a device where a file is read: said so, not "not found"
    (["synth", "/dev/null"], "/dev/null: not a regular file"),
    (["quantize", "tests", "--ptq", "--out", "x"], "weights tests: is a folder; give a file"),
    (["plot", "rd", "tests"], "results tests: is a folder; give a file"),
    (["watermark", "extract", ".", "--key", "/dev/null"], "key file /dev/null: not a regular file"),
    (["rtl", "minconv", "--lanes", "eight"], "invalid int value: 'eight'"),
    (["sim", "mac", "--beats", "100"], "--beats must be between 1 and --max-beats (64), not 100"),
    (["--threads", "0", "rtl", "minconv"], "--threads must be between 1 and 256, not 0"),
    (["perf", "synthetic:8:8", "--pi", "4,8"], "argument --pi: invalid int value: '4,8'"),
    (["synth", "x.v", "--family", "ecp5"], "argument --family: invalid choice: 'ecp5'"),
    (["flow", "--out", "x"], "--out: only with --digits"),
    (["flow", "--digits", "my.toml", "--run-dir", "r"], "CONFIG, --run-dir: not with --digits"),
    # a given 0 is refused, not taken for "use the default" (and sim decoder has no --layer)
    (["rtl", "decoder", "synthetic:16:24", "--pi", "0"],
     "--pi must divide the 16 input channels of the heaviest layer 'g_s.4': one of [1, 2, 4, 8, 16], not 0"),
    (["perf", "synthetic:16:24", "--pi", "2", "--po", "0"],
     "--po must divide the 16 output channels of the heaviest layer 'g_s.4': one of [1, 2, 4, 8, 16], not 0"),
    (["sim", "decoder", "synthetic:16:24", "--po", "0"],
     "--po must divide the 16 output channels of the heaviest layer 'g_s.4': one of [1, 2, 4, 8, 16], not 0"),
    (["rtl", "gdn", "synthetic:16:24", "--po", "0"], "layer g_s.1: po must divide the 16 channels: one of [1, 2, 4, 8, 16], not 0"),
    (["plan", "synthetic:16:24", "--resolution", "1920x1080", "--fps", "inf", "--dsp", "10"],
     "argument --fps: must be a finite number, not 'inf'"),
    (["perf", "synthetic:16:24", "--pi", "4", "--po", "4", "--clock-mhz", "0"],
     "argument --clock-mhz: must be positive, not 0"),
    (["sim", "convt", "synthetic:16:24", "--p-valid", "0"],
     "argument --p-valid: must be a probability in (0, 1], not 0"),
    (["sim", "gdn", "synthetic:16:24", "--p-ready", "1.5"],
     "argument --p-ready: must be a probability in (0, 1], not 1.5"),
    (["train", "--steps", "1", "--lr", "nan", "--out", "x.pt"], "argument --lr: must be a finite number, not 'nan'"),
    (["perf", "synthetic:100000:24", "--pi", "1", "--po", "1"], "(N, M from 1 to 1024, SEED >= 0; product mul or min)"),
    (["perf", "synthetic:16:24:-1", "--pi", "1", "--po", "1"], "bundle 'synthetic:16:24:-1': write synthetic:N:M"),
    (["eval", "--no-baselines"], "nothing to evaluate: give weight files or bundle directories, or drop --no-baselines"),
    (["eval", "models/checkpoints/student_n16_photos_l0.0130.pt", "./models/checkpoints/student_n16_photos_l0.0130.pt"],
     "models/checkpoints/student_n16_photos_l0.0130.pt: given more than once"),
    (["bench", "kd", "--base-steps", "0"], "--base-steps must be between 1 and 10000000, not 0"),
    (["bench", "kd", "--crop", "8"], "--crop must be a multiple of 16 (>= 16), not 8"),
    (["watermark", "deploy", "m.pt", "--key", "k.json", "--out", "b", "--qat-epochs", "-1"],
     "--qat-epochs must be between 0 and 10000, not -1"),
    (["sim", "convt", "synthetic:16:24", "--seed", "-1"],
     "argument --seed: a seed must be between 0 and 4294967295, not -1"),
    (["flow", "--digits", "--bits", "0"], "--bits must be between 2 and 16, not 0"),
    (["sim", "minconv", "--vectors", "0"], "--vectors must be between 1 and 16777216, not 0"),
    (["sim", "convt", "synthetic:8:8", "--pack", "--split-products"],
     "layer g_s.0: split_products cuts multipliers built from LUTs into two stages: a 'mul' engine without pack"),
])
def test_bad_input_is_one_line_exit_2(args, needle, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err


def _licforge() -> list[str]:
    """The installed ``licforge`` console script (``-m licforge.flows.cli`` without one)."""
    script = Path(sys.executable).with_name("licforge")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "licforge.flows.cli"]


@pytest.mark.parametrize("cmd", [["plot", "rd", "{f}"],
                                 ["quantize", "models/checkpoints/student_n16_photos_l0.0130.pt", "--out", "{o}",
                                  "--recipe", "{f}"]])
def test_a_binary_json_argument_is_named_not_a_traceback(cmd, tmp_path):
    """A results file or recipe that is not UTF-8 (a binary file given by mistake) is refused by name,
    exit 2, in one line: no notice of a third-party import (torch's "No CUDA runtime" log line) before it."""
    f = tmp_path / "r.json"
    f.write_bytes(bytes([0xEC, 0xD7, 0xAA, 0xC2]) * 8)
    r = subprocess.run(_licforge() + [a.format(f=f, o=tmp_path / "q") for a in cmd], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and f"{f}: not valid JSON ('utf-8' codec can't decode byte 0xec" in err[0], err


def test_a_file_of_another_bundle_is_refused_in_one_line(tmp_path, capsys):
    """Decoding with the wrong bundle: exit 2 and one line, with no deprecation warning of compressai's
    imports (torch_geometric's ``torch.jit.script``) before it; an --out that is not a PNG file: exit 2."""
    from PIL import Image

    Image.new("RGB", (16, 16), (90, 120, 200)).save(tmp_path / "a.png")
    bundles = ROOT / "models" / "checkpoints" / "bundles"
    assert main(["encode", str(bundles / "student_n16_photos_hybrid8"), str(tmp_path / "a.png"),
                 "--out", str(tmp_path / "a.licf")]) == 0
    r = subprocess.run(_licforge() + ["decode", str(tmp_path / "a.licf"), "--model",
                                      str(bundles / "student_n32_photos_hybrid8")], capture_output=True, text=True)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "a.licf: file was encoded with the bundle of sha256 486712d06f899bff" in err[0], err
    for out, why in ((tmp_path, "is a folder"), (tmp_path / "a.jpg", "written as PNG")):  # refused before decoding
        assert main(["decode", str(tmp_path / "a.licf"), "--out", str(out)]) == 2
        assert capsys.readouterr().err == f"licforge: error: --out {out}: {why}; give a file name ending in .png\n"
    assert main(["decode", str(tmp_path / "a.licf"), "--out", str(tmp_path / "a.PNG")]) == 0


def test_output_paths_are_checked_before_the_work(tmp_path, capsys):
    """A training run to a folder; a bundle, RTL, benchmark, flow or place-and-route folder onto a file; a
    plot to a non-PNG name; --json into a folder; a file under a file: refused by name (exit 2) before
    the command's work."""
    from PIL import Image

    (tmp_path / "f.txt").write_text("x")
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    weights = str(ROOT / "models" / "checkpoints" / "student_n16_photos_l0.0130.pt")
    for args, needle in ((["train", "--steps", "1", "--out", str(tmp_path)],
                          f"--out {tmp_path}: is a folder; give a file name"),
                         (["distill", "--steps", "1", "--kd-recon", "0", "--out", str(tmp_path)],
                          f"--out {tmp_path}: is a folder"),
                         (["quantize", weights, "--ptq", "--out", str(tmp_path / "f.txt")],
                          f"--out {tmp_path / 'f.txt'}: is a file; give a folder name"),
                         (["plot", "rd", str(tmp_path / "f.txt"), "--out", str(tmp_path / "rd")],
                          f"--out {tmp_path / 'rd'}: written as PNG; give a file name ending in .png"),
                         (["synth", str(tmp_path / "f.txt"), "--json", str(tmp_path)],
                          f"--json {tmp_path}: is a folder; give a file name"),
                         *[(cmd + ["--out", str(tmp_path / "f.txt")], f"--out {tmp_path / 'f.txt'}: is a file; give a "
                            f"folder name") for cmd in (["rtl", "minconv"], ["watermark", "embed"], ["bench", "minconv"],
                                                        ["flow", "--digits"], ["qonnx", "digits"], ["pnr", str(tmp_path)])],
                         (["eval", "--bitstreams", str(tmp_path / "f.txt")],
                          f"--bitstreams {tmp_path / 'f.txt'}: is a file; give a folder name"),
                         (["--build", str(tmp_path / "f.txt"), "rtl", "minconv"],
                          f"--build {tmp_path / 'f.txt'}: is a file; give a folder name"),
                         (["flow", "--run-dir", str(tmp_path / "f.txt")], f"--run-dir {tmp_path / 'f.txt'}: is a file"),
                         (["encode", weights, str(tmp_path / "a.png"), "--out", str(tmp_path / "f.txt" / "a.licf")],
                          f"its folder cannot be made (File exists: {tmp_path / 'f.txt'})")):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("licforge: error: ") and needle in err and err.count("\n") == 1, err


def test_an_output_folder_under_a_file_or_in_a_read_only_folder_is_refused_before_the_work(tmp_path, capsys,
                                                                                           monkeypatch):
    """A folder ``--out`` below a file, or in a folder that cannot be written (a read-only tree: the
    check asks ``os.access``, made to answer no here since root may write anywhere), is refused by
    name before the command runs (it failed at the first write before)."""
    import licforge.errors as errors

    (tmp_path / "f.txt").write_text("x")
    assert main(["rtl", "minconv", "--out", str(tmp_path / "f.txt" / "a" / "b")]) == 2
    assert capsys.readouterr().err == (f"licforge: error: --out {tmp_path / 'f.txt' / 'a' / 'b'}: cannot be made "
                                       f"({tmp_path / 'f.txt'} is a file)\n")
    ro = tmp_path / "ro"
    ro.mkdir()
    real = errors.os.access
    monkeypatch.setattr(errors.os, "access", lambda path, mode: Path(path) != ro and real(path, mode))
    for out, why in ((ro / "new" / "rtl", f"not writable ({ro} is read-only)"), (ro, "not writable")):
        assert main(["rtl", "minconv", "--out", str(out)]) == 2
        assert capsys.readouterr().err == f"licforge: error: --out {out}: {why}\n"
    assert not (ro / "new").exists()
    assert main(["rtl", "minconv", "--out", str(tmp_path / "rw" / "rtl")]) == 0


def test_a_failing_cocotb_test_is_a_failed_check_in_one_line(monkeypatch, capsys):
    """SimulationFailed from a simulation the command started: exit 1, one line naming the log."""
    import licforge.sim.lane_array as lane_array
    from licforge.sim.runner import SimulationFailed

    def failing(*a, **k):
        raise SimulationFailed("licforge.sim.tb_lane_array on top (verilator): 1 of 1 cocotb tests failed; log L")

    monkeypatch.setattr(lane_array, "random_array_check", failing)
    assert main(["sim", "minconv", "--vectors", "4"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["licforge: check failed: licforge.sim.tb_lane_array on top (verilator): 1 of 1 cocotb tests "
                   "failed; log L"]


def test_console_script_exits_2_with_one_line():
    """The installed ``licforge`` entry point (``-m licforge.flows.cli`` without one): exit code 2, one line."""
    cmd = _licforge()
    r = subprocess.run(cmd + ["rtl", "minconv", "--bits", "0"], capture_output=True, text=True)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines == ["licforge: error: --bits must be between 2 and 32, not 0"]


def test_a_closed_stdout_pipe_ends_the_command_without_a_traceback(tmp_path):
    """``licforge ... | head``: the reader leaves before the command writes; exit 1, nothing on stderr
    about the broken pipe (no traceback, no 'Exception ignored' at interpreter exit)."""
    cmd = _licforge()
    p = subprocess.Popen(cmd + ["rtl", "minconv", "--out", str(tmp_path / "m")], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    p.stdout.close()   # before the child has written anything: its first flush meets a closed pipe
    err = p.stderr.read()
    assert p.wait() == 1 and "BrokenPipe" not in err and "Traceback" not in err, err


def _parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser) of every parser in the ``licforge`` tree, the top one first."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, path + (name,))


def _option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action | None:
    return next((a for a in parser._actions if flag in a.option_strings), None)


COMMANDS = {path: p for path, p in _parsers(build_parser())}


@pytest.mark.parametrize("old", [["demo"], ["kd-study"], ["bundle-info", "b"], ["rd-plot", "r.json"],
                                 ["sim", "decode", "synthetic:8:8", "x.png"], ["watermark", "report"],
                                 ["bench", "lic", "--results", "r"], ["eval", "--threads", "2"]])
def test_the_old_grammar_is_refused(old, capsys):
    assert main(old) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_one_name_per_command():
    """Verb then object: no "demo", one name for each command, every benchmark under bench."""
    names = {" ".join(path) for path in COMMANDS if path}
    assert not any("demo" in path for path in COMMANDS)
    assert {"flow", "encode", "decode", "sim decoder", "inspect", "plot rd", "bench kd", "bench watermark",
            "bench all", "watermark extract", "watermark attack", "watermark deploy"} <= names
    assert not names & {"sim decode", "sim image", "watermark report", "kd-study", "bundle-info", "rd-plot"}
    assert {p[1] for p in COMMANDS if len(p) == 2 and p[0] == "bench"} == {
        "codec", "decoder", "kd", "lic", "minconv", "minconv-lic", "watermark", "all"}
    assert _option(COMMANDS[("flow",)], "--digits").help == "run the MinConv digits slice instead of the LIC flow"
    for path, flags in {("bench", "watermark"): ["--hosts", "--products", "--quick"],
                        ("bench", "kd"): ["--base-steps", "--ft-steps", "--widths", "--seeds", "--lambdas", "--work",
                                          "--device", "--tag", "--workers"]}.items():
        assert all(_option(COMMANDS[path], f) for f in flags), path
    for cmd, inp in {("watermark", "extract"): "source", ("watermark", "attack"): "source",
                     ("watermark", "deploy"): "model", ("encode",): "image", ("decode",): "file",
                     ("inspect",): "bundle"}.items():
        assert any(a.dest == inp and not a.option_strings for a in COMMANDS[cmd]._actions), cmd


def test_the_command_table_lists_every_command():
    """The README's command table has a row for every command of the parser, and no other."""
    import itertools

    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("\n## Commands\n"):readme.index("**Grammar.**")]
    listed = set()
    for line in table.splitlines():
        if line.startswith("| `licforge "):
            words = line.split("`")[1].split()[1:]
            words = list(itertools.takewhile(lambda w: w.islower() and not w.startswith(("-", "[")), words))
            listed |= set(itertools.product(*(w.split("\\|") for w in words)))
    leaves = {path for path, p in COMMANDS.items()
              if path and not any(isinstance(a, argparse._SubParsersAction) for a in p._actions)}
    assert listed == leaves


def test_one_meaning_and_one_default_per_flag():
    """--json: never a default; --out of a benchmark: bench/results; --family: xcup; --pi/--po:
    integers; --threads, --build: global only; no --results, --png, --model, --bundle, --verilog input flags."""
    from licforge.rtl.yosys import DEFAULT_FAMILY

    assert DEFAULT_FAMILY == "xcup"
    seen = set()
    for path, p in COMMANDS.items():
        for a in p._actions:
            for flag in a.option_strings:
                seen.add(flag)
                where = f"licforge {' '.join(path)} {flag}"
                if flag == "--json":
                    assert a.default is None, where
                elif flag == "--family":
                    assert a.default == DEFAULT_FAMILY, where
                elif flag in ("--pi", "--po"):
                    assert a.type is int, where
                elif flag in ("--threads", "--build"):
                    assert path == (), where
                elif flag == "--out" and path[:1] == ("bench",):
                    assert a.default == "bench/results", where
                assert flag not in ("--results", "--png"), where
                if path[:1] == ("watermark",) and path[1:] != ("deploy",):
                    assert flag not in ("--model", "--bundle", "--verilog"), where
    assert {"--json", "--family", "--pi", "--po", "--threads", "--out"} <= seen


def test_bench_all_runs_every_benchmark_with_its_defaults(monkeypatch, tmp_path, capsys):
    """Each benchmark gets (out_dir, build_dir, args with its own defaults); kd (a GPU study) is not in all."""
    from licforge.flows import cmd_codec, cmd_decoder, cmd_lic, cmd_minconv, cmd_watermark

    calls = {}

    def fake(name):
        def bench(out, build, args):
            calls[name] = (out, build, args)
            return f"{name} done"
        return bench

    for mod, name in ((cmd_codec, "codec"), (cmd_decoder, "decoder"), (cmd_lic, "lic"), (cmd_lic, "kd"),
                      (cmd_minconv, "minconv"), (cmd_watermark, "watermark")):
        monkeypatch.setattr(mod, f"_bench_{name}", fake(name))
    assert main(["--build", str(tmp_path / "b"), "bench", "all", "--out", str(tmp_path / "r")]) == 0
    assert sorted(calls) == ["codec", "decoder", "lic", "minconv", "watermark"]
    assert all(c[:2] == (tmp_path / "r", tmp_path / "b") for c in calls.values())
    assert calls["watermark"][2].hosts == "digits,lic" and calls["watermark"][2].quick is False
    assert calls["decoder"][2].family == "xcup"
    assert "bench minconv: minconv done" in capsys.readouterr().out
    calls.clear()
    assert main(["bench", "kd", "--widths", "16", "--out", str(tmp_path / "k")]) == 0
    out, build, args = calls["kd"]
    assert out == tmp_path / "k" and build == Path("build") and args.widths == [16] and args.work is None


def test_threads_are_set_once_at_the_entry_point(monkeypatch, capsys):
    import torch

    seen = []
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    assert main(["--threads", "3", "inspect", str(ROOT / "models/checkpoints/bundles/student_n16_photos_hybrid8")]) == 0
    assert seen == [3] and "valid, hash" in capsys.readouterr().out


def test_rtl_then_synth(tmp_path, capsys):
    out_min, out_mac = tmp_path / "minconv", tmp_path / "mac"
    assert main(["rtl", "minconv", "--lanes", "4", "--bits", "6", "--out", str(out_min)]) == 0
    assert main(["rtl", "mac", "--lanes", "4", "--bits", "6", "--out", str(out_mac)]) == 0
    assert (out_min / "top.v").read_text().startswith("/* Generated by Amaranth Yosys")
    manifest = json.loads((out_min / "manifest.json").read_text())
    assert manifest["config"]["op"] == "min" and manifest["config"]["lanes"] == 4
    capsys.readouterr()
    assert main(["synth", str(out_mac), "--json", str(tmp_path / "mac.json")]) == 0
    mac = json.loads((tmp_path / "mac.json").read_text())["resources"]
    assert mac["DSP"] == 4  # one multiplier per lane, mapped to DSP48
    assert main(["synth", str(out_min), "--json", str(tmp_path / "min.json")]) == 0
    mn = json.loads((tmp_path / "min.json").read_text())["resources"]
    assert mn["DSP"] == 0 and mn["LUT"] > 0 and mn["FF"] > 0
    assert main(["synth", str(out_mac), "--no-dsp", "--json", str(tmp_path / "mac_nodsp.json")]) == 0
    mac_lut = json.loads((tmp_path / "mac_nodsp.json").read_text())["resources"]
    assert mac_lut["DSP"] == 0 and mac_lut["LUT"] > mn["LUT"]  # multipliers in fabric cost more than comparators


def test_a_top_module_no_source_declares_is_bad_input(tmp_path, capsys):
    """``--top`` naming no module of the sources is refused before Yosys runs (it was a Yosys
    failure, exit 1, with the log's "Module `bar' not found!" twice), naming the modules there
    are; a module in a block comment does not count, an escaped identifier does."""
    from licforge.rtl.yosys import verilog_modules

    a, b = tmp_path / "a.v", tmp_path / "b.v"
    a.write_text("/* module ghost(); endmodule */\nmodule top(input x, output y);\n  assign y = x;\nendmodule\n")
    b.write_text("// module other\n  module \\top.sub (input x);\nendmodule\nmodule automatic inner;\nendmodule\n")
    assert verilog_modules([a, b]) == ["top", "top.sub", "inner"]
    assert main(["synth", str(a), "--top", "bar"]) == 2
    assert capsys.readouterr().err == ("licforge: error: top module 'bar': a.v declares no module of that name "
                                       "(modules: top)\n")
    assert main(["pnr", str(tmp_path), "--top", "ghost", "--out", str(tmp_path / "p")]) == 2
    assert capsys.readouterr().err == ("licforge: error: top module 'ghost': 2 Verilog files declare no module of "
                                       "that name (modules: top, top.sub, inner)\n")


def test_yosys_failure_is_reported_without_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.v"
    bad.write_text("module top(input a; endmodule\n")
    assert main(["synth", str(bad), "--top", "top"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("licforge: yosys failed on top (xcup):") and "Traceback" not in err
