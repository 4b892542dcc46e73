"""CLI ``licforge plan BUNDLE --fps F --resolution WxH --dsp D [--clock-mhz C]``: the cheapest
decoder that meets a frame-rate target by the analytical model (:func:`rtl.perf.plan_for_target`).

BUNDLE is a bundle directory or ``synthetic:N:M[:SEED]``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from licforge.errors import UsageError, positive_float

__all__ = ["register", "parse_resolution", "format_plan"]


def parse_resolution(text: str) -> tuple[int, int]:
    """``WxH`` (e.g. ``1920x1080``) as (width, height); UsageError naming ``--resolution`` otherwise."""
    m = re.fullmatch(r"(\d+)x(\d+)", text.strip().lower())
    if not m or not (1 <= int(m[1]) <= 16384 and 1 <= int(m[2]) <= 16384):
        raise UsageError(f"--resolution must be WxH with 1..16384 pixels each (e.g. 1920x1080), not {text!r}")
    return int(m[1]), int(m[2])


def format_plan(result: dict, width: int, height: int) -> str:
    """The plan as a table, one row per layer, and a total line."""
    from licforge.rtl.perf import format_efficiency, layer_luts
    from licforge.tables import markdown_table

    rep = result["report"]
    lh, lw = rep["latents"]
    rows = []
    for p in result["plan"]:
        cyc = p.frame_cycles(lh, lw)
        packed, lone = p.dsp_split
        rows.append([p.name, p.op, f"{p.cin}->{p.cout}", p.pi, p.po, p.pp, p.slots, p.dsps,
                     f"{packed} + {lone}", layer_luts(p), cyc, f"{cyc / rep['cycles_steady']:.1%}"])
    table = markdown_table(["layer", "op", "channels", "PI", "PO", "PP", "products/cycle", "DSPs", "packed + lone",
                            "LUT (est.)", "cycles/frame", "busy"], rows)
    total = (f"total: {rep['dsps']} DSPs ({rep['dsp_packed']} packed, 2 products each, + {rep['dsp_lone']} lone), "
             f"~{rep['lut_estimate']} LUT (estimate), {rep['fps']} fps at {width}x{height} = {rep['mpixel_s']} "
             f"Mpixel/s at {rep['clock_hz'] / 1e6:g} MHz (assumed clock, not placed and routed), DSP efficiency "
             f"{format_efficiency(rep['dsp_efficiency_steady'])} (streaming; {rep['fps_single_frame']} fps for one "
             f"isolated frame)")
    return f"{table}\n{total}"


def _cmd_plan(args) -> int:
    from licforge.quant.bundle import decoder_layers
    from licforge.quant.synthetic import load_decoder_bundle
    from licforge.rtl.perf import plan_for_target

    width, height = parse_resolution(args.resolution)
    if args.dsp < 0:
        raise UsageError(f"--dsp must be at least 0, not {args.dsp}")
    bundle = load_decoder_bundle(args.bundle, Path(args.build))
    r = plan_for_target(decoder_layers(bundle), fps=args.fps, height=height, width=width, dsp_budget=args.dsp,
                        clock_hz=args.clock_mhz * 1e6, pack=not args.no_pack)
    if args.json:
        out = dict(r, plan=[p.as_dict() for p in r["plan"]]) if r["ok"] else r
        Path(args.json).write_text(json.dumps({"bundle": str(bundle.path), "fps": args.fps,
                                               "resolution": [width, height], "dsp_budget": args.dsp,
                                               "clock_mhz": args.clock_mhz, **out}, indent=1))
    if not r["ok"]:
        print(r["reason"])
        return 1
    print(format_plan(r, width, height))
    return 0


def register(groups: dict) -> None:
    """Add ``plan`` to the ``licforge`` parser."""
    p = groups["top"].add_parser("plan", help="the cheapest decoder (PI/PO/PP per layer) meeting a frame-rate target "
                                              "within a DSP budget, by the analytical model")
    p.add_argument("bundle", help="bundle directory, or synthetic:N:M[:SEED]")
    p.add_argument("--fps", type=positive_float, required=True, help="frames per second to reach")
    p.add_argument("--resolution", required=True, help="output frame size WxH, e.g. 1920x1080")
    p.add_argument("--dsp", type=int, required=True, help="DSP48E2 budget (ZCU102: 2520; 0 fits a MinConv bundle)")
    p.add_argument("--clock-mhz", type=positive_float, default=200.0, help="clock of the fps figures (MHz, default 200)")
    p.add_argument("--no-pack", action="store_true", help="one product per DSP (no shared-operand packing)")
    p.add_argument("--json", help="also write the plan (or the reason it cannot be met) to this file")
    p.set_defaults(func=_cmd_plan, torch=False)
