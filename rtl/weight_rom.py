"""Weight ROMs of a dot-product layer, in the order a :class:`rtl.lane_array.LaneArray` eats them.

A ``conv2d``/``linear`` layer with ``O`` output channels and fan-in ``K`` (weight reshaped to
``O x K``, row-major) is computed by an ``L``-lane array as ``O`` dot products of
``beats = ceil(K / L)`` beats each (:func:`sim.lane_array.layer_stimulus`).  Its weight ROM
holds one word per beat: word ``o * beats + t`` packs weights ``w[o, t*L .. t*L + L-1]``
(zero past ``K``), lane 0 in the least significant ``bits``, two's complement.  The memory is
an ``amaranth.lib.memory.Memory`` tagged with :func:`rtl.emit.rom_file_attr`, so
:func:`rtl.emit.write_verilog` writes its contents as ``<layer>_w.hex`` beside the Verilog;
:func:`read_weight_roms` rebuilds every layer's integer weight from those files alone (this
is where a deployed network's watermark is read from).

Timing: synchronous read, one word per cycle when ``en`` is high, ``data`` valid one cycle
after ``addr``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from amaranth import Module, signed, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from licforge.quant.fixed import check_bits, int_range
from .conv_transpose import pack_words
from .deployed import read_lanes
from .emit import rom_file_attr, write_verilog

__all__ = ["WeightRom", "WeightRomBank", "rom_words", "write_weight_roms", "read_weight_roms", "MANIFEST"]

MANIFEST = "weight_roms.json"


def rom_words(weight: np.ndarray, lanes: int, bits: int) -> list[int]:
    """The ROM words of ``weight`` (``O x ...``) for an ``lanes``-wide array (see module doc)."""
    w = np.asarray(weight, np.int64)
    lo, hi = int_range(bits, signed=True)
    if w.size and (w.min() < lo or w.max() > hi):
        raise ValueError(f"weights in [{w.min()}, {w.max()}] do not fit {bits}-bit two's complement")
    rows = w.reshape(w.shape[0], -1)
    beats = -(-rows.shape[1] // lanes)
    rows = np.pad(rows, ((0, 0), (0, beats * lanes - rows.shape[1])))
    return pack_words(rows.reshape(-1, lanes), bits)


class WeightRom(wiring.Component):
    """One layer's weight ROM: ``lanes`` signed ``bits``-bit weights per word."""

    def __init__(self, name: str, weight: np.ndarray, *, lanes: int, bits: int) -> None:
        if not isinstance(lanes, int) or isinstance(lanes, bool) or lanes < 1:
            raise ValueError(f"lanes must be a positive integer, not {lanes!r}")
        self.name, self.lanes, self.bits = name, lanes, check_bits(bits, "bits", 2, 32)
        self.shape = tuple(np.shape(weight))
        self.words = rom_words(weight, lanes, bits)
        super().__init__({
            "en": In(1),
            "addr": In(range(max(2, len(self.words)))),
            "data": Out(data.ArrayLayout(signed(bits), lanes)),
        })

    def elaborate(self, platform) -> Module:
        m = Module()
        m.submodules.rom = rom = Memory(shape=unsigned(self.lanes * self.bits), depth=len(self.words),
                                        init=self.words, attrs=rom_file_attr(f"{self.name}_w"))
        rd = rom.read_port()
        m.d.comb += [rd.en.eq(self.en), rd.addr.eq(self.addr), self.data.as_value().eq(rd.data)]
        return m


class WeightRomBank(wiring.Component):
    """A :class:`WeightRom` per layer; ports ``<layer>_en``, ``<layer>_addr``, ``<layer>_data``."""

    def __init__(self, weights: dict[str, np.ndarray], *, lanes: int, bits: int) -> None:
        if not weights:
            raise ValueError("weights: at least one layer is needed")
        self.roms = {n: WeightRom(n, w, lanes=lanes, bits=bits) for n, w in weights.items()}
        sig = {}
        for n, r in self.roms.items():
            for port, member in r.signature.members.items():
                sig[f"{n}_{port}"] = member
        super().__init__(sig)

    def elaborate(self, platform) -> Module:
        m = Module()
        for n, r in self.roms.items():
            m.submodules[n] = r
            m.d.comb += [r.en.eq(getattr(self, f"{n}_en")), r.addr.eq(getattr(self, f"{n}_addr")),
                         getattr(self, f"{n}_data").eq(r.data)]
        return m


def write_weight_roms(weights: dict[str, np.ndarray], out_dir: Path, *, lanes: int, bits: int) -> list[Path]:
    """Verilog of a :class:`WeightRomBank` (top ``weight_roms``), its ``$readmemh`` files and
    ``weight_roms.json`` (per layer: hex file, weight shape, lanes, bits)."""
    out_dir = Path(out_dir)
    bank = WeightRomBank(weights, lanes=lanes, bits=bits)
    sources = write_verilog(bank, "weight_roms", out_dir)
    manifest = {n: {"file": f"{n}_w.hex", "shape": list(r.shape), "lanes": lanes, "bits": bits}
                for n, r in bank.roms.items()}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return sources


def read_weight_roms(out_dir: Path) -> dict[str, np.ndarray]:
    """Every layer's integer weight rebuilt from the hex files in ``out_dir`` (inverse of
    :func:`rom_words`); ValueError (:class:`rtl.deployed.DeploymentError` for a ROM file)
    names the file that is missing or inconsistent."""
    out_dir = Path(out_dir)
    mpath = out_dir / MANIFEST
    if not mpath.is_file():
        raise ValueError(f"{mpath}: not found; 'licforge watermark deploy --verilog DIR' writes weight ROMs")
    out = {}
    for name, e in json.loads(mpath.read_text()).items():
        shape, lanes, bits = tuple(e["shape"]), int(e["lanes"]), int(e["bits"])
        k = int(np.prod(shape[1:]))
        beats = -(-k // lanes)
        vals = read_lanes(out_dir / e["file"], lanes, bits, shape[0] * beats)
        out[name] = vals.reshape(shape[0], beats * lanes)[:, :k].reshape(shape)
    return out
