"""Evaluation on real bitstreams: every held-out image is encoded to a file, read back,
decoded, and scored (bits per pixel from the file size, PSNR, MS-SSIM on 8-bit RGB).

* float model (a weight file): :func:`quant.codec.encode_image` / :func:`quant.codec.decode_image`
  (CompressAI ``compress`` / ``decompress`` with integer medians, in the licforge file of
  :mod:`quant.container`); reconstruction ``p = clamp(round(256 x_hat), 0, 255)``.
* quantized model (a bundle directory): :func:`quant.codec.encode_image` (integer golden
  encoder + rANS) -> file -> :func:`quant.codec.decode_latents` -> integer golden decoder.
  When the Brevitas model (``<bundle>.quant.pt``) is present, its encoder (float64) must give
  the latents decoded from the file and its fake-quant decoder (float64) the pixels of the
  golden decoder, on every image, or the evaluation fails (:class:`errors.CheckFailed`).
* baselines: JPEG and WebP from Pillow at several qualities (default encoder settings).

PSNR = 10 log10(255^2 / MSE) over all pixels and channels of an image; the curve point of a
model is the mean over images of bpp and of PSNR (and MS-SSIM, reported when every image
is larger than 160 pixels a side).
"""
from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from licforge.errors import CheckFailed, UsageError

__all__ = ["psnr", "ms_ssim", "eval_float", "eval_bundle", "eval_baseline", "evaluate", "JPEG_QUALITIES",
           "WEBP_QUALITIES"]

JPEG_QUALITIES = (1, 3, 5, 10, 20, 30, 50, 75)
WEBP_QUALITIES = (0, 5, 10, 20, 30, 50, 75)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (peak 255)."""
    from licforge.models.data import psnr_from_mse

    return psnr_from_mse(float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def ms_ssim(a: np.ndarray, b: np.ndarray) -> float | None:
    """MS-SSIM (pytorch-msssim, data range 255, 5 scales) of two uint8 (H, W, 3) images;
    None for images with a side of 160 pixels or less (too small for 5 scales)."""
    from pytorch_msssim import ms_ssim as _ms

    if min(a.shape[:2]) <= 160:
        return None
    ta, tb = (torch.from_numpy(x.astype(np.float32)).permute(2, 0, 1)[None] for x in (a, b))
    return float(_ms(ta, tb, data_range=255.0))


def _score(img: np.ndarray, rec: np.ndarray, nbytes: int) -> dict[str, float]:
    h, w = img.shape[:2]
    return {"bytes": nbytes, "bpp": 8.0 * nbytes / (h * w), "psnr": psnr(img, rec), "ms_ssim": ms_ssim(img, rec)}


def _mean(per_image: dict[str, dict[str, float]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for k in ("bpp", "psnr", "ms_ssim"):
        vals = [v[k] for v in per_image.values() if v[k] is not None]
        out[k] = float(np.mean(vals)) if len(vals) == len(per_image) else None
    return out


def _write(bitstreams: Path | None, name: str, data: bytes) -> bytes:
    """Write the bitstream to a real file and read it back (the decoder reads the file)."""
    if bitstreams is None:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            f = Path(d) / name
            f.write_bytes(data)
            return f.read_bytes()
    bitstreams.mkdir(parents=True, exist_ok=True)
    f = bitstreams / name
    f.write_bytes(data)
    return f.read_bytes()


@torch.no_grad()
def eval_float(path: Path, images: dict[str, np.ndarray], bitstreams: Path | None = None) -> dict[str, Any]:
    """Encode/decode every image with a float weight file (module doc)."""
    from licforge.quant.codec import decode_image, encode_image, load_float_model

    model = load_float_model(path)
    per_image = {}
    for name, img in images.items():
        data = _write(bitstreams, f"{Path(path).stem}_{name}.licf", encode_image(model, img))
        per_image[name] = _score(img, decode_image(model, data), len(data))
    meta = model.meta
    return {"name": Path(path).stem, "curve": meta.get("curve", model.config.name), "lmbda": meta.get("lmbda"),
            "kind": "float", "file": str(path), "config": model.config.to_dict(), "per_image": per_image,
            "mean": _mean(per_image)}


@torch.no_grad()
def eval_bundle(bundle_dir: Path, images: dict[str, np.ndarray], bitstreams: Path | None = None) -> dict[str, Any]:
    """Encode with the bundle's golden encoder, decode with its golden decoder (module doc)."""
    from licforge.quant.bundle import read_bundle
    from licforge.quant.codec import decode_latents, encode_image, pad_image
    from licforge.quant.lic import brevitas_integers, golden_decode, load_quantized

    from licforge.quant.train import quant_model_path

    bundle = read_bundle(bundle_dir)
    qpath = quant_model_path(Path(bundle_dir))
    q, meta = load_quantized(qpath) if qpath.is_file() else (None, {})
    per_image, checked = {}, 0
    for name, img in images.items():
        data = _write(bitstreams, f"{Path(bundle_dir).name}_{name}.licf", encode_image(bundle, img))
        latent, (hh, ww) = decode_latents(bundle, data)
        pix = golden_decode(bundle, latent)
        if q is not None:
            lat_b, pix_b = brevitas_integers(q, pad_image(img))
            if not np.array_equal(lat_b, latent) or not np.array_equal(pix_b, pix):
                raise CheckFailed(f"{bundle_dir}: image {name}: Brevitas latents/pixels differ from the integer "
                                  f"golden model ({int((lat_b != latent).sum())} latents, "
                                  f"{int((pix_b != pix).sum())} pixels)")
            checked += 1
        rec = pix[0, :, :hh, :ww].transpose(1, 2, 0).astype(np.uint8)
        per_image[name] = _score(img, rec, len(data))
    m = bundle.model
    return {"name": Path(bundle_dir).name, "curve": meta.get("curve", f"N={m.get('N')} {m.get('recipe')}"),
            "lmbda": m.get("lmbda"), "kind": "quantized", "file": str(bundle_dir), "bundle_hash": bundle.hash,
            "brevitas_equal_golden": f"{checked}/{len(images)} images" if q is not None else "not checked "
            f"({qpath.name} absent)", "per_image": per_image, "mean": _mean(per_image)}


