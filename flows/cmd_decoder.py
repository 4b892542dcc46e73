"""CLI of the decoder slice: ``rtl gdn|decoder``, ``sim convt|gdn|decoder``, ``perf``,
``bench decoder`` (a licforge file is decoded by the RTL with ``licforge decode --rtl``, in
``flows/cmd_codec.py``).

BUNDLE is a bundle directory or ``synthetic:N:M[:SEED]`` (a random well-scaled decoder).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from licforge.bench.decoder import PNR_SEEDS
from licforge.flows.cmd_codec import image_arg
from licforge.flows.cmd_pnr import seeds_arg
from licforge.rtl.project import DEFAULT_MAX_WIDTH, DEFAULT_PART
from licforge.rtl.yosys import DEFAULT_FAMILY, FAMILIES
from licforge.errors import UsageError, need_int, out_dir, positive_float, probability, seed_int

__all__ = ["register", "chosen_parallelism"]


def chosen_parallelism(args: argparse.Namespace, layers) -> tuple[int, int]:
    """(``--pi``, ``--po``) of the command line, each defaulting to the plan's
    (:func:`rtl.plan.default_parallelism`) only when not given: a given 0 or negative value
    reaches the plan's check and is refused there by name."""
    from licforge.rtl.plan import default_parallelism

    pi, po = default_parallelism(layers)
    return (pi if args.pi is None else args.pi), (po if args.po is None else args.po)


def _cmd_rtl_decoder(args) -> int:
    from licforge.quant.bundle import decoder_layers
    from licforge.rtl.perf import format_efficiency
    from licforge.rtl.project import generate_decoder
    from licforge.quant.synthetic import load_decoder_bundle

    bundle = load_decoder_bundle(args.bundle, Path(args.build))
    pi, po = chosen_parallelism(args, decoder_layers(bundle))
    out = out_dir(args.out or f"{args.build}/rtl/decoder_{bundle.hash[:12]}_pi{pi}_po{po}")
    need_int(args.max_width, "--max-width", 1, 4096)
    man = generate_decoder(bundle, pi, po, out, max_width=args.max_width, part=args.part,
                           clock_hz=args.clock_mhz * 1e6, split_products=args.split_products)
    fig = man["model_figures"]["1080p"]
    print(f"decoder (PI={pi}, PO={po}, {fig['multipliers']} multipliers) -> {out}: "
          f"{', '.join(man['sources'])}, {len(man['roms'])} ROM files, manifest.json, vivado.tcl")
    print(f"model: 1080p {fig['cycles_steady']} cycles/frame streaming = {fig['fps']} fps at {args.clock_mhz:g} MHz "
          f"({fig['cycles']} cycles for one isolated frame), DSP efficiency "
          f"{format_efficiency(fig['dsp_efficiency_steady'])}")
    return 0


def _cmd_rtl_gdn(args) -> int:
    from licforge.quant.bundle import decoder_layers
    from licforge.rtl.emit import write_verilog
    from licforge.rtl.gdn import GdnUnit
    from licforge.quant.synthetic import load_decoder_bundle

    bundle = load_decoder_bundle(args.bundle, Path(args.build))
    pool = decoder_layers(bundle) if args.layer is None else bundle.layers
    gdns = [l for l in pool if l.op in ("igdn", "gdn") and args.layer in (None, l.name)]
    if not gdns:
        raise UsageError(f"--layer: bundle {bundle.path} has no igdn/gdn layer {args.layer or ''}")
    lay = gdns[0]
    try:
        unit = GdnUnit.for_layer(lay, pi=args.pi, po=1 if args.po is None else args.po, div_bits=args.div_bits)
    except ValueError as e:
        raise UsageError(str(e)) from None
    out = out_dir(args.out or f"{args.build}/rtl/gdn_{bundle.hash[:12]}_{lay.name}_pi{unit.pi}_po{unit.po}")
    sources = write_verilog(unit, "gdn", out)
    (out / "manifest.json").write_text(json.dumps({"design": "gdn", "top": "gdn", "bundle": str(bundle.path),
                                                   "sources": [s.name for s in sources],
                                                   "blocks": [unit.deployment()]}, indent=1))
    print(f"GdnUnit {lay.name} ({'inverse' if unit.inverse else 'forward'}, C={unit.channels}, PI={unit.pi}, "
          f"PO={unit.po}, latency {unit.latency}): "
          f"{', '.join(str(s) for s in sources)}")
    return 0


