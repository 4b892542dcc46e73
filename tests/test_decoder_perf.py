"""Parallelism plan and analytical performance model of the decoder (numbers only)."""
import numpy as np
import pytest

from licforge.rtl.perf import frame_report, frame_timeline, useful_macs
from licforge.quant.golden import conv_transpose2d_int
from licforge.quant.bundle import decoder_layers
from licforge.quant.synthetic import random_decoder_bundle
from licforge.rtl.plan import LayerPlan, default_parallelism, plan_decoder


@pytest.fixture(scope="module")
def layers16():
    return decoder_layers(random_decoder_bundle(16, 24, seed=0))


def test_plan_balances_every_layer_against_the_heaviest(layers16):
    plan = plan_decoder(layers16, 8, 8)
    assert [(p.name, p.pi, p.po) for p in plan] == [
        ("g_s.0", 6, 1), ("g_s.1", 1, 1), ("g_s.2", 16, 1), ("g_s.3", 4, 1), ("g_s.4", 8, 8), ("g_s.5", 16, 1),
        ("g_s.6", 16, 3)]
    budget = plan[4].cycles_per_latent
    assert budget == 16 * 25 * 2 * 2
    assert all(p.cycles_per_latent <= budget for p in plan)
    assert [p.multipliers for p in plan] == [6, 2, 16, 5, 64, 17, 48]
    assert default_parallelism(layers16) == (8, 8) and default_parallelism(layers16, 4) == (4, 4)


def test_plan_names_the_layer_and_the_valid_values(layers16):
    with pytest.raises(ValueError, match=r"--po must divide the 16 output channels of the heaviest layer "
                                         r"'g_s.4': one of \[1, 2, 4, 8, 16\], not 3"):
        plan_decoder(layers16, 4, 3)


def test_a_layer_that_cannot_keep_up_gets_full_parallelism():
    layers = decoder_layers(random_decoder_bundle(16, 16, seed=0))
    plan = plan_decoder(layers, 16, 16)  # the 16->3 layer would need 192 multipliers; it has 48
    assert (plan[-1].pi, plan[-1].po) == (16, 3)
    assert plan[-1].cycles_per_latent == 1600 > plan[4].cycles_per_latent == 400


def test_useful_macs_count_only_taps_inside_the_frame():
    plan = [LayerPlan("c", "conv_transpose2d", 2, 3, 0, 1, 1)]
    h, w = 3, 5
    ones = conv_transpose2d_int(np.ones((1, 2, h, w)), np.ones((2, 3, 5, 5)), 2, 2, 1)
    assert useful_macs(plan, h, w) == int(ones.sum()) == (5 * h - 3) * (5 * w - 3) * 2 * 3


def test_frame_report_1080p(layers16):
    r = frame_report(plan_decoder(layers16, 8, 8), 1080, 1920)
    assert r["latents"] == [68, 120] and r["decoded"] == [1088, 1920]
    assert r["multipliers"] == 158
    assert r["cycles_steady"] == 1600 * 68 * 120
    assert 1.0 < r["cycles"] / r["cycles_steady"] < 1.05     # fill and drain: a few latent rows
    assert r["fps"] == round(200e6 / r["cycles_steady"], 2) == 15.32
    assert r["fps_single_frame"] == round(200e6 / r["cycles"], 2) < r["fps"]
    assert r["dsp_efficiency_steady"] > 0.9


def test_timeline_of_a_single_engine_is_its_schedule():
    """One engine, input all present: the first pair waits for 2 rows (w*GI cycles each)."""
    p = LayerPlan("c", "conv_transpose2d", 4, 4, 0, 2, 2)
    t = frame_timeline([p], 3, 5)
    gi, g = 2, 4
    first = 2 * 5 * gi + 1              # rows 0 and 1 written, then one cycle to start
    assert t["cycles"] == first + 3 * 25 * 5 * g + 8 + 1  # three pairs, engine latency 7 + log2(2)


def test_lut_weights_fit_recovers_the_weights_that_made_the_counts():
    """fit_lut_weights on LUT counts made by known weights gives those weights back (multiplier
    layers first, then the MinConv weights with the others fixed); a weight whose feature never
    occurs keeps its current value; a layer without LUTs is refused."""
    from licforge.rtl.perf import LUT_WEIGHTS, fit_lut_weights, layer_luts

    truth = {"base": 50.0, "adder_bits": 0.8, "dot_products": 60.0, "rom_bits": 0.5, "lane_mux_bits": 0.4,
             "queue_bits": 1.5, "input_bits": 0.7, "comparator_bits": 2.0, "shifter_bits": 0.25}
    plans = [LayerPlan("c", "conv_transpose2d", cin, cout, 0, pi, po, pp, pack)
             for cin, cout, pi, po, pp, pack in [(16, 16, 16, 2, 1, False), (16, 16, 8, 1, 1, True), (24, 16, 6, 1, 1, False),
                                                 (16, 3, 16, 3, 2, True), (32, 32, 16, 4, 2, True), (64, 64, 64, 1, 1, False),
                                                 (128, 3, 2, 3, 1, False), (16, 16, 4, 4, 4, True)]]
    plans += [LayerPlan("g", "igdn", c, c, 1, pi, po, pp) for c, pi, po, pp in [(16, 1, 1, 1), (32, 16, 2, 3), (64, 4, 1, 1)]]
    mins = [LayerPlan("m", "conv_transpose2d", 16, 16, 0, 16, po, product="min") for po in (1, 2, 4)]
    mins += [LayerPlan("n", "igdn", 16, 16, 1, pi, 1, product="min", out_product="shift") for pi in (4, 8, 16)]
    points = [(p, float(layer_luts(p, truth))) for p in plans + mins]
    fitted = fit_lut_weights(points)
    assert fitted == pytest.approx(truth, rel=0.02, abs=0.005)   # the counts are rounded to whole LUTs
    only_mul = fit_lut_weights(points[:len(plans)])
    assert (only_mul["comparator_bits"], only_mul["shifter_bits"]) == (LUT_WEIGHTS["comparator_bits"],
                                                                        LUT_WEIGHTS["shifter_bits"])
    with pytest.raises(ValueError, match="positive LUT count"):
        fit_lut_weights([(plans[0], 0.0)])
