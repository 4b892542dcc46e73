"""Watermarks read from what was deployed: weights rebuilt from the memory init files beside
the Verilog (digits weight ROMs, or an LIC decoder project), and the task metric of a
deployed LIC bundle (real bitstreams decoded by the integer golden model).
"""
from __future__ import annotations

from pathlib import Path

from licforge.errors import UsageError, need_dir
from licforge.models.data import embedded_images
from licforge.quant.bundle import Bundle, write_bundle
from licforge.rtl.deployed import read_deployed_weights
from licforge.rtl.project import generate_decoder
from licforge.rtl.weight_rom import MANIFEST, read_weight_roms, write_weight_roms

from .layers import bundle_chain, chain_weights

__all__ = ["verilog_weights", "verilog_bits", "memory_weights", "lic_metric", "decoder_weights"]


def verilog_weights(path: str | Path) -> dict:
    """Integer weights rebuilt from memory init files: the digits weight ROMs
    (``weight_roms.json``) or an LIC decoder written by ``licforge rtl decoder``."""
    d = need_dir(path, "Verilog directory")
    try:
        if (d / MANIFEST).is_file():
            return read_weight_roms(d)
        return {n: t["weight"] for n, t in read_deployed_weights(d).items() if "weight" in t}
    except ValueError as e:
        raise UsageError(str(e)) from None


def verilog_bits(path: str | Path) -> int | None:
    """The weight bit width of digits weight ROMs (``weight_roms.json``), None for other folders."""
    import json

    m = Path(path) / MANIFEST
    if not m.is_file():
        return None
    widths = {int(e["bits"]) for e in json.loads(m.read_text()).values()}
    return widths.pop() if len(widths) == 1 else None


def memory_weights(bundle: Bundle, out_dir: Path, lanes: int = 8) -> dict:
    """Write the bundle's weight ROMs (Verilog + ``$readmemh`` files) to ``out_dir`` and read
    the integer weights back from the files alone."""
    write_weight_roms(chain_weights(bundle_chain(bundle)), out_dir, lanes=lanes, bits=bundle.model["bits"])
    return read_weight_roms(out_dir)


def lic_metric(bundle: Bundle, out_dir: Path) -> dict:
    """Write an LIC bundle to ``out_dir`` and measure it on the held-out images: mean PSNR
    (dB) and bpp of real bitstreams, decoded by the integer golden model (the bundle's
    ``path`` is then set, as :func:`decoder_weights` needs)."""
    from licforge.quant.eval import eval_bundle

    write_bundle(bundle, out_dir)
    mean = eval_bundle(out_dir, embedded_images("held-out"))["mean"]
    return {"psnr": mean["psnr"], "bpp": mean["bpp"]}


def decoder_weights(bundle: Bundle, out_dir: Path) -> dict:
    """Generate the LIC decoder's Verilog (``licforge rtl decoder``, one lane each way) for a
    written bundle and read its integer weights back from the ROM files alone."""
    if bundle.path is None:
        raise ValueError("decoder_weights: write the bundle first (its path goes into the manifest)")
    generate_decoder(bundle, 1, 1, out_dir)
    return verilog_weights(out_dir)
