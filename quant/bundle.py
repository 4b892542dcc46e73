"""The deployment bundle: one directory per quantized model, integers only.

    bundle.json        manifest: format, model description, input format, the layer graph
                       (a chain), per-layer attributes (exponents, shifts, bit widths ...),
                       per-tensor file/shape/sha256, and a hash over all of it
    <layer>.<t>.npy    one int64 array per tensor (weights, biases, GDN gamma/beta)

Everything downstream (golden model, RTL generators, QONNX cross-checks, watermark
extraction) reads a bundle through :func:`read_bundle`, which validates it and refuses a
truncated, edited or inconsistent bundle with a :class:`BundleError` naming the file, what is
wrong, and the fix.  Op schemas (required attributes, tensors and the attribute giving each
tensor's bit width) live in :data:`OPS`.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from licforge.errors import read_json

from .fixed import int_range

__all__ = ["decoder_layers", "BundleError", "Layer", "Bundle", "OPS", "OpSchema", "write_bundle", "read_bundle",
           "FORMAT"]

FORMAT = "licforge-bundle/1"
MANIFEST = "bundle.json"


class BundleError(ValueError):
    """A bundle that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class OpSchema:
    """Required attributes, and tensors -> (bit-width attribute, signed, narrow)."""
    attrs: tuple[str, ...]
    tensors: dict[str, tuple[str, bool, bool]] = field(default_factory=dict)
    optional_tensors: tuple[str, ...] = ()


_DOT = ("x_exp", "w_exp", "acc_exp", "out_exp", "shift", "w_bits", "x_bits", "out_bits",
        "acc_bits", "relu", "product")
_WB = {"weight": ("w_bits", True, True), "bias": ("b_bits", True, False)}
_GDN = ("x_exp", "x_bits", "gamma_exp", "gamma_bits", "beta_bits", "norm_acc_exp", "norm_exp",
        "norm_bits", "norm_shift", "out_exp", "out_bits", "out_shift")
OPS: dict[str, OpSchema] = {
    # dot-product layers; optional bias at the accumulator scale; optional "out_signed"
    # (default true) and "x_shift"/"w_shift" (MinConv scale alignment)
    "conv2d": OpSchema(_DOT + ("stride", "padding"), _WB, ("bias",)),
    "linear": OpSchema(_DOT, _WB, ("bias",)),
    # PyTorch layout (Cin, Cout, K, K); "product" mul, or min with "x_shift"/"w_shift" (contract_15)
    "conv_transpose2d": OpSchema(_DOT + ("stride", "padding", "output_padding", "b_bits"), _WB),
    # simplified (inverse) GDN: n = requant(beta + gamma |x|, norm_shift); igdn y = x n,
    # gdn y = x / n (see quant.golden); gamma (C, C) >= 0, beta (C,) at x_exp + gamma_exp.
    # igdn only, optional (contract_15): "norm_product" min (+ "norm_x_shift"/"norm_g_shift",
    # "log2_gain"; beta at the min's scale) and "out_product" shift (y = x << pow2_round(n))
    "igdn": OpSchema(_GDN, {"gamma": ("gamma_bits", True, True), "beta": ("beta_bits", True, False)}),
    "gdn": OpSchema(_GDN, {"gamma": ("gamma_bits", True, True), "beta": ("beta_bits", True, False)}),
    # encoder output -> integer latent symbols (exp 0): requantize by "shift" to "out_bits"
    "latent": OpSchema(("x_exp", "out_exp", "shift", "out_bits"),
                       # optional: the entropy coder's integer tables (quant.codec), present
                       # together with their attrs "cdf_bits", "cdf_length_bits",
                       # "offset_bits", "cdf_precision": per channel c, symbols are
                       # latent - median[c], coded by rANS with cdf[c, :cdf_length[c]], offset[c]
                       {"cdf": ("cdf_bits", False, False), "cdf_length": ("cdf_length_bits", False, False),
                        "offset": ("offset_bits", True, False), "median": ("out_bits", True, False)},
                       ("cdf", "cdf_length", "offset", "median")),
    "flatten": OpSchema(()),
}


