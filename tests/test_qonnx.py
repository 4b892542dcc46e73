"""Equality 3: QONNX (Brevitas export, qonnx cleanup, qonnx executor) == Brevitas, exactly, for
the LIC synthesis transform and the exact digits classifier; FINN gaps named per layer."""
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from licforge.flows.cli import main
from licforge.quant.qonnx import export_classifier, export_synthesis
from licforge.quant.digits import QuantDigitsNet, quantize_digits

ROOT = Path(__file__).resolve().parent.parent
QUANT_PT = ROOT / "models/checkpoints/bundles/student_n16_photos_hybrid8.quant.pt"
CONV_T = ("ConvTranspose with output_padding=1: InferPixelPaddingDeconv ignores output_padding (its output is "
          "(in-1)*stride-2*pad+k, one row and column short) and drops the bias input")
ABS = "Abs: no FINN hardware layer or transformation (the elementwise functions are Relu, Exp, Erf only)"


def wide(bits):
    return (f"{bits}-bit activation Quant: ConvertQONNXtoFINN converts activation Quants only up to "
            f"max_multithreshold_bit_width=8 (default) to MultiThreshold; a wider one needs 2**bits-1 thresholds "
            f"per channel")


@pytest.fixture(scope="module")
def synthesis(tmp_path_factory):
    return export_synthesis(QUANT_PT, tmp_path_factory.mktemp("qonnx"))


def test_synthesis_transform_executes_exactly_on_held_out_latents(synthesis):
    assert synthesis["exact"] is True and synthesis["max_abs_diff"] == 0.0
    assert synthesis["samples"] == 3 and synthesis["sample_names"] == ["astronaut", "chelsea", "coffee"]
    assert synthesis["ops"] == {"Abs": 3, "Conv": 3, "ConvTranspose": 4, "Mul": 3, "Quant": 25}
    assert synthesis["input_shape"] == [1, 24, 32, 32] and Path(synthesis["onnx"]).is_file()
    assert json.loads(json.dumps(synthesis)) == synthesis


def test_synthesis_names_every_layer_finn_cannot_build(synthesis):
    layers = {r["layer"]: r for r in synthesis["layers"]}
    assert list(layers) == ["latent"] + [f"g_s.{k}" for k in range(7)]
    assert layers["latent"]["finn"] == "supported" and layers["latent"]["onnx_ops"] == {"Quant": 1}
    assert layers["g_s.1"]["onnx_ops"] == {"Abs": 1, "Conv": 1, "Mul": 1, "Quant": 4}
    assert layers["g_s.0"]["onnx_ops"] == {"ConvTranspose": 1, "Quant": 3}
    assert [(u["layer"], u["finn"], u["reasons"]) for u in synthesis["unsupported"]] == [
        ("g_s.0", "at risk", [CONV_T, wide(10)]), ("g_s.1", "unsupported", [ABS, wide(12)]),
        ("g_s.2", "at risk", [CONV_T, wide(10)]), ("g_s.3", "unsupported", [ABS, wide(12)]),
        ("g_s.4", "at risk", [CONV_T, wide(10)]), ("g_s.5", "unsupported", [ABS, wide(12)]),
        ("g_s.6", "at risk", [CONV_T])]


def test_exact_digits_classifier_executes_exactly_on_held_out_digits(digits_models, tmp_path):
    xtr, ytr, x_test, _ = digits_models.split  # the committed exact CNN, after the recipe's 8-bit QAT
    q = quantize_digits(digits_models.exact, 8, xtr, ytr, progress=False)
    res = export_classifier(q, x_test, tmp_path)
    assert res["exact"] is True and res["max_abs_diff"] == 0.0 and res["samples"] == 360
    assert res["ops"] == {"Conv": 2, "Gemm": 1, "Quant": 7, "Relu": 2, "Reshape": 1}
    assert [(u["layer"], u["finn"], u["reasons"]) for u in res["unsupported"]] == [("outq", "at risk", [wide(16)])]


def test_minconv_classifier_is_refused():
    with pytest.raises(ValueError) as e:
        export_classifier(QuantDigitsNet(product="min"), None, Path("unused"))
    assert str(e.value) == ("only the exact-product ('mul') digits classifier exports to QONNX, not product='min': "
                            "ONNX and FINN have no MinConv operator")


@pytest.mark.parametrize("path,message", [
    ("no/such.quant.pt", "licforge: error: quantized model no/such.quant.pt: not found"),
    ("models", "licforge: error: quantized model models: a folder without models.quant.pt beside it; give the "
               ".quant.pt that 'licforge quantize' wrote"),
    ("models/checkpoints/student_n16_photos_l0.0130.pt",
     "licforge: error: models/checkpoints/student_n16_photos_l0.0130.pt: format 'licforge-lic-weights/1', expected "
     "'licforge-lic-quant/1' (a file written by licforge quantize)"),
])
def test_cli_bad_input_is_one_line_exit_2(path, message, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["qonnx", "lic", path, "--out", "unused"]) == 2
    assert capsys.readouterr().err == message + "\n"


class NeedsQuantTensor(nn.Module):
    """Runs in Brevitas (QuantTensor input) but not in the exporter (plain tensors)."""

    def forward(self, x):
        return x.value


def test_a_layer_that_does_not_export_is_named_not_dropped(tmp_path):
    q = QuantDigitsNet(product="mul").eval()
    q.act2 = nn.Sequential(q.act2, NeedsQuantTensor())
    res = export_classifier(q, torch.rand(4, 1, 8, 8), tmp_path)
    reason = "AttributeError: 'FakeTensor' object has no attribute 'value'"
    assert res["exact"] is False and res["onnx"] is None
    assert res["error"] == f"digits_mul: export to QONNX failed ({reason})"
    assert res["unsupported"] == [{"layer": "act2", "finn": "not exported", "reasons": [reason]}]
    exported = [p["layer"] for p in res["layer_exports"] if p["exported"]]
    assert exported == ["inq", "conv1", "act1", "conv2", "fc", "outq"]
    written = sorted(f.name for f in (tmp_path / "digits_mul_layers").glob("*.onnx"))
    assert written == sorted(f"{n}.onnx" for n in exported)
