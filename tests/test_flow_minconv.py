"""The flow on a MinConv student (``student.product = "min"``), in a file of its own so that
the two test workers share the flow's minutes (pytest-xdist --dist loadfile)."""
from __future__ import annotations

from licforge.flows.flow import run_flow

from .test_flow import TINY, _write


def test_minconv_student_runs_every_stage(tmp_path):
    """student.product = "min": the distilled student, the bundle, the RTL (0 multipliers,
    bit-exact on a held-out crop) and the watermark read from the memory files all take the
    MinConv product; QONNX, which has no operator for it, is skipped by name, not failed."""
    from licforge.quant.bundle import read_bundle

    text = TINY.format(run=tmp_path / "run").replace("[student]\n", "[student]\nproduct = \"min\"\n")
    records, _ = run_flow(_write(tmp_path, text), progress=False, log=lambda s: None)
    res = {r.name: r.result for r in records}
    assert res["distill"]["config"]["product"] == "min"
    assert res["qat"]["curve"] == "N=8 MinConv student + KD hybrid8 QAT 8-bit + WaterMAS"
    layers = {lay.name: lay.attrs for lay in read_bundle(res["qat"]["bundle"]).layers}
    assert [layers[f"g_s.{k}"]["product"] for k in (0, 2, 4, 6)] == ["min"] * 4
    assert [layers[f"g_s.{k}"]["out_product"] for k in (1, 3, 5)] == ["shift"] * 3
    assert res["verify"]["mismatches"] == 0 and res["verify"]["pixels_checked"] == 32 * 32 * 3
    assert res["watermark"]["ber_memory_files"] == 0.0 and res["qat"]["ber_bundle"] == 0.0
    assert res["qonnx"] == {"skipped": "student.product = \"min\": QONNX has no operator for a signed-minimum product"}
    assert "not exported: student.product" in (tmp_path / "run" / "report" / "report.md").read_text()
