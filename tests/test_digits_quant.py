"""Equality 1 on the digits classifier: Brevitas fake-quant == integer golden model, exactly;
the committed digits checkpoint: current (the recipe reproduces it) and checked when loaded."""
import hashlib
import json
import re
import shutil

import numpy as np
import pytest
import torch

from licforge.models.lic import CheckpointError
from licforge.quant.digits import (DIGITS_CHECKPOINT, DigitsRecipe, export_digits_bundle, input_to_int,
                                   load_digits_models, quantize_digits, run_digits_golden, train_digits_models)

REWRITE = "python -m licforge.quant.digits"


def brevitas_int_logits(q, x):
    q.double()
    trace = []
    out = q(x.double(), trace)
    q.float()
    return out.int().long().numpy(), trace


def test_accuracies_of_the_embedded_default(digits_models):
    acc = digits_models.accuracy
    # held-out split of 360 images; these thresholds catch a broken conversion or QAT
    assert acc["float_exact"] >= 0.94
    assert acc["float_minconv"] >= 0.92
    assert acc["quant_min_8bit"] >= 0.92


def test_the_recipe_reproduces_the_committed_checkpoint(digits_models):
    """The one test that trains the digits recipe (seed 0): the accuracies of the committed
    networks (measured again when loaded) are those of a fresh run and those recorded."""
    meta = json.loads((DIGITS_CHECKPOINT / "meta.json").read_text())
    assert meta["seed"] == 0 and meta["bits"] == [8] and DigitsRecipe(**meta["recipe"]) == DigitsRecipe()
    fresh = train_digits_models(seed=0, bits=(8,), progress=False)
    assert fresh.accuracy == digits_models.accuracy == meta["accuracy"]
    assert list(fresh.accuracy) == ["float_exact", "float_minconv_converted", "float_minconv", "quant_min_8bit"]


def test_loading_refuses_a_corrupt_or_mismatched_checkpoint(tmp_path):
    d = tmp_path / "digits"
    shutil.copytree(DIGITS_CHECKPOINT, d)
    good = {f.name: f.read_bytes() for f in d.iterdir()}

    def refused(start: str) -> None:
        with pytest.raises(CheckpointError, match="^" + re.escape(start)) as e:
            load_digits_models(d)
        assert REWRITE in str(e.value)
        for name, blob in good.items():
            (d / name).write_bytes(blob)

    (d / "exact.pt").write_bytes(good["minconv.pt"])  # another network's file: its sha256 is not the recorded one
    refused(f"{d / 'exact.pt'}: sha256 differs from the one recorded in {d / 'meta.json'}")
    (d / "quant_min_8bit.pt").write_bytes(good["quant_min_8bit.pt"][:1000])
    refused(f"{d / 'quant_min_8bit.pt'}: sha256 differs")
    (d / "minconv.pt").unlink()
    refused(f"{d / 'minconv.pt'}: not found")
    (d / "meta.json").write_text("{not json")
    refused(f"{d / 'meta.json'}: not JSON")
    (d / "meta.json").unlink()
    refused(f"{d / 'meta.json'}: not found")
    # a readable file of another format, recorded as it is: its loader names the file and the fix
    meta = json.loads(good["meta.json"])
    torch.save({"format": "licforge-lic-weights/1"}, d / "exact.pt")
    meta["files"]["exact.pt"] = hashlib.sha256((d / "exact.pt").read_bytes()).hexdigest()
    (d / "meta.json").write_text(json.dumps(meta))
    refused(f"{d / 'exact.pt'}: format 'licforge-lic-weights/1', expected 'licforge-digits-model/1'")
    assert load_digits_models(d).accuracy == load_digits_models().accuracy


def test_brevitas_equals_golden_on_whole_test_split(digits_models, digits_bundle):
    _, _, xte, _ = digits_models.split
    ref, trace = brevitas_int_logits(digits_models.quantized[8], xte)
    x_int = input_to_int((xte * 16).round().long().numpy(), digits_bundle.input)
    assert np.array_equal(x_int, trace[0].int().long().numpy())
    golden = run_digits_golden(digits_bundle, x_int)
    assert golden.shape == (360, 10)
    assert int((golden != ref).sum()) == 0


@pytest.mark.parametrize("bits", [4, 6])
def test_exact_product_classifier_equality_at_low_bits(digits_models, bits):
    xtr, ytr, xte, _ = digits_models.split
    q = quantize_digits(digits_models.exact, bits, xtr, ytr, qat_epochs=3, progress=False)
    bundle = export_digits_bundle(q, xtr)
    assert bundle.layers[0].attrs["product"] == "mul"
    assert np.abs(bundle.layers[0].tensors["weight"]).max() <= (1 << (bits - 1)) - 1
    ref, _ = brevitas_int_logits(q, xte[:100])
    golden = run_digits_golden(bundle, input_to_int((xte[:100] * 16).round().long().numpy(), bundle.input))
    assert int((golden != ref).sum()) == 0


def test_golden_detects_a_changed_weight(digits_models, digits_bundle):
    _, _, xte, _ = digits_models.split
    x_int = input_to_int((xte[:50] * 16).round().long().numpy(), digits_bundle.input)
    before = run_digits_golden(digits_bundle, x_int)
    fc = digits_bundle.layer("fc")
    saved = fc.tensors["weight"].copy()
    fc.tensors["weight"][0, :] += 1
    try:
        after = run_digits_golden(digits_bundle, x_int)
    finally:
        fc.tensors["weight"] = saved
    assert (after[:, 0] != before[:, 0]).any() and np.array_equal(after[:, 1:], before[:, 1:])
