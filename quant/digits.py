"""The digits classifier quantized with Brevitas, exported to a bundle, run as integers.

:class:`QuantDigitsNet` mirrors :class:`models.digits.DigitsNet` with fixed-point quantizers
(``bits`` for inputs, weights and activations).  With ``product="min"`` its layers compute
MinConv (``sign(x)sign(w)min(|x|,|w|)`` on the dequantized fake-quant values); with
``"mul"`` ordinary convolutions.  :func:`export_digits_bundle` writes the integers;
:func:`run_digits_golden` evaluates the bundle in integer arithmetic only and equals the
Brevitas model exactly (tested).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from brevitas.nn import QuantConv2d, QuantIdentity, QuantLinear, QuantReLU
from torch import Tensor, nn

from licforge.models.digits import DigitsNet
from licforge.models.minconv import min_conv2d, min_linear
from .bundle import Bundle, Layer
from .fixed import accumulator_bits, check_bits, requantize
from .golden import run_layers
from .quantizers import ActFixedPoint, WeightFixedPoint

__all__ = ["QuantMinConv2d", "QuantMinLinear", "QuantDigitsNet", "quantize_digits",
           "export_digits_bundle", "run_digits_golden", "input_to_int", "PIXEL_FRAC_BITS",
           "LogitsOnly", "DigitsModels", "train_digits_models"]

PIXEL_FRAC_BITS = 4  # digits pixels are p / 16, p in 0..16


def _value(t) -> Tensor:
    return t.value if hasattr(t, "value") else t


def _exp(scale) -> int:
    s = float(scale.detach().reshape(-1)[0]) if torch.is_tensor(scale) else float(scale)
    e = math.log2(s)
    if abs(e - round(e)) > 1e-9:
        raise ValueError(f"scale {s} is not a power of two")
    return int(round(e))


class QuantMinConv2d(QuantConv2d):
    """Brevitas conv layer whose products are signed minimums of the quantized operands;
    the stored weight is the gained weight ``2**log2_gain * w``, the output is divided back."""

    def __init__(self, *args, log2_gain: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.log2_gain = int(log2_gain)

    def inner_forward_impl(self, x, quant_weight, quant_bias):
        y = min_conv2d(_value(x), _value(quant_weight), self.stride[0], self.padding[0])
        return y * 2.0 ** -self.log2_gain


class QuantMinLinear(QuantLinear):
    """Brevitas linear layer with signed-minimum products (see :class:`QuantMinConv2d`)."""

    def __init__(self, *args, log2_gain: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.log2_gain = int(log2_gain)

    def inner_forward_impl(self, x, quant_weight, quant_bias):
        return min_linear(_value(x), _value(quant_weight)) * 2.0 ** -self.log2_gain


class QuantDigitsNet(nn.Module):
    """Fixed-point digits classifier: input quantizer, conv1+ReLU, conv2+ReLU, fc, output
    quantizer; every quantizer power-of-two scaled with ``bits`` bits (logits ``out_bits``)."""

    def __init__(self, c1: int = 8, c2: int = 16, bits: int = 8, out_bits: int = 16,
                 product: str = "min", gains: tuple[int, int, int] = (0, 0, 0)) -> None:
        super().__init__()
        check_bits(bits, "bits", 2, 16)
        check_bits(out_bits, "out_bits", 2, 24)
        if product not in ("min", "mul"):
            raise ValueError(f"product must be 'min' or 'mul', not {product!r}")
        self.c1, self.c2, self.bits, self.out_bits, self.product = c1, c2, bits, out_bits, product
        wq = dict(weight_quant=WeightFixedPoint, weight_bit_width=bits, bias=False)
        if product == "min":
            conv = lambda *a, g, **k: QuantMinConv2d(*a, log2_gain=g, **k, **wq)  # noqa: E731
            lin = lambda *a, g, **k: QuantMinLinear(*a, log2_gain=g, **k, **wq)  # noqa: E731
        else:
            conv = lambda *a, g, **k: QuantConv2d(*a, **k, **wq)  # noqa: E731
            lin = lambda *a, g, **k: QuantLinear(*a, **k, **wq)  # noqa: E731
        act = lambda b: dict(act_quant=ActFixedPoint, bit_width=b, return_quant_tensor=True)  # noqa: E731
        self.inq = QuantIdentity(**act(bits))
        self.conv1 = conv(1, c1, 3, padding=1, g=gains[0])
        self.act1 = QuantReLU(**act(bits))
        self.conv2 = conv(c1, c2, 3, stride=2, padding=1, g=gains[1])
        self.act2 = QuantReLU(**act(bits))
        self.fc = lin(c2 * 16, 10, g=gains[2])
        self.outq = QuantIdentity(**act(out_bits))

    def forward(self, x: Tensor, trace: list | None = None):
        """Logits (a QuantTensor); ``trace`` collects every quantizer's output."""
        steps = []
        x = self.inq(x); steps.append(x)  # noqa: E702
        x = self.act1(self.conv1(x)); steps.append(x)  # noqa: E702
        x = self.act2(self.conv2(x)); steps.append(x)  # noqa: E702
        x = self.outq(self.fc(torch.flatten(x, 1))); steps.append(x)  # noqa: E702
        if trace is not None:
            trace.extend(steps)
        return x


