"""Watermark keys: the owner's secret, kept in a key file and never inside the model.

A key holds the scheme, the seed it was drawn from, the watermark bits and where they live:

* WaterMAS: ``positions``, ``repeat`` ``(layer, flat index)`` per bit, drawn uniformly without
  replacement over all the weights of the allowed layers (so a payload spreads across
  several layers, as in the paper); ``groups`` gives the bit each position carries (with
  ``repeat`` > 1, a repetition code: the copies of a bit are spread at random over the positions,
  and reading sums them, :func:`watermark.watermas.watermas_bits`);
* Uchida: one layer; the secret projection matrix ``X`` (``payload x M``, standard normal,
  ``M`` = the layer's kernel size) is regenerated from the seed by :meth:`WatermarkKey.projection`.

The key file is JSON (``format: licforge-watermark-key/1``) with the layer shapes the key was
made for, so that a key applied to the wrong network is refused with a message naming the
layer, instead of reading noise.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from licforge.errors import not_a_file, read_json
from licforge.quant.bundle import Layer
from .layers import OUT_AXIS

__all__ = ["SCHEMES", "KEY_FORMAT", "KeyFileError", "WatermarkKey", "make_key", "save_key", "load_key"]

SCHEMES = ("watermas", "uchida")
KEY_FORMAT = "licforge-watermark-key/1"


class KeyFileError(ValueError):
    """A key file that cannot be used; the message names the file, the entry and the fix."""


@dataclass
class WatermarkKey:
    """The secret of one embedded watermark (see the module docstring)."""
    scheme: str
    seed: int
    bits: np.ndarray
    layers: dict[str, dict[str, Any]]
    positions: list[tuple[str, int]] = field(default_factory=list)
    model: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    groups: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.groups is None:
            self.groups = np.arange(len(self.positions), dtype=np.int64)
        self.groups = np.asarray(self.groups, np.int64)

    @property
    def payload(self) -> int:
        """Number of watermark bits."""
        return int(len(self.bits))

    @property
    def repeat(self) -> int:
        """WaterMAS positions per bit (1: one weight per bit)."""
        return len(self.positions) // max(self.payload, 1) if self.positions else 1

    @property
    def position_bits(self) -> np.ndarray:
        """The bit written at each WaterMAS position."""
        return self.bits[self.groups]

    def positions_by_layer(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """WaterMAS positions grouped by layer: ``{layer: (flat indices, bit numbers)}``."""
        out: dict[str, tuple[list, list]] = {}
        for k, (name, idx) in enumerate(self.positions):
            out.setdefault(name, ([], []))
            out[name][0].append(idx)
            out[name][1].append(int(self.groups[k]))
        return {n: (np.array(i, np.int64), np.array(b, np.int64)) for n, (i, b) in out.items()}

    def projection(self) -> np.ndarray:
        """Uchida's secret matrix ``X`` (``payload x M``), standard normal, from the seed."""
        if self.scheme != "uchida":
            raise ValueError(f"a {self.scheme} key has no projection matrix")
        (name, info), = self.layers.items()
        shape = info["shape"]
        m = int(np.prod(shape)) // int(shape[OUT_AXIS[info["op"]]])
        return np.random.default_rng([self.seed, 1]).standard_normal((self.payload, m))


