"""Watermarks on the committed LIC student: the key in the decoder layers, embedded during
QAT, read back exactly from the bundle; permuting the deployed LIC bundle leaves its integer
golden model unchanged and re-synchronization undoes it; the attack sweeps of the digits study
run on the LIC student, with the BER read from the attacked model's bundle."""
import numpy as np
import pytest
import torch

from licforge.quant.eval import psnr
from licforge.quant.golden import run_layers
from licforge.quant.lic import golden_forward
from licforge.watermark.extract import ber
from licforge.watermark.layers import bundle_chain, chain_weights, model_chain
from licforge.watermark.lic import DECODER_LAYERS, LICHost
from licforge.watermark.lic_study import LICStudyConfig, LICTarget, permuted_attacks
from licforge.watermark.markers import bind_marker
from licforge.watermark.permute import permute, random_permutation
from licforge.watermark.resync import fraction_restored, resynchronize
from licforge.watermark.study import attack_sweeps, ber_above_limit


@pytest.fixture(scope="module")
def host():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield LICHost(steps=3, crops=16)
    torch.set_num_threads(before)


def test_watermas_in_the_decoder_survives_4bit_deployment(host):
    key = host.key("watermas", 512, seed=1)
    assert set(key.layers) == set(DECODER_LAYERS)  # only what the decoder hardware holds
    q = host.quantize(4)
    marker = bind_marker(key, q, write=True)
    bundle = host.export(host.qat(q, marker))
    ints = chain_weights(bundle_chain(bundle))
    assert max(np.abs(ints[n]).max() for n in ("g_s.0", "g_s.2", "g_s.4")) <= 7  # 4-bit weights
    assert ber(key, ints) == 0.0
    assert 0.4 <= np.mean([ber(host.key("watermas", 512, seed=100 + k), ints) for k in range(10)]) <= 0.6


def test_permuted_lic_bundle_keeps_its_pixels_and_resyncs(lic_bundle, lic_quant):
    chain = bundle_chain(lic_bundle)
    perms = random_permutation(chain, seed=4)
    assert "g_a.6" in perms and "g_s.6" not in perms  # latent channels move too; RGB stays
    moved = permute(chain, perms)
    pixels = np.random.default_rng(0).integers(0, 256, size=(1, 3, 32, 32))
    assert np.array_equal(run_layers(moved, pixels), run_layers(chain, pixels))
    est, back = resynchronize(model_chain(lic_quant), moved)
    assert fraction_restored(est, perms) == 1.0
    # every neuron back in place with its own integers, its scale restored towards the float
    # reference's (within the quantization noise of a row's norm: under 1 % here)
    for n, w in chain_weights(chain).items():
        assert np.allclose(chain_weights(back)[n], w, rtol=0.02, atol=0)


def test_lic_attack_sweeps_read_the_bundle_of_the_attacked_student(host):
    key = host.key("watermas", 256, seed=1)
    q = host.quantize(8)
    host.qat(q, bind_marker(key, q, write=True))
    pixels = (host.attacker[:1] * 256).round().long().numpy()  # one 64x64 held-out crop

    def metric(bundle, tag):
        out = golden_forward(bundle, pixels)[1]
        return {"psnr": psnr(out, pixels)}

    cfg = LICStudyConfig(noise=(0.0, 0.25), prune=(0.0, 1.0), finetune_steps=(0, 2), quant_bits=(8,),
                         attack_qat_steps=1, perm_prune=0.0, perm_finetune_steps=1)
    target = LICTarget(host, cfg, metric, "test")
    attacks = attack_sweeps(target, q, key, cfg)
    assert {a: [r["strength"] for r in rows] for a, rows in attacks.items()} == {
        "noise": [0.0, 0.25], "prune": [0.0, 1.0], "finetune": [0, 2], "quantize": [8]}
    assert {a: [r["ber"] for r in rows] for a, rows in attacks.items()} == {
        "noise": [0.0, 0.0], "prune": [0.0, 0.5], "finetune": [0.0, 0.0], "quantize": [0.0]}
    zero = [attacks[a][0] for a in ("noise", "prune", "finetune")]
    assert zero[0]["psnr"] == zero[1]["psnr"] == zero[2]["psnr"]  # attacks work on copies of q
    # every weight pruned: the bundle's weights are all 0, every bit reads 0
    assert attacks["prune"][1]["ber"] == float(key.bits.mean()) == 0.5
    limit = ber_above_limit(attacks, {"psnr": zero[0]["psnr"]}, {"psnr": True})
    assert limit["prune"]["strength"] == 1.0
    assert limit["prune"]["psnr_loss"] == zero[0]["psnr"] - attacks["prune"][1]["psnr"] > 5.0
    perm = permuted_attacks(target, q, key, cfg)
    assert list(perm) == ["permuted_then_pruned_0.0", "finetuned_1_then_permuted"]
    assert perm["permuted_then_pruned_0.0"]["ber_with_resync"] == 0.0
    assert perm["permuted_then_pruned_0.0"]["ber_without_resync"] == 0.53125
    assert perm["permuted_then_pruned_0.0"]["psnr"] == zero[0]["psnr"]  # permutation changes no pixel
    assert all(r["neurons_restored"] == 1.0 for r in perm.values())
