"""Verilog emission: Amaranth -> Verilog, with weight memories as ``$readmemh`` files.

A read-only :class:`amaranth.lib.memory.Memory` (initial contents, no write port) is turned
by :class:`ReadmemhPlatform` into an instance of ``licforge_rom`` whose contents are a hex
file written beside the Verilog, so the weights of a deployed design can be read back from
the files (and Vivado/Yosys infer block or distributed ROM from them).  Memories with write
ports (line buffers) stay ordinary inferred RAMs; their initial contents (zeros), which the
Verilog backend writes as one assignment per word, go to a hex file too
(:func:`memory_inits_to_files`): a 64 K-word line buffer is 65,536 lines of ``initial`` block that
Yosys's Verilog frontend needs tens of minutes for, and a ``$readmemh`` of the same words one
second.  Simulation with Amaranth's simulator needs no platform and uses the same ``Memory``
directly.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from amaranth import ClockSignal, Instance, Module, Shape
from amaranth.back import verilog
from amaranth.lib.memory import Memory

__all__ = ["ReadmemhPlatform", "write_verilog", "memory_inits_to_files", "ROM_MODULE", "ROM_PORTS", "ROM_VERILOG",
           "rom_file_attr", "read_hex", "INIT_FILE_PREFIX"]

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
INIT_FILE_PREFIX = "licforge_init_"
"""Name prefix of the hex files :func:`memory_inits_to_files` writes (``<prefix><sha256[:12]>.hex``)."""
_INIT_BLOCK = re.compile(r"^  initial begin\n((?:    [^\n]*\n)+?)  end\n", re.M)
_INIT_WORD = re.compile(r"    (\\\S+ |[A-Za-z_][\w$]*)\[(\d+)\] = (\d+)'([dhb])([0-9a-fA-F]+);")


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


def _init_words(body: str) -> tuple[str, int, list[int]] | None:
    """(memory, width, words) of an ``initial`` block that assigns words 0, 1, ... of one memory
    with defined constants, else None."""
    name, width, words = None, None, []
    for line in body.splitlines():
        m = _INIT_WORD.fullmatch(line)
        if m is None or int(m[2]) != len(words) or (name is not None and (m[1], int(m[3])) != (name, width)):
            return None
        name, width = m[1], int(m[3])
        try:
            words.append(int(m[5], {"d": 10, "h": 16, "b": 2}[m[4]]))
        except ValueError:  # a digit outside its base
            return None
    return (name, width, words) if words else None


def memory_inits_to_files(text: str, out_dir: Path) -> str:
    """``text`` (Verilog from Amaranth) with every memory ``initial`` block (one assignment per
    word, words 0..n-1 of one memory, no undefined bits) replaced by ``$readmemh`` of a hex file
    written into ``out_dir``, named by a hash of its contents (equal contents share a file).
    Blocks of any other form are kept as they are."""
    def repl(m: re.Match) -> str:
        found = _init_words(m[1])
        if found is None:
            return m[0]
        name, width, words = found
        data = "".join(_word(v, width) + "\n" for v in words)
        fname = f"{INIT_FILE_PREFIX}{hashlib.sha256(f'{width}:{data}'.encode()).hexdigest()[:12]}.hex"
        target = Path(out_dir) / fname
        if not target.is_file() or target.read_text() != data:
            target.write_text(data)
        return f'  initial $readmemh("{fname}", {name});\n'
    return _INIT_BLOCK.sub(repl, text)


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
    depth, signedness), the initial contents of the writable memories
    (:func:`memory_inits_to_files`) and, if there are ROMs, ``licforge_rom.v`` into ``out_dir``;
    return the Verilog sources."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    platform = ReadmemhPlatform(out_dir)
    text = memory_inits_to_files(verilog.convert(component, name=name, platform=platform, emit_src=False), out_dir)
    top = out_dir / f"{name}.v"
    top.write_text(text)
    (out_dir / "roms.json").write_text(json.dumps(platform.roms, indent=1, sort_keys=True))
    rom = out_dir / "licforge_rom.v"
    if not platform.roms:
        rom.unlink(missing_ok=True)
        return [top]
    rom.write_text(ROM_VERILOG)
    return [top, rom]
