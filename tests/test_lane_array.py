"""MinConvArray / MacArray RTL (generated Verilog, cocotb) == golden model, zero mismatches."""
import dataclasses
import json
import re

import numpy as np
import pytest

from licforge.quant.digits import input_to_int, run_digits_golden
from licforge.sim.lane_array import (LaneArrayConfig, extreme_vectors, lane_array_golden, layer_array_config,
                                     layer_output_from_dots, layer_stimulus, simulate_lane_array)
from licforge.sim.runner import SimulationFailed, build_key, run_cocotb
from helpers import require_simulator

SIMULATORS = ["verilator", "icarus"]

CONFIGS = [
    LaneArrayConfig(lanes=8, bits=8, op="min", shift=5, out_bits=8, max_beats=8, x_shift=1),
    LaneArrayConfig(lanes=8, bits=8, op="mul", shift=9, out_bits=8, max_beats=8),
    LaneArrayConfig(lanes=5, bits=4, op="min", shift=2, out_bits=4, max_beats=8, w_shift=2, relu=True),
    LaneArrayConfig(lanes=3, bits=4, op="mul", shift=-1, out_bits=10, max_beats=8),
    # two-stage products (the multiplier from LUTs): an even and an odd operand width
    LaneArrayConfig(lanes=8, bits=8, op="mul", shift=9, out_bits=8, max_beats=8, split=True),
    LaneArrayConfig(lanes=3, bits=5, op="mul", shift=0, out_bits=10, max_beats=8, split=True),
]


@pytest.mark.parametrize("simulator", SIMULATORS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
def test_random_vectors_with_extremes(cfg, simulator, tmp_path, sim_cache):
    require_simulator(simulator)
    seed = 1234
    x, w = extreme_vectors(np.random.default_rng(seed), dots=600, beats=cfg.max_beats, lanes=cfg.lanes, bits=cfg.bits)
    lo, hi = -(1 << (cfg.bits - 1)), (1 << (cfg.bits - 1)) - 1
    assert (x == lo).any() and (x == hi).any() and (x == 0).any()
    r = simulate_lane_array(cfg, x, w, tmp_path, seed=seed, p_valid=0.7, p_ready=0.6, simulator=simulator,
                            cache_dir=sim_cache)
    print(f"seed {seed}: {r.report['checked']} dots, {r.report['mismatches']} mismatches, {r.report['cycles']} cycles")
    assert r.report["checked"] == 600 and r.report["mismatches"] == 0
    # saturation is exercised: some outputs sit at the rails
    outs = np.array(r.report["outputs"])
    assert (outs == (1 << (cfg.out_bits - 1)) - 1).any()


def test_checker_reports_a_wrong_golden(tmp_path, sim_cache):
    """The testbench must fail when RTL and reference disagree (here: the reference is told
    a different shift than the RTL was built with)."""
    cfg = CONFIGS[1]
    x, w = extreme_vectors(np.random.default_rng(0), dots=50, beats=2, lanes=cfg.lanes, bits=cfg.bits)
    from licforge.rtl.emit import write_verilog
    sources = write_verilog(cfg.build(), "top", tmp_path / "rtl")
    params = {**cfg.__dict__, "seed": 0, "p_valid": 1.0, "p_ready": 1.0}
    wrong = lane_array_golden(dataclasses.replace(cfg, shift=cfg.shift + 1), x, w)
    assert not np.array_equal(wrong, lane_array_golden(cfg, x, w))
    np.savez(tmp_path / "stim.npz", x=x, w=w, expected=wrong, params=json.dumps(params))
    with pytest.raises(SimulationFailed):
        run_cocotb(sources=sources, toplevel="top", test_module="licforge.sim.tb_lane_array", cache_dir=sim_cache,
                   test_dir=tmp_path / "run", tb_input=tmp_path / "stim.npz", cycles=100)
    report = json.loads((tmp_path / "run" / "tb_lane_array.verilator.result.json").read_text())
    assert report["mismatches"] > 0
    # a 100-cycle simulation: the model's C++ was compiled with -O0, in an entry of its own
    log = (sim_cache / f"verilator-{build_key(sources, 'top', 'verilator', fast=True)[:32]}" / "build.log").read_text()
    model = [line.split() for line in log.splitlines() if " c++ " in line and re.search(r"/?Vtop\S*\.cpp$", line)]
    assert model and all("-O0" in cmd and "-Os" not in cmd for cmd in model)


def test_classifier_first_layer_through_rtl_gives_golden_class_scores(digits_models, digits_bundle, tmp_path,
                                                                      sim_cache):
    require_simulator("verilator")
    _, _, xte, yte = digits_models.split
    xte, yte = xte[:90], yte[:90]   # a quarter of the held-out digits: 92,160 dot products
    x_int = input_to_int((xte * 16).round().long().numpy(), digits_bundle.input)
    layer = digits_bundle.layers[0]
    cfg = layer_array_config(layer, lanes=8)
    assert cfg.op == "min"
    xs, ws = layer_stimulus(layer, x_int, 8)
    assert xs.shape == (90 * 64 * 8, 2, 8)
    r = simulate_lane_array(cfg, xs, ws, tmp_path, seed=7, cache_dir=sim_cache)
    assert r.report["mismatches"] == 0
    y1 = layer_output_from_dots(layer, np.array(r.report["outputs"]), len(x_int), (8, 8))
    logits_rtl = run_digits_golden(digits_bundle, y1, start=1)
    logits = run_digits_golden(digits_bundle, x_int)
    assert np.array_equal(logits_rtl, logits)
    assert (logits_rtl.argmax(1) == yte.numpy()).mean() == (logits.argmax(1) == yte.numpy()).mean()


def test_classifier_second_layer_real_vectors_with_back_pressure(digits_bundle, digits_models, tmp_path, sim_cache):
    require_simulator("verilator")
    _, _, xte, _ = digits_models.split
    x_int = input_to_int((xte[:12] * 16).round().long().numpy(), digits_bundle.input)
    h1 = run_digits_golden(digits_bundle, x_int, upto=1)
    layer = digits_bundle.layers[1]
    cfg = layer_array_config(layer, lanes=16)
    xs, ws = layer_stimulus(layer, h1, 16)
    assert xs.shape[1] == 5  # 72-long dot products in 16-lane beats
    r = simulate_lane_array(cfg, xs, ws, tmp_path, seed=3, p_valid=0.8, p_ready=0.5, cache_dir=sim_cache)
    assert r.report["mismatches"] == 0
    h2 = layer_output_from_dots(layer, np.array(r.report["outputs"]), len(h1), (4, 4))
    assert np.array_equal(h2, run_digits_golden(digits_bundle, h1, start=1, upto=2))


def test_split_products_are_refused_for_comparators():
    """A split product is a multiplier from LUTs: a comparator array refuses it by name, and the
    split MacArray takes one cycle more than the one-stage one."""
    from licforge.errors import UsageError
    from licforge.rtl.lane_array import LaneArray
    from licforge.sim.lane_array import array_config

    with pytest.raises(ValueError, match="op 'mul', not 'min'"):
        LaneArray(4, 8, "min", shift=0, out_bits=8, split=True)
    with pytest.raises(UsageError, match="a 'mac' array, not a comparator array"):
        array_config("minconv", 4, 8, split=True)
    for split, latency in ((True, 7), (False, 6)):
        array = LaneArray(8, 8, "mul", shift=0, out_bits=8, split=split)
        array._MustUse__silence = True   # only its latency is read
        assert array.latency == latency
