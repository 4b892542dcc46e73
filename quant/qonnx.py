"""QONNX export, the hand-off to FINN (equality 3 of DESIGN.md).

A quantized network is exported with Brevitas (``export_qonnx``), cleaned with qonnx
(``cleanup_model``: shape inference, constant folding, readable names; weight ``Quant`` nodes
are kept) and executed with qonnx's executor (``execute_onnx``).  The executed outputs must
equal Brevitas's outputs exactly (``np.array_equal``), on real inputs:

* :func:`export_synthesis`: the LIC student's synthesis transform (latent quantizer, then
  ``g_s.0`` .. ``g_s.6``) on the integer latents of the held-out images;
* :func:`export_classifier`: the exact-product ("mul") digits classifier on the held-out
  digits.  The MinConv ("min") classifier is refused: ONNX and FINN have no MinConv.

Every ONNX node is attributed to the network layer that produced it (the exporter's
``pkg.torch.onnx.name_scopes`` metadata) and judged against what FINN can build
(:data:`FINN_NOTES`): ``supported``, ``at risk`` (FINN has a path, but not for this node as
exported) or ``unsupported`` (no FINN hardware layer or transformation).  A layer is as bad
as its worst node.  Nothing is dropped silently: when the whole network does not export,
each layer is exported alone, the failing ones are named with the reason, and the others
are written as one ``.onnx`` file each.
"""
from __future__ import annotations

import copy
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from licforge.errors import UsageError

__all__ = ["export_synthesis", "export_classifier", "train_exact_classifier", "FINN_NOTES", "MAX_THRESHOLD_BITS"]

MAX_THRESHOLD_BITS = 8
"""FINN's ``ConvertQONNXtoFINN(max_multithreshold_bit_width=8)`` default: activation ``Quant``
nodes wider than this stay ``Quant`` nodes (a b-bit MultiThreshold has 2**b - 1 thresholds)."""

_FINN = "Xilinx/finn (dev) src/finn/"
FINN_NOTES: dict[str, tuple[str, str, str]] = {
    # key: (status, reason, where in FINN's source the claim can be checked)
    "Quant.weight": ("supported", "weight/bias Quant: folded into the initializer",
                     _FINN + "transformation/qonnx/fold_quant_weights.py (FoldQuantWeights)"),
    "Quant.act": ("supported", "activation Quant: becomes a MultiThreshold -> Thresholding layer",
                  _FINN + "transformation/qonnx/quant_act_to_multithreshold.py"),
    "Quant.wide": ("at risk", "{bits}-bit activation Quant: ConvertQONNXtoFINN converts activation Quants only up to "
                              f"max_multithreshold_bit_width={MAX_THRESHOLD_BITS} (default) to MultiThreshold; a wider "
                              "one needs 2**bits-1 thresholds per channel",
                   _FINN + "transformation/qonnx/convert_qonnx_to_finn.py"),
    "Conv": ("supported", "Conv: LowerConvsToMatMul -> Im2Col + MatMul -> ConvolutionInputGenerator + MVAU",
             _FINN + "transformation/fpgadataflow/convert_to_hw_layers.py (InferConvInpGen, "
                     "InferQuantizedMatrixVectorActivation)"),
    "ConvTranspose": ("supported", "ConvTranspose: InferPixelPaddingDeconv -> FMPadding_Pixel + Im2Col + MatMul",
                      _FINN + "transformation/fpgadataflow/infer_pixel_padding_deconv.py"),
    "ConvTranspose.output_padding": (
        "at risk", "ConvTranspose with output_padding={pad}: InferPixelPaddingDeconv ignores output_padding (its "
                   "output is (in-1)*stride-2*pad+k, one row and column short) and drops the bias input",
        _FINN + "transformation/fpgadataflow/infer_pixel_padding_deconv.py"),
    "Abs": ("unsupported", "Abs: no FINN hardware layer or transformation (the elementwise functions are Relu, Exp, "
                           "Erf only)", _FINN + "custom_op/fpgadataflow/elementwise_functions.py"),
    "Mul": ("supported", "Mul of two streams: ElementwiseMul (InferElementwiseBinaryOperation), integer operands",
            _FINN + "custom_op/fpgadataflow/elementwise_binary.py"),
    "Mul.const": ("supported", "Mul by a constant: absorbed into MultiThreshold by streamlining",
                  _FINN + "transformation/streamline/absorb.py"),
    "Add": ("supported", "Add of a constant: absorbed into MultiThreshold by streamlining",
            _FINN + "transformation/streamline/absorb.py"),
    "Relu": ("supported", "Relu: absorbed into the MultiThreshold that follows",
             _FINN + "transformation/streamline/absorb.py"),
    "MatMul": ("supported", "MatMul: MVAU", _FINN + "transformation/fpgadataflow/convert_to_hw_layers.py"),
    "Gemm": ("supported", "Gemm: GemmToMatMul -> MVAU", _FINN + "transformation/qonnx/convert_qonnx_to_finn.py"),
    "Reshape": ("supported", "flatten before a MatMul: removed by RemoveCNVtoFCFlatten",
                _FINN + "transformation/streamline/absorb.py"),
    "Flatten": ("supported", "flatten before a MatMul: removed by RemoveCNVtoFCFlatten",
                _FINN + "transformation/streamline/absorb.py"),
}
_RANK = {"supported": 0, "at risk": 1, "unsupported": 2}


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {p: version(p) for p in ("brevitas", "qonnx", "onnx", "onnxruntime", "torch")}


