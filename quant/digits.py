"""The digits classifier quantized with Brevitas, exported to a bundle, run as integers.

:class:`QuantDigitsNet` mirrors :class:`models.digits.DigitsNet` with fixed-point quantizers
(``bits`` for inputs, weights and activations).  With ``product="min"`` its layers compute
MinConv (``sign(x)sign(w)min(|x|,|w|)`` on the dequantized fake-quant values); with
``"mul"`` ordinary convolutions.  :func:`export_digits_bundle` writes the integers;
:func:`run_digits_golden` evaluates the bundle in integer arithmetic only and equals the
Brevitas model exactly (tested).

:func:`train_digits_models` is the one digits recipe (exact CNN -> MinConv twin -> QAT,
budget :class:`DigitsRecipe`); its networks at seed 0 are committed in
``models/checkpoints/digits`` (:func:`load_digits_models`; ``python -m licforge.quant.digits``
rewrites them).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from brevitas.nn import QuantConv2d, QuantIdentity, QuantLinear, QuantReLU
from torch import Tensor, nn

from licforge.models.digits import (DigitsNet, accuracy, load_digits_model, load_digits_split, save_digits_model,
                                    to_minconv)
from licforge.models.lic import CheckpointError, read_checkpoint
from licforge.models.minconv import min_linear
from licforge.models.training import classifier_loss, epoch_steps, plain_tensor, train
from .bundle import Bundle, Layer
from .fixed import accumulator_bits, check_bits, requantize
from .golden import run_layers
from .lic_layers import QuantMinConv2d  # the one Brevitas MinConv convolution (LIC decoder too)
from .quantizers import ActFixedPoint, WeightFixedPoint

__all__ = ["QuantMinConv2d", "QuantMinLinear", "QuantDigitsNet", "quantize_digits",
           "export_digits_bundle", "run_digits_golden", "input_to_int", "PIXEL_FRAC_BITS",
           "DigitsRecipe", "DigitsModels", "train_digits_models", "save_digits_models", "load_digits_models",
           "DIGITS_CHECKPOINT", "CHECKPOINT_FORMAT", "QUANT_FORMAT", "PRODUCTS", "CALIB_IMAGES"]

PIXEL_FRAC_BITS = 4  # digits pixels are p / 16, p in 0..16


def _exp(scale) -> int:
    s = float(scale.detach().reshape(-1)[0]) if torch.is_tensor(scale) else float(scale)
    e = math.log2(s)
    if abs(e - round(e)) > 1e-9:
        raise ValueError(f"scale {s} is not a power of two")
    return int(round(e))


class QuantMinLinear(QuantLinear):
    """Brevitas linear layer with signed-minimum products (see :class:`QuantMinConv2d`)."""

    def __init__(self, *args, log2_gain: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.log2_gain = int(log2_gain)

    def inner_forward_impl(self, x, quant_weight, quant_bias):
        return min_linear(plain_tensor(x), plain_tensor(quant_weight)) * 2.0 ** -self.log2_gain


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
                    qat_epochs: int = 10, lr: float = 5e-4, seed: int = 0, out_bits: int = 16,
                    progress: bool = True) -> QuantDigitsNet:
    """The ``bits``-bit Brevitas twin of a (MinConv or exact) float digits network, after
    ``qat_epochs`` epochs of quantization-aware training on (x_train, y_train) (0: the
    twin as converted); ``seed`` seeds the twin's construction and the shuffling."""
    torch.manual_seed(seed)
    product = "mul" if net.exact else "min"
    gains = (0, 0, 0) if net.exact else tuple(int(l.log2_gain) for l in (net.conv1, net.conv2, net.fc))
    q = QuantDigitsNet(net.c1, net.c2, bits, out_bits, product, gains)
    with torch.no_grad():
        for src, dst, g in zip((net.conv1, net.conv2, net.fc), (q.conv1, q.conv2, q.fc), gains):
            dst.weight.copy_(src.weight * 2.0 ** g)
    train(q, classifier_loss, (x_train, y_train), epochs=qat_epochs, lr=lr, seed=seed, desc=f"QAT {bits}-bit",
          progress=progress)
    return q


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


