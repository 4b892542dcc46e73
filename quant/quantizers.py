"""Brevitas quantizers of licforge: power-of-two (fixed-point) scales everywhere.

Weights: narrow-range signed, per tensor, scale from the max statistic, rounded up to a power
of two.  Activations: signed or unsigned, per tensor, scale initialised from runtime
percentiles over ``collect_stats_steps`` training steps, then learned, always a power of two.
Biases: integers at the accumulator's scale (input scale x weight scale).  Bit widths are set
per layer from a recipe (``bit_width=`` keyword); rounding is round-half-to-even throughout.
"""
from __future__ import annotations

from brevitas.quant import (Int8ActPerTensorFixedPoint, Int8WeightPerTensorFixedPoint, Int32Bias,
                            Uint8ActPerTensorFixedPoint)

__all__ = ["WeightFixedPoint", "ActFixedPoint", "UActFixedPoint", "BiasAtAccumulator"]


class WeightFixedPoint(Int8WeightPerTensorFixedPoint):
    """Signed narrow-range weight, power-of-two scale (radix point from max |w|)."""


class ActFixedPoint(Int8ActPerTensorFixedPoint):
    """Signed activation, learned power-of-two scale, statistics over 30 steps."""
    collect_stats_steps = 30


class UActFixedPoint(Uint8ActPerTensorFixedPoint):
    """Unsigned activation (pixels, ReLU outputs), learned power-of-two scale."""
    collect_stats_steps = 30


class BiasAtAccumulator(Int32Bias):
    """Bias as an integer at the accumulator scale (input scale x weight scale)."""
