"""Exit-code contract of the command line (DESIGN.md): bad input -> 2, failed check -> 1; the shared checks
of its arguments (argparse types for floats and seeds) and of the files it reads and writes, which raise
:class:`UsageError` naming the argument or file."""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

__all__ = ["UsageError", "CheckFailed", "need_file", "not_a_file", "need_dir", "need_int", "read_json", "finite_float",
           "positive_float", "probability", "seed_int", "out_file", "out_dir"]


class UsageError(Exception):
    """Bad input: an argument, key or file; printed as one line, exit code 2."""


class CheckFailed(Exception):
    """A verification failed (mismatch, BER above the threshold asked for); exit code 1."""


def need_file(path: str | Path, what: str = "file") -> Path:
    """``path`` as a Path if it is an existing file, else UsageError naming it and why (not found,
    a folder, or not a regular file such as a device)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{what} {p}: {not_a_file(p)}")
    return p


def not_a_file(p: Path) -> str:
    """Why ``p``, which is not a regular file, cannot be read as one: ``not found``, ``is a
    folder; give a file`` or ``not a regular file``."""
    if not p.exists():
        return "not found"
    return "is a folder; give a file" if p.is_dir() else "not a regular file"


def need_dir(path: str | Path, what: str = "directory") -> Path:
    """``path`` as a Path if it is an existing directory, else UsageError naming it."""
    p = Path(path)
    if not p.is_dir():
        raise UsageError(f"{what} {p}: not found (or not a directory)")
    return p


def need_int(value: int, name: str, low: int, high: int) -> int:
    """``value`` if ``low <= value <= high``, else UsageError naming the argument."""
    if not low <= value <= high:
        raise UsageError(f"{name} must be between {low} and {high}, not {value}")
    return value


def read_json(path: str | Path, what: str = "", fix: str = "", error: type[Exception] = UsageError) -> Any:
    """The JSON document in the file ``path``; ``error`` naming the file (``what`` before its name,
    ``fix`` after the reason) where it is not UTF-8 JSON: truncated, corrupt or binary."""
    p = Path(path)
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{what + ' ' if what else ''}{p}: not valid JSON ({e}); the file is truncated or corrupt"
                    f"{', ' + fix if fix else ''}") from None


def finite_float(text: str) -> float:
    """argparse type: a finite number ('inf' and 'nan' are refused by the argument's name)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text!r}")
    return v


def positive_float(text: str) -> float:
    """argparse type: a finite number above 0 (a rate, a clock, a learning rate, a time)."""
    v = finite_float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return v


def probability(text: str) -> float:
    """argparse type: a probability in (0, 1] (of a beat being offered or taken: 0 would never end)."""
    v = finite_float(text)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be a probability in (0, 1], not {text}")
    return v


def seed_int(text: str) -> int:
    """argparse type: a random seed, an integer in [0, 2**32) (numpy's generators refuse negatives)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= v < 2 ** 32:
        raise argparse.ArgumentTypeError(f"a seed must be between 0 and {2 ** 32 - 1}, not {text}")
    return v


def out_file(path: str | Path, what: str = "--out", suffix: str | None = None) -> Path:
    """``path`` as a Path that a command can write its file to, checked before the command's work
    (a training run, a decode) rather than after it: not a folder, ending in ``suffix`` where the
    format follows from it, its folder made and writable; UsageError naming ``what`` otherwise."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{what} {p}: is a folder; give a file name" + (f" ending in {suffix}" if suffix else ""))
    if suffix and p.suffix.lower() != suffix:
        raise UsageError(f"{what} {p}: written as {suffix[1:].upper()}; give a file name ending in {suffix}")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{what} {p}: its folder cannot be made ({e.strerror}: {e.filename})") from None
    if not os.access(p.parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise UsageError(f"{what} {p}: not writable")
    return p


def out_dir(path: str | Path, what: str = "--out") -> Path:
    """``path`` as a Path that a command can write a folder to (a bundle, generated Verilog): not an
    existing file, and the folder, or the nearest existing folder above it (where it will be
    made), writable; UsageError naming ``what`` otherwise.  Nothing is created."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{what} {p}: is a file; give a folder name")
    above = p.absolute()
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        raise UsageError(f"{what} {p}: cannot be made ({above} is a file)")
    if not os.access(above, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {p}: not writable" + ("" if above == p.absolute() else f" ({above} is read-only)"))
    return p