def make_key(scheme: str, chain: list[Layer], payload: int, seed: int, *,
             layers: Iterable[str] | None = None, model: dict | None = None,
             params: dict | None = None, repeat: int = 1) -> WatermarkKey:
    """Draw a key for ``payload`` bits from ``seed`` over the dot layers of ``chain``.

    ``layers`` restricts where the watermark may go (e.g. the decoder layers of an LIC
    student, the part that is deployed in hardware); default: every dot layer.  Uchida uses
    one layer: the only one allowed, or else the allowed layer with the largest kernel size
    ``M`` (Uchida et al. need ``payload <= M`` for the bits to be linearly separable).
    ``repeat`` (WaterMAS): weights per bit, a repetition code whose copies of a bit land at
    random positions (``repeat = 1`` draws exactly the key it always drew from ``seed``).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, not {scheme!r}")
    if not isinstance(payload, int) or payload < 1:
        raise ValueError(f"payload must be a positive number of bits, not {payload!r}")
    if not isinstance(repeat, int) or repeat < 1 or (repeat > 1 and scheme != "watermas"):
        raise ValueError(f"repeat must be a positive number of WaterMAS weights per bit, not {repeat!r} "
                         f"for a {scheme} key")
    dots = {l.name: l for l in chain if l.op in OUT_AXIS}
    names = list(dots) if layers is None else list(layers)
    for n in names:
        if n not in dots:
            raise ValueError(f"layer {n!r} is not a dot layer of the model (layers: {list(dots)})")
    if not names:
        raise ValueError("no layer to carry the watermark")
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2, payload).astype(np.uint8)
    info = lambda n: {"op": dots[n].op, "shape": list(np.shape(dots[n].tensors["weight"]))}  # noqa: E731
    if scheme == "watermas":
        sizes = np.array([np.size(dots[n].tensors["weight"]) for n in names])
        if payload * repeat > sizes.sum():
            times = f" x repeat {repeat}" if repeat > 1 else ""
            raise ValueError(f"payload {payload}{times} exceeds the {int(sizes.sum())} weights of layers {names}")
        flat = np.sort(rng.choice(int(sizes.sum()), payload * repeat, replace=False))
        starts = np.concatenate([[0], np.cumsum(sizes)])
        which = np.searchsorted(starts, flat, side="right") - 1
        positions = [(names[w], int(f - starts[w])) for w, f in zip(which, flat)]
        used = sorted({p[0] for p in positions}, key=names.index)
        groups = rng.permutation(payload * repeat) // repeat if repeat > 1 else None
        return WatermarkKey(scheme, seed, bits, {n: info(n) for n in used}, positions,
                            dict(model or {}), dict(params or {}), groups)
    fan = {n: np.size(dots[n].tensors["weight"]) // np.shape(dots[n].tensors["weight"])[OUT_AXIS[dots[n].op]]
           for n in names}
    name = max(names, key=lambda n: fan[n])
    if payload > fan[name]:
        raise ValueError(f"Uchida payload {payload} exceeds the kernel size M={fan[name]} of layer "
                         f"{name!r}; choose at most {fan[name]} bits or a wider layer")
    return WatermarkKey(scheme, seed, bits, {name: info(name)}, [], dict(model or {}), dict(params or {}))


def save_key(key: WatermarkKey, path: Path) -> Path:
    """Write ``key`` as JSON to ``path`` (parent directories created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"format": KEY_FORMAT, "scheme": key.scheme, "seed": int(key.seed), "payload": key.payload,
           "bits": "".join(str(int(b)) for b in key.bits), "layers": key.layers,
           "positions": [[n, int(i)] for n, i in key.positions], "model": key.model, "params": key.params}
    if key.repeat > 1:
        doc["groups"] = key.groups.tolist()
    path.write_text(json.dumps(doc, indent=1))
    return path


def load_key(path: Path) -> WatermarkKey:
    """Read and validate a key file; :class:`KeyFileError` names the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        why = not_a_file(path)
        raise KeyFileError(f"key file {path}: {why}" + ("; 'licforge watermark embed' writes one" if why == "not found" else ""))
    doc = read_json(path, "key file", error=KeyFileError)
    if not isinstance(doc, dict) or doc.get("format") != KEY_FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else None
        raise KeyFileError(f"key file {path}: format is {got!r}, expected {KEY_FORMAT!r}")
    for k in ("scheme", "seed", "payload", "bits", "layers", "positions"):
        if k not in doc:
            raise KeyFileError(f"key file {path}: missing entry {k!r}")
    if doc["scheme"] not in SCHEMES:
        raise KeyFileError(f"key file {path}: scheme {doc['scheme']!r} is not one of {SCHEMES}")
    bits = doc["bits"]
    if not isinstance(bits, str) or set(bits) - {"0", "1"} or len(bits) != doc["payload"]:
        raise KeyFileError(f"key file {path}: 'bits' must be a string of {doc['payload']} '0'/'1' characters")
    layers = doc["layers"]
    for name, info in layers.items():
        if not isinstance(info, dict) or info.get("op") not in OUT_AXIS or not isinstance(info.get("shape"), list):
            raise KeyFileError(f"key file {path}: layer {name!r} needs 'op' in {sorted(OUT_AXIS)} and a 'shape' list")
    positions = [(str(n), int(i)) for n, i in doc["positions"]]
    groups = doc.get("groups")
    if doc["scheme"] == "watermas":
        n_pos = len(groups) if isinstance(groups, list) else doc["payload"]
        if len(positions) != n_pos or len(set(positions)) != len(positions) or n_pos % max(doc["payload"], 1):
            raise KeyFileError(f"key file {path}: WaterMAS needs {n_pos} distinct positions (a multiple of the "
                               f"payload {doc['payload']}), has {len(set(positions))}")
        if groups is not None and sorted(groups) != sorted(list(range(doc["payload"])) * (n_pos // doc["payload"])):
            raise KeyFileError(f"key file {path}: 'groups' must name every bit 0..{doc['payload'] - 1} "
                               f"{n_pos // doc['payload']} times")
        for n, i in positions:
            if n not in layers or not 0 <= i < int(np.prod(layers[n]["shape"])):
                raise KeyFileError(f"key file {path}: position ({n!r}, {i}) is outside the key's layers")
    elif len(layers) != 1:
        raise KeyFileError(f"key file {path}: an Uchida key names exactly one layer, not {len(layers)}")
    return WatermarkKey(doc["scheme"], int(doc["seed"]), np.frombuffer(bits.encode(), np.uint8) - ord("0"),
                        layers, positions, doc.get("model", {}), doc.get("params", {}), groups)