def _cmd_sim_block(args) -> int:
    from licforge.quant.synthetic import load_decoder_bundle
    from licforge.sim.decode import check_block

    bundle = load_decoder_bundle(args.bundle, Path(args.build))
    need_int(args.height, "--height", 1, 4096)
    need_int(args.width, "--width", 1, 4096)
    image = image_arg(args.image) if args.image else None
    lanes = {"pp": need_int(args.pp, "--pp", 1, 256), "pack": args.pack} if args.kind != "decoder" else {}
    r = check_block(bundle, args.kind, Path(args.build), layer=args.layer, pi=args.pi, po=args.po, height=args.height,
                    width=args.width, image=image, seed=args.seed, p_valid=args.p_valid, p_ready=args.p_ready,
                    simulator=args.simulator, split_products=args.split_products, **lanes)
    lanes_text = f", PP={r['pp']}{', packed' if r['pack'] else ''}" if lanes else ""
    lanes_text += ", split products" if r["split_products"] else ""
    print(f"{args.kind} {','.join(r['layers'])} (PI={r['pi']}, PO={r['po']}{lanes_text}) on {r['simulator']}: "
          f"seed {args.seed}, "
          f"input {r['input_shape']}, {r['checked']} outputs checked, {r['mismatches']} mismatches, "
          f"{r['cycles']} cycles")
    return 0


def _cmd_perf(args) -> int:
    from licforge.bench.decoder import design_table, format_design_table, parallelism_sweep
    from licforge.quant.bundle import decoder_layers
    from licforge.quant.synthetic import load_decoder_bundle

    bundle = load_decoder_bundle(args.bundle, Path(args.build))
    if args.pi is None and args.po is None:
        designs = parallelism_sweep(bundle)
    else:
        designs = [chosen_parallelism(args, decoder_layers(bundle))]
    if args.per_layer and not args.synth:
        raise UsageError("--per-layer: it says how --synth synthesizes; give --synth too")
    rows = design_table(bundle, designs, synth=args.synth, per_layer=args.per_layer, family=args.family,
                        clock_hz=args.clock_mhz * 1e6, build_dir=Path(args.build),
                        progress=(lambda s: print(s, flush=True)) if args.per_layer else None)
    print(format_design_table(rows))
    targets = None
    if args.pi is None and args.po is None:   # the sweep: also the planner's pixel-parallel, packed designs
        from licforge.rtl.perf import ZCU102_DSP, format_target_table, target_sweep

        targets = target_sweep(decoder_layers(bundle), dsp_budget=ZCU102_DSP, clock_hz=args.clock_mhz * 1e6)
        print(f"\nplanned for frame-rate targets within {ZCU102_DSP} DSPs (licforge plan; per layer g_s.0 ..):")
        print(format_target_table(targets))
    if args.json:
        Path(args.json).write_text(json.dumps(rows if targets is None else {"designs": rows, "targets": targets},
                                              indent=1))
    failed = [r for r in rows if r.get("synth_error")]
    for r in failed:
        print(f"Yosys failed on PI={r['pi']} PO={r['po']} ({r['verilog']}): {r['synth_error']}", file=sys.stderr)
    return 1 if failed else 0


def _bench_decoder(out: Path, build: Path, args: argparse.Namespace) -> str:
    from licforge.bench.decoder import bench_decoder

    res = bench_decoder(out / "decoder.json", build, family=args.family, sections=args.sections.split(","),
                        pnr_seeds=args.pnr_seeds)
    return f"wrote {out / 'decoder.json'} (sections {args.sections}; {len(res.get('designs', []))} designs)"


def _common(p: argparse.ArgumentParser, layer: bool = False) -> None:
    p.add_argument("bundle", help="bundle directory, or synthetic:N:M[:SEED]")
    p.add_argument("--pi", type=int, default=None,
                   help="input channels per cycle of the heaviest layer (default: largest divisor <= 8)")
    p.add_argument("--po", type=int, default=None,
                   help="output channels per cycle of the heaviest layer (default: largest divisor <= 8)")
    if layer:
        p.add_argument("--layer", default=None, help="bundle layer name (default: the first of its op)")


def _family_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--family", default=DEFAULT_FAMILY, choices=FAMILIES,
                   help=f"Yosys synth_xilinx family (default {DEFAULT_FAMILY}: UltraScale+, as the ZCU102)")


def _sim_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--simulator", default="verilator", choices=("verilator", "icarus"))