def eval_baseline(codec: str, quality: int, images: dict[str, np.ndarray]) -> dict[str, Any]:
    """JPEG or WebP (Pillow, default settings) at ``quality``."""
    from PIL import Image

    per_image = {}
    for name, img in images.items():
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format=codec, quality=quality)
        data = buf.getvalue()
        rec = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        per_image[name] = _score(img, rec, len(data))
    label = {"JPEG": "JPEG", "WEBP": "WebP"}[codec]
    return {"name": f"{label.lower()}_q{quality}", "curve": f"{label} (Pillow)", "quality": quality,
            "kind": "baseline", "per_image": per_image, "mean": _mean(per_image)}


def evaluate(models: list[Path], images: dict[str, np.ndarray], *, baselines: bool = True,
             bitstreams: Path | None = None, log=print) -> dict[str, Any]:
    """Evaluate weight files and bundle directories (and the baselines) on ``images``."""
    from licforge.models.lic import WEIGHTS_FORMAT, read_checkpoint

    entries = []
    for p in map(Path, models):
        t0 = time.perf_counter()
        if p.is_dir():
            e = eval_bundle(p, images, bitstreams)
        elif p.is_file():
            read_checkpoint(p, WEIGHTS_FORMAT)  # refuses a quantized model file or a corrupt one
            e = eval_float(p, images, bitstreams)
        else:
            raise UsageError(f"model {p}: not found (a weight file .pt or a bundle directory)")
        e["eval_s"] = time.perf_counter() - t0
        entries.append(e)
        if log:
            m = e["mean"]
            ssim = "n/a" if m["ms_ssim"] is None else f"{m['ms_ssim']:.4f}"
            log(f"{e['name']:<36} {e['curve']:<28} {m['bpp']:.4f} bpp  {m['psnr']:.2f} dB  MS-SSIM {ssim}")
    if baselines:
        for codec, qs in (("JPEG", JPEG_QUALITIES), ("WEBP", WEBP_QUALITIES)):
            for qual in qs:
                entries.append(eval_baseline(codec, qual, images))
    return {"images": {k: list(v.shape[:2]) for k, v in images.items()}, "entries": entries}
