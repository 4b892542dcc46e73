"""CLI of the watermark slice: ``watermark embed | deploy | extract | verify | attack`` and
``bench watermark``.  embed / deploy / attack work on the digits classifier; extract and verify
read any bundle or memory-init directory (digits weight ROMs, LIC decoder) or model file; the
benchmark runs the digits study (:mod:`watermark.study`), the LIC study
(:mod:`watermark.lic_study`) and the informed-attacker studies (:mod:`watermark.adversary`,
:mod:`watermark.lic_adversary`).

    licforge watermark embed   --scheme watermas --payload 64 --out build/wm
    licforge watermark deploy  build/wm/model.pt --key build/wm/key.json --bits 4 \\
                               --out build/wm/b4 --verilog build/wm/b4_rtl
    licforge watermark extract build/wm/b4_rtl --key build/wm/key.json --max-ber 0
    licforge watermark attack  build/wm/b4 --attack permute --out build/wm/b4_perm
    licforge watermark extract build/wm/b4_perm --key build/wm/key.json \\
                               --reference build/wm/model.pt --max-ber 0
    licforge watermark verify  build/wm/key.json build/wm/b4_perm --reference build/wm/model.pt
    licforge bench watermark   [--hosts digits,lic] [--products mul,min] [--quick]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from licforge.errors import (CheckFailed, UsageError, finite_float, need_dir, need_file, need_int, out_dir, out_file,
                            positive_float, seed_int)

__all__ = ["register"]

ATTACKS = ("noise", "prune", "finetune", "quantize", "permute")


def _key(path: str):
    from licforge.watermark.keys import KeyFileError, load_key

    try:
        return load_key(Path(path))
    except KeyFileError as e:
        raise UsageError(str(e)) from None


def _model(path: str):
    from licforge.models.digits import load_digits_model

    try:
        return load_digits_model(need_file(path, "model file"))
    except ValueError as e:
        raise UsageError(str(e)) from None


def _bundle(path: str, digits: bool = True):
    from licforge.quant.bundle import read_bundle

    b = read_bundle(need_dir(path, "bundle directory"))
    if digits and b.model.get("arch") != "digits":
        raise UsageError(f"bundle {path}: architecture {b.model.get('arch')!r}; the watermark commands "
                         f"deploy and attack the digits classifier (arch 'digits')")
    return b


def _host(args):
    """The digits host (torch threads: the global ``--threads``, 1 by default: the classifier is
    tiny, more threads only contend)."""
    from licforge.watermark.digits import DigitsHost

    return DigitsHost(seed=args.seed, qat_epochs=getattr(args, "qat_epochs", 5), progress=True)


def _cmd_embed(args) -> int:
    import copy

    from licforge.models.digits import save_digits_model
    from licforge.watermark.markers import MarkerParams
    from licforge.watermark.extract import ber
    from licforge.watermark.keys import save_key
    from licforge.watermark.layers import chain_weights, model_chain

    need_int(args.payload, "--payload", 1, 1 << 20)
    need_int(args.repeat, "--repeat", 1, 64)
    need_int(args.min_bits, "--min-bits", 2, 16)
    if args.repeat > 1 and args.scheme != "watermas":
        raise UsageError(f"--repeat {args.repeat}: a repetition code is for --scheme watermas only; drop --repeat")
    out = out_dir(args.out) if args.out else Path(args.build) / "watermark"
    key_file = out_file(args.key, "--key") if args.key else out / "key.json"
    host = _host(args)
    base = host.train_base(args.product)
    params = MarkerParams(watermas_lam=args.lam if args.lam is not None else MarkerParams.watermas_lam,
                          uchida_lam=args.lam if args.lam is not None else MarkerParams.uchida_lam,
                          min_bits=args.min_bits, watermas_repeat=args.repeat)
    layers = args.layers.split(",") if args.layers else None
    try:
        net, key = host.embed(base, args.scheme, args.payload, args.key_seed, params=params, layers=layers)
    except ValueError as e:
        raise UsageError(f"--payload/--layers: {e}") from None
    control = host.continue_training(copy.deepcopy(base), None)
    key_path = save_key(key, key_file)
    model_path = save_digits_model(net, out / "model.pt")
    print(f"{args.scheme}: {key.payload} bits in layers {sorted(key.layers)}; key {key_path} (keep it "
          f"secret, apart from the model); model {model_path}")
    print(f"accuracy marked {host.accuracy(net):.2%}, unmarked control {host.accuracy(control):.2%}; "
          f"BER on the float weights {ber(key, chain_weights(model_chain(net))):.3f}")
    return 0


def _cmd_deploy(args) -> int:
    from licforge.watermark.deployed import memory_weights
    from licforge.quant.bundle import write_bundle
    from licforge.watermark.extract import ber
    from licforge.watermark.layers import bundle_chain, chain_weights

    need_int(args.bits, "--bits", 2, 16)
    need_int(args.qat_epochs, "--qat-epochs", 0, 10 ** 4)
    out = out_dir(args.out)
    if args.verilog:
        out_dir(args.verilog, "--verilog")
        need_int(args.lanes, "--lanes", 1, 256)
    key, net = _key(args.key), _model(args.model)
    host = _host(args)
    try:
        bundle = host.deploy(net, args.bits, key)
    except ValueError as e:
        raise UsageError(f"--model/--key: {e}") from None
    write_bundle(bundle, out)
    line = f"bundle {args.out}: {args.bits}-bit, golden accuracy {host.bundle_accuracy(bundle):.2%}, " \
           f"BER from the bundle integers {ber(key, chain_weights(bundle_chain(bundle))):.3f}"
    if args.verilog:
        line += f", from the memory init files in {args.verilog} " \
                f"{ber(key, memory_weights(bundle, Path(args.verilog), args.lanes)):.3f}"
    print(line)
    return 0


def _source(path: str, verilog: bool) -> str:
    """What the positional SOURCE is: ``"model"`` (a file), ``"bundle"`` (a directory with a
    bundle manifest, or any directory when ``verilog`` is False) or ``"verilog"`` (another
    directory: memory init files beside generated Verilog); UsageError naming it if absent."""
    from licforge.quant.bundle import MANIFEST

    p = Path(path)
    if p.is_file():
        return "model"
    if p.is_dir():
        return "bundle" if (p / MANIFEST).is_file() or not verilog else "verilog"
    expected = "a bundle directory, a Verilog directory of memory init files or a model file" if verilog else \
        "a model file or a bundle directory"
    raise UsageError(f"SOURCE {p}: not found ({expected})")


def _cmd_extract(args) -> int:
    from licforge.watermark.deployed import verilog_weights
    from licforge.watermark.extract import bit_error_rate, extract_bits
    from licforge.watermark.layers import bundle_chain, chain_weights, model_chain

    key = _key(args.key)
    kind = _source(args.source, verilog=True)
    if kind == "verilog":
        if args.reference:
            raise UsageError("--reference re-synchronizes a bundle or a model file (the layer graph is needed), "
                             "not a Verilog directory")
        weights = verilog_weights(args.source)
    else:
        chain = (bundle_chain(_bundle(args.source, digits=False)) if kind == "bundle"
                 else model_chain(_model(args.source)))
        if args.reference:
            import numpy as np

            from licforge.watermark.resync import resynchronize
            try:
                est, chain = resynchronize(_reference(args.reference), chain)
            except ValueError as e:
                raise UsageError(f"--reference: {e}") from None
            moved = sum(int((p != np.arange(len(p))).sum()) for p in est.values())
            print(f"re-synchronized against {args.reference}: {moved} of {sum(len(p) for p in est.values())} "
                  f"neurons were out of place")
        weights = chain_weights(chain)
    try:
        bits = extract_bits(key, weights)
    except ValueError as e:
        raise UsageError(str(e)) from None
    rate = bit_error_rate(key, bits)
    print(f"{key.scheme} watermark, {key.payload} bits: BER {rate:.4f} ({int(round(rate * key.payload))} "
          f"bit errors); read: {''.join(map(str, bits[:64]))}{'...' if key.payload > 64 else ''}")
    if args.max_ber is not None and rate > args.max_ber:
        raise CheckFailed(f"BER {rate:.4f} is above --max-ber {args.max_ber}")
    return 0


def _reference(path: str):
    """The owner's reference as layers: a digits model file (``watermark embed``) or a quantized
    LIC student (``.quant.pt`` beside a bundle of ``licforge quantize`` / the flow)."""
    from licforge.models.lic import CheckpointError
    from licforge.watermark.layers import model_chain

    try:
        return model_chain(_model(path))
    except UsageError as digits_error:
        from licforge.quant.lic import load_quantized

        try:
            return model_chain(load_quantized(path)[0])
        except CheckpointError:
            raise digits_error from None


def _suspect(args, kind: str, reference):
    """The suspect's layers (a bundle's, a model file's, or memory init files' weights laid on the
    reference's layer graph), or, for memory init files without a reference, their weights."""
    from licforge.watermark.deployed import verilog_weights
    from licforge.watermark.layers import bundle_chain, chain_from_weights, model_chain

    if kind == "bundle":
        return bundle_chain(_bundle(args.source, digits=False))
    if kind == "model":
        return model_chain(_model(args.source))
    weights = verilog_weights(args.source)
    if reference is None:
        return weights
    try:
        return chain_from_weights(weights, reference)
    except ValueError as e:
        raise UsageError(f"SOURCE {args.source}: {e}; re-synchronize the bundle instead") from None


