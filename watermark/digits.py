"""The digits classifier as a watermark host: data, training recipe, metric, deployment.

scikit-learn's bundled digits are split three ways (fixed by ``seed``): the owner's training
images, the attacker's images (held out from the owner, used by the fine-tuning and
quantization attacks) and the test images every accuracy is measured on (default 1077 /
360 / 360).  The owner trains an exact CNN, optionally converts it to MinConv and fine-tunes
it (the chain of :mod:`bench.minconv`), then embeds the watermark by continuing training
with a marker for ``embed_epochs``; the *control* network continues training as long without
one, so that "task metric with and without the watermark" compares like with like.
Deployment is Brevitas QAT at ``bits`` with the marker still bound (the owner knows the key)
and export to a bundle; its accuracy is that of the integer golden model.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from licforge.models.digits import DigitsNet, load_digits_split, to_minconv
from licforge.quant.bundle import Bundle
from licforge.quant.digits import export_digits_bundle, input_to_int, quantize_digits, run_digits_golden
from .keys import WatermarkKey, make_key
from .layers import model_chain
from .markers import MarkerParams, bind_marker
from .train import Marker, classifier_loss, logits, train

__all__ = ["DigitsHost", "save_digits_model", "load_digits_model", "MODEL_FORMAT", "PRODUCTS"]

MODEL_FORMAT = "licforge-digits-model/1"
PRODUCTS = ("mul", "min")


def _steps(n: int, epochs: int, batch: int = 64) -> int:
    return epochs * -(-n // batch)


@dataclass
class DigitsHost:
    """Data splits and recipes of the digits study (see the module docstring)."""
    seed: int = 0
    base_epochs: int = 30
    minconv_epochs: int = 10
    embed_epochs: int = 20
    qat_epochs: int = 5
    progress: bool = False
    data: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        xtr, ytr, xte, yte = load_digits_split(seed=self.seed)
        order = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(self.seed))
        cut = len(xtr) - len(xte)
        own, att = order[:cut], order[cut:]
        self.data = {"x_owner": xtr[own], "y_owner": ytr[own], "x_attack": xtr[att], "y_attack": ytr[att],
                     "x_test": xte, "y_test": yte}

    @property
    def owner(self) -> tuple[Tensor, Tensor]:
        return self.data["x_owner"], self.data["y_owner"]

    @property
    def attacker(self) -> tuple[Tensor, Tensor]:
        return self.data["x_attack"], self.data["y_attack"]

    def train_base(self, product: str) -> DigitsNet:
        """The unmarked float network: exact CNN, or its MinConv twin fine-tuned."""
        if product not in PRODUCTS:
            raise ValueError(f"product must be one of {PRODUCTS}, not {product!r}")
        torch.manual_seed(self.seed)
        net = DigitsNet()
        x, y = self.owner
        train(net, classifier_loss, self.owner, steps=_steps(len(x), self.base_epochs), lr=3e-3,
              seed=self.seed, desc="exact CNN", progress=self.progress)
        if product == "min":
            net = to_minconv(net, x[:256])
            train(net, classifier_loss, self.owner, steps=_steps(len(x), self.minconv_epochs), lr=1e-3,
                  seed=self.seed, desc="MinConv fine-tune", progress=self.progress)
        return net

    def continue_training(self, net: DigitsNet, marker: Marker | None) -> DigitsNet:
        """``embed_epochs`` more epochs of the owner's training on ``net`` (in place)."""
        x, _ = self.owner
        train(net, classifier_loss, self.owner, steps=_steps(len(x), self.embed_epochs), lr=1e-3,
              seed=self.seed + 1, marker=marker, desc="embed" if marker else "control", progress=self.progress)
        return net

    def embed(self, base: DigitsNet, scheme: str, payload: int, key_seed: int, *,
              params: MarkerParams = MarkerParams(), layers: list[str] | None = None) -> tuple[DigitsNet, WatermarkKey]:
        """A marked copy of ``base`` and its key."""
        net = copy.deepcopy(base)
        model = {"arch": "digits", "product": "mul" if base.exact else "min", "c1": base.c1, "c2": base.c2}
        key = make_key(scheme, model_chain(net), payload, key_seed, layers=layers, model=model,
                       params=params.for_scheme(scheme))
        marker = bind_marker(key, net, write=True)
        return self.continue_training(net, marker), key

    def accuracy(self, net: nn.Module) -> float:
        """Top-1 accuracy of a float or Brevitas model on the test split."""
        net.eval()
        with torch.no_grad():
            return float((logits(net(self.data["x_test"])).argmax(1) == self.data["y_test"]).float().mean())

    def deploy(self, net: DigitsNet, bits: int, key: WatermarkKey | None, *, epochs: int | None = None,
               data: tuple[Tensor, Tensor] | None = None) -> Bundle:
        """Brevitas QAT at ``bits`` (the marker of ``key`` bound, if given) and export: the
        owner's deployment with the owner's data, or, with ``key=None`` and the attacker's
        ``data``, the quantization attack."""
        x, y = data or self.owner
        q = quantize_digits(net, bits, x, y, qat_epochs=0, seed=self.seed, progress=False)
        marker = bind_marker(key, q) if key is not None else None
        train(q, classifier_loss, (x, y), steps=_steps(len(x), self.qat_epochs if epochs is None else epochs),
              lr=5e-4, seed=self.seed + 2, marker=marker, desc=f"QAT {bits}-bit", progress=self.progress)
        return export_digits_bundle(q, x)

    def bundle_accuracy(self, bundle: Bundle) -> float:
        """Accuracy of the integer golden model of ``bundle`` on the test split."""
        pixels = (self.data["x_test"] * 16).round().long().numpy()
        out = run_digits_golden(bundle, input_to_int(pixels, bundle.input))
        return float(np.mean(out.argmax(1) == self.data["y_test"].numpy()))


def save_digits_model(net: DigitsNet, path: Path) -> Path:
    """Write a float digits network (architecture + weights, no key) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": MODEL_FORMAT, "c1": net.c1, "c2": net.c2, "exact": net.exact,
                "state_dict": net.state_dict()}, path)
    return path


def load_digits_model(path: Path) -> DigitsNet:
    """Read a network written by :func:`save_digits_model`; ValueError names the file."""
    path = Path(path)
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch raises many types for a file that is not a checkpoint
        raise ValueError(f"model file {path}: not a licforge digits model ({type(e).__name__})") from None
    if not isinstance(doc, dict) or doc.get("format") != MODEL_FORMAT:
        raise ValueError(f"model file {path}: format is not {MODEL_FORMAT!r}; 'licforge watermark embed' "
                         f"writes one")
    net = DigitsNet(doc["c1"], doc["c2"], exact=doc["exact"])
    net.load_state_dict(doc["state_dict"])
    net.eval()
    return net
