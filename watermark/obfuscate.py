"""Function-preserving obfuscation: the invariant neuron transforms that crack white-box marks.

Yan et al., "And Then There Were None: Cracking White-box DNN Watermarks via Invariant Neuron
Transforms" (KDD 2023, arXiv 2205.00199) and the same group's dummy neurons (USENIX Security
2023, arXiv 2303.09732).  Each transform rewrites the hidden neurons of a chain of layers
(:mod:`watermark.layers`: a model's float weights or a bundle's integers) so that the network
computes the same function while the weights a key points at move:

* **scaling** neuron ``c`` of dot layer ``l`` by ``s > 0``: its incoming weights and bias times
  ``s``; a following GDN/IGDN (``n_i = beta_i + sum_j gamma_ij |x_j|``) gets column ``c`` of
  ``gamma`` divided by ``s`` (so every norm is unchanged and ``y_c = x_c n_c`` scales by ``s``);
  the next dot layer's inputs from ``c`` divided by ``s``.  Exact through ReLU (positively
  homogeneous) and GDN1; not through MinConv products or the latent's rounding.
* **sign flip**: scaling by ``-1``.  Exact through GDN1 (the norm uses ``|x|``, ``y = x n`` is odd
  in ``x``), *not* through ReLU (``relu(-x) != -relu(x)``): refused there.
* **split**: neuron ``c`` becomes two neurons with incoming weights ``a1 w`` and ``a2 w`` (``a``
  positive through ReLU, any sign through GDN1) and outgoing weights ``v1 = (t v + r) / a1``,
  ``v2 = ((1 - t) v - r) / a2`` (``t`` a share, ``r`` noise), so that ``a1 v1 + a2 v2 = v``; a GDN
  between gets the copy's row of ``gamma`` (equal norms) and column ``c`` shared between the two
  (``tau gamma_:c / |a1|``, ``(1 - tau) gamma_:c / |a2|``).  Neither copy's outgoing weights
  resemble ``v``.
* **dummy neurons**: added neurons with random incoming weights whose outgoing weights are zero,
  or pairs of identical dummies whose outgoing weights ``u`` and ``-u`` cancel; a GDN between
  gives them a zero ``gamma`` column (no other channel's norm sees them).
* **permutation**: :mod:`watermark.permute`.

On a bundle's integers (``integer=True``), splits copy the neuron (``a1 = a2 = 1``) and share the
outgoing integers and ``gamma`` column as integers, dummies draw their integers from the layer's
own, so that the integer golden model computes exactly the same outputs; scaling and sign flips
are applied to a float model before export (a bundle's per-tensor power-of-two scales cannot
absorb them).  :func:`obfuscate` composes them and returns each hidden neuron's *origin* (the
reference neuron it derives from, ``-1`` for a dummy), the ground truth that re-synchronization
(:mod:`watermark.resync`) is scored against.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from licforge.quant.bundle import Layer
from .layers import OUT_AXIS, channel_path, copy_chain, input_slices, map_inputs
from .permute import permutable_layers, permute, random_permutation

__all__ = ["Obfuscation", "obfuscate", "scale_neurons", "flip_neurons", "split_neuron", "add_dummies",
           "sign_exact", "scale_exact", "obfuscable_layers"]


def _index(chain: list[Layer], name: str) -> int:
    """Position of dot layer ``name`` in ``chain``."""
    for i, l in enumerate(chain):
        if l.name == name and l.op in OUT_AXIS:
            return i
    raise ValueError(f"{name!r} is not a dot layer of the chain ({[l.name for l in chain if l.op in OUT_AXIS]})")


def _channels(lay: Layer) -> int:
    """Output channels of a dot layer."""
    return int(np.shape(lay.tensors["weight"])[OUT_AXIS[lay.op]])


def _inexact(chain: list[Layer], name: str, sign: bool = False) -> str | None:
    """Why scaling (``sign``: flipping) ``name``'s neurons would change the function, or None."""
    i = _index(chain, name)
    try:
        between, _ = channel_path(chain, i)
    except ValueError:
        return "its outputs are the network's"
    if chain[i].attrs.get("product", "mul") != "mul":
        return "its products are MinConv signed minimums"
    if any(chain[j].op == "latent" for j in between):
        return "the latent's rounding follows"
    if sign and chain[i].attrs.get("relu", False):
        return "a ReLU follows (relu(-x) != -relu(x))"
    return None


