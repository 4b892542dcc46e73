"""The budget planner (``licforge plan``) and the model's costs of lanes and packing (numbers only)."""
import json

import pytest

from licforge.flows.cli import main
from licforge.quant.bundle import decoder_layers, read_bundle
from licforge.rtl.perf import frame_report, plan_for_target, target_sweep
from licforge.rtl.plan import LayerPlan, plan_decoder

BUNDLES = "models/checkpoints/bundles"


@pytest.fixture(scope="module")
def students():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / BUNDLES
    names = {16: "student_n16_photos_hybrid8", 32: "student_n32_hybrid8"}
    return {n: decoder_layers(read_bundle(root / names[n])) for n in (16, 32)}


def test_lanes_cost_by_rows_of_blocks():
    """A 16->16 convolution at PI=16, PO=4 (G = 4): a row of 120 input columns in blocks of 8
    lanes is 15 blocks of 9+6 (even row) and 6+4 (odd) taps per column phase pair; 7 lanes
    leave a ragged block (18 blocks); 16 lanes, more than 10 G / 2 = 20 cycles' worth of
    beats, are bound by the output stream (2 PP beats a block)."""
    p = LayerPlan("c", "conv_transpose2d", 16, 16, 0, 16, 4, 8, True)
    assert p.frame_cycles(1, 120) == 15 * 25 * 4 == 1500 and p.cycles_per_latent == 25 * 4 / 8
    assert LayerPlan("c", "conv_transpose2d", 16, 16, 0, 16, 4, 7).frame_cycles(1, 120) == 18 * 100
    wide = LayerPlan("c", "conv_transpose2d", 16, 16, 0, 16, 4, 16)
    assert wide.frame_cycles(1, 128) == 8 * (max(60, 32) + max(40, 32))
    assert LayerPlan("c", "conv_transpose2d", 16, 16, 0, 16, 16, 16).frame_cycles(1, 128) == 8 * (32 + 32)
    gdn = LayerPlan("g", "igdn", 16, 16, 1, 16, 1, 5, True, 10, 8)
    assert gdn.frame_cycles(1, 60) == 2 * (24 * 16) and gdn.multipliers == 16 * 5 + 5
    assert gdn.dsp_split == (0, 16 * 5 + 5)        # PO = 1: no gamma pairs; |x| of 10 bits: no lane pairs


def test_packing_halves_the_convolution_dsps():
    """Row pairs for even PO; an odd PO leaves a row that pairs across lanes, and an odd lane a lone product."""
    assert LayerPlan("c", "conv_transpose2d", 16, 16, 0, 16, 8, 1, True).dsp_split == (64, 0)
    assert LayerPlan("c", "conv_transpose2d", 16, 3, 3, 16, 3, 2, True).dsp_split == (16 * 3, 0)
    assert LayerPlan("c", "conv_transpose2d", 16, 3, 3, 16, 3, 3, True).dsp_split == (16 * 4, 16)
    assert LayerPlan("c", "conv_transpose2d", 16, 3, 3, 16, 3, 3, False).dsp_split == (0, 144)


def test_plan_decoder_keeps_the_channel_plan_and_adds_lanes_when_asked(students):
    """Without max_pp the plan is the channel-parallel one (the last layer cannot keep up); with
    lanes every layer keeps up with the heaviest."""
    layers = students[16]
    old = plan_decoder(layers, 16, 16)
    assert [(p.pi, p.po, p.pp) for p in old][-1] == (16, 3, 1) and old[-1].cycles_per_latent == 1600
    new = plan_decoder(layers, 16, 16, max_pp=8, pack=True)
    budget = new[4].cycles_per_latent
    assert budget == 400 and all(p.cycles_per_latent <= budget for p in new)
    assert (new[-1].pi, new[-1].po, new[-1].pp) == (16, 3, 4)
    assert frame_report(new, 1080, 1920)["dsp_efficiency_steady"] > 0.9


@pytest.mark.parametrize("n,fps,dsps", [(16, 30, 161), (32, 30, 518), (32, 60, 1022)])
def test_goals_1080p_within_the_zcu102(students, n, fps, dsps):
    """>= 62 Mpixel/s (1080p30) for N=16 and N=32, and 1080p60 for N=32, at 200 MHz within
    2,520 DSPs, DSP efficiency >= 90 %; the convolutions' 8x8 products two per DSP."""
    r = plan_for_target(students[n], fps=fps, height=1080, width=1920, dsp_budget=2520)
    assert r["ok"]
    rep = r["report"]
    print(n, fps, [(p.name, p.pi, p.po, p.pp) for p in r["plan"]], {k: rep[k] for k in ("dsps", "fps", "mpixel_s",
                                                                                        "dsp_efficiency_steady")})
    assert rep["fps"] >= fps and rep["mpixel_s"] >= 62 * fps / 30 and rep["dsp_efficiency_steady"] >= 0.9
    assert rep["dsps"] == dsps
    convs = [p for p in r["plan"] if p.op == "conv_transpose2d"]
    assert sum(p.dsps for p in convs) == sum(p.multipliers for p in convs) // 2


