"""The digits classifier as a watermark host: data, training recipe, metric, deployment.

scikit-learn's bundled digits are split three ways (fixed by ``seed``): the owner's training
images, the attacker's images (held out from the owner, used by the fine-tuning and
quantization attacks) and the test images every accuracy is measured on (default 1077 /
360 / 360).  The owner trains an exact CNN, optionally converts it to MinConv and fine-tunes
it (the digits recipe, :func:`quant.digits.train_digits_models`, on the owner's images with
the host's budget), then embeds the watermark by continuing training with a marker for
``embed_epochs``; the *control* network continues training as long without
one, so that "task metric with and without the watermark" compares like with like.
Deployment is Brevitas QAT at ``bits`` with the marker still bound (the owner knows the key)
and export to a bundle; its accuracy is that of the integer golden model.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from licforge.models.digits import DigitsNet, accuracy, load_digits_split
from licforge.models.training import Marker, classifier_loss, epoch_steps, train
from licforge.quant.bundle import Bundle, Layer
from licforge.quant.digits import (DigitsRecipe, export_digits_bundle, input_to_int, quantize_digits,
                                   run_digits_golden, train_digits_models)
from .keys import WatermarkKey, make_key
from .layers import chain_weights, load_chain_weights, model_chain
from .markers import MarkerParams, bind_marker

__all__ = ["DigitsHost", "digits_net"]


def digits_net(chain: list[Layer], exact: bool = True) -> DigitsNet:
    """The float digits classifier whose layers are the weights of ``chain`` (a model's or an
    obfuscated model's; the widths ``c1``, ``c2`` are those of the chain's conv1 and conv2)."""
    w = chain_weights(chain)
    net = DigitsNet(int(w["conv1"].shape[0]), int(w["conv2"].shape[0]), exact=exact)
    load_chain_weights(net, w)
    return net.eval()


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

    def train_base(self, product: str, init_seed: int | None = None) -> DigitsNet:
        """The unmarked float network: the exact CNN (``"mul"``), or its MinConv twin
        fine-tuned (``"min"``), trained by the digits recipe on the owner's images; torch's
        initialisation and the shuffling are seeded by ``init_seed`` (default: the host's seed)."""
        recipe = DigitsRecipe(exact_epochs=self.base_epochs, minconv_epochs=self.minconv_epochs, whole_epochs=False)
        split = (*self.owner, self.data["x_test"], self.data["y_test"])
        seed = self.seed if init_seed is None else init_seed
        m = train_digits_models(seed, (), product=product, recipe=recipe, split=split, progress=self.progress)
        return m.minconv if product == "min" else m.exact

    def continue_training(self, net: DigitsNet, marker: Marker | None, init_seed: int | None = None) -> DigitsNet:
        """``embed_epochs`` more epochs of the owner's training on ``net`` (in place), shuffled by
        ``init_seed + 1`` (default: the host's seed + 1)."""
        x, _ = self.owner
        seed = self.seed if init_seed is None else init_seed
        train(net, classifier_loss, self.owner, steps=epoch_steps(len(x), self.embed_epochs), lr=1e-3,
              seed=seed + 1, marker=marker, desc="embed" if marker else "control", progress=self.progress)
        return net

    def null_model(self, product: str, init_seed: int) -> DigitsNet:
        """An unmarked network trained exactly as the owner trains the marked one (base recipe,
        then ``embed_epochs`` without a marker), from an independent initialisation ``init_seed``."""
        return self.continue_training(self.train_base(product, init_seed), None, init_seed)

    def embed(self, base: DigitsNet, scheme: str, payload: int, key_seed: int, *,
              params: MarkerParams = MarkerParams(), layers: list[str] | None = None) -> tuple[DigitsNet, WatermarkKey]:
        """A marked copy of ``base`` and its key."""
        net = copy.deepcopy(base)
        model = {"arch": "digits", "product": "mul" if base.exact else "min", "c1": base.c1, "c2": base.c2}
        key = make_key(scheme, model_chain(net), payload, key_seed, layers=layers, model=model,
                       params=params.for_scheme(scheme), repeat=params.repeat(scheme))
        marker = bind_marker(key, net, write=True)
        return self.continue_training(net, marker), key

    def accuracy(self, net: nn.Module) -> float:
        """Top-1 accuracy of a float or Brevitas model on the test split."""
        return accuracy(net, self.data["x_test"], self.data["y_test"])

    def deploy(self, net: DigitsNet, bits: int, key: WatermarkKey | None, *, epochs: int | None = None,
               data: tuple[Tensor, Tensor] | None = None) -> Bundle:
        """Brevitas QAT at ``bits`` (the marker of ``key`` bound, if given) and export: the
        owner's deployment with the owner's data, or, with ``key=None`` and the attacker's
        ``data``, the quantization attack."""
        x, y = data or self.owner
        q = quantize_digits(net, bits, x, y, qat_epochs=0, seed=self.seed, progress=False)
        marker = bind_marker(key, q) if key is not None else None
        train(q, classifier_loss, (x, y), steps=epoch_steps(len(x), self.qat_epochs if epochs is None else epochs),
              lr=5e-4, seed=self.seed + 2, marker=marker, desc=f"QAT {bits}-bit", progress=self.progress)
        return export_digits_bundle(q, x)

    def bundle_accuracy(self, bundle: Bundle) -> float:
        """Accuracy of the integer golden model of ``bundle`` on the test split."""
        pixels = (self.data["x_test"] * 16).round().long().numpy()
        out = run_digits_golden(bundle, input_to_int(pixels, bundle.input))
        return float(np.mean(out.argmax(1) == self.data["y_test"].numpy()))