class _Synthesis(nn.Module):
    """The decoder as exported: the latent quantizer (integer latents, 2**0) then ``g_s``."""

    def __init__(self, q: nn.Module) -> None:
        super().__init__()
        self.latent, self.g_s = q.latent_q, q.g_s

    def forward(self, y: Tensor):
        return self.g_s(self.latent(y))


@torch.no_grad()
def _brevitas(module: nn.Module, x: np.ndarray) -> np.ndarray:
    """Brevitas output values of ``module`` on ``x``, computed in float64."""
    module.eval().double()
    try:
        out = module(torch.from_numpy(np.asarray(x, np.float64)))
        return getattr(out, "value", out).numpy()
    finally:
        module.float()


def _layer_of(node, layers: list[str]) -> str:
    """The deepest name scope of ``node`` that is one of ``layers`` (else its own scope)."""
    import ast

    meta = {p.key: p.value for p in node.metadata_props}
    scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
    named = [s for s in scopes if s in layers]
    return named[-1] if named else (scopes[-1] if scopes else node.name)


def _finn_verdict(model, node) -> tuple[str, str, str]:
    """(status, reason, source) of one cleaned QONNX node against :data:`FINN_NOTES`."""
    from qonnx.util.basic import get_by_name

    op, key, fill = node.op_type, node.op_type, {}
    if op == "Quant":
        bits = int(model.get_initializer(node.input[3]))
        key = ("Quant.weight" if model.get_initializer(node.input[0]) is not None
               else "Quant.wide" if bits > MAX_THRESHOLD_BITS else "Quant.act")
        fill = {"bits": bits}
    elif op == "ConvTranspose":
        pads = get_by_name(node.attribute, "output_padding")
        if pads is not None and any(pads.ints):
            key, fill = "ConvTranspose.output_padding", {"pad": max(pads.ints)}
    elif op == "Mul" and any(model.get_initializer(i) is not None for i in node.input):
        key = "Mul.const"
    if key not in FINN_NOTES:
        return "unsupported", f"{op}: not in licforge's FINN table (quant/qonnx.py FINN_NOTES)", ""
    status, why, src = FINN_NOTES[key]
    return status, why.format(**fill), src


def _support(model, layers: list[str]) -> list[dict[str, Any]]:
    """Per layer (in the order of ``layers``; glue ops such as a flatten, named by their own
    scope, last): ONNX ops, FINN status (the worst node's), reasons, sources."""
    rows: dict[str, dict[str, Any]] = {}
    for node in model.graph.node:
        name = _layer_of(node, layers)
        row = rows.setdefault(name, {"layer": name, "onnx_ops": Counter(), "finn": "supported", "reasons": [],
                                     "sources": []})
        row["onnx_ops"][node.op_type] += 1
        status, why, src = _finn_verdict(model, node)
        if _RANK[status] > _RANK[row["finn"]]:
            row["finn"] = status
        if status != "supported" and why not in row["reasons"]:
            row["reasons"].append(why)
        if src and src not in row["sources"]:
            row["sources"].append(src)
    order = sorted(rows.values(), key=lambda r: layers.index(r["layer"]) if r["layer"] in layers else len(layers))
    return [{**r, "onnx_ops": dict(sorted(r["onnx_ops"].items()))} for r in order]


