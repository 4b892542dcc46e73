"""RTL simulation of a bundle's decoder against the integer golden model: single blocks
(random extremes or the real tensors of an image), whole decodes of integer latents, of a
licforge file (``licforge decode --rtl``), and of whole images through such a file.  Every
run works under an explicit ``build_dir`` (``build_dir/sim/<kind>/<bundle hash>_<tag>``) and
takes its simulator from the build cache ``build_dir/sim-cache`` (:func:`sim.runner.run_cocotb`:
a design is compiled once), or from ``cache_dir`` when one is given, or from the folder that
the environment variable ``LICFORGE_SIM_CACHE`` names (one cache for every run and flow of a
machine: the Verilator runtime and each design are then compiled once, not once per run).
"""
from __future__ import annotations

import time
import os
from pathlib import Path

import numpy as np

from licforge.errors import CheckFailed, UsageError
from licforge.rtl.plan import plan_tag
from licforge.rtl.project import DEFAULT_MAX_WIDTH, build_decoder
from .stimulus import extreme_ints

__all__ = ["layer_inputs", "check_block", "rtl_decode", "rtl_decode_file", "sim_decode_image"]


#: environment variable naming a simulator build cache shared by every run that names none
SIM_CACHE_ENV = "LICFORGE_SIM_CACHE"


