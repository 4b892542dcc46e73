"""Simulate a chain of bundle layers in RTL (an engine, a GDN unit, the whole decoder) on its
generated Verilog inside :mod:`sim.harness`, checked by :mod:`sim.tb_layer_chain`.

Builds are reused: the Verilog in a ``work`` directory is rewritten only when its text
changes, so that several stimuli (seeds, frame sizes, back-pressure) share one Verilator
build there; given ``cache_dir``, the build comes from :func:`sim.runner.run_cocotb`'s cache
instead, shared by every ``work`` directory.
"""
from __future__ import annotations

import filecmp
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from licforge.rtl.emit import write_verilog
from .harness import HARNESS_TOP, STIMULUS_FILE, harness_verilog, write_stimulus
from .runner import SimResult, run_cocotb

__all__ = ["generate_sources", "simulate_chain"]


def _sync(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        target = dst / f.name
        if not target.exists() or not filecmp.cmp(f, target, shallow=False):
            shutil.copyfile(f, target)


def generate_sources(component, rtl_dir: Path, *, depth: int, frame_ports: bool) -> list[Path]:
    """Verilog of ``component`` (module ``top``), its ROM files and the harness in ``rtl_dir``;
    files whose text did not change keep their time stamps (no rebuild)."""
    rtl_dir = Path(rtl_dir)
    with tempfile.TemporaryDirectory() as tmp:
        sources = write_verilog(component, "top", Path(tmp))
        in_bits, out_bits = len(component.i.payload.as_value()), len(component.o.payload.as_value())
        (Path(tmp) / "harness.v").write_text(harness_verilog(in_bits=in_bits, out_bits=out_bits, depth=depth,
                                                             frame_ports=frame_ports))
        _sync(Path(tmp), rtl_dir)
        return [rtl_dir / s.name for s in sources] + [rtl_dir / "harness.v"]


def simulate_chain(component, bundle_dir: Path, layers: list[str], x: np.ndarray, *, work: Path,
                   timeout_cycles: int, frame_ports: bool = True, seed: int = 0, p_valid: float = 1.0,
                   p_ready: float = 1.0, simulator: str = "verilator", depth: int | None = None,
                   run_name: str | None = None, cache_dir: Path | None = None) -> SimResult:
    """Stream ``x`` (frames, C, H, W) through ``component`` (frames back to back, one size) and
    compare with the golden model of ``layers`` of the bundle at ``bundle_dir``; returns the
    testbench's report (mismatches, cycles, simulated cycles per second) with ``run_dir``
    added (``outputs.npy`` is there).  The simulator is built in ``work/build_<simulator>``, or
    taken from the build cache ``cache_dir``."""
    x = np.asarray(x, np.int64)
    n_in = x.shape[0] * x.shape[2] * x.shape[3]
    depth = depth or max(1024, 1 << (n_in - 1).bit_length())
    if n_in > depth:
        raise ValueError(f"{n_in} input beats exceed the harness depth {depth}")
    work = Path(work)
    sources = generate_sources(component, work / "rtl", depth=depth, frame_ports=frame_ports)
    run_dir = work / (run_name or f"run_{simulator}_{seed}")
    run_dir.mkdir(parents=True, exist_ok=True)
    for hexfile in (work / "rtl").glob("*.hex"):
        shutil.copyfile(hexfile, run_dir / hexfile.name)
    in_bits = len(component.i.payload.as_value()) // x.shape[1]
    write_stimulus(run_dir / STIMULUS_FILE, x, in_bits)
    params = {"bundle": str(Path(bundle_dir).resolve()), "layers": list(layers), "frame": frame_ports,
              "seed": seed, "p_valid": p_valid, "p_ready": p_ready, "timeout_cycles": int(timeout_cycles)}
    np.savez(run_dir / "stimulus.npz", x=x, params=json.dumps(params))
    res = run_cocotb(sources=sources, toplevel=HARNESS_TOP, test_module="licforge.sim.tb_layer_chain",
                     build_dir=None if cache_dir is not None else work / f"build_{simulator}", cache_dir=cache_dir,
                     test_dir=run_dir, tb_input=run_dir / "stimulus.npz", simulator=simulator, seed=seed)
    res.report["run_dir"] = str(run_dir)
    return res