def _with_input_shape(model, shape: tuple[int, ...]):
    """A copy of the cleaned ``model`` for another input shape (batch and/or spatial size)."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.change_batchsize import ChangeBatchSize
    from qonnx.transformation.infer_shapes import InferShapes

    m = ModelWrapper(copy.deepcopy(model.model)).transform(ChangeBatchSize(shape[0]))
    m.set_tensor_shape(m.graph.input[0].name, list(shape))
    m.graph.output[0].type.tensor_type.shape.ClearField("dim")
    return m.transform(InferShapes())


def _probe_layers(module: nn.Module, named: list[tuple[str, nn.Module]], example: Tensor,
                  out: Path) -> list[dict[str, Any]]:
    """Export each layer alone, on the input it sees in a forward pass of ``module`` on
    ``example``; one row per layer with the written file or the reason it does not export."""
    from brevitas.export import export_qonnx

    inputs: dict[str, Any] = {}

    def keep(name: str):
        def hook(_mod, args) -> None:
            inputs.setdefault(name, args[0])
        return hook

    hooks = [m.register_forward_pre_hook(keep(n)) for n, m in named]
    try:
        with torch.no_grad():
            module(example)
    finally:
        for h in hooks:
            h.remove()
    rows = []
    out.mkdir(parents=True, exist_ok=True)
    for name, mod in named:
        path = out / f"{name}.onnx"
        try:
            layer, x = _standalone(mod, inputs[name])
            with torch.no_grad():
                export_qonnx(layer, x, export_path=str(path))
            rows.append({"layer": name, "exported": True, "onnx": str(path)})
        except Exception as e:  # noqa: BLE001 - any exporter failure is reported, with its layer
            rows.append({"layer": name, "exported": False, "reason": _one_line(e)})
    return rows


def _standalone(mod: nn.Module, x) -> tuple[nn.Module, Tensor]:
    """A copy of ``mod`` that can be exported alone on a plain tensor: a QuantTensor input
    (power-of-two scale) is re-created by a constant quantizer in front, as in the network."""
    from licforge.quant.lic_layers import fixed_act

    if not hasattr(x, "value"):
        return copy.deepcopy(mod), x
    exp = int(round(float(torch.log2(x.scale.detach().reshape(-1)[0]))))
    return nn.Sequential(fixed_act(exp, int(x.bit_width), bool(x.signed)), copy.deepcopy(mod)), x.value


def _one_line(e: Exception) -> str:
    """The last informative line of an exception (exporters wrap the cause in long text)."""
    causes = [e]
    while causes[-1].__cause__ is not None:
        causes.append(causes[-1].__cause__)
    root = causes[-1]
    return f"{type(root).__name__}: {str(root).strip().splitlines()[0] if str(root).strip() else ''}"[:300]


def _export_and_check(network: str, module: nn.Module, named: list[tuple[str, nn.Module]], example: np.ndarray,
                      samples: list[tuple[str, np.ndarray]], out: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """Export ``module`` with the input shape of ``example``, clean it, run every sample
    (a batch each) through qonnx's executor and compare with Brevitas (float64) exactly;
    the JSON-able result."""
    from brevitas.export import export_qonnx
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.util.cleanup import cleanup_model

    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{network}.onnx"
    first = torch.from_numpy(np.asarray(example, np.float32))
    res: dict[str, Any] = {"network": network, **extra, "onnx": None, "input_shape": list(first.shape),
                           "versions": _versions()}
    t0 = time.perf_counter()
    module.eval()
    try:
        with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:  # the raw export (+ its .data file)
            raw = Path(tmp) / "raw.onnx"
            export_qonnx(copy.deepcopy(module), first, export_path=str(raw))  # a failure leaves export mode on
            model = cleanup_model(ModelWrapper(str(raw)))
    except Exception as e:  # noqa: BLE001 - reported per layer below, never swallowed
        probes = _probe_layers(module, named, first, out / f"{network}_layers")
        failed = [p for p in probes if not p["exported"]]
        res.update(error=f"{network}: export to QONNX failed ({_one_line(e)})", layer_exports=probes, exact=False,
                   unsupported=[{"layer": p["layer"], "finn": "not exported", "reasons": [p["reason"]]} for p in failed])
        return res
    model.save(str(path))
    t1 = time.perf_counter()
    worst, names, count = 0.0, [], 0
    for name, x in samples:
        m = model if list(x.shape) == res["input_shape"] else _with_input_shape(model, x.shape)
        got = execute_onnx(m, {m.graph.input[0].name: np.asarray(x, np.float32)})[m.graph.output[0].name]
        ref = _brevitas(module, x)
        if worst is not None:  # None: an output of the wrong shape, no difference to measure
            worst = max(worst, float(np.abs(got.astype(np.float64) - ref).max())) if got.shape == ref.shape else None
        names.append(name)
        count += len(x)
    t2 = time.perf_counter()
    layers = _support(model, [n for n, _ in named])
    res.update(onnx=str(path), ops=dict(sorted(Counter(n.op_type for n in model.graph.node).items())),
               samples=count, sample_names=names, exact=worst == 0.0, max_abs_diff=worst, layers=layers,
               unsupported=[{k: r[k] for k in ("layer", "finn", "reasons")} for r in layers if r["finn"] != "supported"],
               seconds={"export_and_cleanup": round(t1 - t0, 2), "execute_and_compare": round(t2 - t1, 2)})
    return res


def export_synthesis(quant_pt: str | Path, out: str | Path, *, data: str | Path | None = None) -> dict[str, Any]:
    """Export the synthesis transform (decoder) of a quantized LIC student to QONNX and check it.

    ``quant_pt``: a ``.quant.pt`` written by :func:`quant.lic.save_quantized`; ``out``: the
    folder for ``lic_synthesis.onnx``; ``data``: an image folder (default: the embedded
    held-out images).  The samples are the integer latents of the held-out images (padded
    to multiples of 16), computed by the Brevitas model; the ONNX file has the first
    image's latent shape, the others run on a reshaped copy of the same graph.  A file
    that is not a quantized student, or a MinConv student (no QONNX operator for its
    products), raises UsageError naming it."""
    from licforge.models.data import load_split
    from licforge.models.lic import CheckpointError
    from licforge.quant.codec import pad_image
    from licforge.quant.lic import brevitas_integers, load_quantized

    try:
        q, _ = load_quantized(quant_pt)
    except CheckpointError as e:
        raise UsageError(str(e)) from None
    if q.product != "mul":  # QONNX has no signed-minimum or power-of-two-shift operator
        first = "g_s.1" if "g_s.0" in q.spec.config.mul_layers else "g_s.0"  # a hybrid's first MinConv layer
        raise UsageError(f"{quant_pt}: layer {first}: product {q.product!r} is not supported by QONNX export "
                         f"(no QONNX operator computes signed minimums or the inverse GDN's power-of-two shift); "
                         f"export the multiplier twin, or use the bundle with the golden model or the RTL")
    samples = [(name, brevitas_integers(q, pad_image(img))[0].astype(np.float32))
               for name, img in load_split(data, "held-out").items()]
    named = [("latent", q.latent_q)] + [(f"g_s.{k}", m) for k, m in enumerate(q.g_s)]
    extra = {"source": str(quant_pt), "recipe": q.spec.recipe.data.get("name"), "output": "pixels p/256 (x_hat)"}
    return _export_and_check("lic_synthesis", _Synthesis(q), named, samples[0][1], samples, Path(out), extra)


def export_classifier(q: nn.Module, x: Tensor, out: str | Path) -> dict[str, Any]:
    """Export the exact-product digits classifier (:class:`quant.digits.QuantDigitsNet` with
    ``product="mul"``) to QONNX and check it on the images ``x`` (N, 1, 8, 8), one batch.
    The ONNX file has batch size 1.  Raises ValueError for the MinConv ("min") classifier."""
    if getattr(q, "product", None) != "mul":
        raise ValueError(f"only the exact-product ('mul') digits classifier exports to QONNX, not "
                         f"product={getattr(q, 'product', None)!r}: ONNX and FINN have no MinConv operator")
    named = [(n, getattr(q, n)) for n in ("inq", "conv1", "act1", "conv2", "act2", "fc", "outq")]
    xs = x.detach().numpy().astype(np.float32)
    extra = {"source": f"QuantDigitsNet(bits={q.bits}, product='mul')", "output": "logits"}
    return _export_and_check("digits_mul", q, named, xs[:1], [("held-out digits", xs)], Path(out), extra)


def train_exact_classifier(seed: int = 0, bits: int = 8, *, progress: bool = False) -> tuple[nn.Module, Tensor]:
    """The exact-product digits classifier (the digits recipe with ``product="mul"``: float
    training, then ``bits``-bit QAT) and the held-out digits: what ``licforge qonnx digits`` exports."""
    from licforge.quant.digits import train_digits_models

    m = train_digits_models(seed, (bits,), product="mul", progress=progress)
    return m.quantized[bits], m.split[2]

