"""Quantization recipes of the LIC models: per-layer bit widths as data (one JSON file each).

A recipe (``quant/recipes/*.json``) gives defaults per layer kind and per-layer overrides::

    conv         {"w_bits": 8, "out_bits": 10}     g_a.0/2/4 and g_s.0/2/4 convolutions
    gdn          {"gamma_bits": 8, "norm_bits": 12, "out_bits": 8}   g_a.1/3/5, g_s.1/3/5
    latent_bits  8                                  output of g_a.6 = integer latent symbols
    layers       {"g_s.6": {"w_bits": 8}, ...}      overrides by layer name
    calibration  {"percentile": 99.99, "crops": 32, "crop": 128}

Fixed by the number format, not by the recipe: the input is unsigned 8-bit at 2^-8 (the
pixel), g_a.6 outputs the latent (signed ``latent_bits`` at 2^0), g_s.6 outputs unsigned
8-bit pixels at 2^-8.  Every scale is a power of two; activation exponents are calibrated
(the ``percentile`` of |value| on ``crops`` random training crops must be representable).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from licforge.errors import read_json

__all__ = ["Recipe", "RecipeError", "load_recipe", "parse_recipe", "RECIPE_DIR", "CONV_LAYERS", "GDN_LAYERS"]

RECIPE_DIR = Path(__file__).parent / "recipes"
CONV_LAYERS = ("g_a.0", "g_a.2", "g_a.4", "g_a.6", "g_s.0", "g_s.2", "g_s.4", "g_s.6")
GDN_LAYERS = ("g_a.1", "g_a.3", "g_a.5", "g_s.1", "g_s.3", "g_s.5")
_CONV_KEYS = ("w_bits", "out_bits")
_GDN_KEYS = ("gamma_bits", "norm_bits", "out_bits")
_TOP = ("name", "description", "conv", "gdn", "latent_bits", "layers", "calibration")
_CAL = ("percentile", "crops", "crop")


class RecipeError(ValueError):
    """A recipe that cannot be used; names the file and key."""


@dataclass(frozen=True)
class Recipe:
    """A validated recipe; :meth:`bits` gives one layer's widths."""
    name: str
    data: dict[str, Any]

    def bits(self, layer: str) -> dict[str, int]:
        """Bit widths of ``layer`` (defaults of its kind, then its overrides, then the
        number-format constants of the latent and pixel layers)."""
        kind = "conv" if layer in CONV_LAYERS else "gdn"
        out = dict(self.data[kind])
        out.update(self.data["layers"].get(layer, {}))
        if layer == "g_a.6":
            out["out_bits"] = self.data["latent_bits"]
        if layer == "g_s.6":
            out["out_bits"] = 8
        return out

    @property
    def calibration(self) -> dict[str, Any]:
        return self.data["calibration"]


def _need_bits(v: Any, where: str, low: int = 2, high: int = 16) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
        raise RecipeError(f"{where} must be an integer between {low} and {high}, not {v!r}")
    return v


def parse_recipe(data: Any, where: str) -> Recipe:
    """Validate recipe ``data`` (``where`` names its file in messages)."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a recipe is a JSON object")
    unknown = sorted(set(data) - set(_TOP))
    missing = [k for k in _TOP if k not in data]
    if unknown or missing:
        raise RecipeError(f"{where}: unknown keys {unknown}, missing keys {missing} (keys: {list(_TOP)})")
    for kind, keys in (("conv", _CONV_KEYS), ("gdn", _GDN_KEYS)):
        sec = data[kind]
        if not isinstance(sec, dict) or sorted(sec) != sorted(keys):
            raise RecipeError(f"{where}: '{kind}' must have exactly the keys {list(keys)}")
        for k in keys:
            _need_bits(sec[k], f"{where}: {kind}.{k}")
    _need_bits(data["latent_bits"], f"{where}: latent_bits", 4, 16)
    for name, over in data["layers"].items():
        allowed = _CONV_KEYS if name in CONV_LAYERS else _GDN_KEYS if name in GDN_LAYERS else None
        if allowed is None:
            raise RecipeError(f"{where}: layers.{name}: no such layer (layers: {list(CONV_LAYERS + GDN_LAYERS)})")
        for k, v in over.items():
            if k not in allowed:
                raise RecipeError(f"{where}: layers.{name}.{k}: not a setting of this layer ({list(allowed)})")
            _need_bits(v, f"{where}: layers.{name}.{k}")
    cal = data["calibration"]
    if not isinstance(cal, dict) or sorted(cal) != sorted(_CAL):
        raise RecipeError(f"{where}: 'calibration' must have exactly the keys {list(_CAL)}")
    pct = cal["percentile"]
    if isinstance(pct, bool) or not isinstance(pct, (int, float)) or not 50.0 <= pct <= 100.0:
        raise RecipeError(f"{where}: calibration.percentile must be a number in [50, 100], not {pct!r}")
    for k in ("crops", "crop"):
        _need_bits(cal[k], f"{where}: calibration.{k}", 1, 4096)
    if cal["crop"] % 16:
        raise RecipeError(f"{where}: calibration.crop must be a multiple of 16 (the transform's stride), "
                          f"not {cal['crop']}")
    return Recipe(str(data["name"]), data)


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A recipe by file path, or by name from ``quant/recipes/`` (``hybrid8``, ``int8`` ...)."""
    p = Path(name_or_path)
    if not p.is_file():
        p = RECIPE_DIR / f"{name_or_path}.json"
    if not p.is_file():
        known = sorted(f.stem for f in RECIPE_DIR.glob("*.json"))
        raise RecipeError(f"--recipe {name_or_path}: no such file or recipe (built-in: {known})")
    data = read_json(p, "recipe", error=RecipeError)
    return parse_recipe(data, str(p))
