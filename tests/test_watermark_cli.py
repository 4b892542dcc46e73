"""``licforge watermark``: embed -> deploy (bundle + weight-ROM Verilog) -> extract from the
memory init files; permute the deployed bundle -> extract fails -> re-synchronize -> BER 0."""
import contextlib
import io
import json
import re

import pytest
import torch

from licforge.flows.cli import main


def run(*args) -> int:
    """Exit code of ``licforge args`` run in-process (a failed check is exit code 1)."""
    return main(list(map(str, args)))


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    before = torch.get_num_threads()
    out = tmp_path_factory.mktemp("wm")
    assert run("watermark", "embed", "--scheme", "watermas", "--payload", 64, "--out", out) == 0
    torch.set_num_threads(before)
    return out


def test_embed_writes_model_and_separate_key_file(embedded):
    key = json.loads((embedded / "key.json").read_text())
    assert key["format"] == "licforge-watermark-key/1" and key["payload"] == 64
    assert len(key["positions"]) == 64 and len(key["bits"]) == 64
    blob = (embedded / "model.pt").read_bytes()
    assert b"positions" not in blob and key["bits"].encode() not in blob  # the key is not in the model


@pytest.fixture(scope="module")
def deployed(embedded):
    """The marked model deployed at 4 bits (bundle ``b4`` + weight-ROM Verilog ``b4_rtl``) and the bundle
    permuted without the key (``b4_perm``); returns (folder, the two commands' stdout)."""
    d, before = embedded, torch.get_num_threads()
    outs = []
    for args in (["watermark", "deploy", d / "model.pt", "--key", d / "key.json", "--bits", 4, "--qat-epochs", 2,
                  "--out", d / "b4", "--verilog", d / "b4_rtl"],
                 ["watermark", "attack", d / "b4", "--attack", "permute", "--seed", 3, "--out", d / "b4_perm"]):
        with contextlib.redirect_stdout(io.StringIO()) as out:
            assert run(*args) == 0
        outs.append(out.getvalue())
        torch.set_num_threads(before)
    return d, outs


def test_deploy_then_extract_from_the_deployed_integers(deployed, capsys):
    d, (deploy_out, permute_out) = deployed
    assert "BER from the bundle integers 0.000, from the memory init files" in deploy_out
    assert sorted(p.name for p in (d / "b4_rtl").glob("*.hex")) == ["conv1_w.hex", "conv2_w.hex", "fc_w.hex"]
    for src in (d / "b4_rtl", d / "b4", d / "model.pt"):  # memory init files, bundle, model: told apart
        assert run("watermark", "extract", src, "--key", d / "key.json", "--max-ber", 0) == 0
        assert "BER 0.0000 (0 bit errors)" in capsys.readouterr().out

    before_after = re.search(r"golden accuracy ([\d.]+)% before, ([\d.]+)% after", permute_out)
    assert before_after[1] == before_after[2]  # the permuted integer network is the same
    assert run("watermark", "extract", d / "b4_perm", "--key", d / "key.json", "--max-ber", 0.1) == 1
    assert run("watermark", "extract", d / "b4_perm", "--key", d / "key.json",
               "--reference", d / "model.pt", "--max-ber", 0) == 0
    assert "BER 0.0000" in capsys.readouterr().out


def test_verify_gives_matched_bits_p_value_and_a_calibrated_verdict(deployed, capsys):
    """From the memory init files, and from the permuted bundle after re-synchronization; the
    permuted bundle read directly is decided absent (exit 1).  Two null models keep the test short
    (the default is 30, and 30 held out to measure the false-positive rate)."""
    d = deployed[0]
    build = d / "build"
    before = torch.get_num_threads()
    nulls = ["--nulls", 2, "--heldout", 0]
    assert run("--build", build, "watermark", "verify", d / "key.json", d / "b4_rtl", *nulls,
               "--json", d / "verdict.json") == 0
    out = capsys.readouterr().out
    assert "64 matched, BER 0.0000" in out and "binomial p-value 5.42e-20 (log10 -19.27)" in out
    assert "verdict: watermark PRESENT" in out
    doc = json.loads((d / "verdict.json").read_text())
    assert doc["matched"] == 64 and doc["present"] and doc["calibration"]["mode"] == "direct"
    assert len(doc["calibration"]["null_matches"]) == 2 and doc["calibration"]["heldout_matches"] == []
    assert max(doc["calibration"]["null_matches"]) < doc["threshold"] <= 64
    assert len(list((build / "watermark" / "nulls").glob("*_b4"))) == 2  # the deployed null models, cached
    assert run("--build", build, "watermark", "verify", d / "key.json", d / "b4_perm", *nulls) == 1
    assert "verdict: watermark ABSENT" in capsys.readouterr().out
    assert run("--build", build, "watermark", "verify", d / "key.json", d / "b4_perm", "--reference", d / "model.pt",
               *nulls) == 0
    out = capsys.readouterr().out
    assert "read after re-synchronization: 64 matched" in out and "PRESENT" in out
    torch.set_num_threads(before)
    assert run("watermark", "verify", d / "key.json", d / "b4_perm", "--calibration", d / "verdict.json") == 2
    assert "format None" in capsys.readouterr().err


@pytest.mark.parametrize("args,needle", [
    (["watermark", "extract", ".", "--key", "no/such/key.json"], "key file no/such/key.json: not found"),
    (["watermark", "deploy", "no/model.pt", "--key", "k.json", "--out", "x"], "key file k.json: not found"),
    (["watermark", "extract", "no/such/dir", "--key", "KEY"],
     "SOURCE no/such/dir: not found (a bundle directory, a Verilog directory of memory init files or a model file)"),
    (["watermark", "extract", "--key", "KEY", "--bundle", "BUNDLE"], "unrecognized arguments: --bundle"),
    (["watermark", "extract", "--key", "KEY"], "the following arguments are required: SOURCE"),
    (["watermark", "extract", "RTL", "--key", "KEY", "--reference", "MODEL"],
     "--reference re-synchronizes a bundle or a model file (the layer graph is needed), not a Verilog directory"),
    (["watermark", "attack", "BUNDLE", "--attack", "noise", "--out", "x"],
     "--attack noise works on a float model file; a bundle directory can be permuted"),
    (["watermark", "embed", "--scheme", "uchida", "--repeat", "3"],
     "--repeat 3: a repetition code is for --scheme watermas only; drop --repeat"),
    (["watermark", "embed", "--repeat", "0"], "--repeat must be between 1 and 64, not 0"),
    (["watermark", "embed", "--min-bits", "1"], "--min-bits must be between 2 and 16, not 1"),
    (["watermark", "deploy", "MODEL", "--key", "KEY", "--out", "x", "--verilog", "v", "--lanes", "0"],
     "--lanes must be between 1 and 256, not 0"),
    (["watermark", "attack", "MODEL", "--attack", "noise", "--strength", "-1", "--out", "x"],
     "--strength (noise sigma) must be >= 0, not -1"),
    (["watermark", "attack", "MODEL", "--attack", "finetune", "--strength", "-3", "--out", "x"],
     "--strength (fine-tuning steps) must be between 0 and 1048576, not -3"),
    (["watermark", "attack", "MODEL", "--attack", "quantize", "--strength", "3.5", "--out", "x"],
     "--strength (bits) must be a whole number, not 3.5"),
])
def test_bad_input_is_one_line_exit_2(deployed, capsys, args, needle):
    named = {"KEY": "key.json", "BUNDLE": "b4", "RTL": "b4_rtl", "MODEL": "model.pt"}
    args = [str(deployed[0] / named[a]) if a in named else a for a in args]
    assert run(*args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]
