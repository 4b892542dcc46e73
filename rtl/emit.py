"""Verilog emission: Amaranth -> Verilog, with weight memories as ``$readmemh`` files.

A read-only :class:`amaranth.lib.memory.Memory` (initial contents, no write port) is turned
by :class:`ReadmemhPlatform` into an instance of ``licforge_rom`` whose contents are a hex
file written beside the Verilog, so the weights of a deployed design can be read back from
the files (and Vivado/Yosys infer block or distributed ROM from them).  Memories with write
ports (line buffers) stay ordinary inferred RAMs.  Simulation with Amaranth's simulator
needs no platform and uses the same ``Memory`` directly.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from amaranth import ClockSignal, Instance, Module, Shape
from amaranth.back import verilog
from amaranth.lib.memory import Memory

__all__ = ["ReadmemhPlatform", "write_verilog", "ROM_MODULE", "ROM_PORTS", "ROM_VERILOG", "rom_file_attr", "read_hex"]

ROM_MODULE = "licforge_rom"
ROM_PORTS = """\
module licforge_rom #(
    parameter WIDTH = 8,
    parameter DEPTH = 16,
    parameter ABITS = 4,
    parameter INIT_FILE = ""
) (
    input  wire             clk,
    input  wire             en,
    input  wire [ABITS-1:0] addr,
    output reg  [WIDTH-1:0] data
);
"""
"""The header of every ``licforge_rom`` module (its parameters and ports): a ROM of ``DEPTH``
words of ``WIDTH`` bits whose ``data`` is the word at ``addr`` one cycle after ``en``."""
ROM_VERILOG = """\
// licforge_rom: synchronous-read ROM initialised from a $readmemh file (one word a line).
""" + ROM_PORTS + """\
    reg [WIDTH-1:0] mem [0:DEPTH-1];
    initial $readmemh(INIT_FILE, mem);
    always @(posedge clk) if (en) data <= mem[addr];
endmodule
"""
_INIT_ATTR = "licforge_init_file"


def rom_file_attr(name: str) -> dict[str, str]:
    """Memory ``attrs`` that name the hex file a ROM is written to (``<name>.hex``)."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"ROM name {name!r} must be letters, digits, '_', '.', '-'")
    return {_INIT_ATTR: f"{name}.hex"}


def _word(value: int, width: int) -> str:
    return format(value & ((1 << width) - 1), f"0{(width + 3) // 4}x")


def read_hex(path: Path, width: int, signed: bool = True) -> list[int]:
    """Words of a ``$readmemh`` file, as (signed) integers of ``width`` bits."""
    out = []
    for n, line in enumerate(Path(path).read_text().split("\n"), 1):
        line = line.split("//")[0].strip()
        if not line:
            continue
        try:
            v = int(line, 16)
        except ValueError:
            raise ValueError(f"{path}:{n}: not a hex word: {line!r}") from None
        if v >> width:
            raise ValueError(f"{path}:{n}: word {line} is wider than {width} bits")
        out.append(v - (1 << width) if signed and v >> (width - 1) else v)
    return out


class ReadmemhPlatform:
    """Elaboration platform whose ``get_memory`` writes ROM contents to hex files."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.roms: dict[str, dict] = {}

    def get_memory(self, memory: Memory):
        init_file = memory.attrs.get(_INIT_ATTR)
        if memory.write_ports or init_file is None:
            return Memory.elaborate(memory, None)
        if init_file in self.roms:
            raise ValueError(f"two ROMs write the same init file {init_file}")
        shape = Shape.cast(memory.shape)
        width, depth = shape.width, memory.depth
        words = [_word(int(v), width) for v in memory.init]
        (self.out_dir / init_file).write_text("\n".join(words) + "\n")
        self.roms[init_file] = {"width": width, "depth": depth, "signed": shape.signed}
        m = Module()
        abits = max(1, (depth - 1).bit_length())
        for k, port in enumerate(memory.read_ports):
            if port.domain == "comb":
                raise ValueError(f"ROM {init_file}: asynchronous read ports are not supported")
            m.submodules[f"rom{k}"] = Instance(
                ROM_MODULE, p_WIDTH=width, p_DEPTH=depth, p_ABITS=abits, p_INIT_FILE=init_file,
                i_clk=ClockSignal(port.domain), i_en=port.en, i_addr=port.addr, o_data=port.data)
        return m


def write_verilog(component, name: str, out_dir: Path) -> list[Path]:
    """Write ``<name>.v``, every ROM's hex file, ``roms.json`` (the ROM map: file -> width,
    depth, signedness) and, if there are ROMs, ``licforge_rom.v`` into ``out_dir``; return the
    Verilog sources."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    platform = ReadmemhPlatform(out_dir)
    text = verilog.convert(component, name=name, platform=platform, emit_src=False)
    top = out_dir / f"{name}.v"
    top.write_text(text)
    (out_dir / "roms.json").write_text(json.dumps(platform.roms, indent=1, sort_keys=True))
    rom = out_dir / "licforge_rom.v"
    if not platform.roms:
        rom.unlink(missing_ok=True)
        return [top]
    rom.write_text(ROM_VERILOG)
    return [top, rom]
