"""Bjøntegaard deltas, baselines, the data split and the eval / plot rd command line."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from licforge.flows.cli import main
from licforge.quant.rd import bd_psnr, bd_rate, curves_from_results, rd_report
from licforge.models.data import (DataError, EMBEDDED_HELD_OUT, EMBEDDED_TRAIN, embedded_images, folder_images,
                                  read_rgb)

ANCHOR = [(0.2, 26.0), (0.35, 28.1), (0.6, 30.0), (1.0, 32.2)]


def test_bd_rate_of_a_scaled_curve_is_the_scale():
    cheaper = [(r * 0.9, d) for r, d in ANCHOR]
    assert bd_rate(ANCHOR, cheaper) == pytest.approx(-10.0, abs=1e-9)
    assert bd_rate(ANCHOR, ANCHOR) == pytest.approx(0.0, abs=1e-12)
    assert bd_psnr(ANCHOR, [(r, d + 0.5) for r, d in ANCHOR]) == pytest.approx(0.5, abs=1e-9)
    assert bd_rate(ANCHOR, [(1.0, 40.0), (2.0, 44.0)]) is None  # no shared PSNR interval


def test_rd_report_groups_entries_by_curve():
    res = {"entries": [{"curve": "teacher", "mean": {"bpp": r, "psnr": d}} for r, d in ANCHOR]
           + [{"curve": "s", "mean": {"bpp": r * 1.25, "psnr": d}} for r, d in ANCHOR]}
    rep = rd_report(curves_from_results([res]), "teacher")
    assert rep["curves"]["s"]["bd_rate_pct"] == pytest.approx(25.0, abs=1e-9)
    assert rep["curves"]["teacher"]["points"][0] == [0.2, 26.0]


def test_embedded_split_is_fixed_and_disjoint():
    held = embedded_images("held-out")
    assert tuple(held) == EMBEDDED_HELD_OUT == ("astronaut", "chelsea", "coffee")
    assert {k: v.shape for k, v in held.items()} == {"astronaut": (512, 512, 3), "chelsea": (300, 451, 3),
                                                     "coffee": (400, 600, 3)}
    assert not set(EMBEDDED_TRAIN) & set(EMBEDDED_HELD_OUT) and len(EMBEDDED_TRAIN) == 6


def test_read_rgb_scales_16_bit_grey_turns_upright_and_refuses_what_rgb_would_lose(tmp_path, capsys):
    """16-bit grey is scaled to 8 bits (Pillow's own conversion clips it to white above 255); an opaque
    alpha channel is dropped, a transparent pixel refused; 32-bit samples and oversized images refused;
    an EXIF orientation is applied."""
    grey16 = (np.arange(6 * 7, dtype=np.uint16).reshape(6, 7) * 1567)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    got = read_rgb(tmp_path / "g16.png")
    assert got.shape == (6, 7, 3) and got.dtype == np.uint8
    assert got[..., 0].ravel().tolist() == np.rint(grey16.astype(np.float64).ravel() * 255 / 65535).astype(int).tolist()
    assert (got[..., 0] == got[..., 2]).all() and got.max() == 250
    rgba = np.full((4, 5, 4), 255, np.uint8)
    rgba[..., :3] = np.arange(60, dtype=np.uint8).reshape(4, 5, 3)
    Image.fromarray(rgba).save(tmp_path / "opaque.png")
    assert (read_rgb(tmp_path / "opaque.png") == rgba[..., :3]).all()
    rgba[1, 2, 3] = 254
    rgba[3, 0, 3] = 0
    Image.fromarray(rgba).save(tmp_path / "holes.png")
    with pytest.raises(DataError, match=r"holes\.png: 2 transparent pixels \(alpha below 255\); licforge codes RGB"):
        read_rgb(tmp_path / "holes.png")
    Image.fromarray(np.zeros((3, 3), np.int32)).save(tmp_path / "i32.tif")
    with pytest.raises(DataError, match=r"i32\.tif: 32-bit integer samples; save it as 8-bit RGB"):
        read_rgb(tmp_path / "i32.tif")
    with pytest.raises(DataError, match=r"g16\.png: 7x6 has more than the 41 pixels a licforge file holds"):
        read_rgb(tmp_path / "g16.png", max_pixels=41)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(rgba[..., :3]).save(tmp_path / "camera.png", exif=exif)
    assert (read_rgb(tmp_path / "camera.png") == np.rot90(rgba[..., :3], -1)).all()
    bundle = Path(__file__).resolve().parent.parent / "models/checkpoints/bundles/student_n16_photos_hybrid8"
    assert main(["encode", str(bundle), str(tmp_path / "holes.png")]) == 2
    assert "licforge: error: image " in capsys.readouterr().err


def test_image_folder_split_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(9):
        img = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
        img.save(tmp_path / f"im{i}.{'png' if i % 2 else 'jpg'}")
    train, held = folder_images(tmp_path, "train"), folder_images(tmp_path, "held-out")
    assert sorted(held) == ["im7"] and len(train) == 8 and train["im1"].shape == (40, 48, 3)
    (tmp_path / "im8.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"im8\.jpg: not a readable PNG/JPEG image"):
        folder_images(tmp_path, "train")
    with pytest.raises(DataError, match=r"--data .*nothing: not a directory"):
        folder_images(tmp_path / "nothing", "train")
    few = tmp_path / "few"
    few.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(few / f"a{i}.png")
    assert sorted(folder_images(few, "train")) == ["a0", "a1", "a2"]
    with pytest.raises(DataError) as e:  # 3 images are not "no images"
        folder_images(few, "held-out")
    assert str(e.value) == (f"--data {few}: 3 PNG/JPEG image(s), too few to hold any out (every 8th file is held "
                            "out): give at least 8, or train/ and test/ subfolders")
    (few / "train").mkdir()
    (few / "test").mkdir()
    with pytest.raises(DataError, match=f"^--data {few}: no PNG/JPEG images in {few / 'test'}$"):
        folder_images(few, "held-out")
    with pytest.raises(DataError, match=f"^--data {tmp_path / 'few' / 'train'}: no PNG/JPEG images$"):
        folder_images(few / "train", "train")


def test_eval_baselines_and_plot_rd_cli(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "imgs"
    (folder / "train").mkdir(parents=True)
    (folder / "test").mkdir()
    img = embedded_images("held-out")["chelsea"][:192, :256]
    Image.fromarray(img).save(folder / "test" / "cat.png")
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--data", str(folder)]) == 0  # no --json: the table only, no file
    assert "jpeg_q75" in capsys.readouterr().out and not (tmp_path / "build").exists()
    rc = main(["eval", "--data", str(folder), "--json", str(tmp_path / "e.json")])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "e.json").read_text())
    jpeg = [e for e in res["entries"] if e["curve"] == "JPEG (Pillow)"]
    assert [e["quality"] for e in jpeg] == [1, 3, 5, 10, 20, 30, 50, 75]
    assert all(e["per_image"]["cat"]["bpp"] == 8 * e["per_image"]["cat"]["bytes"] / (192 * 256) for e in jpeg)
    assert np.all(np.diff([e["mean"]["psnr"] for e in jpeg]) > 0)
    rc = main(["plot", "rd", str(tmp_path / "e.json"), "--anchor", "JPEG (Pillow)",
               "--out", str(tmp_path / "rd.png"), "--json", str(tmp_path / "bd.json")])
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "rd.png").read_bytes()[:4] == b"\x89PNG"
    bd = json.loads((tmp_path / "bd.json").read_text())
    assert bd["curves"]["WebP (Pillow)"]["bd_rate_pct"] < 0  # WebP beats JPEG
    rc = main(["plot", "rd", str(tmp_path / "e.json"), "--anchor", "teacher"])
    assert rc == 2 and "--anchor 'teacher': no such curve" in capsys.readouterr().err
    rc = main(["--build", str(tmp_path / "b"), "plot", "rd", str(tmp_path / "e.json"), "--anchor", "JPEG (Pillow)"])
    assert rc == 0 and "BD-rates" not in capsys.readouterr().out  # no --json: the plot alone, in <build>/lic
    assert (tmp_path / "b" / "lic" / "rd.png").is_file() and list((tmp_path / "b" / "lic").iterdir()) == [
        tmp_path / "b" / "lic" / "rd.png"]


def test_rd_plot_styles_keep_teacher_and_widths_apart():
    """The teacher is black and no width shares its colour; line style names the variant."""
    from licforge.quant.rd import curve_style

    palette = {"teacher": "k"}
    labels = ["N=16 GDN1", "N=16 GDN1 + KD", "N=16 GDN1 + KD mix50", "N=16 GDN1 seed 1", "N=32 GDN1", "N=64 GDN1 + KD",
              "N=64 GDN1 + KD, hybrid8 QAT"]
    st = {k: curve_style(k, palette) for k in labels}
    assert [st[k]["color"] for k in labels] == ["C0", "C0", "C0", "C0", "C1", "C2", "C2"]
    assert [st[k]["ls"] for k in labels[:4]] == [":", "-", (0, (4, 2)), "-."]
    assert curve_style("teacher", palette)["color"] == "k" and curve_style("WebP (Pillow)", palette)["marker"] == "s"
