"""Shared fixtures: the committed digits classifiers, simulator selection, the LIC bundles."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

# one intra-op thread: the models here are small, and OpenMP threads that compete with the
# simulator builds (or anything else on a 2-core CI machine) slow training down several-fold
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits_models():
    """Exact CNN, MinConv twin and an 8-bit QAT MinConv classifier (seed 0): the committed
    checkpoint (models/checkpoints/digits), which one test retrains to check it is current."""
    from licforge.quant.digits import load_digits_models

    return load_digits_models()


@pytest.fixture(scope="session")
def digits_bundle(digits_models, tmp_path_factory):
    """The 8-bit MinConv classifier's bundle, written and read back."""
    from licforge.quant.bundle import read_bundle, write_bundle
    from licforge.quant.digits import export_digits_bundle

    out = tmp_path_factory.mktemp("bundle") / "digits_minconv_b8"
    write_bundle(export_digits_bundle(digits_models.quantized[8], digits_models.split[0]), out)
    return read_bundle(out)


@pytest.fixture(scope="session", autouse=True)
def sim_cache():
    """The simulator build cache the RTL tests share (``cache_dir`` of :func:`sim.runner.run_cocotb`):
    ``build/sim-cache`` in the repository, kept between sessions; a design is compiled once.
    It is also ``LICFORGE_SIM_CACHE`` for the session, so that the flows' and the CLI's RTL
    decodes compile the Verilator runtime once, not once per run folder."""
    from pathlib import Path

    from licforge.sim.decode import SIM_CACHE_ENV

    cache = Path(__file__).resolve().parent.parent / "build" / "sim-cache"
    saved = os.environ.get(SIM_CACHE_ENV)
    os.environ[SIM_CACHE_ENV] = str(cache)
    yield cache
    if saved is None:
        os.environ.pop(SIM_CACHE_ENV, None)
    else:
        os.environ[SIM_CACHE_ENV] = saved


LIC_BUNDLE = "models/checkpoints/bundles/student_n16_photos_hybrid8"


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
