"""Read a deployed decoder's integer tensors back from its files alone.

``licforge rtl decoder`` writes, beside the Verilog, one ``$readmemh`` file per ROM and a
``manifest.json`` whose ``blocks`` list gives each block's shapes, parallelism and ROM
files (:meth:`rtl.decoder.Decoder.manifest`).  :func:`read_deployed_weights` inverts the ROM
layouts (:func:`rtl.conv_transpose.conv_weight_layout`, :func:`rtl.gdn.gamma_layout`) and
returns the tensors exactly as the bundle holds them: this is where the watermark of a
deployed network is read from.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .conv_transpose import KERNEL, conv_weight_layout
from .emit import read_hex
from .gdn import gamma_layout

__all__ = ["read_deployed_weights", "DeploymentError", "MANIFEST"]

MANIFEST = "manifest.json"


class DeploymentError(ValueError):
    """A deployment directory that cannot be read back; the message names the file."""


def read_lanes(path: Path, lanes: int, bits: int, words: int) -> np.ndarray:
    """(words, lanes) signed integers of a ROM file of ``lanes`` x ``bits``-bit words."""
    if not path.is_file():
        raise DeploymentError(f"{path}: ROM file missing; copy the whole deployment directory")
    raw = read_hex(path, lanes * bits, signed=False)
    if len(raw) != words:
        raise DeploymentError(f"{path}: {len(raw)} words, the manifest's layout needs {words}")
    mask, half = (1 << bits) - 1, 1 << (bits - 1)
    vals = np.array([[(w >> (k * bits)) & mask for k in range(lanes)] for w in raw], dtype=np.int64)
    return np.where(vals >= half, vals - (1 << bits), vals)


def read_deployed_weights(out_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    """``{layer name: {tensor name: int64 array}}`` (``weight``/``bias`` of each transposed
    convolution, ``gamma``/``beta`` of each inverse GDN) rebuilt from the hex files and the
    manifest in ``out_dir``."""
    out_dir = Path(out_dir)
    mpath = out_dir / MANIFEST
    if not mpath.is_file():
        raise DeploymentError(f"{mpath}: not found; a deployment is a directory written by 'licforge rtl decoder'")
    blocks = json.loads(mpath.read_text()).get("blocks")
    if not isinstance(blocks, list):
        raise DeploymentError(f"{mpath}: no 'blocks' list; was it written by 'licforge rtl decoder'?")
    out: dict[str, dict[str, np.ndarray]] = {}
    for blk in blocks:
        roms, pi, po = blk["roms"], blk["pi"], blk["po"]
        if blk["op"] == "conv_transpose2d":
            cin, cout = blk["cin"], blk["cout"]
            lay = conv_weight_layout(cin, cout, pi, po)
            vals = read_lanes(out_dir / roms["weight"]["file"], pi * po, roms["weight"]["bits"], len(lay))
            w = np.zeros((cin, cout, KERNEL, KERNEL), np.int64)
            w[lay[..., 0], lay[..., 1], lay[..., 2], lay[..., 3]] = vals
            bias = read_lanes(out_dir / roms["bias"]["file"], po, roms["bias"]["bits"], cout // po).reshape(-1)
            out[blk["name"]] = {"weight": w, "bias": bias}
        elif blk["op"] == "igdn":
            c = blk["channels"]
            lay = gamma_layout(c, pi, po)
            vals = read_lanes(out_dir / roms["gamma"]["file"], pi * po, roms["gamma"]["bits"], len(lay))
            gamma = np.zeros((c, c), np.int64)
            gamma[lay[..., 0], lay[..., 1]] = vals
            beta = read_lanes(out_dir / roms["beta"]["file"], po, roms["beta"]["bits"], c // po).reshape(-1)
            out[blk["name"]] = {"gamma": gamma, "beta": beta}
        else:
            raise DeploymentError(f"{mpath}: block {blk.get('name')!r} has unknown op {blk.get('op')!r}")
    return out
