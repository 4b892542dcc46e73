"""An LIC student as a watermark host: the key lives in the decoder, embedded during QAT.

Only the synthesis transform (``g_s.0``, ``g_s.2``, ``g_s.4``, ``g_s.6``, transposed
convolutions) is deployed in the decoder hardware, so the key is drawn over those layers and
read back from the bundle or from the decoder's ROM files (``licforge rtl decoder``,
:func:`rtl.deployed.read_deployed_weights`).  Deployment at ``w_bits`` is the student's
Brevitas model with the ``hybrid8`` recipe and every convolution's weights at ``w_bits``:
post-training calibration (:func:`quant.lic.quantize_student` without training), then QAT
with :func:`models.training.train` on random training crops of the embedded images and the
rate-distortion loss ``bpp + lmbda * MSE`` (:func:`models.lic_train.rd_terms`, ``lmbda`` of
the student), the GDN constraints re-imposed after every step, and the marker bound (or
not, for the control).  The imperceptibility metrics (PSNR, bpp of real bitstreams) are
measured by the caller on the exported bundle (:func:`quant.eval.eval_bundle`).  The
attacker's data (fine-tuning and quantization attacks, :mod:`watermark.lic_study`) is ``crops``
random crops of the held-out images, which the owner never trained on.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from licforge.models.lic import SYNTH_CONVS, load_weights
from licforge.models.training import Marker, train
from licforge.quant.bundle import Bundle, Layer
from .keys import WatermarkKey, make_key
from .layers import model_chain

__all__ = ["LICHost", "DECODER_LAYERS", "DEFAULT_STUDENT", "student_chain", "float_student"]

DECODER_LAYERS = SYNTH_CONVS
"""The layers a key is drawn over: the synthesis convolutions, what the hardware decodes."""
DEFAULT_STUDENT = Path(__file__).resolve().parent.parent / "models" / "checkpoints" / "student_n16_photos_l0.0130.pt"


@dataclass
class LICHost:
    """A float LIC student and the QAT recipe used to deploy it with or without a mark."""
    weights: Path = DEFAULT_STUDENT
    steps: int = 150
    lr: float = 1e-3
    crops: int = 64
    crop: int = 64
    batch: int = 8
    seed: int = 0
    data_folder: str | None = None
    progress: bool = False
    net: nn.Module = field(init=False)
    data: Tensor = field(init=False)
    attacker: Tensor = field(init=False)

    def __post_init__(self) -> None:
        from licforge.models.data import CropSampler, load_split

        self.net, self.cfg, self.meta = load_weights(self.weights)
        self.lmbda = float(self.meta.get("lmbda") or 0.013)
        self.images = load_split(self.data_folder, "train")
        sampler = CropSampler(self.images, self.crop, self.crops, self.seed)
        self.data = sampler()
        self.attacker = CropSampler(load_split(self.data_folder, "held-out"), self.crop, self.crops, self.seed + 1)()

    def loss(self, net: nn.Module, batch) -> Tensor:
        """Rate-distortion loss ``bpp + lmbda * MSE`` (MSE on the 0..255 scale)."""
        from licforge.models.lic_train import rd_terms

        (x,) = batch
        bpp, mse = rd_terms(net(x), x)
        return bpp + self.lmbda * mse

    def key(self, scheme: str, payload: int, seed: int, params: dict | None = None, repeat: int = 1) -> WatermarkKey:
        """A key over the decoder layers of the student (``repeat``: WaterMAS weights per bit)."""
        return make_key(scheme, model_chain(self.net), payload, seed, layers=DECODER_LAYERS,
                        model={"arch": "lic", "student": self.weights.name, "N": self.cfg.N, "M": self.cfg.M},
                        params=params, repeat=repeat)

    def quantize(self, w_bits: int, recipe: str = "hybrid8") -> nn.Module:
        """The PTQ'd Brevitas student, ``recipe`` with ``w_bits``-bit convolution weights."""
        from licforge.quant.lic import quantize_student
        from licforge.quant.lic_recipe import load_recipe, parse_recipe

        data = copy.deepcopy(load_recipe(recipe).data)
        data["name"], data["conv"]["w_bits"] = f"{data['name']}-w{w_bits}", w_bits
        q, _ = quantize_student(self.net, self.cfg, parse_recipe(data, f"{recipe} with {w_bits}-bit weights"),
                                self.images, train=None, seed=self.seed, log=None)
        return q

    def qat(self, q: nn.Module, marker: Marker | None) -> nn.Module:
        """``steps`` QAT steps on ``q`` in place (GDN constraints re-imposed every step); the global
        torch generator, which draws the entropy bottleneck's training noise, is seeded first."""
        torch.manual_seed(self.seed)
        train(q, self.loss, (self.data,), steps=self.steps, lr=self.lr, batch=self.batch, seed=self.seed,
              marker=marker, on_step=lambda k, m: m.project_(), desc="LIC QAT", progress=self.progress)
        return q

    def with_student(self, net: nn.Module) -> "LICHost":
        """This host (data, recipe) with another float student of the same architecture."""
        out = copy.copy(self)
        out.net = net
        return out

    @staticmethod
    def export(q: nn.Module) -> Bundle:
        """The deployment bundle of ``q`` (entropy coder prepared first)."""
        from licforge.quant.codec import prepare_entropy_coder
        from licforge.quant.lic import export_bundle

        prepare_entropy_coder(q.entropy_bottleneck)
        return export_bundle(q)


