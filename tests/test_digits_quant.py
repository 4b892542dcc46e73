"""Equality 1 on the digits classifier: Brevitas fake-quant == integer golden model, exactly."""
import numpy as np
import pytest

from licforge.quant.digits import export_digits_bundle, input_to_int, quantize_digits, run_digits_golden


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
