"""Exit-code contract of the command line (DESIGN.md): bad input -> 2, failed check -> 1."""
from __future__ import annotations

from pathlib import Path

__all__ = ["UsageError", "CheckFailed", "need_file", "need_dir", "need_int"]


class UsageError(Exception):
    """Bad input: an argument, key or file; printed as one line, exit code 2."""


class CheckFailed(Exception):
    """A verification failed (mismatch, BER above the threshold asked for); exit code 1."""


def need_file(path: str | Path, what: str = "file") -> Path:
    """``path`` as a Path if it is an existing file, else UsageError naming it."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{what} {p}: not found")
    return p


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
