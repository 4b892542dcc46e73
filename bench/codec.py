"""Codec speed on CPU: encode and decode time of one 768x512 photograph for the N=16 bundle
(integer golden model), the float N=16 student, the N=128 teacher and CompressAI's
``bmshj2018-factorized`` architecture at N=128/M=192 (random weights: only its time counts),
all in one run, with the analysis transform, the entropy coding and the synthesis transform
timed apart.

The photograph is scikit-image's ``coffee`` (400x600, a held-out image: no model here was
trained on it) resized to 512x768 (Pillow, bicubic).  Every figure is the median of
``repeats`` runs after one warm-up run, at torch's current thread count.  Entropy coding is
what a licforge file costs: rANS with CompressAI's coder, plus, on decode, the file's checks
(:func:`quant.container.read_file`, :func:`quant.container.check_payload`) — except for the
CompressAI row, which times CompressAI's own ``compress``/``decompress`` strings.  bpp counts
the whole licforge file (header included); PSNR is against the 768x512 photograph.
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

__all__ = ["bench_codec", "photo_768x512", "format_codec_table"]

BUNDLE = "models/checkpoints/bundles/student_n16_photos_hybrid8"
STUDENT = "models/checkpoints/student_n16_photos_l0.0130.pt"
TEACHER = "models/checkpoints/teacher_n128_photos16k_l0.0130.pt"
ROOT = Path(__file__).resolve().parent.parent


def photo_768x512() -> np.ndarray:
    """scikit-image's ``coffee`` resized to 512 rows x 768 columns, uint8 RGB."""
    from PIL import Image

    from licforge.models.data import embedded_images

    img = Image.fromarray(embedded_images("held-out")["coffee"])
    return np.asarray(img.resize((768, 512), Image.Resampling.BICUBIC))


