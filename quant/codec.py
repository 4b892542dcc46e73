"""Compress an image to a licforge file and decode it again, with a deployment bundle (the
integer golden encoder and decoder) or a float weight file (a CompressAI model), and
CompressAI's rANS coder.  The file format and the checks a file passes before its payload
reaches the coder are :mod:`quant.container`'s.

Bundle (:func:`encode_image`): the image is padded to a multiple of 16 by repeating its last
row and column (:func:`pad_image`), run through the integer golden encoder
(``quant.lic.golden_encode``) to integer latents ``y`` (1, M, h, w); the symbols
``y - median[c]`` of channel ``c`` are coded by rANS (``compressai.ans``) with the bundle's
``latent`` tables (``cdf``, ``cdf_length``, ``offset``), in CompressAI's order (channel-major,
then raster), so the bytes equal those of ``EntropyBottleneck.compress`` on the same latents.
Decoding (:func:`decode_latents`, :func:`decode_image`) reverses it; a decoded latent outside
the bundle's latent bit width is refused, and the decoder's output is cropped to the top-left
H x W pixels.

Float weight file (:class:`FloatModel`): CompressAI's ``compress`` with integer medians
(:func:`prepare_entropy_coder`); decoding runs CompressAI's ``decompress`` steps with every
string checked first; pixels ``p = clamp(round(256 x_hat), 0, 255)``.

A file names its model by sha256; :func:`find_model` looks for it among the committed
bundles (``models/checkpoints/bundles/*``) and weight files (``models/checkpoints/*.pt``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from torch import nn

from licforge.errors import UsageError
from licforge.models.lic import LICConfig
from .bundle import Bundle, BundleError
from .container import (KIND_BUNDLE, KIND_FLOAT, KINDS, MAX_PIXELS, MAX_RAW_BITS, BitstreamError, Header,
                        check_limits, check_payload, read_file, tables_sha256, write_file)
from .fixed import int_range

__all__ = ["BitstreamError", "FloatModel", "Model", "load_model", "load_float_model", "model_sha256",
           "coder_tables", "pad_image", "encode_latents", "encode_image", "read_header", "decode_latents",
           "decode_float_latent", "decode_image", "find_model", "prepare_entropy_coder", "PAD", "COMMITTED"]

PAD = 16
#: where :func:`find_model` looks: ``bundles/<name>/`` and ``<name>.pt``
COMMITTED = Path(__file__).resolve().parent.parent / "models" / "checkpoints"


@torch.no_grad()
def prepare_entropy_coder(eb: nn.Module) -> None:
    """Quantiles by bisection, integer medians, then the rANS tables (``update``).

    With integer medians CompressAI's ``round(y - median) + median`` maps integer latents to
    themselves, so the symbols are ``latent - median`` exactly."""
    eb._update_quantiles()
    eb.quantiles[:, 0, 1] = torch.round(eb.quantiles[:, 0, 1])
    eb.update(force=True)


@dataclass(frozen=True)
class FloatModel:
    """A float weight file ready to code: the network (entropy coder prepared), its
    architecture, the file's sha256, path and meta (curve label, lambda ...)."""
    net: nn.Module
    config: LICConfig
    sha256: str
    path: Path
    meta: dict


Model = Union[Bundle, FloatModel]


def load_float_model(path: str | Path) -> FloatModel:
    """A weight file of ``licforge train``/``distill`` with its entropy coder prepared."""
    from licforge.models.lic import load_weights
    from .train import file_sha256

    net, cfg, meta = load_weights(path)
    prepare_entropy_coder(net.entropy_bottleneck)
    net.update(force=True)
    return FloatModel(net, cfg, file_sha256(Path(path)), Path(path), meta)


def load_model(path: str | Path) -> Model:
    """A bundle directory (it must hold an encoder and the entropy coder's tables) or a float
    weight file."""
    from .bundle import read_bundle

    p = Path(path)
    if p.is_dir():
        bundle = read_bundle(p)
        _tables(bundle)
        return bundle
    if p.is_file():
        return load_float_model(p)
    raise UsageError(f"model {p}: not found (a bundle directory or a weight file .pt)")