def _suspect_bits(args, kind: str, suspect) -> int | None:
    """Weight bit width of the suspect (what the null models are deployed at; None: float): a
    bundle's, the weight ROMs' manifest's, or, for other memory init files, the narrowest signed
    width holding the largest integer (power-of-two scales put it in the top binade)."""
    from licforge.watermark.deployed import verilog_bits

    if kind == "bundle":
        b = _bundle(args.source, digits=False)
        if "bits" in b.model:
            return int(b.model["bits"])
        return max(int(l.attrs["w_bits"]) for l in b.layers if "w_bits" in l.attrs)
    if kind == "model":
        return None
    weights = suspect if isinstance(suspect, dict) else {l.name: l.tensors["weight"] for l in suspect
                                                         if "weight" in l.tensors}
    return verilog_bits(args.source) or max(int(abs(w).max()).bit_length() + 1 for w in weights.values())


def _calibrate(args, key, reference, kind: str, suspect):
    """The calibration of ``key`` for this reading: ``--calibration FILE``, or made now on null
    models (digits by default; LIC students only with an explicit ``--nulls``); returns it and where it is."""
    from licforge.watermark.layers import chain_weights
    from licforge.watermark.verify import Calibration, key_fingerprint, weights_fingerprint

    mode = "direct" if reference is None else "resync"
    if args.calibration:
        try:
            cal = Calibration.load(need_file(args.calibration, "calibration file"))
        except ValueError as e:
            raise UsageError(str(e)) from None
        ref = None if reference is None else weights_fingerprint(chain_weights(reference))
        if (cal.key, cal.mode, cal.reference) != (key_fingerprint(key), mode, ref):
            raise UsageError(f"--calibration {args.calibration}: made for key {cal.key}, {cal.mode} reading "
                             f"(reference {cal.reference}); this is key {key_fingerprint(key)}, {mode} reading "
                             f"(reference {ref}): calibrate again without --calibration")
        return cal, args.calibration
    cache = Path(args.build) / "watermark" / "nulls"
    bits = _suspect_bits(args, kind, suspect)
    arch = key.model.get("arch")
    if arch == "digits":
        from licforge.watermark.nulls import digits_calibration

        return digits_calibration(key, reference, _host(args), bits, count=args.nulls or 30,
                                  heldout=30 if args.heldout is None else args.heldout, alpha=args.alpha, cache=cache)
    if arch == "lic" and args.nulls:
        from licforge.watermark.lic import DEFAULT_STUDENT, LICHost
        from licforge.watermark.nulls import lic_calibration

        student = DEFAULT_STUDENT.parent / key.model.get("student", DEFAULT_STUDENT.name)
        if not student.is_file() or bits is None:
            raise UsageError(f"key {args.key}: its student {student.name} is not in {student.parent} (the null "
                             f"students copy its architecture); pass --calibration FILE")
        return lic_calibration(key, reference, LICHost(weights=student, seed=args.seed), bits, count=args.nulls,
                               heldout=args.heldout or 0, alpha=args.alpha, cache=cache)
    raise UsageError(f"key {args.key}: a {arch!r} key is calibrated on null students that take minutes each: "
                     f"pass --nulls N (and --heldout M), or --calibration FILE")


