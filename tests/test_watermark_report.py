"""The watermark studies' reports (tables and plots) rebuilt from the committed benchmark
results: the rows the README quotes come out of the JSON with these numbers."""
import json
from pathlib import Path

from licforge.watermark.report import adversary_tables, markdown_tables, write_adversary_report, write_report

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"
PNG = b"\x89PNG\r\n\x1a\n"


def _rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|") and not set(line) <= set("|- ")]


def _row(rows: list[list[str]], *key: str) -> list[str]:
    hits = [r for r in rows if r[:len(key)] == list(key)]
    assert len(hits) == 1, (key, hits)
    return hits[0]


def test_adversary_tables_and_plots_from_the_committed_study(tmp_path):
    res = json.loads((RESULTS / "watermark_adversary.json").read_text())
    rows = _rows(adversary_tables(res))
    assert _row(rows, "exact CNN", "WaterMAS", "64 x12")[4:] == ["42 / 46", "0/30 / 0/30", "64 (p 1e-19)"]
    combined = _row(rows, "exact CNN", "WaterMAS 64 x12", "obfuscated + all three")
    assert combined[4:] == ["51.6 %", "0.0 %", "0.0 %", "100.0 %", "1e-19", "present"]
    assert _row(rows, "exact CNN", "WaterMAS 256 x3", "obfuscated + all three")[5:8] == ["1.6 %", "1.6 %", "100.0 %"]
    lic = _row(rows, "LIC N=16", "WaterMAS 256 x3", "obfuscated + all three")
    assert lic[3:] == ["25.4", "56.2 %", "0.0 %", "0.0 %", "100.0 %", "1e-77", "present"]
    paths = write_adversary_report(res, tmp_path / "adv.json")
    assert [p.name for p in paths] == ["adv.json", "adv_nulls.png", "adv_obfuscation.png", "adv_intercept.png"]
    assert json.loads(paths[0].read_text()) == res
    assert all(p.read_bytes()[:8] == PNG for p in paths[1:])


def test_removal_tables_and_plots_from_the_committed_study(tmp_path):
    res = json.loads((RESULTS / "watermark.json").read_text())
    rows = _rows(markdown_tables(res))
    assert _row(rows, "control (no watermark)", "8-bit")[2:4] == ["27.21", "0.3050"]
    assert _row(rows, "watermas 256 bits", "8-bit")[2:6] == ["26.57", "0.3062", "0.0 %", "0.0 %"]
    paths = write_report(res, tmp_path / "wm.json")
    assert {p.name for p in paths} >= {"wm.json", "wm_lic.png"}
    assert all(p.read_bytes()[:8] == PNG for p in paths if p.suffix == ".png")
