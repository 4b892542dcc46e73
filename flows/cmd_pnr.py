"""CLI of place and route: ``pnr DIR`` (Yosys ``synth_ecp5``, nextpnr-ecp5, ecppack; library
:mod:`rtl.pnr`)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from licforge.errors import CheckFailed, UsageError, need_dir, out_dir, positive_float

__all__ = ["register", "seeds_arg"]


def seeds_arg(text: str) -> list[int]:
    """``1,2,3`` -> ``[1, 2, 3]``: placement seeds of an argument; an argparse error naming the
    text otherwise."""
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"write placement seeds as integers separated by commas, not {text!r}")
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"placement seeds must be non-negative integers, not {text!r}")
    return seeds


def _cmd_pnr(args) -> int:
    from licforge.rtl.pnr import PnrError, parse_device, run_pnr
    from licforge.rtl.yosys import YosysError

    design = need_dir(args.design, "design")
    try:
        dev = parse_device(args.device)
    except ValueError as e:
        raise UsageError(f"--device: {e}") from None
    out = out_dir(args.out or f"{args.build}/pnr/{design.resolve().name}_{dev.part}")
    man = design / "manifest.json"
    if args.no_dsp and man.is_file():   # a decoder whose LUT multipliers are one stage each
        m = json.loads(man.read_text())
        if m.get("split_products") is False and any("mul" in (b.get("product"), b.get("norm_product"), b.get("out_product"))
                                                     for b in m.get("blocks", [])):
            print(f"note: {design} has one-stage multipliers; with --no-dsp they are LUT cones that set the clock "
                  "(licforge rtl decoder --split-products builds them in two stages)", flush=True)
    try:
        rep = run_pnr(design, out, device=dev.part, seeds=args.seeds, freq_mhz=args.freq_mhz, top=args.top,
                      threads=args.threads, timeout_s=args.timeout_s, pack_dsp=not args.no_dsp_pack,
                      global_enables=not args.no_global_enables, slice_roms=not args.no_ebr_roms,
                      dsp=not args.no_dsp, progress=lambda s: print(s, flush=True))
    except ValueError as e:
        raise UsageError(str(e)) from None
    except (PnrError, YosysError) as e:
        print(f"licforge: {e}", file=sys.stderr)
        return 1
    f, u = rep["fmax_mhz"], rep["utilization"]
    seeds = ", ".join(f"seed {r['seed']}: {r['fmax_mhz']:.1f}" for r in rep["seeds"])
    print(f"{rep['top']} on {dev.part}: Fmax {f['min']:.1f} .. {f['max']:.1f} MHz (median {f['median']:.1f}; {seeds}) "
          f"measured after place and route")
    print("utilization: " + ", ".join(f"{k} {v['used']}/{v['available']}" for k, v in u.items()
                                      if k in ("LUT4", "FF", "MULT18", "EBR", "IO")))
    for fail in rep["failed_seeds"]:
        print(f"seed {fail['seed']}: failed, not counted: {fail['error']}")
    print(f"bitstream (seed {f['best_seed']}): {rep['bitstream']}; report {out / 'pnr.json'}")
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=1))
    if args.min_mhz is not None and f["min"] < args.min_mhz:
        raise CheckFailed(f"Fmax {f['min']:.1f} MHz (the slowest seed) is below --min-mhz {args.min_mhz:g}")
    if args.min_mhz is not None and rep["failed_seeds"]:
        raise CheckFailed(f"--min-mhz {args.min_mhz:g}: seed(s) {', '.join(str(x['seed']) for x in rep['failed_seeds'])} "
                          "failed to place or route")
    return 0


def register(groups: dict) -> None:
    """Add ``pnr`` to the ``licforge`` parser."""
    from licforge.rtl.pnr import DEFAULT_DEVICE, DEFAULT_FREQ_MHZ, DEFAULT_SEEDS

    p = groups["top"].add_parser("pnr", help="place and route for an ECP5 (synth_ecp5, nextpnr-ecp5, ecppack): "
                                             "measured Fmax over seeds, utilization, bitstream")
    p.add_argument("design", help="a folder of Verilog: 'rtl decoder' output (placed in the byte-stream board "
                                  "wrapper) or any design with --top")
    p.add_argument("--device", default=DEFAULT_DEVICE,
                   help=f"ECP5 ordering code (default {DEFAULT_DEVICE}: the ULX3S's ECP5-85F, speed 6, caBGA381)")
    p.add_argument("--seeds", type=seeds_arg, default=list(DEFAULT_SEEDS),
                   help=f"placement seeds, comma-separated (default {','.join(map(str, DEFAULT_SEEDS))})")
    p.add_argument("--freq-mhz", type=positive_float, default=DEFAULT_FREQ_MHZ,
                   help=f"nextpnr's timing target (default {DEFAULT_FREQ_MHZ:g}); the measured Fmax is reported")
    p.add_argument("--top", default=None, help="top module (default: the board wrapper of a decoder, else the "
                                               "manifest's top)")
    p.add_argument("--no-dsp", action="store_true",
                   help="map every multiplier to LUTs (synth_ecp5 -nodsp: no MULT18X18D), e.g. to measure a "
                        "decoder that must leave the DSPs free")
    p.add_argument("--no-dsp-pack", action="store_true",
                   help="leave the multipliers' operand registers in the fabric (default: moved into the MULT18X18D)")
    p.add_argument("--no-ebr-roms", action="store_true",
                   help="leave the ROMs as written (default: ROMs of 4,096 bits or more cut into slices as wide as "
                        "one EBR port, so that no multiplexer follows an EBR)")
    p.add_argument("--no-global-enables", action="store_true",
                   help="route every clock enable through the fabric (default: the flip-flop enables with the most "
                        "loads drive them through DCCA global buffers)")
    p.add_argument("--out", help="output folder (default <build>/pnr/<design folder>_<device>)")
    p.add_argument("--timeout-s", type=positive_float, default=None, help="give up a Yosys or nextpnr run after this long")
    p.add_argument("--min-mhz", type=positive_float, default=None, help="exit 1 when the slowest seed's Fmax is below this")
    p.add_argument("--json", help="also write the report to this file")
    p.set_defaults(func=_cmd_pnr, torch=False)
