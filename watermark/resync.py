"""Re-synchronization after a neuron permutation ("Find the Lady").

De Sousa Trias et al., "Find the Lady: Permutation and Re-Synchronization of Deep Neural
Networks", arXiv 2312.14182.
The owner holds the reference network; the suspect may have had its neurons permuted and
then been pruned, fine-tuned or quantized.  The order is recovered layer by layer, from the
input side:

1. layer ``l``'s inputs are already in the reference order (the network's input is never
   permuted; the previous layer has just been put back);
2. each suspect neuron is described by its incoming weights (one row of the weight), each
   reference neuron likewise; the similarity of two neurons is the cosine of their rows, which
   ignores a per-layer scale, so a float reference matches a quantized integer suspect;
3. the one-to-one assignment of suspect to reference neurons with the largest total
   similarity (Hungarian algorithm, :func:`scipy.optimize.linear_sum_assignment`) is the
   estimated permutation; it is undone on layer ``l``'s outputs and layer ``l+1``'s inputs.

Matching on incoming weights needs no data and works on the deployed integers.  (Which
neuron descriptor the paper matches on, and how, we could not check against its text: the
stored copy available here gave the abstract and introduction only; the three steps above are
our implementation of "matching neurons against the reference".)
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
from scipy.optimize import linear_sum_assignment

from licforge.quant.bundle import Layer
from .layers import rows
from .permute import permutable_layers, permute

__all__ = ["resynchronize", "fraction_restored"]


def _unit_rows(w: np.ndarray, op: str) -> np.ndarray:
    r = rows(np.asarray(w, np.float64), op)
    return r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-300)


def resynchronize(reference: list[Layer], suspect: list[Layer]) -> tuple[dict[str, np.ndarray], list[Layer]]:
    """Estimate the permutation that maps ``reference`` to ``suspect`` (the convention of
    :func:`watermark.permute.permute`: ``suspect ~ permute(reference, perms)``); returns the
    estimate and the suspect put back in the reference order."""
    ref = {l.name: l for l in reference}
    work = suspect
    est: dict[str, np.ndarray] = {}
    for name in permutable_layers(suspect):
        if name not in ref:
            raise ValueError(f"the reference has no layer {name!r}; re-synchronize against the network "
                             f"the key was made for")
        lay = next(l for l in work if l.name == name)
        r, s = ref[name].tensors["weight"], lay.tensors["weight"]
        if np.shape(r) != np.shape(s) or ref[name].op != lay.op:
            raise ValueError(f"layer {name!r}: suspect {lay.op} {np.shape(s)} vs reference "
                             f"{ref[name].op} {np.shape(r)}")
        sim = _unit_rows(s, lay.op) @ _unit_rows(r, lay.op).T
        _, match = linear_sum_assignment(-sim)
        est[name] = match
        work = permute(work, {name: np.argsort(match)})
    return est, work


def fraction_restored(estimate: Mapping[str, np.ndarray], truth: Mapping[str, np.ndarray]) -> float:
    """Fraction of all permuted neurons whose original position was recovered."""
    hit = sum(int(np.sum(np.asarray(estimate[n]) == np.asarray(p))) for n, p in truth.items())
    return hit / sum(len(p) for p in truth.values())
