"""``licforge encode`` / ``licforge decode``: the file layout as documented (quant/container.py),
any image size, the bounds-checked rANS model against CompressAI's decoder, every refusal as
exit 2 with one line (before anything large is allocated), the model found by its hash, a
float weight file, and golden and RTL decodes writing the same PNG."""
from __future__ import annotations

import json
import re
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers import rans64_encode, require_simulator
from PIL import Image

from licforge.flows.cli import main
from licforge.models.data import embedded_images
from licforge.quant.codec import (coder_tables, decode_image, decode_latents, encode_image, encode_latents,
                                  load_model, pad_image)
from licforge.quant.container import (MAX_PIXELS, BitstreamError, check_payload, read_file, tables_sha256)
from licforge.quant.golden import golden_decode, golden_encode

ROOT = Path(__file__).resolve().parent.parent
N32 = ROOT / "models/checkpoints/bundles/student_n32_hybrid8"
STUDENT = ROOT / "models/checkpoints/student_n16_photos_l0.0130.pt"


@pytest.fixture(scope="module")
def crop():
    return embedded_images("held-out")["chelsea"][100:164, 150:230]  # 64 x 80: latents 4 x 5


@pytest.fixture(scope="module")
def small(lic_bundle, crop, tmp_path_factory):
    """(image file, licforge file, its bytes) of the crop, written by ``licforge encode``."""
    d = tmp_path_factory.mktemp("codec")
    Image.fromarray(crop).save(d / "crop.png")
    assert main(["encode", str(lic_bundle.path), str(d / "crop.png"), "--out", str(d / "crop.licf")]) == 0
    return d / "crop.png", d / "crop.licf", (d / "crop.licf").read_bytes()


def _with(data: bytes, crc: bool = True, **fields) -> bytes:
    """``data`` with header fields replaced at their documented offsets, the CRC32 recomputed
    unless ``crc`` is False."""
    at = {"version": (4, ">B"), "kind": (5, ">B"), "pad": (6, ">B"), "count": (7, ">B"), "H": (8, ">H"),
          "W": (10, ">H"), "C": (12, ">H"), "h": (14, ">H"), "w": (16, ">H"), "model": (18, ">32s"),
          "tables": (50, ">32s")}
    out = bytearray(data)
    for name, value in fields.items():
        off, fmt = at[name]
        struct.pack_into(fmt, out, off, value)
    if crc:
        struct.pack_into(">I", out, len(out) - 4, zlib.crc32(bytes(out[:-4])))
    return bytes(out)


def test_the_file_is_laid_out_as_documented(lic_bundle, crop, small):
    data = small[2]
    assert (data[:4], data[4], data[5], data[6], data[7]) == (b"LICF", 2, 1, 16, 1)
    assert struct.unpack_from(">5H", data, 8) == (64, 80, 24, 4, 5)
    assert data[18:50].hex() == lic_bundle.hash
    assert data[50:82].hex() == tables_sha256(coder_tables(lic_bundle))
    (n,) = struct.unpack_from(">I", data, 82)
    assert len(data) == 86 + n + 4
    assert struct.unpack(">I", data[-4:])[0] == zlib.crc32(data[:-4])
    assert data[86:86 + n] == encode_latents(lic_bundle, golden_encode(lic_bundle, pad_image(crop)))


