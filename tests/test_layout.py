"""The house rules: import layering, one namespace, and a non-editable install that works.

Layers (DESIGN.md): ``{errors, tables} <- models <- quant <- {rtl, sim, watermark} <- bench <- flows``;
``rtl`` imports no torch; nothing but ``flows`` (and its tests) imports ``flows``.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("models", "quant", "rtl", "sim", "watermark", "bench", "flows")
# what each folder may import from licforge (itself always)
ALLOWED = {
    "errors": set(),
    "tables": set(),
    "models": {"errors", "tables"},
    "quant": {"errors", "tables", "models"},
    "rtl": {"errors", "tables", "quant"},
    "sim": {"errors", "tables", "models", "quant", "rtl"},
    "watermark": {"errors", "tables", "models", "quant", "rtl"},
    "bench": {"errors", "tables", "models", "quant", "rtl", "sim", "watermark"},
    "flows": {"errors", "tables", "models", "quant", "rtl", "sim", "watermark", "bench"},
}
# the only licforge modules rtl/ may import from quant/ (numbers and the bundle reader: no torch)
RTL_FROM_QUANT = {"licforge.quant.fixed", "licforge.quant.bundle"}
GROUND = ("errors", "tables")  # modules of the namespace root
TOP_NAMES = set(PACKAGES) | set(GROUND)


def _sources() -> list[tuple[str, Path]]:
    out = [(name, ROOT / f"{name}.py") for name in GROUND]
    for pkg in PACKAGES:
        out += [(pkg, p) for p in sorted((ROOT / pkg).rglob("*.py"))]
    return out


def _imports(path: Path, pkg: str) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in ``path``, function-level ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside its own package (or the namespace root)
                base = ["licforge", pkg][: 2 - (node.level - 1)] if pkg not in GROUND else ["licforge"]
                found.append((node.lineno, ".".join(base + ([node.module] if node.module else []))))
            else:
                found.append((node.lineno, node.module))
    return found


def test_every_source_follows_the_layering():
    bad = []
    for pkg, path in _sources():
        rel = path.relative_to(ROOT)
        for line, mod in _imports(path, pkg):
            head = mod.split(".")[0]
            if head in TOP_NAMES:
                bad.append(f"{rel}:{line}: bare 'import {mod}': use licforge.{mod}")
            if head == "torch" and pkg == "rtl":
                bad.append(f"{rel}:{line}: rtl/ imports torch")
            if head != "licforge" or mod == "licforge":
                continue
            target = mod.split(".")[1]
            if target != pkg and target not in ALLOWED[pkg]:
                bad.append(f"{rel}:{line}: {pkg}/ may not import {mod}")
            if pkg == "rtl" and target == "quant" and ".".join(mod.split(".")[:3]) not in RTL_FROM_QUANT:
                bad.append(f"{rel}:{line}: rtl/ may import only {sorted(RTL_FROM_QUANT)} from quant/, not {mod}")
    assert bad == []


def test_the_layering_check_catches_a_violation(tmp_path):
    """The checker above is not vacuous: a quant module that imports flows, a bare top-level
    import and torch in rtl are all reported."""
    f = tmp_path / "x.py"
    f.write_text("from licforge.flows.cli import main\nimport models.lic\ndef f():\n    import torch\n")
    mods = [m for _, m in _imports(f, "rtl")]
    assert mods == ["licforge.flows.cli", "models.lic", "torch"]
    f.write_text("from .gdn import GdnUnit\nfrom .. import errors\n")
    assert [m for _, m in _imports(f, "rtl")] == ["licforge.rtl.gdn", "licforge"]


def test_importing_the_rtl_generators_loads_no_torch():
    mods = sorted(p.stem for p in (ROOT / "rtl").glob("*.py") if p.stem != "__init__")
    code = ("import sys\n" + "".join(f"import licforge.rtl.{m}\n" for m in mods)
            + "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT.parent, check=True)
    assert out.stdout.strip() == "[]"


def test_only_the_namespace_is_importable_from_outside_the_repository(tmp_path):
    code = ("import importlib.util as u, licforge.models.lic, licforge.flows.cli, licforge.bench.decoder\n"
            "print([n for n in ('models', 'quant', 'rtl', 'sim', 'flows', 'watermark', 'bench', 'errors', 'tables') "
            "if u.find_spec(n) is not None and 'licforge' in str(u.find_spec(n).origin)])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="needs the project's virtual environment (make test)")
def test_a_non_editable_install_carries_the_checkpoints_recipes_and_config(tmp_path):
    """A fresh venv that sees the project's dependencies (a .pth line to this venv's
    site-packages, no second download), ``pip install --no-deps --no-build-isolation .``:
    its ``licforge`` command runs from elsewhere, with the data files inside the package."""
    import sysconfig

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3.*/site-packages"))
    (site / "licforge_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    py = venv / "bin" / "python"
    build = tmp_path / "src"  # a copy without build outputs, so pip never walks build/ or .venv/
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard"], check=True,
                           capture_output=True, text=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (build / f).parent.mkdir(parents=True, exist_ok=True)
            (build / f).write_bytes((ROOT / f).read_bytes())
    r = subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                        "--no-index", str(build)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    code = ("import licforge, pathlib, importlib.util as u; p = pathlib.Path(licforge.__file__).parent\n"
            "print(p.parent.name)\n"
            "print(u.find_spec('models') is None, u.find_spec('flows') is None)\n"
            "for f in ('models/checkpoints/teacher_n128_photos16k_l0.0130.pt', 'models/checkpoints/student_n16_photos_l0.0130.pt',\n"
            "          'models/checkpoints/bundles/student_n16_photos_hybrid8/bundle.json', 'quant/recipes/hybrid8.json',\n"
            "          'flows/default.toml', 'bench/results/lic.json', 'models/checkpoints/digits/meta.json'):\n"
            "    print(f, (p / f).is_file())\n")
    out = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True).stdout
    lines = out.split("\n")
    assert lines[0] == "site-packages" and lines[1] == "True True"
    assert [l.rsplit(" ", 1)[1] for l in lines[2:9]] == ["True"] * 7, out
    bundle = next((site / "licforge").glob("models/checkpoints/bundles/student_n16_photos_hybrid8"))
    cli = subprocess.run([str(venv / "bin" / "licforge"), "inspect", str(bundle)], capture_output=True,
                         text=True, cwd=tmp_path)
    assert cli.returncode == 0, cli.stderr
    assert "g_s.0" in cli.stdout
