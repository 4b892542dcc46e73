"""The intercepted key: an attacker who knows where the mark is moves it as cheaply as possible.

WaterMAS's security claim (De Sousa Trias et al., ICPR 2024) is made against an attacker who
intercepted the key ``K``, the weight positions: the sharpness-aware maximization makes moving
the key weights costly.  Uchida's key is the projection matrix ``X`` and the layer.  Here the
attacker holds the key and wants the deployed integers to read a chosen share ``f`` of the bits
wrong (BER ``f``; at 50 % the mark reads as chance):

* **WaterMAS, overwrite**: each key weight's flip (to the opposite sign, magnitude 1.5 steps of
  the layer's power-of-two scale at the deployment width, so the integers carry it) is priced by
  the exact rise of the attacker's training loss when that weight alone is flipped; the
  ``f * n`` cheapest are flipped (:func:`forge_watermas`); **WaterMAS, sign flip**: the same with
  ``w -> -w`` (the key weight keeps its magnitude);
* **Uchida, minimal-norm move**: the ``f * n`` bits with the smallest projection margin
  ``|x_k . w_bar|`` are pushed to the opposite sign with the typical margin (the median
  ``|x . w_bar|``) by the smallest change of the mean kernel, ``dw = X_F^T (X_F X_F^T)^-1 (t_F -
  X_F w_bar)``, added to every kernel of the layer (the smallest Frobenius change of ``W`` whose
  mean moves by ``dw``) (:func:`forge_uchida`);
* then **a few steps of optimization against the mark**: fine-tuning on the attacker's data
  with the forged key as the attacker's own marker (WaterMAS: the flipped weights held, no
  sharpness term; Uchida: the regulariser pulling towards the forged bits), and the attacker's
  own deployment (QAT with the forged marker bound, export).

The task cost is read on the attacker's deployed integers (:class:`InterceptTarget`), against
the owner's deployment of the marked model.
"""
from __future__ import annotations

import copy
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from licforge.models.training import Marker
from licforge.quant.bundle import Layer
from .extract import ber
from .keys import WatermarkKey
from .layers import OUT_AXIS, chain_weights, dot_modules
from .markers import bind_marker
from .uchida import effective_weight
from .watermas import magnitude_floor

__all__ = ["InterceptTarget", "forge_watermas", "forge_uchida", "intercept_row", "intercept_sweep", "MODES"]


class InterceptTarget(Protocol):
    """A host as the key-holding attacker sees it (:class:`watermark.adversary.DigitsIntercept`,
    :class:`watermark.lic_adversary.LICIntercept`)."""

    def attacker_loss(self, net: nn.Module) -> float:
        """The task loss of ``net`` on (a fixed batch of) the attacker's data, in eval mode."""

    def finetune(self, net: nn.Module, steps: int, marker: Marker | None) -> None:
        """``steps`` steps of training on the attacker's data, ``net`` in place, with ``marker``."""

    def deploy(self, net: nn.Module, key: WatermarkKey | None) -> tuple[list[Layer], dict[str, float]]:
        """The attacker's deployment of ``net`` (the forged ``key``'s marker bound): its layers
        (integers) and task metrics."""

    @property
    def deploy_bits(self) -> int:
        """The weight bit width of the attacker's deployment."""


def _flip_cost(target: InterceptTarget, net: nn.Module, p: torch.Tensor, idx: int, value: float, base: float) -> float:
    with torch.no_grad():
        old = float(p.view(-1)[idx])
        p.view(-1)[idx] = value
    cost = target.attacker_loss(net) - base
    with torch.no_grad():
        p.view(-1)[idx] = old
    return cost


def forge_watermas(key: WatermarkKey, net: nn.Module, count: int, target: InterceptTarget, *,
                   negate: bool = False) -> WatermarkKey:
    """Flip the ``count`` cheapest bits of ``net`` in place (module docstring), every key weight
    of each (all copies, for a key with ``repeat`` > 1; a bit costs the sum of its copies' prices):
    overwrite with the opposite sign at the smallest magnitude the deployed integers carry, or with
    ``negate`` the sign flip ``w -> -w``; returns the attacker's key: those positions with the
    flipped bits, no sharpness term (``lam = 0``)."""
    if key.scheme != "watermas":
        raise ValueError(f"forge_watermas needs a watermas key, not a {key.scheme} key")
    mods = dot_modules(net)
    base = target.attacker_loss(net)
    new_values, costs = [], []
    for name, idx in key.positions:
        p = mods[name].weight
        mu = magnitude_floor(p, target.deploy_bits, 1.5)
        w = float(p.detach().view(-1)[idx])
        value = -w if negate else (-mu if w > 0 else mu)
        new_values.append(value)
        costs.append(_flip_cost(target, net, p, idx, value, base))
    bit_cost = np.zeros(key.payload)
    np.add.at(bit_cost, key.groups, costs)  # a bit of a repetition code moves with all its copies
    bits = np.argsort(bit_cost, kind="stable")[:count]
    chosen = np.flatnonzero(np.isin(key.groups, bits)).tolist()
    with torch.no_grad():
        for k in chosen:
            name, idx = key.positions[k]
            mods[name].weight.view(-1)[idx] = new_values[k]
    positions = [key.positions[k] for k in chosen]
    return WatermarkKey("watermas", key.seed, (1 - key.position_bits[chosen]).astype(np.uint8),
                        {n: key.layers[n] for n in sorted({p[0] for p in positions})}, positions,
                        dict(key.model), {**key.params, "lam": 0.0})


