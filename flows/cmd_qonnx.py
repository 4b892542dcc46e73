"""CLI of the QONNX hand-off to FINN: ``licforge qonnx lic QUANT_PT`` and ``licforge qonnx digits``.

Each writes ``OUT/<network>.onnx`` and ``OUT/<network>.json`` (the result of
:mod:`quant.qonnx`) and prints one line per layer that FINN cannot build as exported.
Exit 1 when qonnx's execution differs from Brevitas or a layer does not export.
"""
from __future__ import annotations

import json
from pathlib import Path

from licforge.errors import CheckFailed, UsageError, need_file, need_int, out_dir, seed_int

__all__ = ["register"]


def _report(res: dict, out: Path) -> int:
    """Write ``res`` to ``out/<network>.json``, print a summary; CheckFailed unless exact."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{res['network']}.json"
    path.write_text(json.dumps(res, indent=1))
    if res.get("error"):
        names = ", ".join(f"{u['layer']} ({u['reasons'][0]})" for u in res["unsupported"]) or "none alone"
        raise CheckFailed(f"{res['error']}; layers that do not export: {names}; details in {path}")
    print(f"{res['network']}: {res['onnx']}, ops {res['ops']}, {res['samples']} samples, "
          f"exact={res['exact']} (max |diff| {res['max_abs_diff']}); {path}")
    for u in res["unsupported"]:
        print(f"  FINN {u['finn']}: {u['layer']}: {'; '.join(u['reasons'])}")
    if not res["exact"]:
        raise CheckFailed(f"{res['onnx']}: qonnx execution differs from Brevitas (max |diff| {res['max_abs_diff']} "
                          f"on {res['samples']} samples)")
    return 0


def _cmd_lic(args) -> int:
    from licforge.quant.qonnx import export_synthesis
    from licforge.quant.train import quant_model_path

    quant_pt = Path(args.quant_pt)
    if quant_pt.is_dir():  # a bundle directory: its Brevitas model lies beside it
        beside = quant_model_path(quant_pt)
        if not beside.is_file():
            raise UsageError(f"quantized model {quant_pt}: a folder without {beside.name} beside it; "
                             f"give the .quant.pt that 'licforge quantize' wrote")
        quant_pt = beside
    need_file(quant_pt, "quantized model")
    out = _out(args)
    return _report(export_synthesis(quant_pt, out, data=args.data), out)


def _cmd_digits(args) -> int:
    from licforge.quant.qonnx import export_classifier, train_exact_classifier

    need_int(args.bits, "--bits", 2, 16)
    q, x_test = train_exact_classifier(args.seed, args.bits, progress=True)
    out = _out(args)
    return _report(export_classifier(q, x_test, out), out)


def _out(args) -> Path:
    """The output folder: ``--out``, else ``<build>/qonnx``."""
    return out_dir(args.out) if args.out else Path(args.build) / "qonnx"


def register(groups: dict) -> None:
    """Add ``licforge qonnx lic|digits`` to the ``licforge`` parser."""
    top = groups["top"].add_parser("qonnx", help="QONNX export for FINN, checked against Brevitas")
    sub = top.add_subparsers(dest="network", required=True, parser_class=type(top))
    lic = sub.add_parser("lic", help="the LIC student's synthesis transform (decoder)")
    lic.add_argument("quant_pt", help="quantized student (.quant.pt from licforge quantize, or its bundle directory)")
    lic.add_argument("--data", default=None, help="image folder for the held-out latents (default: embedded)")
    lic.add_argument("--out", default=None, help="output folder (default <build>/qonnx)")
    lic.set_defaults(func=_cmd_lic)
    dig = sub.add_parser("digits", help="the exact-product digits classifier (trained here)")
    dig.add_argument("--seed", type=seed_int, default=0)
    dig.add_argument("--bits", type=int, default=8)
    dig.add_argument("--out", default=None, help="output folder (default <build>/qonnx)")
    dig.set_defaults(func=_cmd_digits)