def test_plan_says_why_it_cannot(students):
    r = plan_for_target(students[32], fps=60, height=1080, width=1920, dsp_budget=600)
    assert not r["ok"] and r["binding"] == "g_s.4"
    assert r["reason"].startswith("cannot: 60 fps at 1920x1080 (200 MHz) needs 1022 DSPs, more than 600; the largest "
                                  "layer is g_s.4 (conv_transpose2d 32->32, 512 DSPs at PI=32 ")
    assert r["reason"].endswith(f"); possible with 1022 DSPs, or up to {r['max_fps']:.2f} fps within 600")
    assert 30 < r["max_fps"] < 60
    within = plan_for_target(students[32], fps=r["max_fps"], height=1080, width=1920, dsp_budget=600)
    assert within["ok"] and within["report"]["dsps"] <= 600
    r = plan_for_target(students[16], fps=120, height=1080, width=1920, dsp_budget=2520)
    assert not r["ok"] and r["binding"] == "g_s.6" and "limited by its one-pixel-a-beat stream" in r["reason"]
    assert r["max_fps"] == round(200e6 / (1088 * 1920), 2)


def test_cli_plan_table_json_and_refusals(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", f"{BUNDLES}/student_n16_photos_hybrid8", "--fps", "30", "--resolution", "1920x1080", "--dsp",
                 "2520", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| g_s.6 | conv_transpose2d | 16->3" in text and "total: 161 DSPs" in text and "30.64 fps" in text
    assert "assumed clock, not placed and routed" in text
    saved = json.loads(out.read_text())
    assert saved["ok"] and [p["pp"] for p in saved["plan"]][-1] == 2 and saved["report"]["dsps"] == 161
    assert main(["plan", "synthetic:16:16", "--fps", "300", "--resolution", "1920x1080", "--dsp", "2520"]) == 1
    line = capsys.readouterr().out.strip()
    assert line.startswith("cannot: 300 fps at 1920x1080 (200 MHz): layer g_s.6") and "\n" not in line
    assert main(["plan", "synthetic:16:16", "--fps", "30", "--resolution", "1920-1080", "--dsp", "9"]) == 2
    assert "--resolution must be WxH" in capsys.readouterr().err


def test_target_sweep_rows(students):
    rows = target_sweep(students[16], targets=[("1080p", 30.0)])
    assert [(r["pack"], r["ok"]) for r in rows] == [(True, True), (False, True)]
    assert rows[0]["report"]["dsps"] < rows[1]["report"]["dsps"] == rows[1]["report"]["multipliers"]


def test_zero_dsp_budget_fits_only_a_minconv_decoder(students, capsys):
    """--dsp 0: the MinConv bundle's plan uses no DSP; the multiplier bundle is refused by name,
    with each layer's least DSP count (one product at PI = PO = PP = 1; a GDN's norm and output)."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / BUNDLES
    mins = decoder_layers(read_bundle(root / "student_n16_min_hybrid8"))
    r = plan_for_target(mins, fps=30, height=1080, width=1920, dsp_budget=0)
    assert r["ok"] and r["report"]["dsps"] == 0 and r["report"]["fps"] >= 30
    r = plan_for_target(students[16], fps=30, height=1080, width=1920, dsp_budget=0)
    assert not r["ok"] and r["max_fps"] == 0.0 and r["binding"] == "g_s.1"
    assert r["reason"] == ("cannot: 30 fps at 1920x1080 (200 MHz) within 0 DSPs: the decoder needs at least 10 at "
                           "any speed (g_s.0 1, g_s.1 2, g_s.2 1, g_s.3 2, g_s.4 1, g_s.5 2, g_s.6 1: multiplier "
                           "products); a MinConv bundle (product min) needs none")
    assert main(["plan", "synthetic:16:16", "--fps", "30", "--resolution", "1920x1080", "--dsp", "-1"]) == 2
    assert "--dsp must be at least 0, not -1" in capsys.readouterr().err
