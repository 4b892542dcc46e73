"""licforge: learned image compression from PyTorch to verified Verilog.

The repository's top-level folders are this package's subpackages (``pyproject.toml`` maps
them with setuptools' ``package-dir``), imported as ``licforge.models``, ``licforge.quant``,
``licforge.rtl``, ``licforge.sim``, ``licforge.watermark``, ``licforge.bench`` and
``licforge.flows``; ``licforge.errors`` holds the error types every layer may raise and
``licforge.tables`` the Markdown table formatter every layer may use.

Import rules (tested in ``tests/test_layout.py``)::

    {errors, tables} <- models <- quant <- {rtl, sim, watermark} <- bench <- flows

``rtl`` imports no torch (hardware generators take numbers); nothing imports ``flows``.
"""