def model_sha256(model: Model) -> str:
    """The sha256 a file names its model by: a bundle's hash, a weight file's sha256."""
    return model.hash if isinstance(model, Bundle) else model.sha256


def _tables(bundle: Bundle) -> tuple[list, list, list, np.ndarray]:
    try:
        lay = bundle.layer("latent")
    except KeyError:
        raise BundleError(f"{bundle.path}: bundle has no 'latent' layer; it holds only a decoder, not the encoder "
                          f"and entropy coder a file needs") from None
    missing = [t for t in ("cdf", "cdf_length", "offset", "median") if t not in lay.tensors]
    if missing:
        raise BundleError(f"{bundle.path}: layer 'latent' lacks the entropy coder tables {missing}; "
                          f"re-export the bundle with 'licforge quantize'")
    t = lay.tensors
    return (t["cdf"].tolist(), t["cdf_length"].reshape(-1).tolist(), t["offset"].reshape(-1).tolist(),
            np.asarray(t["median"], np.int64))


def coder_tables(model: Model) -> dict[str, np.ndarray]:
    """The entropy coder's integer tables, as hashed into a file (``container.tables_sha256``)."""
    if isinstance(model, Bundle):
        _tables(model)
        return {k: model.layer("latent").tensors[k] for k in ("cdf", "cdf_length", "offset", "median")}
    eb = model.net.entropy_bottleneck
    out = {"cdf": eb._quantized_cdf, "cdf_length": eb._cdf_length, "offset": eb._offset,
           "median": eb.quantiles[:, 0, 1]}
    gc = getattr(model.net, "gaussian_conditional", None)
    if gc is not None:
        out.update(gaussian_cdf=gc._quantized_cdf, gaussian_cdf_length=gc._cdf_length, gaussian_offset=gc._offset)
    return {k: np.asarray(v.detach().numpy(), np.int64) for k, v in out.items()}


def pad_image(image: np.ndarray, multiple: int = PAD) -> np.ndarray:
    """uint8 (H, W, 3) -> (1, 3, H', W') int64 with H', W' multiples of ``multiple`` (the
    last row and column repeated)."""
    img = _rgb_array(image)
    hh, ww = img.shape[:2]
    padded = np.pad(img, ((0, -hh % multiple), (0, -ww % multiple), (0, 0)), mode="edge")
    return padded.transpose(2, 0, 1)[None].astype(np.int64)


def _indexes(m: int, h: int, w: int) -> list[int]:
    return np.repeat(np.arange(m), h * w).tolist()


def _bypass_safe(top: float, what: str) -> None:
    """Refuse latents CompressAI's encoder cannot code: its raw (bypass) value
    ``2|symbol - offset| + 1`` must stay below 2**28, or its loop ``while (raw >> 4n) != 0``
    shifts an int32 by 32 bits and never ends; latents up to 2**25 in magnitude are safe."""
    if top >= 1 << (MAX_RAW_BITS - 3):
        raise ValueError(f"{what}: a latent of magnitude {top:g}, beyond the 2**{MAX_RAW_BITS - 3} CompressAI's rANS "
                         f"coder codes safely")


def encode_latents(bundle: Bundle, latent: np.ndarray) -> bytes:
    """One rANS string for integer latents (1, M, h, w) with the bundle's tables."""
    from compressai.ans import RansEncoder

    cdf, length, offset, median = _tables(bundle)
    lat = np.asarray(latent, np.int64)
    if lat.ndim != 4 or lat.shape[:2] != (1, len(median)):
        raise ValueError(f"latent must be (1, {len(median)}, h, w), not {lat.shape}")
    _bypass_safe(float(np.abs(lat).max(initial=0)), "encode_latents")
    _, m, h, w = lat.shape
    symbols = (lat[0] - median[:, None, None]).reshape(-1).tolist()
    return RansEncoder().encode_with_indexes(symbols, _indexes(m, h, w), cdf, length, offset)


