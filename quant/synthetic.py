"""Random but well-scaled decoder bundles, for hardware tests of any width without training.

The layer chain and number formats are exactly those of a quantized factorized-prior
synthesis transform (``conv_transpose2d`` 5x5/2, ``igdn``, ... , RGB out): latents are signed
integers (exp 0), the output is unsigned 8-bit pixels (exp -8, pixel = integer).  Weights
are random; each layer's output exponent is calibrated on a random latent so that its
activations use their range without saturating wholesale (the 99.9th percentile lands near
full scale).  Trained bundles come from :mod:`quant.lic`; these serve block tests, extreme
values and widths nobody trained.

``product="min"`` builds the multiplier-free decoder of issue 15 (contract_15): signed
minimums in every ``conv_transpose2d`` (``x_shift``/``w_shift`` bring both operands of a min to
the same magnitude range: the first layer's small latents are shifted up, one layer's
half-range weights too, so both shift paths are exercised), the inverse GDN's norm in min
form (``norm_product="min"``) and its output a shift by the norm rounded to a power of two
(``out_product="shift"``), or the exact product (``gdn_out="mul"``).  ``mul_layers`` keeps the
listed convolutions of a ``min`` decoder as multiplier layers (the hybrid of
:class:`models.lic.LICConfig`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from licforge.errors import UsageError

from .bundle import Bundle, Layer, read_bundle, write_bundle
from .fixed import accumulator_bits, bits_for_range
from .golden import conv_transpose2d_int, gdn_norm_int, pow2_round, run_layer

__all__ = ["random_decoder_bundle", "load_decoder_bundle"]


def _calibrated_shift(acc: np.ndarray, bits: int) -> int:
    top = float(np.quantile(np.abs(acc), 0.999)) if acc.size else 1.0
    return max(0, int(np.ceil(np.log2(max(top, 1.0) / ((1 << (bits - 1)) - 1)))))


def random_decoder_bundle(n: int, m: int, *, seed: int = 0, w_bits: int = 8, act_bits: int = 8,
                          latent_bits: int = 8, gamma_bits: int = 8, norm_bits: int = 8,
                          latent_hw: tuple[int, int] = (4, 4), product: str = "mul",
                          mul_layers: tuple[str, ...] = (), gdn_out: str = "shift") -> Bundle:
    """A decoder bundle (4 transposed convolutions, 3 inverse GDNs) with random integers;
    ``product``: ``"mul"`` (multipliers) or ``"min"`` (MinConv decoder, module doc), whose
    convolutions named in ``mul_layers`` keep multipliers and whose inverse GDNs' output is a
    shift (``gdn_out="shift"``) or the exact product (``"mul"``)."""
    if product not in ("mul", "min"):
        raise ValueError(f"random_decoder_bundle: product must be 'mul' or 'min', not {product!r}")
    if gdn_out not in ("shift", "mul"):
        raise ValueError(f"random_decoder_bundle: gdn_out (of a 'min' decoder) must be 'shift' or 'mul', "
                         f"not {gdn_out!r}")
    convs = tuple(f"g_s.{2 * k}" for k in range(4))  # models.lic.SYNTH_CONVS (this module is torch-free)
    if mul_layers and (product != "min" or not set(mul_layers) <= set(convs)):
        raise ValueError(f"random_decoder_bundle: mul_layers are convolutions of a 'min' decoder, not {mul_layers}")
    gdn_mins = product == "min"
    rng = np.random.default_rng(seed)
    wmax = (1 << (w_bits - 1)) - 1
    x = rng.integers(-(1 << (latent_bits - 1)) // 4, (1 << (latent_bits - 1)) // 4,
                     size=(1, m, *latent_hw)).astype(np.int64)
    x_exp = 0
    layers: list[Layer] = []
    chans = [m, n, n, n, 3]
    for k in range(4):
        cin, cout = chans[k], chans[k + 1]
        mins = gdn_mins and convs[k] not in mul_layers   # this convolution's product
        x_bits = act_bits if k else latent_bits
        # min: latents (a quarter of their range) shifted up by 2; layer 2's weights half-range, shifted by 1
        x_shift, w_shift = (2 if k == 0 else 0, 1 if k == 2 else 0) if mins else (0, 0)
        w = rng.integers(-(wmax >> w_shift), (wmax >> w_shift) + 1, size=(cin, cout, 5, 5))
        bias = rng.integers(-(1 << 12), 1 << 12, size=cout)
        last = k == 3
        out_bits = 8 if last else act_bits
        conv_product = "min" if mins else "mul"
        acc = conv_transpose2d_int(x, w, 2, 2, 1, conv_product, x_shift, w_shift) + bias[None, :, None, None]
        shift = _calibrated_shift(acc, out_bits)
        if last:  # pixels: exp -8, unsigned; centre the random output on mid-grey
            shift += 1
            bias = bias + (128 << shift)
            out_exp = -8
            acc_exp = out_exp - shift
        else:
            acc_exp = x_exp - x_shift if mins else x_exp - (w_bits - 1)
            out_exp = acc_exp + shift
        # mul: acc = x + w exponents; min: both operands at 2**(x_exp - x_shift) = 2**(w_exp - w_shift),
        # the accumulator 2**log2_gain finer (the MinConv weight gain)
        gain = x_exp - x_shift - acc_exp if mins else 0
        w_exp = x_exp - x_shift + w_shift if mins else acc_exp - x_exp
        b_bits = bits_for_range(int(bias.min()), int(bias.max()))
        term_bits = max(x_bits + x_shift, w_bits + w_shift) if mins else act_bits + w_bits - 1
        attrs = {"x_exp": x_exp, "w_exp": w_exp, "acc_exp": acc_exp, "out_exp": out_exp,
                 "shift": out_exp - acc_exp, "x_bits": x_bits,
                 "w_bits": w_bits, "b_bits": b_bits, "out_bits": out_bits,
                 "out_signed": not last, "relu": False, "product": conv_product,
                 "acc_bits": accumulator_bits(1 << (term_bits - 1), cin * 9, 1 << (b_bits - 1)),
                 "stride": 2, "padding": 2, "output_padding": 1}
        if mins:
            attrs.update(x_shift=x_shift, w_shift=w_shift, log2_gain=gain)
        conv = Layer(convs[k], "conv_transpose2d", attrs, {"weight": w, "bias": bias})
        layers.append(conv)
        x, x_exp = run_layer(conv, x), out_exp
        if last:
            break
        gmax = (1 << (gamma_bits - 1)) - 1
        gamma = np.where(rng.random((cout, cout)) < 0.3, rng.integers(0, gmax + 1, (cout, cout)), 0)
        gamma[np.diag_indices(cout)] = rng.integers(gmax // 2, gmax + 1, cout)
        xa = np.abs(x).reshape(cout, -1)
        if gdn_mins:  # sum_j min(|x_j|, gamma_ij): |x| and gamma both up to ~2**(bits-1), no shift
            load = float(np.mean(np.minimum(xa[None], gamma[:, :, None]).sum(1).max(0))) + 1.0
        else:
            load = float(np.mean((gamma @ xa).max(0))) + 1.0
        norm_acc_exp = -int(round(np.log2(load)))  # the norm's sum ~ 1 on average
        gamma_exp = x_exp if gdn_mins else norm_acc_exp - x_exp  # min: gamma at the scale of |x|
        norm_exp = -(norm_bits - 2)  # norms in [0, 4)
        beta = np.full(cout, 1 << -norm_acc_exp, dtype=np.int64)  # beta = 1.0
        beta_bits = accumulator_bits(int(beta.max()), 1)
        attrs = {"x_exp": x_exp, "x_bits": act_bits, "gamma_exp": gamma_exp, "gamma_bits": gamma_bits,
                 "beta_bits": beta_bits, "norm_acc_exp": norm_acc_exp, "norm_exp": norm_exp,
                 "norm_bits": norm_bits, "norm_shift": norm_exp - norm_acc_exp, "out_bits": act_bits}
        if gdn_mins:
            attrs.update(norm_product="min", norm_x_shift=0, norm_g_shift=0, out_product=gdn_out,
                         log2_gain=x_exp - norm_acc_exp)
        nrm = gdn_norm_int(x, gamma, beta, attrs["norm_shift"], norm_bits, attrs.get("norm_product", "mul"))
        if attrs.get("out_product") == "shift":  # the output multiplies by the power of two nearest the norm
            e = pow2_round(nrm)
            nrm = np.where(e >= 0, np.int64(1) << np.maximum(e, 0), 0)
        out_shift = _calibrated_shift(x * nrm, act_bits)
        attrs.update(out_exp=x_exp + norm_exp + out_shift, out_shift=out_shift)
        lay = Layer(f"g_s.{2 * k + 1}", "igdn", attrs, {"gamma": gamma.astype(np.int64), "beta": beta})
        layers.append(lay)
        x, x_exp = run_layer(lay, x), lay.attrs["out_exp"]
    model = {"arch": "synthetic-factorized-decoder", "N": n, "M": m, "seed": seed, "product": product}
    if mul_layers:
        model["mul_layers"] = sorted(mul_layers)
    inp = {"exp": 0, "bits": latent_bits, "signed": True, "shape": [m, None, None]}
    return Bundle(model, inp, layers)


def load_decoder_bundle(spec: str, build_dir: Path) -> Bundle:
    """A bundle directory, or ``synthetic:N:M[:SEED[:PRODUCT]]`` for a random well-scaled decoder
    bundle (:func:`random_decoder_bundle`, PRODUCT ``mul`` or ``min``, written once under
    ``build_dir/bundles``)."""
    if spec.startswith("synthetic:"):
        parts = spec.split(":")[1:]
        product = parts[3] if len(parts) == 4 else "mul"
        try:
            n, m, seed = (int(v) for v in (parts + ["0"])[:3])
            if (len(parts) not in (2, 3, 4) or min(n, m) < 1 or max(n, m) > 1024 or seed < 0
                    or product not in ("mul", "min")):
                raise ValueError
        except ValueError:
            raise UsageError(f"bundle {spec!r}: write synthetic:N:M, synthetic:N:M:SEED or synthetic:N:M:SEED:min "
                             f"(N, M from 1 to 1024, SEED >= 0; product mul or min)") from None
        out = Path(build_dir) / "bundles" / f"synthetic_N{n}_M{m}_s{seed}{'_min' if product == 'min' else ''}"
        if not (out / "bundle.json").is_file():
            write_bundle(random_decoder_bundle(n, m, seed=seed, product=product), out)
        return read_bundle(out)
    path = Path(spec)
    if not path.exists():
        raise UsageError(f"bundle {spec}: not found (a bundle directory, or synthetic:N:M)")
    return read_bundle(path)
