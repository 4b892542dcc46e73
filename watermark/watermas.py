"""WaterMAS: substitutive white-box watermarking by sharpness-aware maximization.

De Sousa Trias, Mitrea, Fiandrotti, Cagnazzo, Chaudhuri, Tartaglione, "WaterMAS:
Sharpness-Aware Maximization for Neural Network Watermarking", ICPR 2024, arXiv 2409.03902.

What the paper fixes (abstract and introduction) and licforge follows:

* the secret key ``K`` is the set of positions of the weights that convey the watermark,
  drawn at random across several layers (:func:`watermark.keys.make_key`);
* the method is *substitutive*: the watermark bits are written into the weights at ``K``,
  and insertion *keeps those weights unchanged* for the rest of training (they are frozen:
  zero gradient, re-imposed after every optimiser step);
* the other weights are trained so that the loss is *sharp* around the watermarked ones:
  "even small alterations of the watermarked weights would impact the model's
  performance", which bounds the strength of any removal attack;
* insertion happens during training (imperceptibility).

Where licforge had to choose (the stored copy of the paper available when this was written
gave its abstract and introduction, not its equations; every choice below is ours):

1. **Bit carrier: sign and magnitude floor.**  Bit ``b_k`` is written as
   ``w_k <- (2 b_k - 1) * max(|w_k|, mu_l)``: the sign carries the bit, the original magnitude
   is kept (the weight distribution barely moves), and ``mu_l`` is a floor relative to the
   layer's fixed-point scale at the coarsest bit width the network will be deployed at:
   ``mu_l = floor_lsb * 2**ceil(log2(max|W_l| / (2**(min_bits-1) - 1)))`` (the power-of-two
   scale Brevitas' ``WeightFixedPoint`` gives the layer at ``min_bits``).  With
   ``floor_lsb = 1.5`` a key weight is at least one integer step (it rounds to +-2 at
   ``min_bits``; more at wider formats) and stays non-zero even if the layer's scale doubles
   during QAT, so the deployed integers carry every bit: extraction is ``b_k = [q_k > 0]``
   on the bundle's integers, and the bit error rate of an unattacked deployment is 0.
2. **Sharpness-aware maximization.**  SAM (Foret et al., ICLR 2021) minimizes
   ``max_{eps} L(w + eps)``; WaterMAS turns it around on the key weights only.  With
   ``w_K`` frozen, the free weights ``theta`` minimize

       J(theta) = L(theta, w_K) - lam * S(theta),   S = L(theta, w_K + eps) - L(theta, w_K)

   i.e. the task loss minus ``lam`` times the sharpness ``S`` of the loss at the key weights.
   As in SAM, ``eps`` is held constant and ``grad J`` comes from two backward passes:
   ``grad J = (1 + lam) grad L(w) - lam grad L(w + eps)``.  Our choice of ``eps`` is the
   *erasure* direction, ``eps_K = -rho * w_K`` (the key weights moved a fraction ``rho``
   towards zero; ``rho = 1`` is pruning all of them): the direction every removal attack
   pushes a sign-coded bit (pruning, noise until the sign flips, quantization to zero).  We
   tried SAM's own inner maximization first (``eps_k = rho std(W_l) sign(dL/dw_k)``, the
   L-infinity worst case): on the digits classifier it cost up to 16 points of accuracy at 64
   bits while zeroing the key weights still cost under 3 points, whereas the erasure
   direction at ``rho = 1`` (``lam = 1``, ``cap = 0.5``) cost 1-3 points and made zeroing
   the key weights cost 22-27 points (exact CNN at 64 and 256 bits, MinConv at 256; only 2 on
   the MinConv network at 64 bits).
   ``S`` is a maximization without a floor, so the term is dropped for any step whose
   sharpness already exceeds ``cap`` (in loss units; a hinge, ours) and it cannot run away
   and wreck the task.
3. **Repetition with a soft decision** (the key's ``repeat``, default 1).  Magnitude pruning
   after an obfuscation that scales neurons by up to 2x each way (so a weight of a hidden layer
   by up to 4x) zeroes key weights however the floor is set, and the attacker's re-training
   regrows them with any sign: on the digits classifier, 7-10 % of 256 bits at the strongest
   pruning that costs at most 5 points.  With ``repeat = r`` each bit is written at ``r``
   positions spread at random over the key's layers and read as the sign of the sum of its
   weights, each relative to its layer's largest magnitude: a copy that survived keeps the
   magnitude of the floor and outvotes regrown ones, which are small.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .keys import WatermarkKey
from .layers import dot_modules
from licforge.models.training import Marker

__all__ = ["WaterMAS", "watermas_bits", "magnitude_floor"]


def magnitude_floor(w: Tensor, min_bits: int, floor_lsb: float) -> float:
    """``floor_lsb`` steps of the layer's power-of-two weight scale at ``min_bits`` bits."""
    top = float(w.detach().abs().max())
    if top == 0.0:
        raise ValueError("cannot embed into an all-zero layer")
    return floor_lsb * 2.0 ** math.ceil(math.log2(top / ((1 << (min_bits - 1)) - 1)))


