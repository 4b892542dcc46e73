"""Removal attacks on the weights, by an attacker who does not know the key.

Each attack takes ``{layer name: float weight}`` of every dot layer (see
:func:`watermark.layers.chain_weights`) and returns attacked copies:

* :func:`gaussian_noise`: ``w + N(0, (s * std(W_l))**2)`` on every weight, ``s`` relative to
  each layer's standard deviation;
* :func:`magnitude_prune`: in every layer, the fraction ``rate`` of weights of smallest
  magnitude set to 0 (ties broken by position, so exactly ``round(rate * n)`` per layer).

Fine-tuning is :func:`models.training.train` without a marker on the attacker's data;
quantization is the host model's own QAT / export (e.g. :func:`quant.digits.quantize_digits`
then :func:`quant.digits.export_digits_bundle`); neuron permutation is in
:mod:`watermark.permute`.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

__all__ = ["gaussian_noise", "magnitude_prune"]


def gaussian_noise(weights: Mapping[str, np.ndarray], sigma: float, seed: int) -> dict[str, np.ndarray]:
    """Every weight plus Gaussian noise of standard deviation ``sigma * std(layer)``."""
    if sigma < 0:
        raise ValueError(f"noise sigma must be >= 0, not {sigma}")
    rng = np.random.default_rng(seed)
    out = {}
    for name, w in weights.items():
        w = np.asarray(w, np.float64)
        out[name] = w + rng.standard_normal(w.shape) * sigma * w.std()
    return out


def magnitude_prune(weights: Mapping[str, np.ndarray], rate: float) -> dict[str, np.ndarray]:
    """Per layer, the ``round(rate * size)`` weights of smallest ``|w|`` set to zero."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"pruning rate must be in [0, 1], not {rate}")
    out = {}
    for name, w in weights.items():
        w = np.array(w, np.float64)
        flat = w.reshape(-1)
        k = int(round(rate * flat.size))
        flat[np.argsort(np.abs(flat), kind="stable")[:k]] = 0.0
        out[name] = w
    return out