def _cmd_verify(args) -> int:
    import json
    import math

    from licforge.watermark.layers import chain_weights
    from licforge.watermark.verify import decide, read_direct, read_resync

    key = _key(args.key)
    kind = _source(args.source, verilog=True)
    if args.nulls is not None:
        need_int(args.nulls, "--nulls", 2, 10000)
    if args.heldout is not None:
        need_int(args.heldout, "--heldout", 0, 10000)
    if not 0 < args.alpha < 1:
        raise UsageError(f"--alpha must be in (0, 1), not {args.alpha}")
    reference = _reference(args.reference) if args.reference else None
    suspect = _suspect(args, kind, reference)
    try:
        bits = (read_direct(key, suspect if isinstance(suspect, dict) else chain_weights(suspect)) if reference is None
                else read_resync(key, reference, suspect)[0])
    except ValueError as e:
        raise UsageError(str(e)) from None
    cal, where = _calibrate(args, key, reference, kind, suspect)
    v = decide(key, bits, cal)
    fpr = cal.false_positive_rate
    print(f"{key.scheme} watermark, {key.payload} bits, read {'after re-synchronization' if reference else 'directly'}"
          f": {v['matched']} matched, BER {v['ber']:.4f}")
    print(f"binomial p-value {v['p_binomial']:.3g} (log10 {v['log10_p_binomial']:.2f}): the chance of "
          f">= {v['matched']} matches if every bit were a fair coin")
    print(f"threshold {cal.threshold} matches, calibrated on {len(cal.null_matches)} unmarked null models "
          f"(alpha {cal.alpha:g}; null matches {min(cal.null_matches)}..{max(cal.null_matches)}"
          + (f"; held-out false positives {round(fpr * len(cal.heldout_matches))} of {len(cal.heldout_matches)}"
             if fpr is not None else "") + f"): {where}")
    print(f"null-law tail at {v['matched']}: {10 ** v['log10_p_null']:.3g} (log10 {v['log10_p_null']:.2f})")
    print(f"verdict: watermark {'PRESENT' if v['present'] else 'ABSENT'}")
    if args.json:
        doc = {**v, "source": str(args.source), "key": str(args.key), "calibration": cal.to_dict()}
        doc = {k: (None if isinstance(x, float) and not math.isfinite(x) else x) for k, x in doc.items()}
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    if not v["present"]:
        raise CheckFailed(f"watermark absent: {v['matched']} of {key.payload} bits matched, threshold {cal.threshold}")
    return 0


