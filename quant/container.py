"""The licforge file: a compressed image as bytes, and the checks a file passes before any
of its bytes reaches CompressAI's entropy decoder.

Layout, version 2 (all integers big endian)::

    offset  bytes  field
    0       4      magic b"LICF"
    4       1      format version (2)
    5       1      model kind: 1 = deployment bundle (integer golden model / RTL decoder),
                   2 = float weight file (CompressAI model)
    6       1      P: the image was padded to a multiple of P pixels (16; 64 for a hyperprior)
    7       1      S: number of payload strings (1 factorized prior; 2 hyperprior: y, z)
    8       2      H, image height in pixels (1..65535)
    10      2      W, image width
    12      2      C, channels of the entropy-bottleneck latent (M; N for a hyperprior's z)
    14      2      h = ceil(H / P), latent height
    16      2      w = ceil(W / P), latent width
    18      32     sha256 of the model: a bundle's hash, or a weight file's bytes
    50      32     sha256 of the entropy coder's tables (:func:`tables_sha256`)
    82      4*S    payload lengths in bytes
    82+4S   ...    the payloads: rANS strings of CompressAI's coder, in that order
    end-4   4      CRC32 of every byte before it

A file is read by :func:`read_file`, which refuses, with a :class:`BitstreamError` whose
message is one line, anything but a well-formed file: a short or long file, another magic, an
unknown version or model kind, sizes inconsistent with each other, or a wrong CRC.  Limits
depend on the decoder and are checked by :func:`check_limits` before anything proportional to
the image is allocated: at most :data:`MAX_PIXELS` pixels for a CPU decode (golden or float
model), and the widest latent line of the RTL decoder for an RTL decode.

The payload is then checked by :func:`check_payload`, a bounds-checked model of CompressAI's
rANS decoder (``rans_interface.cpp``, ``rans64.h``), because that decoder itself does no bounds
checking: its initialisation and renormalisation read past the end of the buffer and its bypass
loop has no bound.  The model decodes the string with the same tables and indexes, refusing a
string that is not a whole number of 32-bit words, reads a word past its end, leaves the rANS
state interval, codes a raw (bypass) value longer than the latent can be, or does not end in
the encoder's initial state exactly at its last word.  Only a string it accepts is handed to
CompressAI's decoder, which then reads the same words and returns the same symbols.  Before
decoding, a string too short for the declared latent shape is refused without a decode: rANS
spends at least ``-log2 p_max`` bits on a symbol whose most likely value has probability
``p_max``.
"""
from __future__ import annotations

import bisect
import hashlib
import itertools
import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from licforge.errors import UsageError

__all__ = ["BitstreamError", "Header", "write_file", "read_file", "check_limits", "check_payload",
           "tables_sha256", "MAGIC", "VERSION", "KIND_BUNDLE", "KIND_FLOAT", "KINDS", "MAX_STRINGS",
           "MAX_PIXELS", "MAX_FILE_BYTES", "RANS_PRECISION", "MAX_RAW_BITS"]

MAGIC, VERSION = b"LICF", 2
KIND_BUNDLE, KIND_FLOAT = 1, 2
KINDS = {KIND_BUNDLE: "bundle", KIND_FLOAT: "float weight file"}
MAX_STRINGS = 2
#: the largest image a CPU decode (integer golden model or float model) accepts: 2**24 pixels
#: (4096 x 4096); the golden decoder of the N=16 bundle peaks near 100 bytes per pixel (1.7 GB
#: there), the float N=128 teacher's synthesis near 480
MAX_PIXELS = 1 << 24
#: the largest file ``licforge decode`` reads into memory
MAX_FILE_BYTES = 1 << 26
RANS_PRECISION = 16  # CompressAI's rANS: probabilities in 1/65536
#: the longest raw value CompressAI's bypass mode may carry here (7 groups of 4 bits: an int32
#: in its decoder; latents are far smaller)
MAX_RAW_BITS = 28
_FIXED = struct.Struct(">4sBBBBHHHHH32s32s")
_RANS_L = 1 << 31  # rans64.h RANS64_L: the state lives in [L, L << 32)
_BYPASS_BITS = 4  # CompressAI's bypass mode codes raw values 4 bits at a time


class BitstreamError(UsageError, ValueError):
    """A file that cannot be decoded (with this model); the message is one line saying why."""


