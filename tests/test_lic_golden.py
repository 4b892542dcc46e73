"""Equality 1 for the LIC student: Brevitas fake-quant (float64) == integer golden model,
exactly, on every held-out image, for the committed bundle; and the GDN blocks alone."""
import numpy as np
import pytest
import torch

from licforge.models.data import embedded_images
from licforge.models.lic import build_lic, student_config
from licforge.quant.bundle import Bundle
from licforge.quant.codec import pad_image, prepare_entropy_coder
from licforge.quant.golden import gdn_int, igdn_int
from licforge.quant.lic import brevitas_integers, export_bundle, golden_decode, golden_forward, quantize_student
from licforge.quant.lic_layers import QuantGDN1, exp_for_range, fixed_act
from licforge.quant.lic_recipe import load_recipe


def test_committed_bundle_equals_brevitas_on_all_held_out_images(lic_bundle, lic_quant):
    m = lic_bundle.model["M"]
    assert (lic_bundle.model["N"], m) == (16, 24)
    for name, img in embedded_images("held-out").items():
        px = pad_image(img)
        lat_b, out_b = brevitas_integers(lic_quant, px)
        lat_g, out_g = golden_forward(lic_bundle, px)
        h, w = px.shape[2] // 16, px.shape[3] // 16
        assert lat_g.shape == (1, m, h, w) and out_g.shape == px.shape, name
        assert np.array_equal(lat_b, lat_g), name
        assert np.array_equal(out_b, out_g), name
        assert 0 <= out_g.min() and out_g.max() <= 255 and np.abs(lat_g).max() < 128


def test_bundle_is_the_export_of_the_committed_brevitas_model(lic_bundle, lic_quant):
    again = export_bundle(lic_quant)
    assert [l.name for l in again.layers] == [l.name for l in lic_bundle.layers]
    for a, b in zip(again.layers, lic_bundle.layers):
        assert a.op == b.op and a.attrs == b.attrs, a.name
        assert a.tensors.keys() == b.tensors.keys()
        assert all(np.array_equal(a.tensors[t], b.tensors[t]) for t in a.tensors), a.name


def test_golden_decoder_sees_a_changed_weight(lic_bundle):
    lat = np.zeros((1, lic_bundle.model["M"], 2, 2), np.int64)
    lat[0, :, 0, 0] = np.arange(lic_bundle.model["M"]) - 8
    before = golden_decode(lic_bundle, lat)
    layers = [l for l in lic_bundle.layers]
    g4 = next(l for l in layers if l.name == "g_s.4")
    w = g4.tensors["weight"].copy()
    w[:, 0] += 3
    patched = Bundle(lic_bundle.model, lic_bundle.input,
                     [type(l)(l.name, l.op, l.attrs, {**l.tensors, "weight": w}) if l is g4 else l for l in layers])
    assert (golden_decode(patched, lat) != before).any()


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("gamma_bits,norm_bits,out_bits", [(8, 12, 8), (6, 8, 10)])
def test_quant_gdn1_equals_golden_ops(inverse, gamma_bits, norm_bits, out_bits):
    from compressai.layers import GDN1

    torch.manual_seed(gamma_bits + norm_bits + inverse)
    c, x_exp = 6, -5
    gdn = GDN1(c, inverse=inverse)
    with torch.no_grad():
        gdn.gamma.copy_(gdn.gamma_reparam.init(torch.rand(c, c) * 0.4))
        gdn.beta.copy_(gdn.beta_reparam.init(torch.rand(c) + 0.05))
    x = torch.randn(3, c, 9, 7) * 3
    norm_exp = exp_for_range(6.0, norm_bits, False)
    out_exp = exp_for_range(8.0, out_bits, True)
    q = QuantGDN1(c, inverse, gamma_bits=gamma_bits, norm_bits=norm_bits, norm_exp=norm_exp, out_bits=out_bits,
                  out_exp=out_exp)
    q.load_float(gdn)
    inq = fixed_act(x_exp, 10, True)
    q.double()
    xq = inq.double()(x.double())
    y = q(xq).int().long().numpy()
    qw = q.norm_conv.quant_weight()
    gamma = qw.int().long().numpy()[:, :, 0, 0]
    g_exp = int(round(np.log2(float(qw.scale.detach()))))
    beta = q.norm_conv.bias_quant(q.norm_conv.bias, abs(xq), qw).int().long().numpy()
    assert (gamma >= 0).all() and beta.min() >= 2 ** (norm_exp - x_exp - g_exp)
    shift = (out_exp - x_exp - norm_exp) if inverse else (out_exp + norm_exp - x_exp)
    ref = (igdn_int if inverse else gdn_int)(xq.int().long().numpy(), gamma, beta, norm_shift=norm_exp - x_exp - g_exp,
                                             norm_bits=norm_bits, out_shift=shift, out_bits=out_bits)
    assert y.shape == ref.shape == (3, c, 9, 7)
    assert int((y != ref).sum()) == 0
    assert len(np.unique(ref)) > 20  # a real spread of values, not a saturated block


def test_ptq_int8_student_equals_golden():
    """Another recipe (8-bit norms) and an untrained width: export + golden == Brevitas."""
    cfg = student_config(8)
    torch.manual_seed(4)
    net = build_lic(cfg)
    train = {k: v[:256, :256] for k, v in embedded_images("train").items()}
    q, _ = quantize_student(net, cfg, load_recipe("int8"), train)
    prepare_entropy_coder(q.entropy_bottleneck)
    bundle = export_bundle(q)
    assert bundle.layer("g_a.1").attrs["norm_bits"] == 8 and bundle.layer("g_s.6").attrs["out_signed"] is False
    px = pad_image(embedded_images("held-out")["coffee"][100:180, 200:330])
    lat_b, out_b = brevitas_integers(q, px)
    lat_g, out_g = golden_forward(bundle, px)
    assert out_g.shape == (1, 3, 80, 144)
    assert np.array_equal(lat_b, lat_g) and np.array_equal(out_b, out_g)
    assert len(np.unique(out_g)) > 10


@pytest.mark.parametrize("call,message", [
    (lambda b: golden_decode(b, np.zeros((24, 4, 4), np.int64)), "latents must be (N, 24, H, W), not int64 (24, 4, 4)"),
    (lambda b: golden_decode(b, np.full((1, 24, 2, 2), 0.5)), "latents: float64 values that are not whole numbers"),
    (lambda b: golden_decode(b, np.full((1, 24, 2, 2), 128)),
     "latents: values 128..128 outside the 8-bit signed range -128..127 that the bundle takes"),
    (lambda b: golden_forward(b, np.full((1, 3, 32, 32), 256)),
     "pixels: values 256..256 outside the 8-bit unsigned range 0..255 that the bundle takes"),
    (lambda b: golden_forward(b, np.zeros((1, 3, 30, 32), np.uint8)),
     "pixels must be (N, 3, H, W) with H, W multiples of 16, not uint8 (1, 3, 30, 32)"),
])
def test_golden_model_refuses_what_the_hardware_port_would_wrap(lic_bundle, call, message):
    """The golden model's inputs are the decoder's ports: a value the port cannot hold (a latent of 128 on
    an 8-bit signed port), a fraction, another shape, is refused rather than wrapped or truncated."""
    with pytest.raises(ValueError) as e:
        call(lic_bundle)
    assert str(e.value).startswith(message)
