"""The weight tensors a watermark lives in, seen alike in a PyTorch model and in a bundle.

A white-box watermark is read from the weights of the dot-product layers: ``conv2d`` and
``linear`` (PyTorch layout ``(Cout, Cin, ...)``, output channels on axis 0) and
``conv_transpose2d`` (``(Cin, Cout, K, K)``, output channels on axis 1).  Both a float or
Brevitas model and a deployment bundle are described here as a chain of
:class:`quant.bundle.Layer` nodes (name, op, tensors), so that embedding, extraction, attacks
and re-synchronization are written once:

* a bundle's layers are used as they are (integer weights, the deployed numbers);
* a model's dot layers are listed in registration order (the execution order of the
  sequential networks licforge builds), named by their module path, with a ``flatten`` node
  where a convolution feeds a linear layer, and with float64 copies of their weights.

Layer names agree between a model and its bundle (``conv1``, ``conv2``, ``fc`` for the digits
classifier), which is what lets a key made on the float model be read from the integers.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import nn

from licforge.quant.bundle import Bundle, Layer

__all__ = ["OUT_AXIS", "IN_AXIS", "dot_modules", "model_chain", "bundle_chain", "chain_weights",
           "load_chain_weights", "rows", "channel_path", "map_inputs", "input_slices", "copy_chain", "run_node",
           "chain_forward", "channel_activations", "chain_from_weights"]

OUT_AXIS = {"conv2d": 0, "linear": 0, "conv_transpose2d": 1}
"""Axis of the output channels of each dot-product op's weight."""
IN_AXIS = {"conv2d": 1, "linear": 1, "conv_transpose2d": 0}
"""Axis of the input channels of each dot-product op's weight."""


