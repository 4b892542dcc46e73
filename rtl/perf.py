"""Analytical performance model of the decoder pipeline (:class:`rtl.decoder.Decoder`).

Steady state: every layer works concurrently, so a frame of ``h x w`` latents takes
``max_layer(cycles_per_latent) * h * w`` cycles (:mod:`rtl.plan`) when frames stream back
to back (checked in simulation: two frames take exactly that many cycles more than one).
One isolated frame adds the pipeline fill and drain, from a row-level timeline (max-plus
recurrences over rows, not a cycle simulation):

* transposed convolution, input grid ``h x w``, ``G = Cin/PI * Cout/PO``: input row ``r``
  is in the line buffer at ``A_r = max(P_r + GI, A_{r-1} + w*GI, F_{r-4} + 1 + w*GI)``
  (``P_r``: the producer's last pixel of row ``r``; ``F_q``: when row ``q`` leaves the
  4-row buffer); output pair ``i`` starts at ``S_i = max(S_{i-1} + 25 w G, A_{min(i+1,h-1)} + 1)``,
  its rows end at ``S_i + 15 w G + L`` and ``S_i + 25 w G + L`` (``L`` the engine latency);
* inverse GDN, ``t = C/PI * C/PO`` cycles a pixel: row ``r`` ends at
  ``max(P_r + t, D_{r-1} + W t) + L``.

DSP efficiency = useful MACs per cycle / multipliers instantiated, where useful MACs
exclude the zero taps at the frame border: a transposed convolution on ``h x w`` does
``(5h-3)(5w-3) Cin Cout`` of them, an inverse GDN ``H W (C^2 + C)``.
"""
from __future__ import annotations

from licforge.rtl.conv_transpose import LINE_SLOTS, conv_latency
from licforge.rtl.gdn import gdn_latency
from licforge.rtl.plan import TAPS, LayerPlan

__all__ = ["frame_timeline", "frame_report", "useful_macs", "FRAMES", "CLOCK_HZ"]

CLOCK_HZ = 200e6  # the stated clock of every fps figure
FRAMES = {"1080p": (1080, 1920), "768x512": (512, 768)}


def _conv_rows(p: LayerPlan, arrivals: list[float], h: int, w: int) -> list[float]:
    """End times of the output rows of a transposed convolution, frames back to back:
    ``arrivals[f*h + i]`` is when the producer's last pixel of row ``i`` of frame ``f`` is out."""
    gi, go = p.cin // p.pi, p.cout // p.po
    pair = TAPS * w * gi * go
    even = 15 * w * gi * go
    lat = conv_latency(p.pi)
    a_done: list[float] = []  # when input row r (global index) is in the line buffer
    starts: list[float] = []  # when output pair k (global index) starts

    def row_in(r: int) -> float:
        while len(a_done) <= r:
            q = len(a_done)
            t = max(arrivals[q] + gi, (a_done[-1] if a_done else 0) + w * gi)
            if q >= LINE_SLOTS:
                t = max(t, freed_at(q - LINE_SLOTS) + 1 + w * gi)
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
        out += [s + even + lat, s + pair + lat]
    return out


def _gdn_rows(p: LayerPlan, arrivals: list[float], w: int) -> list[float]:
    t = (p.cin // p.pi) * (p.cout // p.po)
    lat = gdn_latency(p.pi)
    out: list[float] = []
    for r_done in arrivals:
        out.append(max(r_done + t, (out[-1] - lat if out else 0) + w * t) + lat)
    return out


def frame_timeline(plan: list[LayerPlan], height: int, width: int, frames: int = 1) -> dict:
    """Cycles of ``frames`` frames of ``height x width`` latents, back to back, from the row
    timeline: ``cycles`` (first input beat offered to the last pixel out), and per layer the
    time its last output row ends.  Assumes the latents are offered every cycle and the
    output is never stalled."""
    h, w = height, width
    arrivals = [0.0] * (frames * h)  # the latents are all available from the start
    ends = {}
    for p in plan:
        if p.op == "conv_transpose2d":
            arrivals = _conv_rows(p, arrivals, h, w)
            h, w = 2 * h, 2 * w
        else:
            arrivals = _gdn_rows(p, arrivals, w)
        ends[p.name] = arrivals[-1]
    return {"cycles": int(arrivals[-1]) + 1, "layer_end": ends, "output_hw": (h, w)}


def useful_macs(plan: list[LayerPlan], height: int, width: int) -> int:
    """Multiply-accumulates of one frame that touch real data (border zeros excluded)."""
    total, h, w = 0, height, width
    for p in plan:
        if p.op == "conv_transpose2d":
            total += (5 * h - 3) * (5 * w - 3) * p.cin * p.cout
            h, w = 2 * h, 2 * w
        else:
            total += h * w * (p.cin * p.cout + p.cout)
    return total


def frame_report(plan: list[LayerPlan], height: int, width: int, clock_hz: float = CLOCK_HZ) -> dict:
    """The model's figures for an output frame of ``height x width`` pixels (padded up to a
    multiple of the decoder's upsampling, 16).

    Streaming (frames back to back, as a video decoder runs, the layers of consecutive frames
    overlap): ``cycles_steady`` a frame, ``cycles_per_pixel``, ``fps`` at ``clock_hz`` and
    ``dsp_efficiency_steady``.  One isolated frame (first latent in to last pixel out, fill
    and drain included): ``cycles``, ``fps_single_frame``, ``dsp_efficiency``.
    """
    up = 1 << sum(p.op == "conv_transpose2d" for p in plan)
    lh, lw = -(-height // up), -(-width // up)
    steady = max(p.cycles_per_latent for p in plan) * lh * lw
    single = frame_timeline(plan, lh, lw)["cycles"]
    mults = sum(p.multipliers for p in plan)
    macs = useful_macs(plan, lh, lw)
    pixels = lh * lw * up * up
    return {"frame": [height, width], "latents": [lh, lw], "decoded": [lh * up, lw * up],
            "multipliers": mults, "clock_hz": clock_hz, "useful_macs": macs,
            "cycles_steady": steady, "cycles_per_pixel": round(steady / pixels, 4),
            "fps": round(clock_hz / steady, 2), "dsp_efficiency_steady": round(macs / (steady * mults), 4),
            "cycles": single, "fps_single_frame": round(clock_hz / single, 2),
            "dsp_efficiency": round(macs / (single * mults), 4)}