def quantize_digits(net: DigitsNet, bits: int, x_train: Tensor, y_train: Tensor, *,
                    qat_epochs: int = 10, seed: int = 0, out_bits: int = 16,
                    progress: bool = True) -> QuantDigitsNet:
    """Quantization-aware fine-tuning of a (MinConv or exact) float digits network."""
    from licforge.models.training import fit_classifier

    torch.manual_seed(seed)
    product = "mul" if net.exact else "min"
    gains = (0, 0, 0) if net.exact else tuple(int(l.log2_gain) for l in (net.conv1, net.conv2, net.fc))
    q = QuantDigitsNet(net.c1, net.c2, bits, out_bits, product, gains)
    with torch.no_grad():
        for src, dst, g in zip((net.conv1, net.conv2, net.fc), (q.conv1, q.conv2, q.fc), gains):
            dst.weight.copy_(src.weight * 2.0 ** g)
    wrapped = LogitsOnly(q)
    fit_classifier(wrapped, x_train, y_train, epochs=qat_epochs, lr=5e-4, seed=seed,
                   desc=f"QAT {bits}-bit", progress=progress)
    q.eval()
    return q


class LogitsOnly(nn.Module):
    """The logits of a quantized network as a plain tensor (Brevitas may return a QuantTensor)."""

    def __init__(self, q: QuantDigitsNet) -> None:
        super().__init__()
        self.q = q

    def forward(self, x: Tensor) -> Tensor:
        return _value(self.q(x))


@torch.no_grad()
def export_digits_bundle(q: QuantDigitsNet, sample: Tensor) -> Bundle:
    """The integers of ``q`` as a :class:`Bundle` (layers conv1, conv2, flatten, fc)."""
    q.eval()
    trace: list = []
    q(sample[:1], trace)
    exps = [_exp(t.scale) for t in trace]  # input, act1, act2, logits
    layers = []
    specs = [("conv1", q.conv1, "conv2d", True), ("conv2", q.conv2, "conv2d", True),
             ("fc", q.fc, "linear", False)]
    for k, (name, mod, kind, relu) in enumerate(specs):
        if name == "fc":
            layers.append(Layer("flatten", "flatten", {}))
        qw = mod.quant_weight()
        x_exp, w_exp, out_exp = exps[k], _exp(qw.scale), exps[k + 1]
        if q.product == "min":
            acc_exp = min(x_exp, w_exp) - mod.log2_gain
            x_shift, w_shift = x_exp - min(x_exp, w_exp), w_exp - min(x_exp, w_exp)
        else:
            acc_exp, x_shift, w_shift = x_exp + w_exp, 0, 0
        out_bits = q.out_bits if name == "fc" else q.bits
        w_int = qw.int().long().numpy()
        fan_in = int(np.prod(w_int.shape[1:]))
        big = 1 << (q.bits - 1)
        max_term = big * big if q.product == "mul" else big << max(x_shift, w_shift)
        attrs = {"x_exp": x_exp, "w_exp": w_exp, "acc_exp": acc_exp, "out_exp": out_exp,
                 "shift": out_exp - acc_exp, "x_bits": q.bits, "w_bits": q.bits, "out_bits": out_bits,
                 "acc_bits": accumulator_bits(max_term, fan_in), "relu": relu,
                 "product": q.product, "x_shift": x_shift, "w_shift": w_shift,
                 "log2_gain": getattr(mod, "log2_gain", 0)}
        if kind == "conv2d":
            attrs.update(stride=mod.stride[0], padding=mod.padding[0])
        layers.append(Layer(name, kind, attrs, {"weight": w_int}))
    model = {"arch": "digits", "c1": q.c1, "c2": q.c2, "product": q.product, "bits": q.bits}
    inp = {"exp": exps[0], "bits": q.bits, "signed": True, "shape": [1, 8, 8],
           "pixel_frac_bits": PIXEL_FRAC_BITS}
    return Bundle(model, inp, layers)


def input_to_int(pixels: np.ndarray, inp: dict) -> np.ndarray:
    """Integer input of a bundle from integer pixels ``p`` (value ``p * 2**-frac``)."""
    shift = inp["exp"] + inp["pixel_frac_bits"]
    return requantize(np.asarray(pixels, np.int64), shift, inp["bits"], inp["signed"])


def run_digits_golden(bundle: Bundle, x_int: np.ndarray, upto: int | None = None,
                      start: int = 0) -> np.ndarray:
    """Run layers ``start .. upto-1`` of the bundle on integer input; returns int64 logits."""
    return run_layers(bundle.layers[start:upto], x_int)


@dataclass
class DigitsModels:
    """Float exact, float MinConv and quantized networks with held-out accuracies."""
    exact: object
    minconv: object
    quantized: dict
    accuracy: dict
    split: tuple


def train_digits_models(seed: int = 0, bits: tuple[int, ...] = (8,), *, product: str = "min",
                        progress: bool = True) -> DigitsModels:
    """Train the exact classifier, its MinConv twin, and QAT versions at each bit width."""
    from licforge.models.digits import accuracy, load_digits_split, to_minconv
    from licforge.models.training import fit_classifier

    torch.manual_seed(seed)
    xtr, ytr, xte, yte = load_digits_split(seed=seed)
    exact = DigitsNet()
    fit_classifier(exact, xtr, ytr, epochs=40, seed=seed, desc="exact CNN", progress=progress)
    acc = {"float_exact": accuracy(exact, xte, yte)}
    mc = to_minconv(exact, xtr[:256])
    acc["float_minconv_converted"] = accuracy(mc, xte, yte)
    fit_classifier(mc, xtr, ytr, epochs=20, lr=1e-3, seed=seed, desc="MinConv fine-tune", progress=progress)
    acc["float_minconv"] = accuracy(mc, xte, yte)
    src = mc if product == "min" else exact
    quantized = {}
    for b in bits:
        q = quantize_digits(src, b, xtr, ytr, seed=seed, progress=progress)
        quantized[b] = q
        acc[f"quant_{product}_{b}bit"] = accuracy(LogitsOnly(q), xte, yte)
    return DigitsModels(exact, mc, quantized, acc, (xtr, ytr, xte, yte))