def _op_of(module: nn.Module) -> str | None:
    if isinstance(module, nn.ConvTranspose2d):
        return "conv_transpose2d"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Linear):
        return "linear"
    return None


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def dot_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The model's conv2d / conv_transpose2d / linear layers by name, in registration order.

    A layer counts if it hangs from the model through containers only (``Sequential``,
    ``ModuleList``, ``ModuleDict``): a convolution inside another layer (e.g. the 1x1
    convolution that holds a GDN's ``gamma``) is that layer's business, not a dot layer of the
    network (the bundle stores it as the GDN's ``gamma``)."""
    mods = dict(model.named_modules())
    out = {}
    for name, m in mods.items():
        parents = [".".join(name.split(".")[:k]) for k in range(1, name.count(".") + 1)]
        if name and _op_of(m) is not None and all(isinstance(mods[p], _CONTAINERS) for p in parents):
            out[name] = m
    if not out:
        raise ValueError(f"{type(model).__name__} has no Conv2d, ConvTranspose2d or Linear layer "
                         f"to carry a watermark")
    return out


def _relu_between(model: nn.Module) -> bool:
    """Whether a ReLU follows every dot layer but the last: the digits classifiers (float,
    MinConv or Brevitas), whose forward applies it functionally, where no module shows it."""
    from licforge.models.digits import DigitsNet
    from licforge.quant.digits import QuantDigitsNet

    return isinstance(model, (DigitsNet, QuantDigitsNet))


def model_chain(model: nn.Module) -> list[Layer]:
    """The model's dot layers as bundle-like nodes with float64 copies of their weights (and
    biases); ``attrs["relu"]`` marks the layers a ReLU follows (known for the digits classifiers,
    as in their bundles), ``attrs["product"]`` is ``"min"`` for MinConv layers, else ``"mul"``;
    convolutions record ``stride``, ``padding`` (and ``output_padding``) as bundles do."""
    chain: list[Layer] = []
    mods = dot_modules(model)
    relu = _relu_between(model)
    for k, (name, m) in enumerate(mods.items()):
        op = _op_of(m)
        if op == "linear" and chain and chain[-1].op in ("conv2d", "conv_transpose2d"):
            chain.append(Layer("flatten", "flatten", {}))
        tensors = {"weight": m.weight.detach().to(torch.float64).cpu().numpy().copy()}
        if getattr(m, "bias", None) is not None:
            tensors["bias"] = m.bias.detach().to(torch.float64).cpu().numpy().copy()
        attrs = {"relu": relu and k < len(mods) - 1, "product": "min" if hasattr(m, "log2_gain") else "mul"}
        if op != "linear":
            attrs.update(stride=int(m.stride[0]), padding=int(m.padding[0]))
        if op == "conv_transpose2d":
            attrs["output_padding"] = int(m.output_padding[0])
        chain.append(Layer(name, op, attrs, tensors))
    return chain


def bundle_chain(bundle: Bundle) -> list[Layer]:
    """The bundle's layers with their tensors copied (so attacks never edit the bundle)."""
    return [Layer(l.name, l.op, dict(l.attrs), {k: v.copy() for k, v in l.tensors.items()})
            for l in bundle.layers]


def copy_chain(chain: list[Layer]) -> list[Layer]:
    """A copy of ``chain`` whose attributes and tensors can be edited without touching it."""
    return [Layer(l.name, l.op, dict(l.attrs), {k: np.array(v) for k, v in l.tensors.items()}) for l in chain]


def channel_path(chain: list[Layer], i: int) -> tuple[list[int], int]:
    """Where the output channels of dot layer ``chain[i]`` go: the indices of the channel-wise
    nodes up to the next dot layer (``gdn``/``igdn``, ``latent``, ``flatten``) and the index of
    that dot layer.  ValueError if ``chain[i]`` is the last dot layer (its outputs are the
    network's) or a node in between mixes channels in a way no per-channel edit follows."""
    between = []
    for j in range(i + 1, len(chain)):
        op = chain[j].op
        if op in OUT_AXIS:
            return between, j
        if op not in ("gdn", "igdn", "latent", "flatten"):
            raise ValueError(f"cannot follow the channels of {chain[i].name!r} through layer {chain[j].name!r} "
                             f"(op {op!r})")
        between.append(j)
    raise ValueError(f"layer {chain[i].name!r} is the last dot layer: its outputs are the network's")


def input_slices(layer: Layer, channels: int) -> np.ndarray:
    """A copy of ``layer``'s weight with its input channels on axis 0 (the view :func:`map_inputs` edits)."""
    got: list[np.ndarray] = []

    def keep(w: np.ndarray) -> np.ndarray:
        got.append(np.array(w))
        return w

    map_inputs(copy_chain([layer])[0], channels, keep)
    return got[0]


def map_inputs(layer: Layer, channels: int, fn) -> None:
    """Replace ``layer``'s weight by ``fn`` applied along its input channels, in place: ``fn``
    takes and returns an array with the input channels on axis 0 (``channels`` of them before,
    any number after).  After a ``flatten`` a channel is a block of ``in_features / channels``
    consecutive features (one per spatial position)."""
    w = np.asarray(layer.tensors["weight"])
    if layer.op == "linear" and w.shape[1] != channels:
        block = w.shape[1] // channels
        if block * channels != w.shape[1]:
            raise ValueError(f"layer {layer.name!r}: {w.shape[1]} inputs are not {channels} channel blocks")
        new = fn(np.moveaxis(w.reshape(w.shape[0], channels, block), 1, 0))
        layer.tensors["weight"] = np.moveaxis(new, 0, 1).reshape(w.shape[0], -1)
        return
    axis = IN_AXIS[layer.op]
    if w.shape[axis] != channels:
        raise ValueError(f"layer {layer.name!r} reads {w.shape[axis]} channels, not {channels}")
    layer.tensors["weight"] = np.moveaxis(fn(np.moveaxis(w, axis, 0)), 0, axis)


def chain_from_weights(weights: Mapping[str, np.ndarray], structure: list[Layer]) -> list[Layer]:
    """A chain with ``structure``'s layers (names, ops, attributes) and the weights ``weights``
    (e.g. integers read back from memory init files, which hold no layer graph)."""
    missing = [l.name for l in structure if l.op in OUT_AXIS and l.name not in weights]
    if missing:
        raise ValueError(f"the weights lack layers {missing} of the reference (they have: {list(weights)})")
    return [Layer(l.name, l.op, dict(l.attrs), {"weight": np.asarray(weights[l.name])} if l.op in OUT_AXIS else {})
            for l in structure]


def chain_weights(chain: list[Layer]) -> dict[str, np.ndarray]:
    """``{layer name: weight}`` of the chain's dot layers (the arrays themselves, not copies)."""
    return {l.name: l.tensors["weight"] for l in chain if l.op in OUT_AXIS}


@torch.no_grad()
def load_chain_weights(model: nn.Module, weights: Mapping[str, np.ndarray]) -> None:
    """Copy ``weights`` (by layer name) into the model's dot layers, in place."""
    mods = dot_modules(model)
    for name, w in weights.items():
        if name not in mods:
            raise KeyError(f"model has no dot layer {name!r} (layers: {list(mods)})")
        p = mods[name].weight
        if tuple(p.shape) != tuple(np.shape(w)):
            raise ValueError(f"layer {name!r}: weight shape {tuple(np.shape(w))} != model's {tuple(p.shape)}")
        p.copy_(torch.as_tensor(np.asarray(w), dtype=p.dtype))


def rows(w: np.ndarray, op: str) -> np.ndarray:
    """The weight as one row per output channel: ``(Cout, fan_in)``."""
    return np.moveaxis(np.asarray(w), OUT_AXIS[op], 0).reshape(np.shape(w)[OUT_AXIS[op]], -1)


def _float_node(lay: Layer, t: torch.Tensor) -> torch.Tensor:
    """One node of a float chain (tensors taken as real numbers, no quantization)."""
    import torch.nn.functional as F

    a = lay.attrs
    ts = {k: torch.as_tensor(np.asarray(v, np.float64)) for k, v in lay.tensors.items()}
    if lay.op == "flatten":
        return t.reshape(len(t), -1)
    if lay.op in ("gdn", "igdn"):
        n = torch.einsum("ij,njhw->nihw", ts["gamma"], t.abs()) + ts["beta"][None, :, None, None]
        return t * n if lay.op == "igdn" else t / n
    if lay.op == "conv2d":
        t = F.conv2d(t, ts["weight"], ts.get("bias"), a.get("stride", 1), a.get("padding", 0))
    elif lay.op == "conv_transpose2d":
        t = F.conv_transpose2d(t, ts["weight"], ts.get("bias"), a["stride"], a["padding"], a["output_padding"])
    elif lay.op == "linear":
        t = F.linear(t, ts["weight"], ts.get("bias"))
    else:
        raise ValueError(f"layer {lay.name!r}: no float model for op {lay.op!r}")
    return torch.relu(t) if a.get("relu", False) else t


def run_node(lay: Layer, x: np.ndarray) -> np.ndarray:
    """One node of a chain: a bundle's layer (it records its requantization ``shift``) in the
    integer golden model (:func:`quant.golden.run_layer`), any other as a float network (float64:
    conv2d, conv_transpose2d, linear with ReLU where ``attrs["relu"]``, flatten, simplified
    GDN / inverse GDN ``n = beta + gamma |x|``, ``y = x / n`` or ``x n``)."""
    if "shift" in lay.attrs or "norm_shift" in lay.attrs:
        from licforge.quant.golden import run_layer

        return run_layer(lay, x)
    return _float_node(lay, torch.as_tensor(np.asarray(x, np.float64))).numpy()


def chain_forward(chain: list[Layer], x: np.ndarray) -> np.ndarray:
    """The chain's output for input ``x`` (:func:`run_node` node after node)."""
    for lay in chain:
        x = run_node(lay, x)
    return np.asarray(x)


def channel_activations(chain: list[Layer], x: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    """For each dot layer in ``names``, what the next dot layer reads from its channels (its
    output after ReLU, GDN, latent) on input ``x``, as a (samples x positions, channels) matrix."""
    out: dict[str, np.ndarray] = {}
    pending: str | None = None
    for lay in chain:
        if (lay.op in OUT_AXIS or lay.op == "flatten") and pending is not None:
            a = np.asarray(x, np.float64)
            out[pending] = np.moveaxis(a, 1, -1).reshape(-1, a.shape[1]) if a.ndim > 2 else a
            pending = None
        if len(out) == len(names):
            break
        x = run_node(lay, x)
        if lay.name in names:
            pending = lay.name
    return out
