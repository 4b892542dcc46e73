"""Neuron permutation: the attack that leaves the function unchanged and scrambles the key.

The output channels of a dot layer can be put in any order if the layers that read them
are permuted the same way: the network computes the same function, but a watermark read at
fixed positions (WaterMAS) or from a fixed channel order (Uchida's mean kernel of a layer
whose inputs moved) reads noise.  A permutation ``perm`` of layer ``l`` means: new output
channel ``j`` is old channel ``perm[j]``.  Applying it touches

* layer ``l``'s weight along its output axis, and its bias;
* every channel-wise node up to the next dot layer: ``gdn``/``igdn`` (``gamma[perm][:, perm]``,
  ``beta[perm]``); ``latent`` (per-tensor requantization) moves its per-channel entropy-coder
  tables, if any, along their first axis; ``flatten`` passes through;
* the next dot layer's input axis; after a ``flatten`` the inputs are blocks of
  ``in_features / C`` consecutive features (one per spatial position), moved as blocks.

Quantization scales are per tensor in licforge, so the permuted bundle's integer golden
model is *exactly* the original one (tested), and a float model's output equal up to
rounding.  The last dot layer's outputs (the network's outputs) are never permuted.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
from torch import nn

from licforge.quant.bundle import Layer
from .layers import OUT_AXIS, chain_weights, channel_path, copy_chain, load_chain_weights, map_inputs, model_chain

__all__ = ["permutable_layers", "random_permutation", "permute", "permute_model", "inverse"]


def permutable_layers(chain: list[Layer]) -> list[str]:
    """Names of the dot layers whose outputs may be permuted (all but the last)."""
    return [l.name for l in chain if l.op in OUT_AXIS][:-1]


def random_permutation(chain: list[Layer], seed: int) -> dict[str, np.ndarray]:
    """A uniformly random permutation of every permutable layer's output channels."""
    rng = np.random.default_rng(seed)
    out = {}
    for l in chain:
        if l.name in permutable_layers(chain):
            out[l.name] = rng.permutation(np.shape(l.tensors["weight"])[OUT_AXIS[l.op]])
    return out


def inverse(perms: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The permutations that undo ``perms``."""
    return {n: np.argsort(p) for n, p in perms.items()}


def permute(chain: list[Layer], perms: Mapping[str, np.ndarray]) -> list[Layer]:
    """A copy of ``chain`` with the output channels of the layers in ``perms`` permuted
    (and everything that reads them), see the module docstring."""
    new = copy_chain(chain)
    names = {l.name for l in new if l.op in OUT_AXIS}
    for n in perms:
        if n not in names:
            raise ValueError(f"cannot permute {n!r}: not a dot layer of the chain ({sorted(names)})")
    for i, lay in enumerate(new):
        if lay.name not in perms:
            continue
        perm = np.asarray(perms[lay.name])
        c = lay.tensors["weight"].shape[OUT_AXIS[lay.op]]
        if sorted(perm.tolist()) != list(range(c)):
            raise ValueError(f"permutation of {lay.name!r} is not a permutation of its {c} channels")
        between, nxt = channel_path(new, i)
        lay.tensors["weight"] = np.take(lay.tensors["weight"], perm, axis=OUT_AXIS[lay.op])
        if "bias" in lay.tensors:
            lay.tensors["bias"] = lay.tensors["bias"][perm]
        for j in between:
            node = new[j]
            if node.op in ("gdn", "igdn"):
                node.tensors["gamma"] = node.tensors["gamma"][perm][:, perm]
                node.tensors["beta"] = node.tensors["beta"][perm]
            elif node.op == "latent":
                node.tensors = {k: v[perm] for k, v in node.tensors.items()}
        map_inputs(new[nxt], c, lambda w: w[perm])
    return new


def permute_model(model: nn.Module, perms: Mapping[str, np.ndarray]) -> None:
    """Permute a model's dot layers in place (models whose only per-channel parameters are
    the dot layers' weights, e.g. the digits classifier, float or Brevitas)."""
    chain = model_chain(model)
    owned = {id(m.weight) for m in (dict(model.named_modules())[l.name] for l in chain if l.op in OUT_AXIS)}
    for name, p in model.named_parameters():
        if id(p) not in owned and p.numel() > 1:
            raise ValueError(f"cannot permute {type(model).__name__}: parameter {name!r} is per channel "
                             f"and not a dot layer's weight; permute the deployment bundle instead")
    load_chain_weights(model, chain_weights(permute(chain, perms)))
