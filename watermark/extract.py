"""Reading a watermark back, from any set of named weight tensors.

The same readers serve the float model, the deployment bundle's integers
(:func:`quant.bundle.read_bundle`) and the integers rebuilt from the memory init files written
beside the generated Verilog: each gives ``{layer name: weight}`` and
:func:`extract_bits` reads the key's bits from it.  The bit error rate (BER) is the fraction
of bits that differ from the key's.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from .keys import WatermarkKey
from .uchida import uchida_bits
from .watermas import watermas_bits

__all__ = ["extract_bits", "bit_error_rate", "ber"]


def extract_bits(key: WatermarkKey, weights: Mapping[str, np.ndarray]) -> np.ndarray:
    """The ``key.payload`` bits read from ``weights`` with the key's scheme."""
    missing = [n for n in key.layers if n not in weights]
    if missing:
        raise ValueError(f"the weights lack the key's layers {missing} (they have: {list(weights)})")
    for name, info in key.layers.items():
        if list(np.shape(weights[name])) != list(info["shape"]):
            raise ValueError(f"layer {name!r}: weight shape {list(np.shape(weights[name]))} != the key's "
                             f"{info['shape']}; was the key made for another network?")
    return watermas_bits(key, weights) if key.scheme == "watermas" else uchida_bits(key, weights)


def bit_error_rate(key: WatermarkKey, bits: np.ndarray) -> float:
    """Fraction of ``bits`` that differ from the key's bits."""
    bits = np.asarray(bits)
    if bits.shape != key.bits.shape:
        raise ValueError(f"{bits.shape[0] if bits.ndim else 0} bits read, the key has {key.payload}")
    return float(np.mean(bits != key.bits))


def ber(key: WatermarkKey, weights: Mapping[str, np.ndarray]) -> float:
    """Bit error rate of the watermark read from ``weights``."""
    return bit_error_rate(key, extract_bits(key, weights))