def student_chain(q: nn.Module) -> list[Layer]:
    """The float parameters of a quantized student (:class:`quant.lic.QuantFactorizedPrior`) as a
    chain: convolutions (weight, bias, stride, padding), GDN1 / inverse GDN1 (``gamma`` = the norm
    convolution's weight, ``beta`` its bias) and the latent between ``g_a`` and ``g_s`` (float64
    copies; :func:`float_student` makes a float student of a chain)."""
    from licforge.quant.lic_layers import QuantGDN1

    chain: list[Layer] = []
    for prefix, seq in (("g_a", q.g_a), ("g_s", q.g_s)):
        if prefix == "g_s":
            chain.append(Layer("latent", "latent", {}, {}))
        for k, m in enumerate(seq):
            name = f"{prefix}.{k}"
            f64 = lambda t: t.detach().to(torch.float64).numpy().copy()  # noqa: E731
            if isinstance(m, QuantGDN1):
                chain.append(Layer(name, "igdn" if m.inverse else "gdn", {},
                                   {"gamma": f64(m.norm_conv.weight)[:, :, 0, 0], "beta": f64(m.norm_conv.bias)}))
                continue
            op = "conv_transpose2d" if prefix == "g_s" else "conv2d"
            attrs = {"stride": int(m.stride[0]), "padding": int(m.padding[0]), "relu": False, "product": "mul"}
            if op == "conv_transpose2d":
                attrs["output_padding"] = int(m.output_padding[0])
            chain.append(Layer(name, op, attrs, {"weight": f64(m.weight), "bias": f64(m.bias)}))
    return chain


@torch.no_grad()
def float_student(template: nn.Module, chain: list[Layer], entropy_bottleneck: nn.Module | None = None) -> nn.Module:
    """A float CompressAI student (a copy of ``template``, GDN1) with the parameters of a chain of
    :func:`student_chain`'s shapes (GDN1's ``gamma`` and ``beta`` through CompressAI's
    non-negative reparametrization), and ``entropy_bottleneck``'s state if given: what PTQ
    (:meth:`LICHost.quantize`) calibrates an edited quantized student from."""
    net = copy.deepcopy(template)
    mods = {f"{p}.{k}": m for p, seq in (("g_a", net.g_a), ("g_s", net.g_s)) for k, m in enumerate(seq)}
    for lay in chain:
        if lay.op == "latent":
            continue
        m = mods[lay.name]
        if lay.op in ("gdn", "igdn"):
            m.gamma.copy_(m.gamma_reparam.init(torch.as_tensor(lay.tensors["gamma"], dtype=m.gamma.dtype)))
            m.beta.copy_(m.beta_reparam.init(torch.as_tensor(lay.tensors["beta"], dtype=m.beta.dtype)))
        else:
            m.weight.copy_(torch.as_tensor(lay.tensors["weight"]))
            m.bias.copy_(torch.as_tensor(lay.tensors["bias"]))
    if entropy_bottleneck is not None:
        net.entropy_bottleneck.load_state_dict(entropy_bottleneck.state_dict())
    return net.eval()