def _median_s(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _row(name: str, kind: str, n: int, m: int, parts: dict[str, float], nbytes: int, img: np.ndarray,
         rec: np.ndarray) -> dict:
    from licforge.quant.eval import psnr

    h, w = img.shape[:2]
    return {"model": name, "kind": kind, "N": n, "M": m, "bytes": nbytes, "bpp": 8 * nbytes / (h * w),
            "psnr_db": psnr(img, rec), **{k: round(v, 5) for k, v in parts.items()},
            "encode_s": round(parts["analysis_s"] + parts["entropy_encode_s"], 5),
            "decode_s": round(parts["entropy_decode_s"] + parts["synthesis_s"], 5)}


@torch.no_grad()
def _bundle_row(img: np.ndarray, repeats: int) -> dict:
    from licforge.quant.codec import decode_latents, encode_image, encode_latents, load_model, pad_image
    from licforge.quant.golden import golden_decode, golden_encode

    bundle = load_model(ROOT / BUNDLE)
    px = pad_image(img)
    latent = golden_encode(bundle, px)
    data = encode_image(bundle, img)
    parts = {"analysis_s": _median_s(lambda: golden_encode(bundle, px), repeats),
             "entropy_encode_s": _median_s(lambda: encode_latents(bundle, latent), repeats),
             "entropy_decode_s": _median_s(lambda: decode_latents(bundle, data), repeats),
             "synthesis_s": _median_s(lambda: golden_decode(bundle, latent), repeats)}
    h, w = img.shape[:2]
    rec = golden_decode(bundle, decode_latents(bundle, data)[0])[0, :, :h, :w].transpose(1, 2, 0).astype(np.uint8)
    m = bundle.model
    return _row(f"N={m['N']} bundle, integer golden model", "golden", m["N"], m["M"], parts, len(data), img, rec)


@torch.no_grad()
def _float_row(path: Path, label: str, img: np.ndarray, repeats: int) -> dict:
    from licforge.quant.codec import decode_float_latent, decode_image, encode_image, load_float_model, pad_image

    model = load_float_model(path)
    net = model.net
    x = torch.from_numpy(pad_image(img)).float() / 256.0
    y = net.g_a(x)
    data = encode_image(model, img)
    y_hat, _ = decode_float_latent(model, data)
    parts = {"analysis_s": _median_s(lambda: net.g_a(x), repeats),
             "entropy_encode_s": _median_s(lambda: net.entropy_bottleneck.compress(y), repeats),
             "entropy_decode_s": _median_s(lambda: decode_float_latent(model, data), repeats),
             "synthesis_s": _median_s(lambda: net.g_s(y_hat), repeats)}
    cfg = model.config
    return _row(label, "float", cfg.N, cfg.M, parts, len(data), img, decode_image(model, data))


@torch.no_grad()
def _compressai_row(img: np.ndarray, repeats: int) -> dict:
    from compressai.models import FactorizedPrior

    from licforge.quant.codec import pad_image

    torch.manual_seed(0)
    net = FactorizedPrior(128, 192).eval()
    net.update(force=True)
    x = torch.from_numpy(pad_image(img)).float() / 256.0
    y = net.g_a(x)
    strings = net.entropy_bottleneck.compress(y)
    y_hat = net.entropy_bottleneck.decompress(strings, y.shape[-2:])
    parts = {"analysis_s": _median_s(lambda: net.g_a(x), repeats),
             "entropy_encode_s": _median_s(lambda: net.entropy_bottleneck.compress(y), repeats),
             "entropy_decode_s": _median_s(lambda: net.entropy_bottleneck.decompress(strings, y.shape[-2:]),
                                           repeats),
             "synthesis_s": _median_s(lambda: net.g_s(y_hat), repeats)}
    h, w = img.shape[:2]
    rec = torch.clamp(torch.round(net.g_s(y_hat) * 256), 0, 255)[0, :, :h, :w].permute(1, 2, 0).numpy()
    return _row("CompressAI bmshj2018-factorized N=128 (random weights)", "compressai", 128, 192, parts,
                len(strings[0]), img, rec.astype(np.uint8))


def format_codec_table(rows: list[dict]) -> str:
    """The rows as a Markdown table (milliseconds)."""
    from licforge.tables import markdown_table

    def ms(v: float) -> str:
        return f"{1000 * v:.0f}"

    return markdown_table(
        ["model", "bpp", "PSNR (dB)", "analysis (ms)", "entropy enc (ms)", "entropy dec (ms)", "synthesis (ms)",
         "encode (ms)", "decode (ms)"],
        [[r["model"], f"{r['bpp']:.4f}", f"{r['psnr_db']:.2f}", ms(r["analysis_s"]), ms(r["entropy_encode_s"]),
          ms(r["entropy_decode_s"]), ms(r["synthesis_s"]), ms(r["encode_s"]), ms(r["decode_s"])] for r in rows])


def bench_codec(out_json: Path, repeats: int = 5, log=print) -> dict:
    """Time the four codecs on the 768x512 photograph (module doc); writes ``out_json``."""
    img = photo_768x512()
    rows = [_bundle_row(img, repeats), _float_row(ROOT / STUDENT, "N=16 float student", img, repeats),
            _float_row(ROOT / TEACHER, "N=128 teacher (float)", img, repeats), _compressai_row(img, repeats)]
    by_kind = {r["model"]: r for r in rows}
    golden, teacher, cai = rows[0], rows[2], rows[3]
    res = {"image": {"source": "skimage coffee (held-out) resized to 768x512, bicubic", "height": 512, "width": 768},
           "repeats": repeats, "statistic": "median after one warm-up", "torch_threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "rows": rows,
           "speedup_golden_vs_teacher_synthesis": teacher["synthesis_s"] / golden["synthesis_s"],
           "speedup_golden_vs_compressai_synthesis": cai["synthesis_s"] / golden["synthesis_s"],
           "speedup_golden_vs_float_student_synthesis": by_kind["N=16 float student"]["synthesis_s"]
           / golden["synthesis_s"]}
    out_json = Path(out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(res, indent=1) + "\n")
    if log:
        log(format_codec_table(rows))
    return res