@torch.no_grad()
def forge_uchida(key: WatermarkKey, net: nn.Module, count: int) -> WatermarkKey:
    """Move the mean kernel of the key's layer of ``net`` in place so that the ``count`` bits of
    smallest margin flip (module docstring); returns the attacker's key (the same projection,
    those bits flipped)."""
    if key.scheme != "uchida":
        raise ValueError(f"forge_uchida needs a uchida key, not a {key.scheme} key")
    (name, info), = key.layers.items()
    module = dot_modules(net)[name]
    axis = OUT_AXIS[info["op"]]
    w = effective_weight(module).detach().to(torch.float64)
    w_bar = torch.movedim(w, axis, 0).reshape(w.shape[axis], -1).mean(0).numpy()
    x = key.projection()
    y = x @ w_bar
    chosen = np.sort(np.argsort(np.abs(y), kind="stable")[:count])
    bits = key.bits.copy()
    bits[chosen] = 1 - bits[chosen]
    if count:
        xf = x[chosen]
        goal = np.where(bits[chosen] == 1, 1.0, -1.0) * float(np.median(np.abs(y)))
        dw = xf.T @ np.linalg.solve(xf @ xf.T, goal - xf @ w_bar)
        p = module.weight
        step = torch.as_tensor(dw, dtype=p.dtype).reshape([s for k, s in enumerate(p.shape) if k != axis])
        p.add_(step.unsqueeze(axis))
    return WatermarkKey("uchida", key.seed, bits, dict(key.layers), [], dict(key.model), dict(key.params))


MODES = {"watermas": ("overwrite", "negate"), "uchida": ("move",)}
"""The attacker's first move per scheme (module docstring)."""


def intercept_row(target: InterceptTarget, net: nn.Module, key: WatermarkKey, fraction: float, steps: int,
                  reference: dict[str, float], higher_is_better: dict[str, bool], mode: str | None = None) -> dict:
    """One attack: forge ``fraction`` of the bits on a copy of ``net`` (``mode``, the scheme's first
    by default: :data:`MODES`), ``steps`` of fine-tuning with the attacker's marker, the attacker's
    deployment; the BER read from its integers with the true key, its task metrics and their loss
    against ``reference``.  ``fraction = 0`` is the attacker's pipeline without forging."""
    mode = mode or MODES[key.scheme][0]
    if mode not in MODES[key.scheme]:
        raise ValueError(f"mode {mode!r} is not one of {MODES[key.scheme]} for a {key.scheme} key")
    att = copy.deepcopy(net)
    count = int(round(fraction * key.payload))
    forged = (forge_watermas(key, att, count, target, negate=mode == "negate") if key.scheme == "watermas"
              else forge_uchida(key, att, count))
    marker = bind_marker(forged, att) if count else None
    if steps:
        target.finetune(att, steps, marker)
    chain, score = target.deploy(att, forged if count else None)
    return {"mode": mode, "target_ber": fraction, "steps": steps, "forged_bits": count,
            "ber": ber(key, chain_weights(chain)),
            **score, **{f"{m}_loss": (reference[m] - score[m]) * (1 if up else -1)
                        for m, up in higher_is_better.items()}}


def intercept_sweep(target: InterceptTarget, net: nn.Module, key: WatermarkKey, fractions: Sequence[float],
                    steps: Sequence[int], reference: dict[str, float], higher_is_better: dict[str, bool],
                    log: Callable[[str], None] = print) -> list[dict]:
    """:func:`intercept_row` for every mode of the scheme, target BER in ``fractions`` (and 0, the
    attacker's pipeline alone) and fine-tuning length in ``steps``."""
    out = []
    for s in steps:
        out.append(intercept_row(target, net, key, 0.0, s, reference, higher_is_better))
        for mode in MODES[key.scheme]:
            for f in fractions:
                out.append(intercept_row(target, net, key, f, s, reference, higher_is_better, mode))
                r = out[-1]
                log(f"  intercepted {key.scheme} key, {mode} {f:.0%}, {s} steps: BER {r['ber']:.3f}, "
                    + ", ".join(f"{m} {r[m]:.4f}" for m in higher_is_better))
    return out