DIGITS_CHECKPOINT = Path(__file__).resolve().parent.parent / "models" / "checkpoints" / "digits"
"""The committed networks of the recipe at seed 0 (8-bit MinConv QAT); see :func:`load_digits_models`."""
CHECKPOINT_FORMAT = "licforge-digits-checkpoint/1"
QUANT_FORMAT = "licforge-digits-quant/1"
PRODUCTS = ("mul", "min")
CALIB_IMAGES = 256
"""The MinConv twin's weight gains are calibrated on this many training images."""
_REWRITE = "python -m licforge.quant.digits (trains the recipe at seed 0 and rewrites the folder)"


@dataclass(frozen=True)
class DigitsRecipe:
    """Budget of the digits training chain: epochs and learning rates of the exact CNN, of the
    MinConv twin's fine-tuning and of QAT.  With ``whole_epochs`` (the default) an epoch of
    the float stages is one pass over the images, the learning rate annealed once per epoch;
    without, ``epochs`` stands for :func:`models.training.epoch_steps` full minibatches, the
    learning rate annealed every step (the watermark study's budget).  QAT always counts passes."""
    exact_epochs: int = 40
    minconv_epochs: int = 20
    qat_epochs: int = 10
    exact_lr: float = 3e-3
    minconv_lr: float = 1e-3
    qat_lr: float = 5e-4
    whole_epochs: bool = True

    def budget(self, n: int, epochs: int) -> dict[str, int]:
        """The keyword argument of :func:`models.training.train` for ``epochs`` epochs over ``n`` images."""
        return {"epochs": epochs} if self.whole_epochs else {"steps": epoch_steps(n, epochs)}


@dataclass
class DigitsModels:
    """The networks of one run of :func:`train_digits_models`: the float exact CNN, its float
    MinConv twin (None for ``product="mul"``) and the QAT networks by bit width, with their
    accuracies on the test images of ``split`` = (x_train, y_train, x_test, y_test)."""
    exact: DigitsNet
    minconv: DigitsNet | None
    quantized: dict[int, QuantDigitsNet]
    accuracy: dict[str, float]
    split: tuple[Tensor, Tensor, Tensor, Tensor]
    seed: int = 0
    product: str = "min"
    recipe: DigitsRecipe = DigitsRecipe()


def train_digits_models(seed: int = 0, bits: tuple[int, ...] = (8,), *, product: str = "min",
                        recipe: DigitsRecipe = DigitsRecipe(),
                        split: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
                        progress: bool = True) -> DigitsModels:
    """The digits recipe: the exact CNN (torch seeded with ``seed``); for ``product="min"``
    its MinConv twin (gains calibrated on the first :data:`CALIB_IMAGES` training images),
    fine-tuned; then QAT at each of ``bits`` of the MinConv (``"min"``) or exact (``"mul"``)
    network.  ``split`` = (x_train, y_train, x_test, y_test) defaults to
    :func:`models.digits.load_digits_split` of ``seed``; accuracies are on its test images."""
    if product not in PRODUCTS:
        raise ValueError(f"product must be one of {PRODUCTS}, not {product!r}")
    torch.manual_seed(seed)
    split = load_digits_split(seed=seed) if split is None else split
    xtr, ytr = split[0], split[1]
    exact = DigitsNet()
    train(exact, classifier_loss, (xtr, ytr), **recipe.budget(len(xtr), recipe.exact_epochs), lr=recipe.exact_lr,
          seed=seed, desc="exact CNN", progress=progress)
    minconv = None
    if product == "min":
        minconv = to_minconv(exact, xtr[:CALIB_IMAGES])
        train(minconv, classifier_loss, (xtr, ytr), **recipe.budget(len(xtr), recipe.minconv_epochs),
              lr=recipe.minconv_lr, seed=seed, desc="MinConv fine-tune", progress=progress)
    src = minconv if minconv is not None else exact
    quantized = {b: quantize_digits(src, b, xtr, ytr, qat_epochs=recipe.qat_epochs, lr=recipe.qat_lr, seed=seed,
                                    progress=progress) for b in bits}
    return DigitsModels(exact, minconv, quantized, _accuracies(exact, minconv, quantized, product, split), split,
                        seed, product, recipe)