def _rgb_array(image: np.ndarray) -> np.ndarray:
    """``image`` as an array if it is uint8 (H, W, 3) with at least one pixel; ValueError naming its dtype
    and shape otherwise."""
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 or min(img.shape[:2]) < 1:
        raise ValueError(f"image must be uint8 (H, W, 3) with H, W >= 1, not {img.dtype} {img.shape}")
    return img


def _check_image(image: np.ndarray) -> np.ndarray:
    img = _rgb_array(image)
    hh, ww = img.shape[:2]
    if hh * ww > MAX_PIXELS or max(hh, ww) > 0xFFFF:
        raise UsageError(f"image {hh}x{ww}: more than the {MAX_PIXELS} pixels (or 65535 a side) a file may hold")
    return img


def _float_compress(net: nn.Module, x: torch.Tensor) -> tuple[list[bytes], tuple[int, int]]:
    """CompressAI's ``compress`` of a factorized prior or a hyperprior (strings y[, z], the
    entropy-bottleneck latent's size), each latent checked codable first."""
    eb = net.entropy_bottleneck
    y = net.g_a(x)
    _bypass_safe(float(y.abs().max()), "encode")
    if not hasattr(net, "gaussian_conditional"):
        return eb.compress(y), tuple(y.shape[-2:])
    z = net.h_a(torch.abs(y))
    _bypass_safe(float(z.abs().max()), "encode")
    z_strings = eb.compress(z)
    indexes = net.gaussian_conditional.build_indexes(net.h_s(eb.decompress(z_strings, z.shape[-2:])))
    return net.gaussian_conditional.compress(y, indexes) + z_strings, tuple(z.shape[-2:])


@torch.no_grad()
def encode_image(model: Model, image: np.ndarray) -> bytes:
    """The licforge file of a uint8 (H, W, 3) image (module doc)."""
    img = _check_image(image)
    hh, ww = img.shape[:2]
    tables = tables_sha256(coder_tables(model))
    if isinstance(model, Bundle):
        from .golden import golden_encode

        latent = golden_encode(model, pad_image(img))
        strings = [encode_latents(model, latent)]
        kind, pad, channels, hw = KIND_BUNDLE, PAD, latent.shape[1], tuple(latent.shape[2:])
    else:
        net = model.net
        pad = net.downsampling_factor  # 16 (factorized), 64 (hyperprior)
        strings, shape = _float_compress(net, torch.from_numpy(pad_image(img, pad)).float() / 256.0)
        kind, channels, hw = KIND_FLOAT, net.entropy_bottleneck.channels, shape
    header = Header(kind, pad, hh, ww, channels, hw, model_sha256(model), tables, tuple(len(s) for s in strings))
    return write_file(header, strings)


def read_header(data: bytes) -> Header:
    """The header of a well-formed file (:func:`quant.container.read_file`)."""
    return read_file(data)[0]


def _expect(header: Header, strings: list[bytes], model: Model) -> None:
    """Refuse a file made with another model (both hashes named), with other coder tables, or
    whose fields do not fit the model."""
    mine = model_sha256(model)
    kind = KIND_BUNDLE if isinstance(model, Bundle) else KIND_FLOAT
    if header.kind != kind or header.model_sha256 != mine:
        raise BitstreamError(f"file was encoded with the {KINDS[header.kind]} of sha256 {header.model_sha256}, not "
                             f"with this {KINDS[kind]} (sha256 {mine}); decode it with the model of that hash")
    tables = tables_sha256(coder_tables(model))
    if header.tables_sha256 != tables:
        raise BitstreamError(f"file's entropy coder tables (sha256 {header.tables_sha256}) differ from the model's "
                             f"({tables}): the model's coder was prepared differently")
    if kind == KIND_BUNDLE:
        pad, channels, count = PAD, len(_tables(model)[3]), 1
    else:
        net = model.net
        pad, channels = net.downsampling_factor, net.entropy_bottleneck.channels
        count = 2 if hasattr(net, "gaussian_conditional") else 1
    if (header.pad, header.channels, len(strings)) != (pad, channels, count):
        raise BitstreamError(f"header declares padding {header.pad}, {header.channels} latent channels and "
                             f"{len(strings)} strings; this model codes {pad}, {channels} and {count}")