@dataclass
class Layer:
    """One node of the chain: ``op`` with integer ``attrs`` and integer ``tensors``."""
    name: str
    op: str
    attrs: dict[str, Any]
    tensors: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Bundle:
    """A quantized model as integers: ``input`` = {exp, bits, signed, shape}; ``model`` is
    free-form description (architecture, widths, recipe, source checkpoint)."""
    model: dict[str, Any]
    input: dict[str, Any]
    layers: list[Layer]
    hash: str = ""
    path: Path | None = None

    def layer(self, name: str) -> Layer:
        for lay in self.layers:
            if lay.name == name:
                return lay
        raise KeyError(f"bundle has no layer {name!r} (layers: {[l.name for l in self.layers]})")


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a, dtype=np.int64), allow_pickle=False)
    return buf.getvalue()


def _digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return v


def _check_layer(lay: Layer, where: str) -> None:
    schema = OPS.get(lay.op)
    if schema is None:
        raise BundleError(f"{where}: layer {lay.name!r} has unknown op {lay.op!r}; known ops: "
                          f"{sorted(OPS)} (was the bundle written by a newer licforge?)")
    missing = [a for a in schema.attrs if a not in lay.attrs]
    if missing:
        raise BundleError(f"{where}: layer {lay.name!r} ({lay.op}) lacks attributes {missing}; "
                          f"re-export the bundle with 'licforge quantize'")
    for t, (bits_key, signed, narrow) in schema.tensors.items():
        if t not in lay.tensors:
            if t in schema.optional_tensors:
                continue
            raise BundleError(f"{where}: layer {lay.name!r} lacks tensor {t!r}")
        arr = lay.tensors[t]
        if not np.issubdtype(arr.dtype, np.integer):
            raise BundleError(f"{where}: tensor {lay.name}.{t} is {arr.dtype}, not integer")
        lo, hi = int_range(int(lay.attrs[bits_key]), signed, narrow)
        if arr.size and (arr.min() < lo or arr.max() > hi):
            raise BundleError(f"{where}: tensor {lay.name}.{t} has values in [{arr.min()}, {arr.max()}], "
                              f"outside the {lay.attrs[bits_key]}-bit range [{lo}, {hi}] its "
                              f"'{bits_key}' declares")
    a = lay.attrs
    _check_products(lay, where)
    if lay.op in ("igdn", "gdn"):
        norm_acc = (a["x_exp"] + a["gamma_exp"] if a.get("norm_product", "mul") == "mul"
                    else a["x_exp"] - a.get("norm_x_shift", 0) - a.get("log2_gain", 0))
        if a["norm_acc_exp"] != norm_acc or a["norm_shift"] != a["norm_exp"] - a["norm_acc_exp"]:
            raise BundleError(f"{where}: layer {lay.name!r}: GDN exponents are inconsistent "
                              f"(norm_acc_exp must be x_exp + gamma_exp, norm_shift norm_exp - norm_acc_exp)")
        if (lay.tensors["gamma"] < 0).any():
            raise BundleError(f"{where}: layer {lay.name!r}: gamma has negative entries")
        c = lay.tensors["beta"].shape[0]
        if lay.tensors["gamma"].shape != (c, c):
            raise BundleError(f"{where}: layer {lay.name!r}: gamma shape {lay.tensors['gamma'].shape} != ({c}, {c})")
    if "shift" in lay.attrs and "acc_exp" in lay.attrs and "out_exp" in lay.attrs:
        if lay.attrs["shift"] != lay.attrs["out_exp"] - lay.attrs["acc_exp"]:
            raise BundleError(f"{where}: layer {lay.name!r}: shift {lay.attrs['shift']} != out_exp - "
                              f"acc_exp = {lay.attrs['out_exp'] - lay.attrs['acc_exp']}")


def _check_min_operands(lay: Layer, where: str, x_exp: int, w_exp: int, xs: int, ws: int, acc_exp: int,
                        what: str) -> None:
    """A sum of signed minimums: shifts >= 0, at most one non-zero, aligning both operands to one
    scale, and the accumulator at that scale divided by ``2**log2_gain``."""
    gain = lay.attrs.get("log2_gain", 0)
    if min(xs, ws) < 0 or min(xs, ws) > 0 or x_exp - xs != w_exp - ws or acc_exp != x_exp - xs - gain:
        raise BundleError(f"{where}: layer {lay.name!r}: {what} shifts ({xs}, {ws}) do not align the operands "
                          f"(at most one non-zero shift, x_exp - x_shift = w_exp - w_shift = acc_exp + log2_gain)")


