"""Helpers the test modules import (``pythonpath = ["tests"]`` in pyproject.toml: the suite runs
with ``--import-mode=importlib``, so the repository root is not on ``sys.path`` and a bare
``import models`` fails as it does for a user)."""
from __future__ import annotations

from typing import Callable

import pytest

__all__ = ["require_simulator", "Interrupt", "interrupt_after"]


def require_simulator(name: str) -> None:
    """Skip (with the reason) when the HDL simulator ``name`` is not installed."""
    from licforge.sim.runner import SimulatorUnavailable, simulator_env

    try:
        simulator_env(name)
    except SimulatorUnavailable as e:
        pytest.skip(str(e))


class Interrupt(Exception):
    """Raised by :func:`interrupt_after` to stop a training run the way a kill would."""


def interrupt_after(steps: int | None) -> Callable[[object], None]:
    """An ``after_step`` hook for ``train_lic`` that raises :class:`Interrupt` during step
    ``steps + 1`` (after ``steps`` completed steps); ``None``: never."""
    calls: list[int] = []

    def hook(_net: object) -> None:
        calls.append(1)
        if steps is not None and len(calls) > steps:
            raise Interrupt

    return hook
