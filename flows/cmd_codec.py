"""CLI of the codec: ``encode`` (a model and an image -> a licforge file) and ``decode`` (a
file -> a PNG, by the integer golden decoder, the float model, or the decoder RTL in cocotb),
and ``bench codec``.

MODEL is a bundle directory or a float weight file (.pt).  ``decode`` finds the model by the
sha256 the file names among the committed ones when ``--model`` is not given.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from licforge.errors import CheckFailed, UsageError, need_file, need_int, out_file
from licforge.rtl.project import DEFAULT_MAX_WIDTH

__all__ = ["register"]


def _model(path: str):
    """A bundle or weight file, its errors (missing tables, corrupt file) as exit 2."""
    from licforge.models.lic import CheckpointError
    from licforge.quant.codec import load_model

    try:
        return load_model(path)
    except CheckpointError as e:
        raise UsageError(str(e)) from None


def image_arg(path_arg: str):
    """An image file as uint8 (H, W, 3) RGB (:func:`models.data.read_rgb`), at most the pixels a
    licforge file holds; UsageError naming the file otherwise."""
    from licforge.models.data import DataError, read_rgb
    from licforge.quant.container import MAX_PIXELS

    try:
        return read_rgb(need_file(path_arg, "image"), MAX_PIXELS)
    except DataError as e:
        raise UsageError(f"image {e}") from None


def _import_coder() -> None:
    """Import CompressAI (seconds) before a clock starts: the times printed are the codec's."""
    import compressai.ans  # noqa: F401


def _output(arg: str | None, default: Path, source: Path, suffix: str | None = None) -> Path:
    """``--out`` (else ``default``) checked by :func:`errors.out_file`; UsageError where it is the input."""
    out = Path(arg) if arg else default
    if out.resolve() == source.resolve():
        raise UsageError(f"--out {out}: would overwrite the input; name another file")
    return out_file(out, "--out", suffix)


def _write_json(path: str | None, record: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(record, indent=1) + "\n")


def _cmd_encode(args) -> int:
    from licforge.quant.codec import encode_image, model_sha256, read_header
    from licforge.quant.container import KINDS

    model = _model(args.model)
    img = image_arg(args.image)
    image = Path(args.image)
    out = _output(args.out, Path(args.build) / "codec" / f"{image.stem}.licf", image)
    _import_coder()
    t0 = time.perf_counter()
    data = encode_image(model, img)
    seconds = time.perf_counter() - t0
    out.write_bytes(data)
    h = read_header(data)
    kind = KINDS[h.kind]
    bpp = 8 * len(data) / (h.height * h.width)
    print(f"{image.name} {h.height}x{h.width} -> {out}: {len(data)} bytes, {bpp:.4f} bpp ({kind} "
          f"{model_sha256(model)[:16]}, latent {h.channels}x{h.latent_hw[0]}x{h.latent_hw[1]}), {seconds:.2f} s")
    _write_json(args.json, {"image": str(image), "file": str(out), "bytes": len(data), "bpp": bpp,
                            "height": h.height, "width": h.width, "latent": [h.channels, *h.latent_hw],
                            "model": str(args.model), "model_kind": kind, "model_sha256": h.model_sha256,
                            "tables_sha256": h.tables_sha256, "encode_s": seconds})
    return 0


def _read_file(path_arg: str) -> tuple[Path, bytes]:
    from licforge.quant.container import MAX_FILE_BYTES

    path = need_file(path_arg, "file")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise UsageError(f"file {path}: {size} bytes, more than the {MAX_FILE_BYTES} a licforge file may have")
    return path, path.read_bytes()


