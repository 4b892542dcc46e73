"""Binding a key to a model: the marker of the key's scheme, with the key's strengths.

The embedding strengths are recorded in the key file (``params``) when the key is made, so
that deployment (QAT with the marker still bound) uses the same ones without the caller
repeating them.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from .keys import WatermarkKey
from licforge.models.training import Marker
from .uchida import Uchida
from .watermas import WaterMAS

__all__ = ["MarkerParams", "bind_marker"]


@dataclass(frozen=True)
class MarkerParams:
    """Embedding strengths: WaterMAS ``lam``/``rho``/``cap``, bit floor and ``repeat`` (weights per
    bit, a repetition code drawn into the key), Uchida ``lam``."""
    watermas_lam: float = 1.0
    watermas_rho: float = 1.0
    watermas_cap: float = 0.5
    min_bits: int = 4
    floor_lsb: float = 1.5
    uchida_lam: float = 0.1
    watermas_repeat: int = 1

    def repeat(self, scheme: str) -> int:
        """Key positions per bit for ``scheme`` (a repetition code is WaterMAS's only)."""
        return self.watermas_repeat if scheme == "watermas" else 1

    def spread(self, payload: int, key_weights: int | None) -> "MarkerParams":
        """These strengths with ``watermas_repeat`` set so that a ``payload``-bit WaterMAS key
        spends about ``key_weights`` weights (``key_weights // payload`` per bit, at least 1);
        unchanged for None."""
        return self if key_weights is None else replace(self, watermas_repeat=max(1, key_weights // payload))

    def for_scheme(self, scheme: str) -> dict[str, Any]:
        if scheme == "watermas":
            return {"lam": self.watermas_lam, "rho": self.watermas_rho, "cap": self.watermas_cap,
                    "min_bits": self.min_bits, "floor_lsb": self.floor_lsb}
        return {"lam": self.uchida_lam}


def bind_marker(key: WatermarkKey, model: nn.Module, *, write: bool = False) -> Marker:
    """The key's marker bound to ``model`` with the strengths recorded in the key.  With
    ``write`` (WaterMAS) the bits are substituted first; otherwise the model must carry them."""
    p = key.params
    if key.scheme == "uchida":
        return Uchida(key, model, lam=p.get("lam", MarkerParams.uchida_lam))
    m = WaterMAS(key, model, lam=p.get("lam", MarkerParams.watermas_lam),
                 rho=p.get("rho", MarkerParams.watermas_rho), cap=p.get("cap", MarkerParams.watermas_cap))
    if write:
        m.write(p.get("min_bits", MarkerParams.min_bits), p.get("floor_lsb", MarkerParams.floor_lsb))
    else:
        m.require_carried()
    return m
