"""CLI of the MinConv slice: ``rtl minconv|mac``, ``sim minconv|mac``, ``synth``,
``bench minconv`` (the digits slice itself is ``flow --digits``, :mod:`flows.cmd_flow`)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from licforge.bench.minconv_lic import DECODERS, HYBRIDS, hybrid_what
from licforge.errors import UsageError, need_int, not_a_file, out_dir, seed_int
from licforge.rtl.yosys import DEFAULT_FAMILY, FAMILIES

__all__ = ["register"]


def _cmd_rtl_array(args) -> int:
    from licforge.sim.lane_array import array_config, generate_array

    cfg = array_config(args.kind, args.lanes, args.bits, args.shift, args.out_bits, args.max_beats,
                       split=getattr(args, "split_products", False))
    out = out_dir(args.out or f"{args.build}/rtl/{cfg.name}")
    sources = generate_array(cfg, out)
    print(f"{cfg.name}: {', '.join(str(s) for s in sources)}")
    return 0


def _cmd_synth(args) -> int:
    from licforge.rtl.yosys import synthesize

    sources: list[Path] = []
    for p in map(Path, args.verilog):
        if p.is_dir():
            found = sorted(p.glob("*.v"))
            if not found:
                raise UsageError(f"{p}: directory holds no .v files")
            sources += found
        elif p.is_file():
            sources.append(p)
        else:
            raise UsageError(f"{p}: {not_a_file(p)}")
    try:
        report = synthesize(sources, args.top, family=args.family, dsp=not args.no_dsp,
                            out_json=Path(args.json) if args.json else None)
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(json.dumps(report["resources"]))
    return 0


def _cmd_sim_array(args) -> int:
    from licforge.sim.lane_array import array_config, random_array_check

    cfg = array_config(args.kind, args.lanes, args.bits, args.shift, args.out_bits, args.max_beats,
                       split=getattr(args, "split_products", False))
    if not 1 <= args.beats <= cfg.max_beats:
        raise UsageError(f"--beats must be between 1 and --max-beats ({cfg.max_beats}), not {args.beats}")
    need_int(args.vectors, "--vectors", 1, 1 << 24)
    r = random_array_check(cfg, args.vectors, args.beats, args.seed, Path(args.build) / "sim" / cfg.name,
                           args.simulator)
    print(f"{cfg.name} on {r.simulator}: seed {args.seed}, {r.report['checked']} dot products, "
          f"{r.report['mismatches']} mismatches, {r.report['cycles']} cycles")
    return 0


def _bench_minconv(out: Path, build: Path, args: argparse.Namespace) -> str:
    from licforge.bench.minconv import bench_minconv

    res = bench_minconv(out / "minconv.json", build)
    return f"wrote {out / 'minconv.json'} ({len(res['arrays'])} array pairs)"


def _array_args(p: argparse.ArgumentParser, kind: str) -> None:
    p.add_argument("--lanes", type=int, default=8, help="lanes L (dot-product width per cycle)")
    p.add_argument("--bits", type=int, default=8, help="operand bit width b (2..32)")
    p.add_argument("--shift", type=int, default=None, help="requantization shift (default: b)")
    p.add_argument("--out-bits", type=int, default=None, help="output bit width (default: b)")
    p.add_argument("--max-beats", type=int, default=64, help="longest dot product, in beats")
    if kind == "mac":
        p.add_argument("--split-products", action="store_true",
                       help="each product in two pipeline stages (two half-width products, then their sum): the "
                            "better multiplier from LUTs; one cycle more latency")


def _bench_minconv_lic(out: Path, build: Path, args) -> str:
    from licforge.bench.minconv_lic import (PNR_RUNS, RUNS, decode_held_out, format_synth_table, pnr_twins,
                                            synth_twins)

    path = out / "minconv_lic_rtl.json"
    for section in args.sections:
        if section == "synth":
            runs = [r for r in RUNS if r[0] in args.decoders]
            print(format_synth_table(synth_twins(build, path, runs=runs)), flush=True)
        elif section == "pnr":
            pnr_twins(build, path, runs=[r for r in PNR_RUNS if r[0] in args.decoders])
        else:
            decode_held_out(build, path)
    return f"wrote {path}"


def register(groups: dict) -> None:
    """Add this module's subcommands to the ``licforge`` parser groups."""
    for kind, what in (("minconv", "MinConvArray (comparator lanes)"), ("mac", "MacArray (multiplier lanes)")):
        p = groups["rtl"].add_parser(kind, help=what)
        _array_args(p, kind)
        p.add_argument("--out", help="output directory (default <build>/rtl/<design>)")
        p.set_defaults(func=_cmd_rtl_array, torch=False)
        p = groups["sim"].add_parser(kind, help=f"random vectors through the {what}")
        _array_args(p, kind)
        p.add_argument("--vectors", type=int, default=1000, help="dot products to check")
        p.add_argument("--beats", type=int, default=4, help="beats per dot product")
        p.add_argument("--seed", type=seed_int, default=0)
        p.add_argument("--simulator", default="verilator", choices=("verilator", "icarus"))
        p.set_defaults(func=_cmd_sim_array, torch=False)

    syn = groups["top"].add_parser("synth", help="Yosys synth_xilinx resources as JSON")
    syn.add_argument("verilog", nargs="+", help="Verilog files or directories of them")
    syn.add_argument("--top", default="top", help="top module (default: top)")
    syn.add_argument("--family", default=DEFAULT_FAMILY, choices=FAMILIES,
                     help=f"Yosys synth_xilinx family (default {DEFAULT_FAMILY}: UltraScale+)")
    syn.add_argument("--no-dsp", action="store_true", help="map multipliers to LUTs")
    syn.add_argument("--json", help="also write the report to this file")
    syn.set_defaults(func=_cmd_synth, torch=False)

    p = groups["bench"].add_parser("minconv-lic", help="MinConv vs multiplier N=16 decoders: Yosys (xcup, ECP5, "
                                                       "-nodsp), ECP5 place and route, a held-out photo through "
                                                       "the MinConv RTL -> minconv_lic_rtl.json (hours; not in "
                                                       "bench all)")
    p.add_argument("--sections", nargs="+", default=["synth", "pnr", "decode"], choices=["synth", "pnr", "decode"],
                   help="parts to run; each updates its part of the JSON and keeps the others")
    p.add_argument("--decoders", nargs="+", default=list(DECODERS), choices=DECODERS,
                   help="decoders the synth and pnr sections build (" + "; ".join(
                       f"{h}: MinConv with {hybrid_what(h)}" for h in HYBRIDS)
                   + "); the runs of the others are kept")
    p.set_defaults(bench=_bench_minconv_lic, in_all=False)

    p = groups["bench"].add_parser("minconv", help="comparator vs multiplier lanes: Yosys resources, "
                                                   "simulated dot products -> minconv.json")
    p.set_defaults(bench=_bench_minconv)
