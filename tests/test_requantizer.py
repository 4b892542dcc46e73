"""RTL Requantizer == quant.fixed.requantize, exhaustively, in Amaranth's simulator."""
import numpy as np
import pytest
from amaranth.sim import Simulator

from licforge.quant.fixed import requantize
from licforge.rtl.requantizer import Requantizer


@pytest.mark.parametrize("shift,out_bits,relu", [(3, 4, False), (1, 6, True), (0, 5, False), (-2, 6, False)])
def test_requantizer_exhaustive(shift, out_bits, relu):
    dut = Requantizer(in_bits=8, shift=shift, out_bits=out_bits, relu=relu)
    inputs = list(range(-128, 128))
    got = []

    async def tb(ctx):
        ctx.set(dut.o.ready, 1)
        for v in inputs:
            ctx.set(dut.i.valid, 1)
            ctx.set(dut.i.payload, v)
            await ctx.tick()
            assert ctx.get(dut.o.valid) == 1
            got.append(ctx.get(dut.o.payload))

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(tb)
    sim.run()
    exp = requantize(np.array(inputs), shift, out_bits)
    if relu:
        exp = np.maximum(exp, 0)
    assert got == exp.tolist()


def test_requantizer_holds_output_under_back_pressure():
    dut = Requantizer(in_bits=8, shift=1, out_bits=8)

    async def tb(ctx):
        ctx.set(dut.o.ready, 0)
        ctx.set(dut.i.valid, 1)
        ctx.set(dut.i.payload, 7)
        await ctx.tick()
        ctx.set(dut.i.payload, 11)
        assert ctx.get(dut.i.ready) == 0  # output held, input stalled
        await ctx.tick()
        assert ctx.get(dut.o.payload) == 4  # 3.5 -> 4 (half to even), still the first beat
        ctx.set(dut.o.ready, 1)
        await ctx.tick()
        assert ctx.get(dut.o.payload) == 6  # 5.5 -> 6

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(tb)
    sim.run()


@pytest.mark.parametrize("kwargs,msg", [({"in_bits": 8, "shift": 1, "out_bits": 0}, "out_bits must be between 1 and 32, not 0"),
                                        ({"in_bits": 8, "shift": 99, "out_bits": 8}, "shift must be an integer in"),
                                        ({"in_bits": 1, "shift": 1, "out_bits": 8}, "in_bits must be between 2 and 64")])
def test_requantizer_rejects_bad_parameters(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        Requantizer(**kwargs)
