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
           "load_chain_weights", "rows"]

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


def model_chain(model: nn.Module) -> list[Layer]:
    """The model's dot layers as bundle-like nodes with float64 copies of their weights."""
    chain: list[Layer] = []
    for name, m in dot_modules(model).items():
        op = _op_of(m)
        if op == "linear" and chain and chain[-1].op in ("conv2d", "conv_transpose2d"):
            chain.append(Layer("flatten", "flatten", {}))
        w = m.weight.detach().to(torch.float64).cpu().numpy().copy()
        chain.append(Layer(name, op, {}, {"weight": w}))
    return chain


def bundle_chain(bundle: Bundle) -> list[Layer]:
    """The bundle's layers with their tensors copied (so attacks never edit the bundle)."""
    return [Layer(l.name, l.op, dict(l.attrs), {k: v.copy() for k, v in l.tensors.items()})
            for l in bundle.layers]


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