def _check_products(lay: Layer, where: str) -> None:
    """The product attributes of contract_15: known values, on layers that have them."""
    a = lay.attrs
    if lay.op in ("conv2d", "linear", "conv_transpose2d"):
        if a["product"] not in ("mul", "min"):
            raise BundleError(f"{where}: layer {lay.name!r}: product {a['product']!r} is neither 'mul' nor 'min'")
        if a["product"] == "min":
            _check_min_operands(lay, where, a["x_exp"], a["w_exp"], a.get("x_shift", 0), a.get("w_shift", 0),
                                a["acc_exp"], "x/w")
    if lay.op in ("igdn", "gdn"):
        norm, out = a.get("norm_product", "mul"), a.get("out_product", "mul")
        if norm not in ("mul", "min") or out not in ("mul", "shift") or (lay.op == "gdn" and (norm, out) != ("mul", "mul")):
            raise BundleError(f"{where}: layer {lay.name!r} ({lay.op}): norm_product {norm!r} / out_product {out!r} "
                              f"not supported (igdn: mul|min and mul|shift; gdn: mul only)")
        if norm == "min":
            _check_min_operands(lay, where, a["x_exp"], a["gamma_exp"], a.get("norm_x_shift", 0),
                                a.get("norm_g_shift", 0), a["norm_acc_exp"], "norm")


def write_bundle(bundle: Bundle, out_dir: Path) -> str:
    """Validate and write ``bundle`` to ``out_dir`` (created); returns its hash."""
    out_dir = Path(out_dir)
    names = [l.name for l in bundle.layers]
    if len(set(names)) != len(names):
        raise BundleError(f"{out_dir}: duplicate layer names {names}")
    for lay in bundle.layers:
        _check_layer(lay, str(out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    layers = []
    for lay in bundle.layers:
        tensors = {}
        for t, a in lay.tensors.items():
            fname = f"{lay.name}.{t}.npy"
            data = _npy_bytes(a)
            (out_dir / fname).write_bytes(data)
            tensors[t] = {"file": fname, "shape": list(a.shape), "sha256": hashlib.sha256(data).hexdigest()}
        layers.append({"name": lay.name, "op": lay.op, "attrs": _jsonable(lay.attrs), "tensors": tensors})
    manifest = {"format": FORMAT, "model": _jsonable(bundle.model), "input": _jsonable(bundle.input),
                "layers": layers}
    manifest["hash"] = _digest(manifest)
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    bundle.hash, bundle.path = manifest["hash"], out_dir
    return manifest["hash"]


def read_bundle(path: Path) -> Bundle:
    """Read and validate a bundle directory (or its ``bundle.json``)."""
    path = Path(path)
    root = path.parent if path.name == MANIFEST else path
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{mpath}: not found; a bundle is a directory written by 'licforge quantize'")
    manifest = read_json(mpath, fix="re-export the bundle", error=BundleError)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{mpath}: format is {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                          f"expected {FORMAT!r}")
    for key in ("model", "input", "layers", "hash"):
        if key not in manifest:
            raise BundleError(f"{mpath}: missing key {key!r}")
    if _digest(manifest) != manifest["hash"]:
        raise BundleError(f"{mpath}: hash mismatch: the manifest was edited after export; "
                          f"re-export the bundle instead of editing it")
    layers = []
    for entry in manifest["layers"]:
        tensors = {}
        for t, ref in entry.get("tensors", {}).items():
            f = root / ref["file"]
            if not f.is_file():
                raise BundleError(f"{f}: missing (layer {entry['name']!r}, tensor {t!r}); copy the "
                                  f"whole bundle directory")
            data = f.read_bytes()
            if hashlib.sha256(data).hexdigest() != ref["sha256"]:
                raise BundleError(f"{f}: content does not match the manifest's sha256 (truncated or "
                                  f"edited); re-export the bundle")
            a = np.load(io.BytesIO(data), allow_pickle=False)
            if list(a.shape) != ref["shape"]:
                raise BundleError(f"{f}: shape {list(a.shape)} != manifest shape {ref['shape']}")
            tensors[t] = a
        lay = Layer(entry["name"], entry["op"], entry["attrs"], tensors)
        _check_layer(lay, str(mpath))
        layers.append(lay)
    return Bundle(manifest["model"], manifest["input"], layers, manifest["hash"], root)


def decoder_layers(bundle: Bundle) -> list[Layer]:
    """The synthesis-transform layers of a bundle: those after its ``latent`` layer, or all
    layers when it holds only a decoder."""
    ops = [l.op for l in bundle.layers]
    start = ops.index("latent") + 1 if "latent" in ops else 0
    return bundle.layers[start:]