def _cmd_decode(args) -> int:
    import numpy as np
    from PIL import Image

    from licforge.quant.bundle import Bundle
    from licforge.quant.codec import BitstreamError, decode_image, find_model, model_sha256, read_header
    from licforge.quant.container import KINDS

    if args.split_products and not args.rtl:
        raise UsageError("--split-products builds the decoder RTL with two-stage multipliers: give --rtl too")
    path, data = _read_file(args.file)
    try:
        header = read_header(data)
        model_path = args.model or find_model(header)
        if model_path is None:
            raise UsageError(f"file {path}: encoded with the {KINDS[header.kind]} of sha256 {header.model_sha256}, "
                             f"which is not committed here; pass that model with --model")
        model = _model(str(model_path))
        out = _output(args.out, Path(args.build) / "codec" / f"{path.stem}.png", path, suffix=".png")
        record = {"file": str(path), "out": str(out), "height": header.height, "width": header.width,
                  "model": str(model_path), "model_sha256": model_sha256(model)}
        _import_coder()
        t0 = time.perf_counter()
        if args.rtl:
            if not isinstance(model, Bundle):
                raise UsageError(f"--rtl: {record['model']} is a float weight file; the RTL decoder is generated "
                                 f"from a bundle")
            rgb, rep = _rtl(args, model, data)
            record.update(decoder="rtl", mismatches=rep["mismatches"], cycles=rep["cycles"], pi=rep["pi"],
                          po=rep["po"], simulator=rep["simulator"], split_products=args.split_products)
        else:
            rgb = decode_image(model, data)
            record["decoder"] = "golden" if isinstance(model, Bundle) else "float"
    except BitstreamError as e:
        raise UsageError(f"file {path}: {e}") from None
    record["decode_s"] = time.perf_counter() - t0
    Image.fromarray(np.ascontiguousarray(rgb)).save(out)
    what = {"golden": "integer golden decoder", "float": "float model",
            "rtl": f"decoder RTL (PI={record.get('pi')}, PO={record.get('po')}, "
                   f"{'split products, ' if record.get('split_products') else ''}{record.get('simulator')})"}
    line = (f"{path.name} -> {out}: {header.height}x{header.width}, {what[record['decoder']]} of "
            f"{record['model']} ({record['model_sha256'][:16]}), {record['decode_s']:.2f} s")
    if args.rtl:
        line += f"; {record['mismatches']} mismatches against the golden decoder, {record['cycles']} cycles"
    print(line)
    _write_json(args.json, record)
    if args.rtl and record["mismatches"]:
        raise CheckFailed(f"{record['mismatches']} pixels of the RTL decode differ from the golden decoder")
    return 0


def _rtl(args, bundle, data: bytes):
    """The decoder RTL's pixels of ``data`` and its report (with PI, PO)."""
    from licforge.flows.cmd_decoder import chosen_parallelism
    from licforge.quant.bundle import decoder_layers
    from licforge.sim.decode import rtl_decode_file

    need_int(args.max_width, "--max-width", 1, 4096)
    pi, po = chosen_parallelism(args, decoder_layers(bundle))
    rgb, rep = rtl_decode_file(bundle, data, Path(args.build), pi=pi, po=po, max_width=args.max_width,
                               simulator=args.simulator, split_products=args.split_products)
    return rgb, {**rep, "pi": pi, "po": po}


def _bench_codec(out: Path, build: Path, args: argparse.Namespace) -> str:
    from licforge.bench.codec import bench_codec

    res = bench_codec(out / "codec.json")
    g = res["speedup_golden_vs_teacher_synthesis"]
    return f"wrote {out / 'codec.json'} (N=16 golden synthesis {g:.1f}x faster than the N=128 teacher's)"


def register(groups: dict) -> None:
    """Add ``encode``, ``decode`` and ``bench codec``."""
    p = groups["top"].add_parser("encode", help="compress an image to a licforge file with a bundle or weight file")
    p.add_argument("model", help="bundle directory or float weight file (.pt)")
    p.add_argument("image", help="an RGB image file (PNG, JPEG), any size")
    p.add_argument("--out", help="the file to write (default <build>/codec/<image stem>.licf)")
    p.add_argument("--json", help="also write the figures (bytes, bpp, hashes) to this file")
    p.set_defaults(func=_cmd_encode)

    p = groups["top"].add_parser("decode", help="decode a licforge file to a PNG: integer golden decoder (default), "
                                                "float model, or the decoder RTL in cocotb (--rtl)")
    p.add_argument("file", help="a file written by 'licforge encode'")
    p.add_argument("--model", help="bundle directory or weight file (default: the committed one whose sha256 "
                                   "the file names)")
    p.add_argument("--out", help="the PNG to write (default <build>/codec/<file stem>.png)")
    p.add_argument("--rtl", action="store_true", help="decode with the generated decoder RTL (Verilator/cocotb), "
                                                      "checked against the golden decoder")
    p.add_argument("--pi", type=int, default=None, help="--rtl: input channels per cycle (default: largest "
                                                        "divisor <= 8)")
    p.add_argument("--po", type=int, default=None, help="--rtl: output channels per cycle")
    p.add_argument("--max-width", type=int, default=DEFAULT_MAX_WIDTH,
                   help=f"--rtl: widest latent line of the generated decoder (default {DEFAULT_MAX_WIDTH}: "
                        f"{16 * DEFAULT_MAX_WIDTH} pixels)")
    p.add_argument("--split-products", action="store_true",
                   help="--rtl: the decoder built with every multiplier in two pipeline stages (rtl decoder "
                        "--split-products)")
    p.add_argument("--simulator", default="verilator", choices=("verilator", "icarus"))
    p.add_argument("--json", help="also write the figures to this file")
    p.set_defaults(func=_cmd_decode)

    p = groups["bench"].add_parser("codec", help="encode/decode time of a 768x512 photo: N=16 golden model, float "
                                                 "student, teacher, CompressAI N=128 -> codec.json")
    p.set_defaults(bench=_bench_codec)
