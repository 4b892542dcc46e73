"""Real bitstreams from a deployment bundle alone: integer golden encoder + CompressAI's rANS.

File layout (big endian)::

    magic   4 bytes  b"LICF"
    version 1 byte   1
    pad     1 byte   P: the image was padded to a multiple of P (16; 64 for the hyperprior)
    H, W    2 + 2    image size in pixels
    h, w    2 + 2    size of the entropy-coded tensor CompressAI's ``decompress`` takes
                     (= ceil(H/P), ceil(W/P): the latent y for the factorized prior)
    model   8 bytes  first 8 bytes of the bundle hash (or of a float checkpoint's sha256)
    crc32   4 bytes  of everything after the header
    count   1 byte   number of rANS strings (1 for the factorized prior)
    lengths 4 bytes each, then the strings

Encoding (:func:`encode_image`): the image is padded to a multiple of 16 by repeating its
last row and column, run through the integer golden encoder (``quant.lic.golden_encode``) to
integer latents ``y`` (1, M, h, w); the symbols ``y - median[c]`` of channel ``c`` are coded
by rANS (``compressai.ans``) with the bundle's ``latent`` tables (``cdf``, ``cdf_length``,
``offset``), in CompressAI's order (channel-major, then raster), so the bytes equal those of
``EntropyBottleneck.compress`` on the same latents.  Decoding reverses it
(:func:`decode_latents`); the decoder's output is cropped to the top-left H x W pixels.
A bitstream with a bad magic/version, another bundle's hash, a wrong CRC or inconsistent
sizes is refused with a :class:`BitstreamError`.
"""
from __future__ import annotations

import struct
import zlib

import numpy as np
import torch
from torch import nn

from .bundle import Bundle, BundleError

__all__ = ["BitstreamError", "pack", "unpack", "pad_image", "encode_latents", "encode_image",
           "decode_latents", "decode_image", "bundle_id", "prepare_entropy_coder", "MAGIC", "VERSION", "PAD"]

MAGIC, VERSION, PAD = b"LICF", 1, 16
_HEADER = struct.Struct(">4sBBHHHH8sI")


@torch.no_grad()
def prepare_entropy_coder(eb: nn.Module) -> None:
    """Quantiles by bisection, integer medians, then the rANS tables (``update``).

    With integer medians CompressAI's ``round(y - median) + median`` maps integer latents to
    themselves, so the symbols are ``latent - median`` exactly."""
    eb._update_quantiles()
    eb.quantiles[:, 0, 1] = torch.round(eb.quantiles[:, 0, 1])
    eb.update(force=True)


class BitstreamError(ValueError):
    """A bitstream that cannot be decoded with this bundle; says what is wrong."""


def bundle_id(bundle: Bundle) -> bytes:
    """The 8-byte model id of a bundle (its hash prefix)."""
    if not bundle.hash:
        raise BundleError("bundle has no hash: write it with quant.bundle.write_bundle first")
    return bytes.fromhex(bundle.hash[:16])


def pack(model_id: bytes, size: tuple[int, int], latent_hw: tuple[int, int], strings: list[bytes],
         pad: int = PAD) -> bytes:
    """Header + rANS strings (see the module doc)."""
    if len(model_id) != 8 or not 1 <= len(strings) <= 255 or not 1 <= pad <= 255:
        raise ValueError("pack: model_id must be 8 bytes, 1..255 strings, pad 1..255")
    body = bytes([len(strings)]) + b"".join(struct.pack(">I", len(s)) for s in strings) + b"".join(strings)
    return _HEADER.pack(MAGIC, VERSION, pad, *size, *latent_hw, model_id, zlib.crc32(body)) + body