@dataclass(frozen=True)
class Header:
    """The fields of a licforge file (module doc); ``lengths`` are the payload sizes."""
    kind: int
    pad: int
    height: int
    width: int
    channels: int
    latent_hw: tuple[int, int]
    model_sha256: str
    tables_sha256: str
    lengths: tuple[int, ...]

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the image."""
        return self.height, self.width

    @property
    def header_bytes(self) -> int:
        """Bytes before the first payload string."""
        return _FIXED.size + 4 * len(self.lengths)


def tables_sha256(tables: dict[str, np.ndarray]) -> str:
    """sha256 over named integer tables (name, shape, int64 values, in name order): the
    entropy coder's cdf, cdf lengths, offsets and medians (and a hyperprior's Gaussian tables)."""
    h = hashlib.sha256()
    for name in sorted(tables):
        a = np.ascontiguousarray(np.asarray(tables[name]).astype(">i8"))
        h.update(f"{name}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def write_file(header: Header, strings: list[bytes]) -> bytes:
    """The bytes of a licforge file (the header's ``lengths`` are those of ``strings``)."""
    if not 1 <= len(strings) <= MAX_STRINGS or tuple(len(s) for s in strings) != tuple(header.lengths):
        raise ValueError(f"write_file: {len(strings)} strings of {[len(s) for s in strings]} bytes do not match "
                         f"the header's lengths {list(header.lengths)}")
    h, w = header.latent_hw
    for name, v in (("height", header.height), ("width", header.width), ("channels", header.channels),
                    ("latent height", h), ("latent width", w)):
        if not 1 <= v <= 0xFFFF:
            raise BitstreamError(f"{name} {v} does not fit the file's 16-bit field (1..65535)")
    body = _FIXED.pack(MAGIC, VERSION, header.kind, header.pad, len(strings), header.height, header.width,
                       header.channels, h, w, bytes.fromhex(header.model_sha256),
                       bytes.fromhex(header.tables_sha256))
    body += b"".join(struct.pack(">I", len(s)) for s in strings) + b"".join(strings)
    return body + struct.pack(">I", zlib.crc32(body))


def read_file(data: bytes) -> tuple[Header, list[bytes]]:
    """(header, payload strings) of a well-formed licforge file; :class:`BitstreamError`
    otherwise (module doc).  Nothing here allocates more than the file's size."""
    n = len(data)
    if n < 5 or data[:4] != MAGIC:
        raise BitstreamError(f"not a licforge file (starts with {bytes(data[:4])!r}, expected {MAGIC!r})")
    if data[4] != VERSION:
        raise BitstreamError(f"file format version {data[4]}; this licforge reads version {VERSION}")
    if n < _FIXED.size + 4:
        raise BitstreamError(f"file truncated: {n} bytes, shorter than the {_FIXED.size + 4}-byte minimum")
    (_, _, kind, pad, count, hh, ww, c, h, w, model, tables) = _FIXED.unpack_from(data)
    if kind not in KINDS:
        raise BitstreamError(f"unknown model kind {kind} (1 bundle, 2 float weight file)")
    if not 1 <= count <= MAX_STRINGS:
        raise BitstreamError(f"{count} payload strings declared; a file holds 1 to {MAX_STRINGS}")
    lengths = struct.unpack_from(f">{count}I", data, _FIXED.size) if n >= _FIXED.size + 4 * count else ()
    expected = _FIXED.size + 4 * count + sum(lengths) + 4
    if not lengths or n < expected:
        raise BitstreamError(f"file truncated: {n} bytes, its header declares {expected}")
    if n > expected:
        raise BitstreamError(f"file has {n - expected} bytes after the {expected} its header declares")
    if zlib.crc32(data[:-4]) != struct.unpack_from(">I", data, n - 4)[0]:
        raise BitstreamError("file corrupt: CRC32 mismatch")
    if min(hh, ww, c) == 0 or pad == 0:
        raise BitstreamError(f"header declares an empty image or latent (H={hh}, W={ww}, C={c}, P={pad})")
    if (h, w) != (-(-hh // pad), -(-ww // pad)):
        raise BitstreamError(f"latent size {h}x{w} does not fit image size {hh}x{ww} padded to a multiple of {pad}")
    header = Header(kind, pad, hh, ww, c, (h, w), model.hex(), tables.hex(), tuple(lengths))
    pos, strings = header.header_bytes, []
    for length in lengths:
        strings.append(bytes(data[pos:pos + length]))
        pos += length
    return header, strings


def check_limits(header: Header, max_pixels: int = MAX_PIXELS, max_latent_width: int | None = None) -> None:
    """Refuse an image beyond what the decoder accepts: ``max_pixels`` pixels (a CPU decode),
    and, for the RTL decoder, a latent line wider than its line buffers (``max_latent_width``)."""
    if header.height * header.width > max_pixels:
        raise BitstreamError(f"image {header.height}x{header.width} has more than the {max_pixels} pixels this "
                             f"decoder accepts")
    if max_latent_width is not None and header.latent_hw[1] > max_latent_width:
        raise BitstreamError(f"latent line of {header.latent_hw[1]} columns ({header.width} pixels) is wider than "
                             f"the RTL decoder's {max_latent_width} (--max-width)")


def _min_bits(cdf: list[list[int]], lengths: list[int]) -> list[float]:
    """Per table, the fewest bits rANS can spend on one symbol: ``-log2`` of its largest
    probability (the bypass escape included)."""
    return [RANS_PRECISION - math.log2(max(row[i + 1] - row[i] for i in range(n - 1))) for row, n in zip(cdf, lengths)]


def check_payload(string: bytes, indexes: list[int], cdf: list[list[int]], lengths: list[int],
                  offsets: list[int]) -> list[int]:
    """The symbols of one rANS string, decoded by a bounds-checked model of CompressAI's
    ``decode_with_indexes`` (module doc), or a :class:`BitstreamError`.

    ``indexes[i]`` selects the table (``cdf[t][:lengths[t]]``, ``offsets[t]``) of symbol ``i``.
    A bypass-coded raw value may have at most :data:`MAX_RAW_BITS` bits.  The string is
    refused before any decoding when it is shorter than ``32 + sum_i (-log2 p_max(i))`` bits
    (less a rounding allowance of 1e-4 bit per symbol): the encoder's state starts at 2**31 and
    grows by at least ``log2(65536 / freq)`` - 9e-5 bits per symbol, and its flush writes 64
    bits of a state below 2**63."""
    n = len(string)
    if n < 8 or n % 4:
        raise BitstreamError(f"payload of {n} bytes is not a rANS string (whole 32-bit words, at least 2)")
    counts = np.bincount(np.asarray(indexes, np.int64), minlength=len(cdf))
    need = float(np.dot(counts, _min_bits(cdf, lengths))) + 32 - 1e-4 * len(indexes) - 1
    if 8 * n < need:
        raise BitstreamError(f"payload of {n} bytes is too short for the {len(indexes)} latent symbols declared "
                             f"(they need at least {math.ceil(need / 8)} bytes)")
    words = struct.unpack(f"<{n // 4}I", string)
    x, ptr, end = words[0] | (words[1] << 32), 2, n // 4
    low, high, mask, scale = _RANS_L, _RANS_L << 32, (1 << RANS_PRECISION) - 1, RANS_PRECISION

    def corrupt(what: str) -> BitstreamError:
        return BitstreamError(f"payload corrupt: {what} (symbol {len(out)} of {len(indexes)})")

    def bits4() -> int:  # Rans64DecGetBits(4), bounds-checked
        nonlocal x, ptr
        v, x = x & 15, x >> _BYPASS_BITS
        if x < low:
            if ptr == end:
                raise corrupt("reads past the end of the string")
            x, ptr = (x << 32) | words[ptr], ptr + 1
        return v

    out: list[int] = []
    if not low <= x < high:
        raise corrupt("initial rANS state out of its interval")
    bisect_right, append, groups = bisect.bisect_right, out.append, MAX_RAW_BITS // _BYPASS_BITS
    for t, run in itertools.groupby(indexes):  # runs of one table (a channel, for the bottleneck)
        row, max_value, offset = cdf[t], lengths[t] - 2, offsets[t]
        for _ in run:
            cum = x & mask
            s = bisect_right(row, cum, 0, max_value + 2) - 1
            x = (row[s + 1] - row[s]) * (x >> scale) + cum - row[s]
            if x < low:
                if ptr == end:
                    raise corrupt("reads past the end of the string")
                x, ptr = (x << 32) | words[ptr], ptr + 1
                if x < low:
                    raise corrupt("rANS state left its interval")
            if s == max_value:  # bypass: the count of 4-bit groups (15 = more follow), then the raw value
                v = bits4()
                count = v
                while v == 15 and count <= groups:
                    v = bits4()
                    count += v
                if count > groups:
                    raise corrupt(f"a bypass-coded value longer than {MAX_RAW_BITS} bits")
                raw = 0
                for j in range(count):
                    raw |= bits4() << (_BYPASS_BITS * j)
                s = -(raw >> 1) - 1 if raw & 1 else (raw >> 1) + max_value
            append(s + offset)
    if ptr != end:
        raise BitstreamError(f"payload corrupt: {4 * (end - ptr)} bytes left over after the last symbol")
    if x != low:
        raise BitstreamError("payload corrupt: the rANS decoder does not end in the encoder's initial state")
    return out