def scale_exact(chain: list[Layer], name: str) -> bool:
    """Whether positive scaling (and splitting) of ``name``'s neurons keeps the function exactly:
    a hidden layer with products (not MinConv) whose channels reach the next dot layer through
    ReLU, GDN1 or nothing (not through the latent's rounding)."""
    return _inexact(chain, name) is None


def sign_exact(chain: list[Layer], name: str) -> bool:
    """Whether flipping the sign of ``name``'s neurons keeps the function: scaling is exact and
    no ReLU follows (GDN1 / inverse GDN1 are odd in their input)."""
    return _inexact(chain, name, sign=True) is None


def obfuscable_layers(chain: list[Layer]) -> list[str]:
    """The hidden dot layers whose neurons can be scaled, split and padded with dummies exactly."""
    return [n for n in permutable_layers(chain) if scale_exact(chain, n)]


def _scale_channels(chain: list[Layer], i: int, factors: np.ndarray) -> None:
    """Multiply the output channels of ``chain[i]`` by ``factors`` (nonzero) and undo it downstream,
    in place.  Factors of +-1 (sign flips) keep integer tensors integer and leave a GDN untouched."""
    lay = chain[i]
    between, nxt = channel_path(chain, i)
    signs = bool(np.all(np.abs(factors) == 1))
    if signs:
        factors = factors.astype(np.asarray(lay.tensors["weight"]).dtype)
    inverse = factors if signs else 1.0 / factors
    shape = [1] * np.ndim(lay.tensors["weight"])
    shape[OUT_AXIS[lay.op]] = -1
    lay.tensors["weight"] = lay.tensors["weight"] * factors.reshape(shape)
    if "bias" in lay.tensors:
        lay.tensors["bias"] = lay.tensors["bias"] * factors
    for j in between:
        if chain[j].op in ("gdn", "igdn") and not signs:
            chain[j].tensors["gamma"] = chain[j].tensors["gamma"] / np.abs(factors)[None, :]
    map_inputs(chain[nxt], len(factors), lambda w: w * inverse.reshape((-1,) + (1,) * (w.ndim - 1)))


def scale_neurons(chain: list[Layer], factors: Mapping[str, np.ndarray]) -> list[Layer]:
    """A copy of ``chain`` with neuron ``c`` of layer ``l`` scaled by ``factors[l][c] > 0`` (module
    docstring); the weights become float."""
    out = copy_chain(chain)
    for name, s in factors.items():
        s = np.asarray(s, np.float64)
        if not scale_exact(out, name):
            raise ValueError(f"scaling the neurons of {name!r} does not keep the function: {_inexact(out, name)}")
        if (s <= 0).any() or len(s) != _channels(out[_index(out, name)]):
            raise ValueError(f"layer {name!r}: need {_channels(out[_index(out, name)])} positive factors")
        _scale_channels(out, _index(out, name), s)
    return out


def flip_neurons(chain: list[Layer], masks: Mapping[str, np.ndarray]) -> list[Layer]:
    """A copy of ``chain`` with the neurons in ``masks[l]`` (boolean per channel) sign-flipped:
    incoming weights and bias negated, the next dot layer's inputs from them negated.  Exact
    through GDN1; refused where a ReLU follows.  Integer tensors stay integers."""
    out = copy_chain(chain)
    for name, m in masks.items():
        if not sign_exact(out, name):
            raise ValueError(f"flipping the signs of {name!r}'s neurons does not keep the function: "
                             f"{_inexact(out, name, sign=True)}")
        i = _index(out, name)
        m = np.asarray(m, bool)
        if len(m) != _channels(out[i]):
            raise ValueError(f"layer {name!r}: the mask has {len(m)} entries, the layer {_channels(out[i])} neurons")
        _scale_channels(out, i, np.where(m, -1, 1))
    return out