def decode_latents(bundle: Bundle, data: bytes, max_latent_width: int | None = None
                   ) -> tuple[np.ndarray, tuple[int, int]]:
    """(integer latents (1, M, h, w) int64, image size (H, W)) of a file made with this
    bundle, every check of :mod:`quant.container` passed first (``max_latent_width``: the
    RTL decoder's widest latent line, for an RTL decode)."""
    from compressai.ans import RansDecoder

    header, strings = read_file(data)
    _expect(header, strings, bundle)
    check_limits(header, MAX_PIXELS, max_latent_width)
    cdf, length, offset, median = _tables(bundle)
    m, (h, w) = len(median), header.latent_hw
    idx = _indexes(m, h, w)
    symbols = np.asarray(check_payload(strings[0], idx, cdf, length, offset), np.int64).reshape(1, m, h, w)
    latent = symbols + median[None, :, None, None]
    lo, hi = int_range(bundle.layer("latent").attrs["out_bits"], signed=True)
    if latent.min() < lo or latent.max() > hi:
        raise BitstreamError(f"payload corrupt: a decoded latent lies outside the bundle's latent range {lo}..{hi}")
    decoded = RansDecoder().decode_with_indexes(strings[0], idx, cdf, length, offset)
    return np.asarray(decoded, np.int64).reshape(1, m, h, w) + median[None, :, None, None], header.size


@torch.no_grad()
def decode_float_latent(model: FloatModel, data: bytes) -> tuple[torch.Tensor, Header]:
    """(the latent ``y_hat`` a float model's synthesis transform takes, the file's header):
    CompressAI's ``decompress`` steps of a factorized prior or a hyperprior (whose ``h_s``
    gives the indexes of ``y``), every string checked by
    :func:`quant.container.check_payload` before CompressAI's decoder reads it."""
    header, strings = read_file(data)
    _expect(header, strings, model)
    check_limits(header, MAX_PIXELS)
    net = model.net
    eb = net.entropy_bottleneck
    h, w = header.latent_hw

    def checked(coder: nn.Module, string: bytes, indexes: list[int]) -> None:
        check_payload(string, indexes, coder._quantized_cdf.tolist(), coder._cdf_length.reshape(-1).tolist(),
                      coder._offset.reshape(-1).tolist())

    first = strings[-1]  # the entropy-bottleneck string: y (factorized), z (hyperprior)
    checked(eb, first, _indexes(header.channels, h, w))
    latent = eb.decompress([first], (h, w))
    if len(strings) == 2:
        gc = net.gaussian_conditional
        indexes = gc.build_indexes(net.h_s(latent))
        checked(gc, strings[0], indexes.reshape(-1).tolist())
        latent = gc.decompress([strings[0]], indexes, latent.dtype)
    return latent, header


@torch.no_grad()
def decode_image(model: Model, data: bytes) -> np.ndarray:
    """uint8 (H, W, 3) pixels of a file: the integer golden decoder of a bundle, or the float
    model's synthesis transform; cropped to H x W."""
    if isinstance(model, Bundle):
        from .golden import golden_decode

        latent, (hh, ww) = decode_latents(model, data)
        return golden_decode(model, latent)[0, :, :hh, :ww].transpose(1, 2, 0).astype(np.uint8)
    latent, header = decode_float_latent(model, data)
    rec = torch.clamp(torch.round(model.net.g_s(latent) * 256.0), 0, 255)[0, :, :header.height, :header.width]
    return rec.permute(1, 2, 0).numpy().astype(np.uint8)


def find_model(header: Header, root: Path = COMMITTED) -> Path | None:
    """The committed bundle directory (``root/bundles/*``) or weight file (``root/*.pt``)
    whose sha256 the file names, or None."""
    if header.kind == KIND_BUNDLE:
        for d in sorted(p for p in (root / "bundles").glob("*") if (p / "bundle.json").is_file()):
            try:
                if json.loads((d / "bundle.json").read_text()).get("hash") == header.model_sha256:
                    return d
            except (OSError, ValueError):
                continue
        return None
    from .train import file_sha256

    return next((f for f in sorted(root.glob("*.pt")) if file_sha256(f) == header.model_sha256), None)
