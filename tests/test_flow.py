"""The end-to-end flow on a tiny config: every stage runs once, a re-run does no work, a
changed key re-runs only the stages that read it, an interrupted stage resumes alone, bad
configs stop at once naming the key or file."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from licforge.flows.cli import main
from licforge.flows.flow import STAGES, load_config, run_flow

TINY = """
[run]
dir = "{run}"
[student]
N = 8
init = ""
steps = 4
crop = 32
batch = 2
[quant]
qat_steps = 3
[watermark]
payload = 32
wrong_keys = 4
noise = [1.0]
prune = [1.0]
finetune = [2]
quant_bits = [4]
[rtl]
pi = 8
po = 3
[verify]
crop = 32
[synth]
enabled = false
"""


def _write(tmp: Path, text: str, name: str = "flow.toml") -> Path:
    p = tmp / name
    p.write_text(text)
    return p


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flow")
    cfg = _write(tmp, TINY.format(run=tmp / "run"))
    records, _ = run_flow(cfg, progress=False, log=lambda s: None)
    return cfg, tmp / "run", records


def _markers(run: Path) -> dict[str, float]:
    return {s.name: (run / s.name / "stage.json").stat().st_mtime_ns for s in STAGES}


def test_every_stage_runs_and_checks_hold(tiny):
    _, run, records = tiny
    assert [r.name for r in records] == [s.name for s in STAGES]
    assert all(r.ran for r in records)
    res = {r.name: r.result for r in records}
    assert res["verify"]["mismatches"] == 0
    assert res["verify"]["image_hw"] == [32, 32] and res["verify"]["pixels_checked"] == 32 * 32 * 3
    assert res["watermark"]["ber_memory_files"] == 0.0 and res["watermark"]["ber_bundle"] == 0.0
    assert 0.25 < res["watermark"]["ber_wrong_keys_mean"] < 0.75
    assert res["qat"]["ber_bundle"] == 0.0
    checks = [r["check"] for r in res["eval"]["rows"] if r["kind"] == "quantized"]
    assert checks == ["3/3 images"]  # Brevitas == integer golden on every held-out image
    assert (run / "rtl" / "verilog" / "manifest.json").is_file()
    assert res["synth"] == {"skipped": "synth.enabled = false"}


def test_rerun_does_no_work(tiny):
    cfg, run, _ = tiny
    before = _markers(run)
    records, _ = run_flow(cfg, progress=False, log=lambda s: None)
    assert [r.name for r in records if r.ran] == []
    assert _markers(run) == before


def test_changed_key_reruns_only_its_stages(tiny, tmp_path):
    cfg, run, _ = tiny
    changed = _write(tmp_path, cfg.read_text().replace("enabled = false", "enabled = false\nfamily = \"xc7\""))
    records, _ = run_flow(changed, progress=False, log=lambda s: None)
    assert [r.name for r in records if r.ran] == ["synth", "report"]  # only the stages reading [synth]
    records, _ = run_flow(cfg, progress=False, log=lambda s: None)  # back to the fixture's config
    assert [r.name for r in records if r.ran] == ["synth", "report"]


def test_interrupted_stage_resumes_alone_and_from_forces(tiny):
    cfg, run, _ = tiny
    (run / "watermark" / "stage.json").unlink()  # as if killed inside the stage
    records, _ = run_flow(cfg, progress=False, log=lambda s: None)
    assert [r.name for r in records if r.ran] == ["watermark"]
    records, _ = run_flow(cfg, force_from="qonnx", progress=False, log=lambda s: None)
    names = [s.name for s in STAGES]
    assert [r.name for r in records if r.ran] == names[names.index("qonnx"):]


@pytest.mark.parametrize("text, message", [
    ("[quant]\nw_bits = 33\n", "config key quant.w_bits = 33: must be between 2 and 16"),
    ("[quant]\nw_bits = 1\n", "config key quant.w_bits = 1: must be between 2 and 16"),
    ("[quant\nw_bits = 8\n", "not valid TOML"),
    ("[student]\nwidht = 16\n", "unknown key student.widht"),
    ("[data]\nfolder = \"no_such_folder\"\n", "config key data.folder:"),
    ("[teacher]\ncheckpoint = \"garbage.pt\"\n", "config key teacher.checkpoint:"),
    ("[watermark]\nscheme = \"nope\"\n", "config key watermark.scheme = 'nope': must be one of watermas, uchida, none"),
    ("[verify]\ncrop = 40\n", "config key verify.crop = 40: must be a multiple of 16"),
    ("[student]\nproduct = \"max\"\n", "config key student.product = 'max': must be one of mul, min"),
    ("[student]\nproduct = \"min\"\nsteps = 0\n", "student.init is a 'mul' student; converting it needs"),
])
def test_bad_config_stops_at_once(tmp_path, capsys, text, message):
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    cfg = _write(tmp_path, text)
    assert main(["flow", str(cfg), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()  # nothing ran


def test_flow_digits_runs_the_minconv_slice(tmp_path, monkeypatch, capsys):
    """``flow --digits`` (no subcommand "demo"): the digits slice into --out, else <build>/flow/digits."""
    import licforge.bench.minconv

    calls = []
    monkeypatch.setattr(licforge.bench.minconv, "run_minconv_slice", lambda out, **kw: calls.append((out, kw)))
    assert main(["--build", str(tmp_path / "b"), "flow", "--digits", "--lanes", "4"]) == 0
    assert main(["flow", "--digits", "--out", str(tmp_path / "d"), "--simulator", "icarus"]) == 0
    assert calls == [(tmp_path / "b" / "flow" / "digits", {"lanes": 4, "bits": 8, "seed": 0, "simulator": "verilator"}),
                     (tmp_path / "d", {"lanes": 8, "bits": 8, "seed": 0, "simulator": "icarus"})]
    assert f"summary: {tmp_path / 'd' / 'summary.json'}" in capsys.readouterr().out
    assert main(["flow", "--lanes", "4"]) == 2 and "--lanes: only with --digits" in capsys.readouterr().err


def test_default_config_is_valid_and_documented():
    cfg, text = load_config(None)
    assert cfg["student"]["N"] == 16 and cfg["quant"]["w_bits"] == 8 and cfg["watermark"]["scheme"] == "watermas"
    assert Path(cfg["teacher"]["checkpoint"]).is_file() and Path(cfg["student"]["init"]).is_file()
    for sec in ("run", "data", "teacher", "student", "quant", "watermark", "rtl", "verify", "synth", "report"):
        assert f"[{sec}]" in text
    json.dumps(cfg)  # the config goes into the report as JSON


def test_report_shows_every_result(tiny):
    _, run, records = tiny
    res = {r.name: r.result for r in records}
    assert res["qonnx"]["exact"] is True and res["qonnx"]["samples"] == 3
    assert [u["layer"] for u in res["qonnx"]["unsupported"]] == ["g_s.0", "g_s.1", "g_s.2", "g_s.3", "g_s.4",
                                                                 "g_s.5", "g_s.6"]
    html = (run / "report" / "report.html").read_text()
    md = (run / "report" / "report.md").read_text()
    assert res["report"]["sections"] == ["Summary", "Rate-distortion (held-out images, real bitstreams)", "Hardware",
                                         "Verification", "Watermark", "QONNX export (for FINN)", "Stages", "Config",
                                         "Tool versions"]
    for title in res["report"]["sections"]:
        assert title in html and title in md
    assert html.count("data:image/png;base64,") == 2  # the RD plot and the verify comparison, embedded
    assert "verify_comparison.png" in md and (run / "report" / "verify_comparison.png").is_file()
    assert "FAIL" not in md and md.count("PASS") >= 3
    assert f"| RTL decode of {res['verify']['image']}" in md
    assert "| memory init files beside the Verilog | 0 |" in md
    assert "N = 8" in html and "[watermark]" in html  # the config as given
    assert "torch" in md and "2.14.1" in md