def _w_range(lay: Layer) -> tuple[int, int]:
    """The narrow signed integer range of a bundle layer's weights."""
    top = (1 << (int(lay.attrs["w_bits"]) - 1)) - 1
    return -top, top


def _grow_accumulator(lay: Layer, before: int, after: int) -> None:
    """Widen a bundle layer's recorded accumulator for a fan-in that grew from ``before`` to ``after`` inputs."""
    if "acc_bits" in lay.attrs and after > before:
        lay.attrs["acc_bits"] = int(lay.attrs["acc_bits"]) + math.ceil(math.log2(after / before))


def _append_channels(chain: list[Layer], i: int, rows: np.ndarray, bias: np.ndarray | None,
                     outgoing: np.ndarray, gdn: Mapping[int, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
    """Append ``k`` output channels to ``chain[i]`` in place: incoming ``rows`` (k, *kernel),
    ``bias`` (k,), ``outgoing`` (k, *the next layer's slice per input channel); for each GDN node
    index ``j`` between, ``gdn[j] = (columns (C, k) of the old rows, rows (k, C + k), beta (k,))``."""
    lay = chain[i]
    between, nxt = channel_path(chain, i)
    c = _channels(lay)
    axis = OUT_AXIS[lay.op]
    w = np.moveaxis(lay.tensors["weight"], axis, 0)
    lay.tensors["weight"] = np.moveaxis(np.concatenate([w, rows.astype(w.dtype, copy=False)]), 0, axis)
    if "bias" in lay.tensors:
        lay.tensors["bias"] = np.concatenate([lay.tensors["bias"], np.asarray(bias).astype(lay.tensors["bias"].dtype)])
    for j in between:
        node = chain[j]
        if node.op in ("gdn", "igdn"):
            g, b = node.tensors["gamma"], node.tensors["beta"]
            cols, new_rows, new_beta = gdn[j]
            node.tensors["gamma"] = np.concatenate([np.concatenate([g, cols.astype(g.dtype)], axis=1),
                                                    new_rows.astype(g.dtype)])
            node.tensors["beta"] = np.concatenate([b, np.asarray(new_beta).astype(b.dtype)])
    consumer = chain[nxt]
    before = _fan_in(consumer)
    map_inputs(consumer, c, lambda v: np.concatenate([v, outgoing.astype(v.dtype, copy=False)]))
    _grow_accumulator(consumer, before, _fan_in(consumer))


def _fan_in(lay: Layer) -> int:
    """Inputs of one output of a dot layer."""
    w = lay.tensors["weight"]
    return int(np.size(w) // np.shape(w)[OUT_AXIS[lay.op]])


def _gdn_nodes(chain: list[Layer], i: int) -> list[int]:
    """Indices of the GDN / inverse GDN nodes between ``chain[i]`` and the next dot layer."""
    return [j for j in channel_path(chain, i)[0] if chain[j].op in ("gdn", "igdn")]


def _outgoing(chain: list[Layer], i: int) -> np.ndarray:
    """The next dot layer's weights, input channels of ``chain[i]`` on axis 0."""
    return input_slices(chain[channel_path(chain, i)[1]], _channels(chain[i]))


def split_neuron(chain: list[Layer], name: str, c: int, rng: np.random.Generator, *, integer: bool = False,
                 noise: float = 1.0) -> list[Layer]:
    """A copy of ``chain`` with neuron ``c`` of ``name`` split in two (module docstring); the new
    neuron is appended as the last channel.  ``integer``: an exact integer split of a bundle
    (copies, integer outgoing shares within the weight range, integer gamma shares); else the
    factors ``a1, a2`` are log-uniform in [1/2, 2] (``a2`` of random sign where sign flips are
    exact), the share ``t`` uniform in [0.2, 0.8] and ``r`` Gaussian with ``noise`` times the
    standard deviation of the neuron's outgoing weights."""
    out = copy_chain(chain)
    if not scale_exact(out, name):
        raise ValueError(f"splitting the neurons of {name!r} does not keep the function: {_inexact(out, name)}")
    i = _index(out, name)
    lay = out[i]
    axis = OUT_AXIS[lay.op]
    row = np.take(lay.tensors["weight"], c, axis=axis)
    bias = lay.tensors["bias"][c] if "bias" in lay.tensors else None
    outgoing = _outgoing(out, i)
    v = outgoing[c]
    t, tau = rng.uniform(0.2, 0.8, 2)
    if integer:
        a1 = a2 = 1
        lo, hi = _w_range(out[channel_path(out, i)[1]])
        r = np.rint(rng.standard_normal(v.shape) * noise * max(float(np.std(v)), 1.0)).astype(np.int64)
        v1 = np.clip(np.rint(t * v).astype(np.int64) + r, np.maximum(lo, v - hi), np.minimum(hi, v - lo))
        v2 = v - v1
    else:
        a1, a2 = np.exp(rng.uniform(-math.log(2), math.log(2), 2))
        if sign_exact(out, name):
            a2 *= rng.choice([-1.0, 1.0])
        r = rng.standard_normal(v.shape) * noise * float(np.std(v))
        v1, v2 = (t * v + r) / a1, ((1 - t) * v - r) / a2
        lay.tensors["weight"] = np.moveaxis(np.asarray(lay.tensors["weight"], np.float64), axis, 0)
        lay.tensors["weight"][c] *= a1
        lay.tensors["weight"] = np.moveaxis(lay.tensors["weight"], 0, axis)
        if bias is not None:
            lay.tensors["bias"] = np.asarray(lay.tensors["bias"], np.float64)
            lay.tensors["bias"][c] *= a1
        outgoing = outgoing.astype(np.float64)
    outgoing[c] = v1
    map_inputs(out[channel_path(out, i)[1]], len(outgoing), lambda _: outgoing)
    gdn = {}
    for j in _gdn_nodes(out, i):
        g = np.array(out[j].tensors["gamma"])
        if integer:
            col1 = np.floor(tau * g[:, c]).astype(g.dtype)
            col2 = g[:, c] - col1
        else:
            g = g.astype(np.float64)
            col1, col2 = tau * g[:, c] / abs(a1), (1 - tau) * g[:, c] / abs(a2)
        g[:, c] = col1
        out[j].tensors["gamma"] = g
        gdn[j] = (col2[:, None], np.concatenate([g[c], [col2[c]]])[None], out[j].tensors["beta"][c:c + 1])
    _append_channels(out, i, (a2 * row)[None], None if bias is None else np.array([a2 * bias]), v2[None], gdn)
    return out


def add_dummies(chain: list[Layer], name: str, count: int, rng: np.random.Generator, *, cancel: bool = False,
                integer: bool = False) -> list[Layer]:
    """A copy of ``chain`` with ``count`` dummy neurons appended to ``name``: random incoming
    weights (drawn from the layer's own weights, shuffled; float: Gaussian with their standard
    deviation) and zero outgoing weights, or with ``cancel`` ``count`` identical pairs whose
    outgoing weights (drawn from the next layer's) are ``u`` and ``-u``.  A GDN between gives a
    dummy a copy of a random neuron's gamma row and beta and a zero gamma column."""
    out = copy_chain(chain)
    if not scale_exact(out, name):
        raise ValueError(f"adding dummy neurons to {name!r} does not keep the function: {_inexact(out, name)}")
    i = _index(out, name)
    lay = out[i]
    c = _channels(lay)
    w = np.moveaxis(np.asarray(lay.tensors["weight"]), OUT_AXIS[lay.op], 0)
    v = _outgoing(out, i)

    def draw(pool: np.ndarray, shape: tuple) -> np.ndarray:
        if integer:
            return rng.choice(pool.reshape(-1), size=shape)
        return rng.standard_normal(shape) * float(np.std(pool))

    rows = draw(w, (count,) + w.shape[1:])
    bias = draw(lay.tensors["bias"], (count,)) if "bias" in lay.tensors else None
    if cancel:
        u = draw(v, (count,) + v.shape[1:])
        rows, u = np.concatenate([rows, rows]), np.concatenate([u, -u])
        bias = None if bias is None else np.concatenate([bias, bias])
    else:
        u = np.zeros((count,) + v.shape[1:], v.dtype)
    k = len(rows)
    src = rng.integers(0, c, count)
    src = np.concatenate([src, src]) if cancel else src
    gdn = {}
    for j in _gdn_nodes(out, i):
        g, b = out[j].tensors["gamma"], out[j].tensors["beta"]
        gdn[j] = (np.zeros((c, k), g.dtype), np.concatenate([g[src], np.zeros((k, k), g.dtype)], axis=1), b[src])
    _append_channels(out, i, rows, bias, u, gdn)
    return out


@dataclass(frozen=True)
class Obfuscation:
    """The transforms :func:`obfuscate` applies to every obfuscable layer (module docstring):
    per-neuron positive ``scale`` (float chains), sign ``flip`` of half of the neurons where exact,
    ``split`` neurons split in two, ``dummies`` dummy neurons with zero outgoing weights, ``cancel``
    pairs of dummies whose outgoing weights cancel, a random ``permute``-ation; ``integer``: the
    integer-exact variants for a bundle; ``noise``: the spread of a split's outgoing weights."""
    scale: bool = True
    flip: bool = True
    split: int = 2
    dummies: int = 2
    cancel: int = 1
    permute: bool = True
    integer: bool = False
    noise: float = 1.0


def obfuscate(chain: list[Layer], spec: Obfuscation, seed: int) -> tuple[list[Layer], dict[str, np.ndarray]]:
    """``chain`` with the transforms of ``spec`` applied to every layer of
    :func:`obfuscable_layers`, in the order scale, flip, split, dummies (zero, then cancelling
    pairs), permutation (every permutable layer); returns the obfuscated chain and, per permutable
    layer, the origin of each of its neurons (the index of the neuron of ``chain`` it derives from,
    ``-1`` for a dummy).  Scaling factors are log-uniform in [1/2, 2]; sign flips hit half of the
    neurons where they are exact; split neurons are drawn at random.  ``integer``: the exact
    integer variants on a bundle (no scaling, sign flips where exact)."""
    rng = np.random.default_rng(seed)
    out = copy_chain(chain)
    origin = {n: np.arange(_channels(out[_index(out, n)])) for n in permutable_layers(out)}
    for name in obfuscable_layers(out):
        c = _channels(out[_index(out, name)])
        if spec.scale and not spec.integer:
            out = scale_neurons(out, {name: np.exp(rng.uniform(-math.log(2), math.log(2), c))})
        if spec.flip and sign_exact(out, name):
            out = flip_neurons(out, {name: rng.random(c) < 0.5})
        for ch in rng.choice(c, min(spec.split, c), replace=False):
            out = split_neuron(out, name, int(ch), rng, integer=spec.integer, noise=spec.noise)
            origin[name] = np.append(origin[name], origin[name][ch])
        if spec.dummies:
            out = add_dummies(out, name, spec.dummies, rng, integer=spec.integer)
            origin[name] = np.append(origin[name], [-1] * spec.dummies)
        if spec.cancel:
            out = add_dummies(out, name, spec.cancel, rng, cancel=True, integer=spec.integer)
            origin[name] = np.append(origin[name], [-1] * 2 * spec.cancel)
    if spec.permute:
        perms = random_permutation(out, int(rng.integers(1 << 31)))
        out = permute(out, perms)
        origin = {n: o[perms[n]] for n, o in origin.items()}
    return out, origin

