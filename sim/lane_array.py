"""Simulate a LaneArray (MinConvArray / MacArray) on its generated Verilog with cocotb."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from licforge.rtl.emit import write_verilog
from licforge.rtl.lane_array import LaneArray
from licforge.errors import UsageError, need_int

from .runner import SimResult, run_cocotb
from .stimulus import extreme_ints

__all__ = ["LaneArrayConfig", "simulate_lane_array", "lane_array_golden", "extreme_vectors", "layer_array_config",
           "layer_stimulus", "layer_output_from_dots", "array_config", "generate_array", "random_array_check"]


@dataclass(frozen=True)
class LaneArrayConfig:
    """Constructor arguments of :class:`rtl.lane_array.LaneArray`."""
    lanes: int
    bits: int
    op: str
    shift: int
    out_bits: int
    max_beats: int = 64
    x_shift: int = 0
    w_shift: int = 0
    relu: bool = False
    split: bool = False

    @property
    def name(self) -> str:
        kind = "minconv" if self.op == "min" else "mac"
        return (f"{kind}_l{self.lanes}_b{self.bits}_s{self.shift}_o{self.out_bits}"
                f"_x{self.x_shift}_w{self.w_shift}_r{int(self.relu)}_m{self.max_beats}{'_split' if self.split else ''}")

    def build(self) -> LaneArray:
        return LaneArray(self.lanes, self.bits, self.op, shift=self.shift, out_bits=self.out_bits,
                         max_beats=self.max_beats, x_shift=self.x_shift, w_shift=self.w_shift,
                         relu=self.relu, split=self.split)


def extreme_vectors(rng: np.random.Generator, dots: int, beats: int, lanes: int,
                    bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Operands x, w of shape (dots, beats, lanes) from :func:`sim.stimulus.extreme_ints`; with
    three dots or more, the first three are whole dot products of extremes (x, w all -2^(b-1);
    -2^(b-1) and 2^(b-1)-1; all 2^(b-1)-1), to hit the accumulator's corners."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    x, w = (extreme_ints(rng, (dots, beats, lanes), bits) for _ in range(2))
    if dots >= 3:
        x[0], w[0] = lo, lo
        x[1], w[1] = lo, hi
        x[2], w[2] = hi, hi
    return x, w


def lane_array_golden(cfg: LaneArrayConfig, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """What ``cfg``'s array outputs for operands ``x``, ``w`` (dots, beats, lanes): one integer
    per dot product (:func:`quant.golden.dot_requant`)."""
    from licforge.quant.golden import dot_requant

    dots = x.shape[0]
    return dot_requant(np.asarray(x, np.int64).reshape(dots, -1), np.asarray(w, np.int64).reshape(dots, -1), cfg.op,
                       shift=cfg.shift, out_bits=cfg.out_bits, x_shift=cfg.x_shift, w_shift=cfg.w_shift, relu=cfg.relu)


def simulate_lane_array(cfg: LaneArrayConfig, x: np.ndarray, w: np.ndarray, work: Path, *, seed: int = 0,
                        p_valid: float = 1.0, p_ready: float = 1.0, simulator: str = "verilator",
                        cache_dir: Path | None = None) -> SimResult:
    """Generate ``cfg``'s Verilog, stream ``x``/``w`` (dots, beats, lanes) through it and
    compare every output with the golden model; returns the testbench's report.  The
    simulator is built in ``work/build_<simulator>``, or taken from the build cache ``cache_dir``."""
    if x.shape != w.shape or x.ndim != 3 or x.shape[2] != cfg.lanes:
        raise ValueError(f"x and w must both have shape (dots, beats, {cfg.lanes}); got {x.shape}, {w.shape}")
    if x.shape[1] > cfg.max_beats:
        raise ValueError(f"{x.shape[1]} beats per dot product exceed max_beats={cfg.max_beats}")
    work = Path(work)
    rtl_dir = work / "rtl"
    sources = write_verilog(cfg.build(), "top", rtl_dir)
    run_dir = work / f"run_{simulator}_{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    params = {**asdict(cfg), "seed": seed, "p_valid": p_valid, "p_ready": p_ready}
    np.savez(run_dir / "stimulus.npz", x=x, w=w, expected=lane_array_golden(cfg, x, w), params=json.dumps(params))
    return run_cocotb(sources=sources, toplevel="top", test_module="licforge.sim.tb_lane_array",
                      build_dir=None if cache_dir is not None else work / f"build_{simulator}",
                      cache_dir=cache_dir, test_dir=run_dir,
                      tb_input=run_dir / "stimulus.npz", simulator=simulator, seed=seed,
                      cycles=int(x.shape[0] * x.shape[1] / min(p_valid, p_ready)))


def layer_array_config(layer, lanes: int) -> LaneArrayConfig:
    """The LaneArray that computes a bundle ``conv2d``/``linear`` layer, ``lanes`` wide."""
    a = layer.attrs
    fan_in = int(np.prod(layer.tensors["weight"].shape[1:]))
    return LaneArrayConfig(lanes=lanes, bits=max(a["x_bits"], a["w_bits"]), op=a["product"],
                           shift=a["shift"], out_bits=a["out_bits"], max_beats=-(-fan_in // lanes),
                           x_shift=a["x_shift"], w_shift=a["w_shift"], relu=bool(a["relu"]))


def layer_stimulus(layer, x_int: np.ndarray, lanes: int) -> tuple[np.ndarray, np.ndarray]:
    """Operands that make a LaneArray compute bundle layer ``layer`` on ``x_int``: one dot
    product per (image, output position, output channel), in that order, zero-padded to whole
    beats.  Returns x, w of shape (dots, beats, lanes)."""
    from licforge.quant.golden import im2col

    w = np.asarray(layer.tensors["weight"], np.int64)
    o = w.shape[0]
    if layer.op == "conv2d":
        cols = im2col(x_int, w.shape[-1], layer.attrs["stride"], layer.attrs["padding"])
    elif layer.op == "linear":
        cols = np.asarray(x_int, np.int64)[:, None, :]
    else:
        raise ValueError(f"layer {layer.name!r} ({layer.op}) is not a dot-product layer")
    n, positions, k = cols.shape
    wf = w.reshape(o, k)
    beats = -(-k // lanes)
    pad = beats * lanes - k
    xs = np.broadcast_to(cols[:, :, None, :], (n, positions, o, k)).reshape(-1, k)
    ws = np.broadcast_to(wf[None, None], (n, positions, o, k)).reshape(-1, k)
    xs, ws = (np.pad(a, ((0, 0), (0, pad))).reshape(-1, beats, lanes) for a in (xs, ws))
    return xs, ws


def layer_output_from_dots(layer, dots: np.ndarray, n: int, out_hw: tuple[int, int] | None) -> np.ndarray:
    """Reshape per-dot outputs (image, position, channel order) back to NCHW / (n, o)."""
    o = layer.tensors["weight"].shape[0]
    if layer.op == "linear":
        return np.asarray(dots, np.int64).reshape(n, o)
    ho, wo = out_hw
    return np.asarray(dots, np.int64).reshape(n, ho, wo, o).transpose(0, 3, 1, 2)


def array_config(kind: str, lanes: int, bits: int, shift: int | None = None,
                 out_bits: int | None = None, max_beats: int = 64, split: bool = False) -> LaneArrayConfig:
    """Config of a MinConvArray (``kind="minconv"``) or MacArray (``"mac"``; ``split``: two-stage
    products) for the CLI and benchmarks: by default the output keeps ``bits`` bits after
    dropping ``bits`` bits."""
    if kind not in ("minconv", "mac"):
        raise UsageError(f"array kind must be 'minconv' or 'mac', not {kind!r}")
    if split and kind != "mac":
        raise UsageError("--split-products splits multipliers: a 'mac' array, not a comparator array")
    need_int(lanes, "--lanes", 1, 1024)
    need_int(bits, "--bits", 2, 32)
    out_bits = bits if out_bits is None else need_int(out_bits, "--out-bits", 1, 32)
    shift = bits if shift is None else need_int(shift, "--shift", -32, 63)
    need_int(max_beats, "--max-beats", 1, 1 << 20)
    return LaneArrayConfig(lanes=lanes, bits=bits, op="min" if kind == "minconv" else "mul",
                           shift=shift, out_bits=out_bits, max_beats=max_beats, split=split)


def generate_array(cfg: LaneArrayConfig, out_dir: Path) -> list[Path]:
    """Write the array's Verilog (top module ``top``) and a manifest into ``out_dir``."""
    out_dir = Path(out_dir)
    array = cfg.build()
    sources = write_verilog(array, "top", out_dir)
    (out_dir / "manifest.json").write_text(json.dumps(
        {"design": cfg.name, "config": cfg.__dict__, "sources": [s.name for s in sources],
         "latency_cycles": array.latency, "accumulator_bits": array.acc_bits}, indent=1))
    return sources


def random_array_check(cfg: LaneArrayConfig, dots: int, beats: int, seed: int, work: Path,
                       simulator: str = "verilator", p_valid: float = 0.8, p_ready: float = 0.7) -> SimResult:
    """Random vectors with extreme values through ``cfg``'s RTL with random bubbles and
    back-pressure; returns the SimResult (mismatches in ``report``)."""
    rng = np.random.default_rng(seed)
    x, w = extreme_vectors(rng, dots, beats, cfg.lanes, cfg.bits)
    return simulate_lane_array(cfg, x, w, work, seed=seed, p_valid=p_valid, p_ready=p_ready, simulator=simulator)