def _accuracies(exact: DigitsNet, minconv: DigitsNet | None, quantized: dict[int, QuantDigitsNet], product: str,
                split: tuple[Tensor, Tensor, Tensor, Tensor]) -> dict[str, float]:
    """Test accuracy of every network of a run (and of the MinConv twin right after conversion)."""
    xtr, _, xte, yte = split
    acc = {"float_exact": accuracy(exact, xte, yte)}
    if minconv is not None:
        acc["float_minconv_converted"] = accuracy(to_minconv(exact, xtr[:CALIB_IMAGES]), xte, yte)
        acc["float_minconv"] = accuracy(minconv, xte, yte)
    acc.update({f"quant_{product}_{b}bit": accuracy(q, xte, yte) for b, q in quantized.items()})
    return acc


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _quant_file(product: str, bits: int) -> str:
    return f"quant_{product}_{bits}bit.pt"


def save_digits_models(models: DigitsModels, folder: str | Path = DIGITS_CHECKPOINT) -> Path:
    """Write the networks of ``models`` (trained on the default split of their seed) to
    ``folder``: ``exact.pt`` and ``minconv.pt`` (:func:`models.digits.save_digits_model`),
    ``quant_<product>_<bits>bit.pt`` per QAT network, and ``meta.json`` (seed, recipe,
    accuracies, sha256 of every file).  Returns the path of ``meta.json``."""
    if not all(torch.equal(a, b) for a, b in zip(models.split, load_digits_split(seed=models.seed))):
        raise ValueError(f"a digits checkpoint holds networks trained on load_digits_split(seed={models.seed}); "
                         f"these were trained on another split")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [save_digits_model(models.exact, folder / "exact.pt")]
    if models.minconv is not None:
        paths.append(save_digits_model(models.minconv, folder / "minconv.pt"))
    for b, q in models.quantized.items():
        gains = [int(getattr(m, "log2_gain", 0)) for m in (q.conv1, q.conv2, q.fc)]
        torch.save({"format": QUANT_FORMAT, "c1": q.c1, "c2": q.c2, "bits": q.bits, "out_bits": q.out_bits,
                    "product": q.product, "gains": gains, "state_dict": q.state_dict()},
                   folder / _quant_file(models.product, b))
        paths.append(folder / _quant_file(models.product, b))
    meta = {"format": CHECKPOINT_FORMAT, "seed": models.seed, "product": models.product,
            "bits": sorted(models.quantized), "recipe": asdict(models.recipe), "accuracy": models.accuracy,
            "torch": torch.__version__, "files": {p.name: _sha256(p) for p in paths}}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return folder / "meta.json"


def load_digits_models(folder: str | Path = DIGITS_CHECKPOINT) -> DigitsModels:
    """The networks written by :func:`save_digits_models` (by default the committed ones),
    with the split of their seed and their accuracies measured again.  A missing, corrupt,
    edited or mismatched file raises :class:`models.lic.CheckpointError` naming it and the fix."""
    folder = Path(folder)
    meta_path = folder / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{meta_path}: not found; write the digits checkpoint with {_REWRITE}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path}: not JSON ({e}); rewrite it with {_REWRITE}") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{meta_path}: format {got!r}, expected {CHECKPOINT_FORMAT!r}; "
                              f"rewrite it with {_REWRITE}")
    for name, digest in meta["files"].items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: not found (listed in {meta_path}); rewrite the folder with {_REWRITE}")
        if _sha256(path) != digest:
            raise CheckpointError(f"{path}: sha256 differs from the one recorded in {meta_path} (a corrupt file, "
                                  f"or one of another run); rewrite the folder with {_REWRITE}")
    product, seed = meta["product"], meta["seed"]
    exact = load_digits_model(folder / "exact.pt", _REWRITE)
    minconv = load_digits_model(folder / "minconv.pt", _REWRITE) if "minconv.pt" in meta["files"] else None
    quantized = {}
    for b in meta["bits"]:
        path = folder / _quant_file(product, b)
        ck = read_checkpoint(path, QUANT_FORMAT, _REWRITE)
        try:
            q = QuantDigitsNet(ck["c1"], ck["c2"], ck["bits"], ck["out_bits"], ck["product"], tuple(ck["gains"]))
            q.load_state_dict(ck["state_dict"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: not a whole quantized digits network ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:160]}); rewrite the folder with {_REWRITE}") from None
        quantized[b] = q.eval()
    split = load_digits_split(seed=seed)
    return DigitsModels(exact, minconv, quantized, _accuracies(exact, minconv, quantized, product, split), split,
                        seed, product, DigitsRecipe(**meta["recipe"]))


if __name__ == "__main__":
    torch.set_num_threads(1)  # as in the tests: the checkpoint is what one thread computes
    print(save_digits_models(train_digits_models(seed=0, bits=(8,))))