def _cmd_attack(args) -> int:
    from licforge.quant.bundle import Bundle, write_bundle
    from licforge.watermark.attacks import gaussian_noise, magnitude_prune
    from licforge.models.digits import save_digits_model
    from licforge.watermark.extract import ber
    from licforge.watermark.layers import bundle_chain, chain_weights, load_chain_weights, model_chain
    from licforge.watermark.permute import permute, permute_model, random_permutation
    from licforge.models.training import classifier_loss, train

    kind = _source(args.source, verilog=False)
    if kind == "bundle" and args.attack != "permute":
        raise UsageError(f"--attack {args.attack} works on a float model file; a bundle directory can be permuted")
    out = out_dir(args.out) if kind == "bundle" or args.attack == "quantize" else out_file(args.out)
    key = _key(args.key) if args.key else None
    host = _host(args)
    if kind == "bundle":
        b = _bundle(args.source)
        chain = permute(bundle_chain(b), random_permutation(bundle_chain(b), args.seed))
        write_bundle(Bundle(b.model, b.input, chain), out)
        print(f"permuted bundle {out}: golden accuracy {host.bundle_accuracy(b):.2%} before, "
              f"{host.bundle_accuracy(Bundle(b.model, b.input, chain)):.2%} after", end="")
        print(f"; BER {ber(key, chain_weights(chain)):.3f}" if key else "")
        return 0
    net = _model(args.source)
    s = args.strength

    def whole(what: str, low: int, high: int) -> int:  # a count given as --strength: not truncated silently
        if s != int(s):
            raise UsageError(f"--strength ({what}) must be a whole number, not {s:g}")
        return need_int(int(s), f"--strength ({what})", low, high)

    if args.attack == "noise":
        if s < 0:
            raise UsageError(f"--strength (noise sigma) must be >= 0, not {s:g}")
        load_chain_weights(net, gaussian_noise(chain_weights(model_chain(net)), s, args.seed))
    elif args.attack == "prune":
        if not 0 <= s <= 1:
            raise UsageError(f"--strength (pruning rate) must be in [0, 1], not {s}")
        load_chain_weights(net, magnitude_prune(chain_weights(model_chain(net)), s))
    elif args.attack == "finetune":
        train(net, classifier_loss, host.attacker, steps=whole("fine-tuning steps", 0, 1 << 20), lr=1e-3,
              seed=args.seed, cosine=False)
    elif args.attack == "permute":
        permute_model(net, random_permutation(model_chain(net), args.seed))
    else:
        bits = whole("bits", 2, 16)
        bundle = host.deploy(net, bits, None, epochs=10, data=host.attacker)
        write_bundle(bundle, out)
        print(f"quantized bundle {out}: {bits}-bit, golden accuracy {host.bundle_accuracy(bundle):.2%}", end="")
        print(f"; BER {ber(key, chain_weights(bundle_chain(bundle))):.3f}" if key else "")
        return 0
    save_digits_model(net, out)
    print(f"attacked model {out} ({args.attack} {s}): accuracy {host.accuracy(net):.2%}", end="")
    print(f"; BER {ber(key, chain_weights(model_chain(net))):.3f}" if key else "")
    return 0


