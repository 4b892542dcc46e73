"""Helpers the test modules import (``pythonpath = ["tests"]`` in pyproject.toml: the suite runs
with ``--import-mode=importlib``, so the repository root is not on ``sys.path`` and a bare
``import models`` fails as it does for a user)."""
from __future__ import annotations

import pytest

__all__ = ["require_simulator"]


def require_simulator(name: str) -> None:
    """Skip (with the reason) when the HDL simulator ``name`` is not installed."""
    from licforge.sim.runner import SimulatorUnavailable, simulator_env

    try:
        simulator_env(name)
    except SimulatorUnavailable as e:
        pytest.skip(str(e))
