"""Shared fixtures: one trained digits classifier per session, simulator selection."""
from __future__ import annotations

import shutil

import pytest
import torch

# one intra-op thread: the models here are small, and OpenMP threads that compete with the
# simulator builds (or anything else on a 2-core CI machine) slow training down several-fold
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits_models():
    """Exact CNN, MinConv twin and an 8-bit QAT MinConv classifier (seed 0), trained once."""
    from licforge.quant.digits import train_digits_models

    return train_digits_models(seed=0, bits=(8,), progress=False)


@pytest.fixture(scope="session")
def digits_bundle(digits_models, tmp_path_factory):
    """The 8-bit MinConv classifier's bundle, written and read back."""
    from licforge.quant.bundle import read_bundle, write_bundle
    from licforge.quant.digits import export_digits_bundle

    out = tmp_path_factory.mktemp("bundle") / "digits_minconv_b8"
    write_bundle(export_digits_bundle(digits_models.quantized[8], digits_models.split[0]), out)
    return read_bundle(out)


def require_simulator(name: str) -> None:
    """Skip (with the reason) when the HDL simulator ``name`` is not installed."""
    from licforge.sim.runner import SimulatorUnavailable, simulator_env

    try:
        simulator_env(name)
    except SimulatorUnavailable as e:
        pytest.skip(str(e))


LIC_BUNDLE = "models/checkpoints/bundles/student_n16_hybrid8"


@pytest.fixture(scope="session")
def lic_bundle():
    """The committed N=16 student's deployment bundle (hybrid8 QAT)."""
    from pathlib import Path

    from licforge.quant.bundle import read_bundle

    return read_bundle(Path(__file__).resolve().parent.parent / LIC_BUNDLE)


@pytest.fixture(scope="session")
def lic_quant():
    """The committed Brevitas model that the bundle was exported from."""
    from pathlib import Path

    from licforge.quant.lic import load_quantized

    root = Path(__file__).resolve().parent.parent
    return load_quantized(root / (LIC_BUNDLE + ".quant.pt"))[0]


@pytest.fixture
def copy_bundle(tmp_path):
    """``copy_bundle(bundle)``: a writable copy of a bundle's directory, to corrupt in a test."""
    def copy(bundle):
        dst = tmp_path / "b"
        shutil.copytree(bundle.path, dst)
        return dst
    return copy