def unpack(data: bytes, model_id: bytes | None = None) -> tuple[tuple[int, int], tuple[int, int], list[bytes]]:
    """(image size, latent size, strings) of a bitstream; ``model_id`` (if given) must match."""
    if len(data) < _HEADER.size + 1:
        raise BitstreamError(f"bitstream of {len(data)} bytes is shorter than the {_HEADER.size + 1}-byte header")
    magic, version, pad, hh, ww, h, w, mid, crc = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise BitstreamError(f"not a licforge bitstream (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise BitstreamError(f"bitstream version {version}, this decoder reads version {VERSION}")
    if model_id is not None and mid != model_id:
        raise BitstreamError(f"bitstream was made with model {mid.hex()}, not this one ({model_id.hex()}); "
                             f"decode it with the bundle or checkpoint that encoded it")
    body = data[_HEADER.size:]
    if zlib.crc32(body) != crc:
        raise BitstreamError("bitstream is corrupt or truncated (CRC32 mismatch)")
    if pad == 0 or (h, w) != (-(-hh // pad), -(-ww // pad)):
        raise BitstreamError(f"latent size {h}x{w} does not fit image size {hh}x{ww} padded to a multiple of {pad}")
    count, pos, strings = body[0], 1 + 4 * body[0], []
    lengths = struct.unpack_from(f">{count}I", body, 1)
    for n in lengths:
        strings.append(body[pos:pos + n])
        pos += n
    if pos != len(body):
        raise BitstreamError(f"bitstream lengths add up to {pos} bytes, the body has {len(body)}")
    return (hh, ww), (h, w), strings


def pad_image(image: np.ndarray, multiple: int = PAD) -> np.ndarray:
    """uint8 (H, W, 3) -> (1, 3, H', W') int64 with H', W' multiples of ``multiple`` (the
    last row and column repeated)."""
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"image must be uint8 (H, W, 3), not {img.dtype} {img.shape}")
    hh, ww = img.shape[:2]
    padded = np.pad(img, ((0, -hh % multiple), (0, -ww % multiple), (0, 0)), mode="edge")
    return padded.transpose(2, 0, 1)[None].astype(np.int64)


def _tables(bundle: Bundle):
    try:
        lay = bundle.layer("latent")
    except KeyError:
        raise BundleError(f"{bundle.path}: bundle has no 'latent' layer; it holds no encoder") from None
    missing = [t for t in ("cdf", "cdf_length", "offset", "median") if t not in lay.tensors]
    if missing:
        raise BundleError(f"{bundle.path}: layer 'latent' lacks the entropy coder tables {missing}; "
                          f"re-export the bundle with 'licforge quantize'")
    t = lay.tensors
    return (t["cdf"].tolist(), t["cdf_length"].reshape(-1).tolist(), t["offset"].reshape(-1).tolist(),
            np.asarray(t["median"], np.int64))


def _indexes(m: int, h: int, w: int) -> list[int]:
    return np.repeat(np.arange(m), h * w).tolist()


def encode_latents(bundle: Bundle, latent: np.ndarray) -> bytes:
    """One rANS string for integer latents (1, M, h, w) with the bundle's tables."""
    from compressai.ans import RansEncoder

    cdf, length, offset, median = _tables(bundle)
    lat = np.asarray(latent, np.int64)
    if lat.ndim != 4 or lat.shape[:2] != (1, len(median)):
        raise ValueError(f"latent must be (1, {len(median)}, h, w), not {lat.shape}")
    _, m, h, w = lat.shape
    symbols = (lat[0] - median[:, None, None]).reshape(-1).tolist()
    return RansEncoder().encode_with_indexes(symbols, _indexes(m, h, w), cdf, length, offset)


def encode_image(bundle: Bundle, image: np.ndarray) -> bytes:
    """The bitstream of a uint8 (H, W, 3) image: golden encoder, then rANS (module doc)."""
    from .lic import golden_encode

    hh, ww = np.asarray(image).shape[:2]
    latent = golden_encode(bundle, pad_image(image))
    return pack(bundle_id(bundle), (hh, ww), latent.shape[2:], [encode_latents(bundle, latent)])


def decode_latents(bundle: Bundle, data: bytes) -> tuple[np.ndarray, tuple[int, int]]:
    """(integer latents (1, M, h, w) int64, image size (H, W)) of a bitstream made with
    this bundle."""
    from compressai.ans import RansDecoder

    size, (h, w), strings = unpack(data, bundle_id(bundle))
    if len(strings) != 1:
        raise BitstreamError(f"bitstream holds {len(strings)} strings; a factorized-prior bundle reads 1")
    cdf, length, offset, median = _tables(bundle)
    m = len(median)
    sym = RansDecoder().decode_with_indexes(strings[0], _indexes(m, h, w), cdf, length, offset)
    latent = np.asarray(sym, np.int64).reshape(1, m, h, w) + median[None, :, None, None]
    return latent, size


def decode_image(bundle: Bundle, data: bytes) -> np.ndarray:
    """uint8 (H, W, 3) pixels decoded by the integer golden decoder, cropped to H x W."""
    from .lic import golden_decode

    latent, (hh, ww) = decode_latents(bundle, data)
    out = golden_decode(bundle, latent)
    return out[0, :, :hh, :ww].transpose(1, 2, 0).astype(np.uint8)