def watermas_bits(key: WatermarkKey, weights: Mapping[str, np.ndarray]) -> np.ndarray:
    """The bits read from ``weights`` (float or the bundle's integers): ``b_k = [w_k > 0]``; with
    a repetition code (choice 3), ``b_k = [sum_j w_j / max|W_l(j)| > 0]`` over the copies ``j``
    of bit ``k``, each weight relative to the largest magnitude of its layer."""
    total = np.zeros(key.payload)
    for name, (idx, k) in key.positions_by_layer().items():
        w = np.asarray(weights[name], np.float64).reshape(-1)
        top = float(np.abs(w).max(initial=0.0))
        np.add.at(total, k, w[idx] / (top if top > 0 else 1.0))
    return (total > 0).astype(np.uint8)


class WaterMAS(Marker):
    """WaterMAS bound to the weights of ``model`` (see the module docstring).

    Binding records the current values at the key positions as the frozen ones; call
    :meth:`write` first to substitute the bits (embedding), or bind a model that already
    carries them (e.g. the quantized twin of a marked float model, for QAT) and it is
    checked.  ``lam`` weighs the sharpness term, ``rho`` is the fraction by which the key
    weights are moved towards zero in the second pass, ``cap`` the sharpness above which the
    term is dropped for a step.
    """

    def __init__(self, key: WatermarkKey, model: nn.Module, *, lam: float = 1.0, rho: float = 1.0,
                 cap: float = 0.5) -> None:
        if key.scheme != "watermas":
            raise ValueError(f"WaterMAS needs a watermas key, not a {key.scheme} key")
        mods = dot_modules(model)
        self.key, self.lam, self.rho, self.cap = key, float(lam), float(rho), float(cap)
        self.params: dict[str, nn.Parameter] = {}
        self.index: dict[str, Tensor] = {}
        self.sign: dict[str, Tensor] = {}
        for name, (idx, k) in key.positions_by_layer().items():
            if name not in mods:
                raise ValueError(f"the key's layer {name!r} is not in the model (layers: {list(mods)})")
            p = mods[name].weight
            if list(p.shape) != list(key.layers[name]["shape"]):
                raise ValueError(f"layer {name!r}: the key is for shape {key.layers[name]['shape']}, "
                                 f"the model's is {list(p.shape)}")
            self.params[name] = p
            self.index[name] = torch.as_tensor(idx)
            self.sign[name] = torch.as_tensor(2.0 * key.bits[k] - 1.0, dtype=p.dtype)
        self.frozen = {n: p.detach().reshape(-1)[self.index[n]].clone() for n, p in self.params.items()}
        self.last_sharpness = 0.0

    def carried_errors(self) -> int:
        """Key positions whose current sign differs from the bit (0 on a marked model)."""
        return int(sum(int((torch.sign(self.frozen[n]) != self.sign[n]).sum()) for n in self.params))

    def require_carried(self) -> None:
        """Raise ValueError unless the bound model carries every bit of the key."""
        bad = self.carried_errors()
        if bad:
            raise ValueError(f"the model does not carry this WaterMAS key: {bad} of {self.key.payload} "
                             f"key weights have the wrong sign; embed the watermark first")

    @torch.no_grad()
    def write(self, min_bits: int = 4, floor_lsb: float = 1.5) -> None:
        """Substitute the bits: ``w_k <- (2 b_k - 1) max(|w_k|, mu_l)`` (choice 1)."""
        for name, p in self.params.items():
            mu = magnitude_floor(p, min_bits, floor_lsb)
            flat = p.view(-1)
            flat[self.index[name]] = self.sign[name] * flat[self.index[name]].abs().clamp(min=mu)
            self.frozen[name] = flat[self.index[name]].clone()

    @torch.no_grad()
    def after_step(self, net: nn.Module | None = None) -> None:
        """Re-impose the frozen key weights (exactly)."""
        for name, p in self.params.items():
            p.view(-1)[self.index[name]] = self.frozen[name]

    def adjust_gradients(self, net: nn.Module, loss_fn: Callable, batch: Sequence[Tensor],
                         loss: Tensor) -> None:
        """SAM-style second pass at ``w_K + eps`` and the combined gradient (choice 2); the
        key weights' gradients are zeroed so that only the free weights move."""
        if self.lam > 0:
            self._sharpen(net, loss_fn, batch, loss)
        with torch.no_grad():
            for name, p in self.params.items():
                if p.grad is not None:
                    p.grad.view(-1)[self.index[name]] = 0

    def _sharpen(self, net: nn.Module, loss_fn: Callable, batch: Sequence[Tensor], loss: Tensor) -> None:
        params = [p for p in net.parameters() if p.requires_grad]
        clean = [None if p.grad is None else p.grad.clone() for p in params]
        with torch.no_grad():
            for name, p in self.params.items():
                p.view(-1)[self.index[name]] = (1.0 - self.rho) * self.frozen[name]
        for p in params:
            p.grad = None
        perturbed = loss_fn(net, batch)
        perturbed.backward()
        self.after_step()
        self.last_sharpness = float(perturbed.detach() - loss)
        use = self.last_sharpness < self.cap
        with torch.no_grad():
            for p, c in zip(params, clean):
                if c is None:
                    continue
                if use and p.grad is not None:
                    p.grad.mul_(-self.lam).add_(c, alpha=1.0 + self.lam)
                else:
                    p.grad = c
