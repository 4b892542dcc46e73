"""Simulate a chain of bundle layers in RTL (an engine, a GDN unit, the whole decoder) on its
generated Verilog inside :mod:`sim.harness`, checked by :mod:`sim.tb_layer_chain`.

Builds are reused: the Verilog in a ``work`` directory is rewritten only when its text
changes, so that several stimuli (seeds, frame sizes, back-pressure) share one Verilator
build there; given ``cache_dir``, the build comes from :func:`sim.runner.run_cocotb`'s cache
instead, shared by every ``work`` directory.  A component is converted to Verilog once (the
files are kept while the component object lives): a whole decoder takes seconds to convert.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import weakref
from pathlib import Path

import numpy as np

from licforge.rtl.emit import write_verilog
from .harness import HARNESS_TOP, STIMULUS_FILE, harness_verilog, write_stimulus
from .runner import SimResult, run_cocotb

__all__ = ["generate_sources", "simulate_chain"]


#: the generated files of each component converted so far, by name (the component is the key)
_GENERATED: "weakref.WeakKeyDictionary[object, tuple[list[str], dict[str, bytes]]]" = weakref.WeakKeyDictionary()


def _verilog_files(component) -> tuple[list[str], dict[str, bytes]]:
    """(Verilog source names, every file by name) of ``component`` as module ``top``."""
    if component not in _GENERATED:
        with tempfile.TemporaryDirectory() as tmp:
            sources = write_verilog(component, "top", Path(tmp))
            _GENERATED[component] = ([s.name for s in sources],
                                     {f.name: f.read_bytes() for f in Path(tmp).iterdir()})
    return _GENERATED[component]


def generate_sources(component, rtl_dir: Path, *, depth: int, frame_ports: bool) -> list[Path]:
    """Verilog of ``component`` (module ``top``), its ROM files and the harness in ``rtl_dir``
    (``frame_ports``: drive the component's ``width``/``height`` ports, those it has);
    files whose text did not change keep their time stamps (no rebuild)."""
    rtl_dir = Path(rtl_dir)
    names, files = _verilog_files(component)
    in_bits, out_bits = len(component.i.payload.as_value()), len(component.o.payload.as_value())
    ports = tuple(n for n in ("width", "height") if n in component.signature.members) if frame_ports else ()
    harness = harness_verilog(in_bits=in_bits, out_bits=out_bits, depth=depth, frame_ports=ports).encode()
    rtl_dir.mkdir(parents=True, exist_ok=True)
    for name, data in {**files, "harness.v": harness}.items():
        target = rtl_dir / name
        if not target.exists() or target.read_bytes() != data:
            target.write_bytes(data)
    return [rtl_dir / n for n in names] + [rtl_dir / "harness.v"]


def _reference(bundle_dir: Path, layers: list[str], x: np.ndarray) -> tuple[np.ndarray, bool, int]:
    """Golden output of the chain ``layers`` of the bundle at ``bundle_dir`` on ``x``, whether
    it is signed, and its bit width."""
    from licforge.quant.bundle import read_bundle
    from licforge.quant.golden import run_layers

    bundle = read_bundle(bundle_dir)
    chain = [bundle.layer(n) for n in layers]
    last = chain[-1].attrs
    return run_layers(chain, x), bool(last.get("out_signed", True)), int(last["out_bits"])


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
    expected, out_signed, out_bits = _reference(bundle_dir, layers, x)
    params = {"bundle": str(Path(bundle_dir).resolve()), "layers": list(layers), "frame": frame_ports,
              "seed": seed, "p_valid": p_valid, "p_ready": p_ready, "timeout_cycles": int(timeout_cycles),
              "out_signed": out_signed, "out_bits": out_bits}
    np.savez(run_dir / "stimulus.npz", x=x, expected=expected, params=json.dumps(params))
    res = run_cocotb(sources=sources, toplevel=HARNESS_TOP, test_module="licforge.sim.tb_layer_chain",
                     build_dir=None if cache_dir is not None else work / f"build_{simulator}", cache_dir=cache_dir,
                     test_dir=run_dir, tb_input=run_dir / "stimulus.npz", simulator=simulator, seed=seed,
                     cycles=int(timeout_cycles))
    res.report["run_dir"] = str(run_dir)
    return res