def _cache(build_dir: Path, cache_dir: Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    shared = os.environ.get(SIM_CACHE_ENV)
    return Path(shared) if shared else Path(build_dir) / "sim-cache"


def _work(build_dir: Path, kind: str, bundle, tag: str) -> Path:
    return Path(build_dir) / "sim" / kind / f"{bundle.hash[:12]}_{tag}"


def _simulate(dut, bundle, layers: list[str], x: np.ndarray, work: Path, *, frame: bool, timeout: int,
              seed: int, p_ready: float, p_valid: float = 1.0, simulator: str = "verilator", run_name=None,
              cache_dir: Path | None = None):
    from licforge.sim.layer_chain import simulate_chain
    from licforge.sim.runner import SimulationFailed

    try:
        return simulate_chain(dut, bundle.path, layers, x, work=work, timeout_cycles=timeout, frame_ports=frame,
                              seed=seed, p_valid=p_valid, p_ready=p_ready, simulator=simulator, run_name=run_name,
                              cache_dir=cache_dir)
    except SimulationFailed as e:
        raise CheckFailed(str(e)) from None


def _need_encoder(bundle) -> None:
    if "latent" not in [l.op for l in bundle.layers]:
        raise UsageError(f"bundle {bundle.path} holds only a decoder (no 'latent' layer): compressing an "
                         f"image needs a trained bundle from 'licforge quantize'")


def layer_inputs(bundle, image: np.ndarray) -> dict[str, np.ndarray]:
    """The input tensor of every layer when ``image`` (uint8 H x W x 3) is compressed to a
    real bitstream with the bundle (encoder layers: the golden encoder on the padded image)
    and its latents are decoded by the golden model (decoder layers)."""
    from licforge.quant.codec import decode_latents, encode_image, pad_image
    from licforge.quant.golden import run_layer
    from licforge.quant.bundle import decoder_layers

    _need_encoder(bundle)
    out, x = {}, pad_image(np.asarray(image))
    for lay in bundle.layers[:[l.op for l in bundle.layers].index("latent")]:
        out[lay.name] = x
        x = run_layer(lay, x)
    x, _ = decode_latents(bundle, encode_image(bundle, np.asarray(image)))
    for lay in decoder_layers(bundle):
        out[lay.name] = x
        x = run_layer(lay, x)
    return out


def _block_layers(bundle, kind: str, layer: str | None) -> list:
    """The bundle layers a block under test computes: all of them for 'decoder', else the
    named ``conv_transpose2d`` ('convt') or ``igdn``/``gdn`` ('gdn', encoder layers too)
    layer, by default the first of the decoder."""
    from licforge.quant.bundle import decoder_layers

    layers = decoder_layers(bundle)
    if kind == "decoder":
        return layers
    ops = {"convt": ("conv_transpose2d",), "gdn": ("igdn", "gdn")}[kind]
    cands = [l for l in (layers if layer is None else bundle.layers) if l.op in ops and layer in (None, l.name)]
    if not cands:
        raise UsageError(f"--layer: bundle {bundle.path} has no {'/'.join(ops)} layer {layer or ''} "
                         f"(its layers: {[l.name for l in bundle.layers]})")
    return cands[:1]


def _default_parallelism(bundle, kind: str, layer) -> tuple[int, int]:
    """(PI, PO) when none is asked for: the largest divisors up to 8 of the channel counts of
    the block's layer (of the heaviest layer for the whole decoder)."""
    from licforge.quant.bundle import decoder_layers
    from licforge.rtl.plan import default_parallelism, largest_divisor, layer_shapes

    if kind == "decoder":
        return default_parallelism(decoder_layers(bundle))
    if kind == "gdn":
        c = len(layer.tensors["beta"])
        return largest_divisor(c, 8), largest_divisor(c, 8)
    _, _, cin, cout, _ = layer_shapes([layer])[0]
    return largest_divisor(cin, 8), largest_divisor(cout, 8)


def _block(bundle, kind: str, layer, pi: int, po: int, width: int, pp: int = 1, pack: bool = False,
           split_products: bool = False):
    """(design, input channels, input bits, frame ports?) of the block computing ``layer``
    (``split_products``: its multipliers in two stages)."""
    from licforge.rtl.conv_transpose import ConvTransposeEngine
    from licforge.rtl.gdn import GdnUnit

    if kind == "decoder":
        dut = build_decoder(bundle, pi, po, width, split_products=split_products)
        return dut, dut.latent_channels, dut.latent_bits, True
    try:
        if kind == "convt":
            dut = ConvTransposeEngine.for_layer(layer, pi=pi, po=po, pp=pp, pack=pack, max_width=width,
                                                split_products=split_products)
            return dut, dut.cin, dut.x_bits, True
        dut = GdnUnit.for_layer(layer, pi=pi, po=po, pp=pp, pack=pack, split_products=split_products)
        return dut, dut.channels, dut.x_bits, pp > 1
    except ValueError as e:
        raise UsageError(str(e)) from None


def check_block(bundle, kind: str, build_dir: Path, *, layer: str | None, pi: int | None, po: int | None, height: int = 3,
                width: int = 4,
                image: np.ndarray | None = None, seed: int = 0, p_valid: float = 0.8, p_ready: float = 0.6,
                simulator: str = "verilator", cache_dir: Path | None = None, pp: int = 1, pack: bool = False,
                split_products: bool = False) -> dict:
    """One block (``kind`` 'convt' or 'gdn': a bundle layer, by default the first of its op)
    or the whole decoder ('decoder') against the golden model, with random bubbles and
    back-pressure; ``pi``/``po`` None picks the largest divisors up to 8 (of the heaviest
    layer for the decoder); ``pp`` output pixels a cycle and ``pack`` (two products per DSP)
    for a block; ``split_products``: every multiplier in two pipeline stages.  Inputs: random
    with extreme values on a ``height x width`` grid, or, when ``image`` is given, the real
    tensors that image produces (:func:`layer_inputs`).  Returns the testbench report
    (mismatches, cycles)."""
    from licforge.rtl.perf import frame_timeline

    layers = _block_layers(bundle, kind, layer)
    names = [l.name for l in layers]
    real = layer_inputs(bundle, image)[names[0]] if image is not None else None
    if real is not None:
        height, width = real.shape[2:]
    dpi, dpo = _default_parallelism(bundle, kind, layers[0])
    pi, po = (dpi if pi is None else pi), (dpo if po is None else po)
    if kind == "decoder" and (pp != 1 or pack):
        raise UsageError("--pp/--pack set one block's parallelism; a whole decoder takes its plan "
                         "('licforge plan', sim.decode.rtl_decode(plan=...))")
    dut, channels, bits, frame = _block(bundle, kind, layers[0], pi, po, width, pp, pack, split_products)
    x = real if real is not None else extreme_ints(np.random.default_rng(seed), (1, channels, height, width), bits)
    if kind == "decoder":
        busy = frame_timeline(dut.plan, height, width, split=split_products)["cycles"]
    else:
        busy = (25 if kind == "convt" else 1) * height * width * dut.groups[0] * dut.groups[1]
    timeout = int((4 * busy + 10_000) / min(p_valid, p_ready))
    lanes = (f"_pp{pp}" if pp > 1 else "") + ("_pack" if pack else "") + ("_split" if split_products else "")
    tag = f"{names[0] if kind != 'decoder' else 'all'}_pi{pi}_po{po}{lanes}_w{width}"
    res = _simulate(dut, bundle, names, x, _work(build_dir, kind, bundle, tag), frame=frame, timeout=timeout, seed=seed,
                    p_valid=p_valid, p_ready=p_ready, simulator=simulator, cache_dir=_cache(build_dir, cache_dir))
    return {**res.report, "layers": names, "pi": pi, "po": po, "pp": pp, "pack": pack, "split_products": split_products,
            "input_shape": list(x.shape),
            "simulator": res.simulator, "wall_s": round(res.wall_s, 2)}


#: the decoders :func:`rtl_decode` built, by (bundle hash, design tag): the same design is
#: built, and converted to Verilog (:mod:`sim.layer_chain`), once for several decodes
_DECODERS: dict[tuple[str, str], object] = {}


def _decoder(bundle, pi: int | None, po: int | None, plan, max_width: int, split: bool = False):
    """(decoder, tag) for ``pi`` x ``po`` or ``plan`` (``split``: built with ``split_products``),
    built once per (bundle, design)."""
    from licforge.quant.bundle import decoder_layers
    from licforge.rtl.decoder import Decoder

    if (plan is None) == (pi is None or po is None):
        raise ValueError("rtl_decode needs either pi and po, or a plan")
    tag = (f"pi{pi}_po{po}_w{max_width}" if plan is None else f"{plan_tag(plan)}_w{max_width}") + \
        ("_split" if split else "")
    if (bundle.hash, tag) not in _DECODERS:
        _DECODERS.clear()   # one design at a time: a decoder holds its weights
        _DECODERS[bundle.hash, tag] = (build_decoder(bundle, pi, po, max_width, split_products=split) if plan is None
                                       else Decoder(decoder_layers(bundle), plan=list(plan), max_width=max_width,
                                                    split_products=split))
    return _DECODERS[bundle.hash, tag], tag


def rtl_decode(bundle, latents: np.ndarray, build_dir: Path, *, pi: int | None = None, po: int | None = None,
               plan=None, max_width: int = DEFAULT_MAX_WIDTH, seed: int = 0, p_ready: float = 1.0,
               simulator: str = "verilator", cache_dir: Path | None = None,
               p_valid: float = 1.0, split_products: bool = False) -> tuple[np.ndarray, dict]:
    """Decode integer latents (frames, M, h, w), frames back to back, with the decoder RTL
    (checked against the golden decoder inside the testbench); returns the pixels
    (frames, 3, 16h, 16w) and the report (mismatches, cycles, simulated cycles per second,
    wall times) with the model's cycles for the same frames.  The decoder is planned for
    ``pi`` x ``po`` on its heaviest layer, or follows ``plan`` (a list of
    :class:`rtl.plan.LayerPlan`, e.g. from :func:`rtl.perf.plan_for_target`); ``p_valid`` /
    ``p_ready`` < 1 insert random input bubbles and output back-pressure; ``split_products``:
    the decoder's multipliers in two pipeline stages (:class:`rtl.decoder.Decoder`)."""
    from licforge.rtl.perf import frame_timeline

    latents = np.asarray(latents, np.int64)
    frames, _, h, w = latents.shape
    if w > max_width:
        raise UsageError(f"the latent grid is {w} wide, more than --max-width {max_width}")
    dut, tag = _decoder(bundle, pi, po, plan, max_width, split_products)
    model = frame_timeline(dut.plan, h, w, frames, split=split_products)
    t0 = time.perf_counter()
    res = _simulate(dut, bundle, [l.name for l in dut.layers], latents,
                    _work(build_dir, "decoder", bundle, tag), frame=True,
                    timeout=int(4 * model["cycles"] / min(p_ready, p_valid)) + 10_000, seed=seed, p_ready=p_ready,
                    p_valid=p_valid, simulator=simulator, run_name=f"decode_{frames}x{h}x{w}_s{seed}",
                    cache_dir=_cache(build_dir, cache_dir))
    pixels = np.load(Path(res.report["run_dir"]) / "outputs.npy")
    report = {**res.report, "model_cycles": model["cycles"], "multipliers": sum(p.multipliers for p in dut.plan),
              "dsps": sum(p.dsps for p in dut.plan),
              "simulator": res.simulator, "wall_s": round(time.perf_counter() - t0, 2)}
    return pixels, report


def rtl_decode_file(bundle, data: bytes, build_dir: Path, *, pi: int, po: int, max_width: int = DEFAULT_MAX_WIDTH,
                    simulator: str = "verilator", cache_dir: Path | None = None,
                    split_products: bool = False) -> tuple[np.ndarray, dict]:
    """uint8 (H, W, 3) pixels of a licforge file decoded by the decoder RTL (line buffers for
    ``max_width`` latent columns; ``split_products`` as in :func:`rtl_decode`), and
    :func:`rtl_decode`'s report.  The file passes every check of :mod:`quant.container`, the
    RTL's widest line included, before it is decoded."""
    from licforge.quant.codec import decode_latents

    latents, (hh, ww) = decode_latents(bundle, data, max_latent_width=max_width)
    pixels, report = rtl_decode(bundle, latents, build_dir, pi=pi, po=po, max_width=max_width, simulator=simulator,
                                cache_dir=cache_dir, split_products=split_products)
    return np.ascontiguousarray(pixels[0, :, :hh, :ww].transpose(1, 2, 0)).astype(np.uint8), report


def sim_decode_image(bundle, image: np.ndarray, build_dir: Path, *, pi: int, po: int, max_width: int = DEFAULT_MAX_WIDTH,
                     simulator: str = "verilator", cache_dir: Path | None = None, png: Path | None = None) -> dict:
    """Compress ``image`` (uint8 H x W x 3) to a licforge file with the bundle's encoder and
    decode the file with the RTL (:func:`rtl_decode_file`): bits per pixel, PSNR of the
    hardware-decoded image (written to ``png`` when given), mismatches against the golden
    decoder, cycles."""
    from licforge.quant.codec import encode_image, read_header
    from licforge.quant.eval import psnr

    _need_encoder(bundle)
    img = np.asarray(image)
    data = encode_image(bundle, img)
    rgb, rep = rtl_decode_file(bundle, data, build_dir, pi=pi, po=po, max_width=max_width, simulator=simulator,
                               cache_dir=cache_dir)
    if png is not None:
        from PIL import Image

        Image.fromarray(rgb).save(png)
    hh, ww = img.shape[:2]
    h, w = read_header(data).latent_hw
    return {"bytes": len(data), "bpp": 8 * len(data) / (hh * ww), "psnr_db": psnr(rgb, img),
            "mismatches": rep["mismatches"], "cycles": rep["cycles"], "model_cycles": rep["model_cycles"],
            "cycles_per_pixel": rep["cycles"] / (256 * h * w), "image_hw": [hh, ww],
            "latents_hw": [h, w], "sim_cycles_per_s": rep["sim_cycles_per_s"],
            "sim_wall_s": rep["sim_wall_s"], "wall_s": rep["wall_s"], "multipliers": rep["multipliers"]}