def _bench_watermark(out: Path, build: Path, args: argparse.Namespace) -> str:
    """``licforge bench watermark``: the digits and/or LIC studies -> ``OUT/watermark.json``,
    ``OUT/watermark_adversary.json`` + PNGs."""
    from licforge.bench.watermark import STUDIES, watermark_study

    hosts, products = tuple(args.hosts.split(",")), tuple(args.products.split(","))
    studies = tuple(args.studies.split(","))
    for h in hosts:
        if h not in ("digits", "lic"):
            raise UsageError(f"--hosts: {h!r} is not 'digits' or 'lic'")
    for p in products:
        if p not in ("mul", "min"):
            raise UsageError(f"--products: {p!r} is not 'mul' or 'min'")
    for s in studies:
        if s not in STUDIES:
            raise UsageError(f"--studies: {s!r} is not one of {', '.join(STUDIES)}")
    res = watermark_study(out / "watermark.json", build, args.quick, hosts, products, studies)
    files = {"removal": "watermark.json", "adversary": "watermark_adversary.json"}
    return "wrote " + ", ".join(str(out / files[s]) for s in res)


def register(groups: dict) -> None:
    """Add ``watermark embed|deploy|extract|verify|attack`` and ``bench watermark`` to the ``licforge`` parser."""
    g = groups["watermark"]

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--seed", type=seed_int, default=0, help="data split and training seed (default 0)")

    p = g.add_parser("embed", help="train the digits classifier with a watermark; write model + key file")
    p.add_argument("--scheme", choices=("watermas", "uchida"), default="watermas")
    p.add_argument("--payload", type=int, default=64, help="watermark bits (default 64)")
    p.add_argument("--product", choices=("mul", "min"), default="mul", help="exact CNN or MinConv")
    p.add_argument("--key-seed", type=seed_int, default=1, help="seed of the key (positions, bits, matrix)")
    p.add_argument("--layers", help="comma-separated layers the key may use (default: all)")
    p.add_argument("--lam", type=positive_float, help="embedding strength (default: WaterMAS 1.0, Uchida 0.1)")
    p.add_argument("--min-bits", type=int, default=4, help="coarsest deployment bit width (WaterMAS floor)")
    p.add_argument("--repeat", type=int, default=1, help="WaterMAS weights per bit, read by a soft majority "
                   "(default 1; 3 survives obfuscation + pruning, see README)")
    p.add_argument("--out", default=None, help="directory for model.pt (and key.json) (default <build>/watermark)")
    p.add_argument("--key", help="key file (default OUT/key.json)")
    common(p)
    p.set_defaults(func=_cmd_embed)

    p = g.add_parser("deploy", help="QAT with the key preserved -> bundle (+ weight-ROM Verilog)")
    p.add_argument("model", metavar="MODEL", help="watermarked float model file (model.pt of watermark embed)")
    p.add_argument("--key", required=True, help="key file")
    p.add_argument("--bits", type=int, default=8)
    p.add_argument("--qat-epochs", type=int, default=5)
    p.add_argument("--out", required=True, help="bundle directory")
    p.add_argument("--verilog", help="also write weight ROMs (Verilog + $readmemh files) here")
    p.add_argument("--lanes", type=int, default=8, help="weights per ROM word (LaneArray lanes)")
    common(p)
    p.set_defaults(func=_cmd_deploy)

    p = g.add_parser("extract", help="read the watermark back and report the BER")
    p.add_argument("source", metavar="SOURCE", help="a bundle directory, a directory of memory init files "
                                                    "beside the generated Verilog, or a float model file")
    p.add_argument("--key", required=True, help="key file")
    p.add_argument("--reference", help="owner's float model: re-synchronize permuted neurons first")
    p.add_argument("--max-ber", type=finite_float, help="exit 1 if the BER is above this")
    p.set_defaults(func=_cmd_extract)

    p = g.add_parser("verify", help="matched bits, binomial p-value and a verdict against a threshold calibrated "
                                    "on unmarked null models")
    p.add_argument("key", metavar="KEY", help="key file")
    p.add_argument("source", metavar="SOURCE", help="a bundle directory, a directory of memory init files "
                                                    "beside the generated Verilog, or a float model file")
    p.add_argument("--reference", help="owner's model (digits model file, or an LIC student's .quant.pt): "
                                       "re-synchronize first (permutation, sign, scale, split and dummy neurons)")
    p.add_argument("--calibration", help="calibration file (JSON); default: calibrated now on digits null models "
                                         "(cached under <build>/watermark)")
    p.add_argument("--nulls", type=int, help="null models the threshold is fitted on (digits: default 30; an "
                                              "LIC key needs it: each null student trains for minutes)")
    p.add_argument("--heldout", type=int, help="null models held out to measure the false-positive rate "
                                               "(digits: default 30; LIC: 0)")
    p.add_argument("--alpha", type=finite_float, default=0.01, help="false-positive rate of the threshold on the "
                                                             "fitted null law (default 0.01)")
    p.add_argument("--json", help="write the verdict and calibration as JSON")
    common(p)
    p.set_defaults(func=_cmd_verify)

    p = g.add_parser("attack", help="attack a model (or permute a bundle) without the key")
    p.add_argument("source", metavar="SOURCE", help="a float model file, or a bundle directory (permute only)")
    p.add_argument("--attack", choices=ATTACKS, required=True)
    p.add_argument("--strength", type=finite_float, default=0.0,
                   help="noise sigma (x layer std) | pruning rate | fine-tuning steps | bits")
    p.add_argument("--out", required=True, help="attacked model file (bundle directory for quantize or a bundle)")
    p.add_argument("--key", help="report the BER with this key")
    common(p)
    p.set_defaults(func=_cmd_attack)

    p = groups["bench"].add_parser("watermark", help="the digits and LIC watermark studies -> watermark.json + PNGs")
    p.add_argument("--hosts", default="digits,lic", help="digits classifier, LIC student or both")
    p.add_argument("--products", default="mul,min", help="mul (exact CNN), min (MinConv) or both")
    p.add_argument("--studies", default="removal,adversary",
                   help="removal (noise, pruning, fine-tuning, quantization, permutation) and/or adversary "
                        "(obfuscation, intercepted key, calibrated verdicts)")
    p.add_argument("--quick", action="store_true", help="one payload, short sweeps (a smoke run)")
    p.set_defaults(bench=_bench_watermark)
