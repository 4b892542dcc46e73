"""CLI of the end-to-end flow: ``licforge flow [CONFIG] [--from STAGE] [--run-dir DIR]``."""
from __future__ import annotations

import time
from pathlib import Path

__all__ = ["register"]


def _cmd_flow(args) -> int:
    import torch

    from licforge.flows.flow import run_flow

    torch.set_num_threads(args.threads)
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


def register(groups: dict) -> None:
    from licforge.flows.flow import STAGES

    p = groups["top"].add_parser("flow", help="images -> distilled, watermarked student -> verified Verilog "
                                              "-> report (cached stages)")
    p.add_argument("config", nargs="?", default=None,
                   help="TOML config (keys override flows/default.toml; default: that file alone)")
    p.add_argument("--from", dest="force_from", choices=[s.name for s in STAGES], default=None,
                   help="re-run this stage and every later one even when up to date")
    p.add_argument("--run-dir", default=None, help="override run.dir of the config")
    p.add_argument("--threads", type=int, default=1, choices=range(1, 257), metavar="N",
                   help="torch threads (default 1: on 2 shared cores, more threads spin and run slower)")
    p.set_defaults(func=_cmd_flow)