def register(groups: dict) -> None:
    """Add this module's subcommands to the ``licforge`` parser groups."""
    p = groups["rtl"].add_parser("decoder", help="the whole decoder: Verilog, ROM files, manifest, Vivado TCL")
    _common(p)
    p.add_argument("--out", help="output directory (default build/rtl/decoder_<hash>_pi<PI>_po<PO>)")
    p.add_argument("--max-width", type=int, default=DEFAULT_MAX_WIDTH,
                   help=f"widest latent grid (default {DEFAULT_MAX_WIDTH}: {16 * DEFAULT_MAX_WIDTH} pixels)")
    p.add_argument("--part", default=DEFAULT_PART, help=f"FPGA part for the Vivado project (default {DEFAULT_PART}, ZCU102)")
    p.add_argument("--clock-mhz", type=positive_float, default=200.0, help="clock constraint and fps figures (MHz)")
    p.add_argument("--split-products", action="store_true",
                   help="every multiplier in two pipeline stages (half-width products, then their sum), for a build "
                        "whose multipliers are LUTs (pnr --no-dsp, synth --no-dsp): a cycle more latency per block "
                        "that has multipliers, the same pixels")
    p.set_defaults(func=_cmd_rtl_decoder)

    p = groups["rtl"].add_parser("gdn", help="one GDN unit of a bundle: inverse (igdn) or forward (gdn, --layer g_a.1)")
    _common(p, layer=True)
    p.add_argument("--out", help="output directory")
    p.add_argument("--div-bits", type=int, default=None,
                   help="forward GDN: quotient bits per divider stage (default 2; fewer stages, longer paths)")
    p.set_defaults(func=_cmd_rtl_gdn)

    for kind, what in (("convt", "a ConvTransposeEngine"), ("gdn", "a GdnUnit"), ("decoder", "the whole decoder")):
        p = groups["sim"].add_parser(kind, help=f"random inputs with extremes through {what} vs the golden model")
        _common(p, layer=kind != "decoder")
        p.add_argument("--height", type=int, default=3, help="input grid rows")
        p.add_argument("--width", type=int, default=4, help="input grid columns")
        p.add_argument("--seed", type=seed_int, default=0)
        p.add_argument("--p-valid", type=probability, default=0.8, help="probability an input beat is offered")
        p.add_argument("--p-ready", type=probability, default=0.6,
                       help="probability the output is taken (back-pressure)")
        p.add_argument("--image", help="use the real tensors this image produces (needs a trained bundle)")
        if kind != "decoder":
            p.add_argument("--pp", type=int, default=1, help="output pixels per cycle (lanes; default 1)")
            p.add_argument("--pack", action="store_true", help="two 8-bit products per DSP48E2 where they fit")
        p.add_argument("--split-products", action="store_true",
                       help="every multiplier in two pipeline stages (the build for LUT multipliers, as rtl "
                            "decoder --split-products); refused with --pack")
        _sim_opts(p)
        p.set_defaults(func=_cmd_sim_block, kind=kind, **({"layer": None} if kind == "decoder" else {}))

    p = groups["top"].add_parser("perf", help="decoder resources (Yosys) and analytical throughput, as a table: "
                                              "one design with --pi/--po, else the sweep of bench decoder")
    _common(p)
    p.add_argument("--synth", action="store_true", help="also run Yosys synth_xilinx on each design")
    p.add_argument("--per-layer", action="store_true",
                   help="with --synth: each layer's block in a Yosys of its own, resources summed (scales to "
                        "N=64 and beyond; the whole design needs it all in one 4 GiB WebAssembly Yosys)")
    _family_arg(p)
    p.add_argument("--clock-mhz", type=positive_float, default=200.0)
    p.add_argument("--json", help="also write the rows to this file")
    p.set_defaults(func=_cmd_perf)

    p = groups["bench"].add_parser("decoder", help="decoder resources, throughput, bit-exact decodes of every "
                                                   "student -> decoder.json")
    _family_arg(p)
    p.add_argument("--sections", default="designs,synth,pnr",
                   help="comma-separated: designs (model + simulated decodes), synth (Yosys per layer, N=16..128), "
                        "pnr (N=16 on an ECP5-85F); the others' results are kept from the existing decoder.json")
    p.add_argument("--pnr-seeds", type=seeds_arg, default=PNR_SEEDS,
                   help=f"placement seeds of the pnr section (default {','.join(map(str, PNR_SEEDS))})")
    p.set_defaults(bench=_bench_decoder)