@pytest.mark.parametrize("hw", [(1, 1), (15, 17), (33, 70)])
def test_any_image_size_decodes_to_that_size(lic_bundle, hw):
    img = embedded_images("held-out")["astronaut"][:hw[0], 200:200 + hw[1]]
    data = encode_image(lic_bundle, img)
    header, strings = read_file(data)
    assert header.size == hw and header.latent_hw == (-(-hw[0] // 16), -(-hw[1] // 16))
    got = decode_image(lic_bundle, data)
    full = golden_decode(lic_bundle, golden_encode(lic_bundle, pad_image(img)))
    assert got.shape == (*hw, 3) and np.array_equal(got, full[0, :, :hw[0], :hw[1]].transpose(1, 2, 0))


def _coder(bundle):
    t = bundle.layer("latent").tensors
    return t["cdf"].tolist(), t["cdf_length"].tolist(), t["offset"].tolist(), t["median"]


def test_the_payload_check_is_compressais_decoder_with_bounds(lic_bundle):
    """Latents with extremes (raw bypass values) decode to themselves by the model and by
    CompressAI's decoder; strings it cannot decode within their bounds are refused."""
    from compressai.ans import RansDecoder

    cdf, length, offset, median = _coder(lic_bundle)
    rng = np.random.default_rng(0)
    lat = rng.integers(-3, 4, (1, 24, 3, 4))
    lat[0, :, 0, 0], lat[0, :, 2, 3] = 127, -128
    string = encode_latents(lic_bundle, lat)
    idx = np.repeat(np.arange(24), 12).tolist()
    symbols = check_payload(string, idx, cdf, length, offset)
    assert symbols == (lat[0] - median[:, None, None]).reshape(-1).tolist()
    assert symbols == RansDecoder().decode_with_indexes(string, idx, cdf, length, offset)
    for bad, why in ((b"", r"payload of 0 bytes is not a rANS string"),
                     (string[:6], r"payload of 6 bytes is not a rANS string"),
                     (string + bytes(4), r"payload corrupt: 4 bytes left over after the last symbol"),
                     (b"\xff" * len(string), r"payload corrupt: initial rANS state out of its interval")):
        with pytest.raises(BitstreamError, match=why):
            check_payload(bad, idx, cdf, length, offset)
    with pytest.raises(BitstreamError, match=r"too short for the 98304 latent symbols declared"):
        check_payload(string, np.repeat(np.arange(24), 4096).tolist(), cdf, length, offset)
    # a bypass count of 15 groups (60 bits: an int32 overflow in CompressAI's decoder) is refused
    esc = length[0] - 2
    escape = ("sym", cdf[0][esc], cdf[0][esc + 1] - cdf[0][esc])
    with pytest.raises(BitstreamError, match=r"a bypass-coded value longer than 28 bits \(symbol 0 of 288\)"):
        check_payload(rans64_encode([escape, ("bits", 15), ("bits", 15)] + [escape] * 40), idx, cdf, length, offset)
    # and CompressAI's encoder, which never ends on such a value, is not asked to write one
    huge = lat.copy()
    huge[0, 5, 1, 1] = 1 << 28
    with pytest.raises(ValueError, match=r"encode_latents: a latent of magnitude 2.68435e\+08, beyond the 2\*\*25"):
        encode_latents(lic_bundle, huge)


def test_the_crafting_encoder_writes_compressais_bytes(lic_bundle):
    """tests/helpers.rans64_encode, which crafts the adversarial strings, is CompressAI's encoder."""
    cdf, length, offset, median = _coder(lic_bundle)
    lat = np.random.default_rng(1).integers(-2, 3, (1, 24, 2, 3))
    values = (lat[0] - median[:, None, None]).reshape(-1) - np.repeat(offset, 6)
    ops = [("sym", cdf[c][v], cdf[c][v + 1] - cdf[c][v]) for c, v in zip(np.repeat(np.arange(24), 6), values)]
    assert rans64_encode(ops) == encode_latents(lic_bundle, lat)


def _decode_error(capsys, args) -> str:
    rc = main(args)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, (rc, err)
    return err


def test_every_bad_file_exits_2_with_one_line(lic_bundle, small, tmp_path, capsys):
    _, _, data = small
    h16 = lic_bundle.hash
    n32 = load_model(N32)
    cases = {
        "version": (_with(data, crc=False, version=3), r"file format version 3; this licforge reads version 2$"),
        "truncated": (data[:-10], rf"file truncated: {len(data) - 10} bytes, its header declares {len(data)}$"),
        "longer": (data + b"\0", rf"file has 1 bytes after the {len(data)} its header declares$"),
        "corrupt": (data[:90] + bytes([data[90] ^ 4]) + data[91:], r"file corrupt: CRC32 mismatch$"),
        "inconsistent": (_with(data, h=5), r"latent size 5x5 does not fit image size 64x80 padded to a multiple "
                                           r"of 16$"),
        "channels": (_with(data, C=23), r"header declares padding 16, 23 latent channels and 1 strings; this "
                                        r"model codes 16, 24 and 1$"),
        "kind": (_with(data, kind=7), r"unknown model kind 7 \(1 bundle, 2 float weight file\)$"),
        "payload": (_with(data[:90] + bytes([data[90] ^ 4]) + data[91:]), r"payload corrupt: "),
        "tables": (_with(data, tables=bytes(32)), rf"file's entropy coder tables \(sha256 {'0' * 64}\) differ from "
                                                  rf"the model's \([0-9a-f]{{64}}\)"),
        "limit": (_with(data, H=4097, W=4097, h=257, w=257), rf"image 4097x4097 has more than the {MAX_PIXELS} "
                                                             r"pixels this decoder accepts$"),
    }
    for name, (bad, why) in cases.items():
        f = tmp_path / f"{name}.licf"
        f.write_bytes(bad)
        err = _decode_error(capsys, ["decode", str(f), "--model", str(lic_bundle.path), "--out",
                                     str(tmp_path / f"{name}.png")])
        assert err.startswith(f"licforge: error: file {f}: "), err
        assert re.search(why, err), (name, err)
        assert not (tmp_path / f"{name}.png").exists()
    # another bundle: both hashes named
    (tmp_path / "ok.licf").write_bytes(data)
    err = _decode_error(capsys, ["decode", str(tmp_path / "ok.licf"), "--model", str(N32)])
    assert f"encoded with the bundle of sha256 {h16}, not with this bundle (sha256 {n32.hash})" in err
    # an RTL decode refuses a line wider than its decoder's, before any simulation
    err = _decode_error(capsys, ["--build", str(tmp_path), "decode", str(tmp_path / "ok.licf"), "--rtl",
                                 "--max-width", "4"])
    assert err.endswith("latent line of 5 columns (80 pixels) is wider than the RTL decoder's 4 (--max-width)")
    assert not (tmp_path / "sim").exists()
    # no model given and none committed with this hash: the hash it needs
    (tmp_path / "alien.licf").write_bytes(_with(data, model=b"\x11" * 32))
    err = _decode_error(capsys, ["decode", str(tmp_path / "alien.licf")])
    assert err.endswith(f"encoded with the bundle of sha256 {'11' * 32}, which is not committed here; pass that "
                        f"model with --model")


def test_a_huge_declared_image_is_refused_before_any_allocation(lic_bundle, small):
    data = _with(small[2], H=65535, W=65535, h=4096, w=4096)
    tracemalloc.start()
    try:
        with pytest.raises(BitstreamError, match=r"image 65535x65535 has more than"):
            decode_latents(lic_bundle, data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak


def test_decode_finds_the_committed_bundle_by_its_hash(lic_bundle, small, tmp_path, capsys):
    _, f, data = small
    out = tmp_path / "crop.png"
    assert main(["decode", str(f), "--out", str(out), "--json", str(tmp_path / "d.json")]) == 0
    line = capsys.readouterr().out.strip()
    assert f"integer golden decoder of {lic_bundle.path} ({lic_bundle.hash[:16]})" in line
    assert np.array_equal(np.asarray(Image.open(out)), decode_image(lic_bundle, data))
    assert json.loads((tmp_path / "d.json").read_text())["decoder"] == "golden"


def test_a_float_weight_file_encodes_and_decodes(small, tmp_path, capsys):
    png, _, _ = small
    f = tmp_path / "float.licf"
    assert main(["encode", str(STUDENT), str(png), "--out", str(f)]) == 0
    header, _ = read_file(f.read_bytes())
    assert (header.kind, header.channels, header.latent_hw) == (2, 24, (4, 5))
    assert main(["decode", str(f), "--out", str(tmp_path / "float.png")]) == 0  # found among models/checkpoints/*.pt
    assert f"float model of {STUDENT}" in capsys.readouterr().out
    rec = np.asarray(Image.open(tmp_path / "float.png"))
    assert np.array_equal(rec, decode_image(load_model(STUDENT), f.read_bytes()))
    mse = np.mean((rec.astype(float) - np.asarray(Image.open(png))) ** 2)
    assert 20 < 10 * np.log10(255 ** 2 / mse) < 40
    # a float model's file is not a bundle's
    err = _decode_error(capsys, ["decode", str(f), "--model", str(ROOT / "models/checkpoints/bundles/"
                                                                         "student_n16_photos_hybrid8")])
    assert "encoded with the float weight file of sha256" in err and "not with this bundle" in err


def test_golden_and_rtl_decodes_write_identical_pngs(lic_bundle, crop, tmp_path, capsys, sim_cache):
    """The same file (a 32 x 48 crop: latents 2 x 3) through the integer golden decoder and
    through the decoder RTL in Verilator (``--build`` holds the session's simulator cache,
    ``<build>/sim-cache``)."""
    require_simulator("verilator")
    f = tmp_path / "crop.licf"
    f.write_bytes(encode_image(lic_bundle, crop[:32, :48]))
    assert main(["decode", str(f), "--out", str(tmp_path / "golden.png")]) == 0
    assert main(["--build", str(sim_cache.parent), "decode", str(f), "--rtl", "--pi", "2", "--po", "2",
                 "--max-width", "8", "--out", str(tmp_path / "rtl.png")]) == 0
    out = capsys.readouterr().out
    assert "decoder RTL (PI=2, PO=2, verilator)" in out and "0 mismatches against the golden decoder" in out
    assert (tmp_path / "rtl.png").read_bytes() == (tmp_path / "golden.png").read_bytes()


def test_a_hyperprior_weight_file_round_trips_as_compressai_decodes_it(tmp_path):
    """Two strings (y, z) and padding 64: the checked decode equals CompressAI's decompress."""
    import torch

    from licforge.models.lic import LICConfig, build_lic, save_weights

    torch.manual_seed(0)
    cfg = LICConfig("hyperprior", 8, 12, "gdn")
    model = load_model(save_weights(build_lic(cfg), cfg, tmp_path / "hp.pt"))
    img = embedded_images("held-out")["chelsea"][:70, :90]
    data = encode_image(model, img)
    header, strings = read_file(data)
    assert (header.kind, header.pad, header.channels, header.latent_hw, len(strings)) == (2, 64, 8, (2, 2), 2)
    with torch.no_grad():
        enc = model.net.compress(torch.from_numpy(pad_image(img, 64)).float() / 256)
        ref = model.net.decompress(enc["strings"], enc["shape"])["x_hat"]
    assert [[s] for s in strings] == enc["strings"]
    ref = torch.clamp(torch.round(ref * 256), 0, 255)[0, :, :70, :90].permute(1, 2, 0).numpy()
    assert np.array_equal(decode_image(model, data), ref.astype(np.uint8))
