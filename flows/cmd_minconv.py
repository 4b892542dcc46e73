"""CLI of the MinConv slice: ``rtl minconv|mac``, ``sim minconv|mac``, ``synth``, ``demo``,
``bench minconv``."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from licforge.errors import UsageError

__all__ = ["register", "BENCHES"]


def _cmd_rtl_array(args) -> int:
    from licforge.sim.lane_array import array_config, generate_array

    cfg = array_config(args.kind, args.lanes, args.bits, args.shift, args.out_bits, args.max_beats)
    out = Path(args.out or f"{args.build}/rtl/{cfg.name}")
    sources = generate_array(cfg, out)
    print(f"{cfg.name}: {', '.join(str(s) for s in sources)}")
    return 0


def _cmd_synth(args) -> int:
    from licforge.rtl.yosys import FAMILIES, synthesize

    if args.family not in FAMILIES:
        raise UsageError(f"--family must be one of {', '.join(FAMILIES)}, not {args.family!r}")
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
            raise UsageError(f"{p}: not found")
    report = synthesize(sources, args.top, family=args.family, dsp=not args.no_dsp,
                        out_json=Path(args.json) if args.json else None)
    print(json.dumps(report["resources"]))
    return 0


def _cmd_sim_array(args) -> int:
    from licforge.sim.lane_array import array_config, random_array_check

    cfg = array_config(args.kind, args.lanes, args.bits, args.shift, args.out_bits, args.max_beats)
    if not 1 <= args.beats <= cfg.max_beats:
        raise UsageError(f"--beats must be between 1 and --max-beats ({cfg.max_beats}), not {args.beats}")
    r = random_array_check(cfg, args.vectors, args.beats, args.seed, Path(args.build) / "sim" / cfg.name,
                           args.simulator)
    print(f"{cfg.name} on {r.simulator}: seed {args.seed}, {r.report['checked']} dot products, "
          f"{r.report['mismatches']} mismatches, {r.report['cycles']} cycles")
    return 0


def _cmd_demo(args) -> int:
    from licforge.bench.minconv import run_minconv_slice

    out = Path(args.out)
    run_minconv_slice(out, lanes=args.lanes, bits=args.bits, seed=args.seed, simulator=args.simulator)
    print(f"summary: {out / 'summary.json'}")
    return 0


def _bench_minconv(results: Path, build: Path) -> str:
    from licforge.bench.minconv import bench_minconv

    res = bench_minconv(results / "minconv.json", build)
    return f"wrote {results / 'minconv.json'} ({len(res['arrays'])} array pairs)"


BENCHES = {"minconv": _bench_minconv}


def _array_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lanes", type=int, default=8, help="lanes L (dot-product width per cycle)")
    p.add_argument("--bits", type=int, default=8, help="operand bit width b (2..32)")
    p.add_argument("--shift", type=int, default=None, help="requantization shift (default: b)")
    p.add_argument("--out-bits", type=int, default=None, help="output bit width (default: b)")
    p.add_argument("--max-beats", type=int, default=64, help="longest dot product, in beats")


def register(groups: dict) -> None:
    """Add this module's subcommands to the ``licforge`` parser groups."""
    for kind, what in (("minconv", "MinConvArray (comparator lanes)"), ("mac", "MacArray (multiplier lanes)")):
        p = groups["rtl"].add_parser(kind, help=what)
        _array_args(p)
        p.add_argument("--out", help="output directory (default build/rtl/<design>)")
        p.set_defaults(func=_cmd_rtl_array)
        p = groups["sim"].add_parser(kind, help=f"random vectors through the {what}")
        _array_args(p)
        p.add_argument("--vectors", type=int, default=1000, help="dot products to check")
        p.add_argument("--beats", type=int, default=4, help="beats per dot product")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--simulator", default="verilator", choices=("verilator", "icarus"))
        p.set_defaults(func=_cmd_sim_array)

    syn = groups["top"].add_parser("synth", help="Yosys synth_xilinx resources as JSON")
    syn.add_argument("verilog", nargs="+", help="Verilog files or directories of them")
    syn.add_argument("--top", default="top", help="top module (default: top)")
    syn.add_argument("--family", default="xc7", help="xc7 (default), xcu, xcup")
    syn.add_argument("--no-dsp", action="store_true", help="map multipliers to LUTs")
    syn.add_argument("--json", help="also write the report to this file")
    syn.set_defaults(func=_cmd_synth)

    demo = groups["top"].add_parser("demo", help="the main flow on the embedded default")
    demo.add_argument("--out", default="build/demo")
    demo.add_argument("--lanes", type=int, default=8)
    demo.add_argument("--bits", type=int, default=8)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--simulator", default="verilator", choices=("verilator", "icarus"))
    demo.set_defaults(func=_cmd_demo)
