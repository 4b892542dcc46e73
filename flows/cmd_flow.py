"""CLI of the end-to-end flow: ``licforge flow [CONFIG] [--from STAGE] [--run-dir DIR]``, and
the MinConv digits slice, ``licforge flow --digits [--out DIR]``."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from licforge.errors import UsageError, need_int, out_dir, seed_int

__all__ = ["register"]

# options of the digits slice alone, with their defaults (None on the parser: given or not)
_DIGITS = {"lanes": 8, "bits": 8, "seed": 0, "simulator": "verilator"}


def _cmd_flow(args: argparse.Namespace) -> int:
    if args.digits:
        return _digits(args)
    given = [f"--{k}" for k in ("out", *_DIGITS) if getattr(args, k) is not None]
    if given:
        raise UsageError(f"{', '.join(given)}: only with --digits (the LIC flow writes to run.dir, see --run-dir)")
    from licforge.flows.flow import run_flow

    t0 = time.perf_counter()
    records, cfg = run_flow(Path(args.config) if args.config else None,
                            run_dir=Path(args.run_dir) if args.run_dir else None, force_from=args.force_from)
    ran = [r.name for r in records if r.ran]
    print(f"flow done in {time.perf_counter() - t0:.0f} s: {len(ran)} of {len(records)} stages ran"
          f"{' (' + ', '.join(ran) + ')' if ran else ''}")
    report = Path(cfg["run"]["dir"]) / "report" / "report.html"
    if report.is_file():
        print(f"report: {report}")
    return 0


def _digits(args: argparse.Namespace) -> int:
    """``flow --digits``: the MinConv digits slice (train, export, generate, simulate, synthesize)."""
    from licforge.bench.minconv import run_minconv_slice

    given = [name for name, v in (("CONFIG", args.config), ("--from", args.force_from), ("--run-dir", args.run_dir))
             if v is not None]
    if given:
        raise UsageError(f"{', '.join(given)}: not with --digits (they configure the LIC flow)")
    opts = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in _DIGITS.items()}
    need_int(opts["lanes"], "--lanes", 1, 1024)
    need_int(opts["bits"], "--bits", 2, 16)
    out = out_dir(args.out) if args.out else Path(args.build) / "flow" / "digits"
    run_minconv_slice(out, **opts)
    print(f"summary: {out / 'summary.json'}")
    return 0


def register(groups: dict) -> None:
    """Add ``licforge flow`` to the ``licforge`` parser."""
    from licforge.flows.flow import STAGES

    p = groups["top"].add_parser("flow", help="images -> distilled, watermarked student -> verified Verilog "
                                              "-> report (cached stages); --digits: the MinConv digits slice")
    p.add_argument("config", nargs="?", default=None,
                   help="TOML config (keys override flows/default.toml; default: that file alone)")
    p.add_argument("--from", dest="force_from", choices=[s.name for s in STAGES], default=None,
                   help="re-run this stage and every later one even when up to date")
    p.add_argument("--run-dir", default=None, help="override run.dir of the config")
    d = p.add_argument_group("the digits slice")
    d.add_argument("--digits", action="store_true", help="run the MinConv digits slice instead of the LIC flow")
    d.add_argument("--out", default=None, help="output folder of --digits (default <build>/flow/digits)")
    d.add_argument("--lanes", type=int, default=None, help=f"lanes of the arrays (default {_DIGITS['lanes']})")
    d.add_argument("--bits", type=int, default=None, help=f"operand bit width (default {_DIGITS['bits']})")
    d.add_argument("--seed", type=seed_int, default=None, help=f"training and stimulus seed (default {_DIGITS['seed']})")
    d.add_argument("--simulator", default=None, choices=("verilator", "icarus"),
                   help=f"HDL simulator (default {_DIGITS['simulator']})")
    p.set_defaults(func=_cmd_flow)
