"""Real bitstreams: compress to a file, read it back, decompress; refusal of bad streams."""
import re

import numpy as np
import pytest
import torch

from licforge.models.data import embedded_images
from licforge.models.lic import load_weights
from licforge.quant.codec import decode_image, decode_latents, encode_image, pad_image, prepare_entropy_coder
from licforge.quant.container import BitstreamError, read_file
from licforge.quant.lic import brevitas_integers, golden_encode, golden_forward

STUDENT = "models/checkpoints/student_n16_photos_l0.0130.pt"


@pytest.fixture(scope="module")
def chelsea():
    return embedded_images("held-out")["chelsea"]  # 300 x 451: padded to 304 x 464


def test_bundle_round_trip_through_a_file(lic_bundle, lic_quant, chelsea, tmp_path):
    f = tmp_path / "chelsea.licf"
    f.write_bytes(encode_image(lic_bundle, chelsea))
    data = f.read_bytes()
    latent, size = decode_latents(lic_bundle, data)
    assert size == (300, 451) and latent.shape == (1, 24, 19, 29)
    assert np.array_equal(latent, golden_encode(lic_bundle, pad_image(chelsea)))
    # the rANS payload is byte for byte what CompressAI's entropy bottleneck writes
    lat_b, out_b = brevitas_integers(lic_quant, pad_image(chelsea))
    strings = lic_quant.entropy_bottleneck.compress(torch.from_numpy(lat_b).float())
    assert read_file(data)[1] == [strings[0]]
    pixels = decode_image(lic_bundle, data)
    assert pixels.shape == (300, 451, 3) and pixels.dtype == np.uint8
    assert np.array_equal(pixels, out_b[0, :, :300, :451].transpose(1, 2, 0))
    assert 8 * len(data) / (300 * 451) < 1.0  # a real compression, not raw symbols


def test_bad_bitstreams_are_refused(lic_bundle, chelsea):
    """The container's refusals reach decode_latents (each kind of error in detail:
    tests/test_codec_container.py)."""
    data = encode_image(lic_bundle, chelsea[:64, :80])
    with pytest.raises(BitstreamError, match=r"file truncated: \d+ bytes, its header declares \d+"):
        decode_latents(lic_bundle, data[:-4])
    flipped = bytearray(data)
    flipped[-5] ^= 0x10
    with pytest.raises(BitstreamError, match=r"CRC32 mismatch"):
        decode_latents(lic_bundle, bytes(flipped))
    with pytest.raises(BitstreamError, match=r"starts with b'JFIF'"):
        decode_latents(lic_bundle, b"JFIF" + data[4:])


@pytest.mark.parametrize("image", [np.zeros((32, 32), np.uint8), np.zeros((3, 32, 32), np.uint8),
                                   np.zeros((32, 32, 3), np.float32), np.zeros((0, 32, 3), np.uint8)])
def test_an_image_array_of_another_shape_or_type_is_refused_by_both_codecs(lic_bundle, image):
    """A grey, channel-first, float or empty array: the bundle's and pad_image's one check (an empty
    image reached a reshape error in the rANS coder before)."""
    for coder in (lambda: encode_image(lic_bundle, image), lambda: pad_image(image)):
        with pytest.raises(ValueError, match=re.escape(f"image must be uint8 (H, W, 3) with H, W >= 1, not "
                                                       f"{image.dtype} {image.shape}")):
            coder()


def test_float_model_compress_decompress_equals_forward(chelsea):
    net, cfg, _ = load_weights(STUDENT)
    prepare_entropy_coder(net.entropy_bottleneck)
    x = torch.from_numpy(pad_image(chelsea[:128, :160])).float() / 256.0
    with torch.no_grad():
        enc = net.compress(x)
        dec = net.decompress(enc["strings"], enc["shape"])["x_hat"]
        ref = net(x)["x_hat"].clamp(0, 1)
    assert torch.equal(torch.round(dec * 256), torch.round(ref * 256))
    med = net.entropy_bottleneck.quantiles[:, 0, 1]
    assert torch.equal(med, torch.round(med))  # integer medians: the symbols are integer latents


def test_eval_reports_file_sizes_and_checks_golden(lic_bundle, chelsea, tmp_path):
    from licforge.quant.eval import eval_bundle, eval_float

    imgs = {"chelsea": chelsea}
    q = eval_bundle(lic_bundle.path, imgs, tmp_path)
    f = tmp_path / "student_n16_photos_hybrid8_chelsea.licf"
    assert q["per_image"]["chelsea"]["bytes"] == f.stat().st_size
    assert q["per_image"]["chelsea"]["bpp"] == pytest.approx(8 * f.stat().st_size / (300 * 451))
    assert q["brevitas_equal_golden"] == "1/1 images"
    _, out = golden_forward(lic_bundle, pad_image(chelsea))
    rec = out[0, :, :300, :451].transpose(1, 2, 0)
    mse = np.mean((rec.astype(float) - chelsea) ** 2)
    assert q["per_image"]["chelsea"]["psnr"] == pytest.approx(10 * np.log10(255 ** 2 / mse))
    fl = eval_float(STUDENT, imgs, tmp_path)
    assert fl["per_image"]["chelsea"]["bytes"] == (tmp_path / "student_n16_photos_l0.0130_chelsea.licf").stat().st_size
    assert 15 < fl["per_image"]["chelsea"]["psnr"] < 40 and 0 < fl["mean"]["ms_ssim"] <= 1


def test_bench_codec_reproduces_the_committed_file_sizes_and_psnr(tmp_path):
    """``bench codec`` (one repeat): the 768x512 photo through the N=16 bundle, the N=16 float student and
    the teacher gives the bytes of bench/results/codec.json (the README's codec table) exactly, the integer
    decoder's PSNR exactly and the float models' to 1e-3 dB (float convolutions round differently on
    other CPUs: the teacher's PSNR read 31.084554 instead of 31.084367 dB on an AMD EPYC); only the
    timings may differ otherwise."""
    import json
    from pathlib import Path

    from licforge.bench.codec import bench_codec

    committed = json.loads((Path(__file__).resolve().parent.parent / "bench/results/codec.json").read_text())
    got = bench_codec(tmp_path / "codec.json", repeats=1, log=None)
    assert json.loads((tmp_path / "codec.json").read_text())["rows"] == got["rows"]
    for row, ref in zip(got["rows"][:3], committed["rows"][:3]):
        assert (row["model"], row["bytes"]) == (ref["model"], ref["bytes"])
        exact = row["model"].endswith("integer golden model")
        assert row["psnr_db"] == pytest.approx(ref["psnr_db"], abs=1e-9 if exact else 1e-3), row["model"]
    assert [r["bytes"] for r in got["rows"][:3]] == [14038, 14410, 20062]
