"""``licforge``: one command line, subcommands by stage (DESIGN.md).

Exit codes: 0 success; 1 a failed check (a mismatch, a BER above the asked threshold) or a
failed tool run (Yosys, printed with the tail of its log);
2 bad input (an argument, a key, a file), printed as one line naming it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from licforge.errors import CheckFailed, UsageError, need_int, out_dir, out_file

__all__ = ["main", "build_parser", "BENCH_RESULTS"]

BENCH_RESULTS = "bench/results"  # default --out of ``licforge bench``


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments as one line and exit code 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    """The ``licforge`` argument parser: ``licforge [--build DIR] [--threads N] VERB [OBJECT] ...``.

    Subcommands are contributed by the modules ``flows/cmd_*.py``: each defines
    ``register(groups)`` where ``groups`` maps ``"top"`` to the top-level subparsers and
    ``"rtl"``, ``"sim"``, ``"watermark"``, ``"plot"``, ``"bench"`` to those groups'
    subparsers.  A benchmark is a parser added to ``groups["bench"]`` with its own options and
    ``set_defaults(bench=callable)``, the callable taking ``(out_dir, build_dir, args)`` and
    returning a one-line summary; this module gives each one ``--out DIR`` and adds
    ``bench all``, which runs every benchmark (but those registered with ``in_all=False``) with
    its defaults.  A command that does not use torch says so with ``set_defaults(torch=False)``.
    """
    ap = _Parser(prog="licforge", description=__doc__.splitlines()[0])
    ap.add_argument("--build", default="build",
                    help="folder of generated files: Verilog, simulations, synthesis runs (default ./build)")
    ap.add_argument("--threads", type=int, default=1, metavar="N",
                    help="torch CPU threads (default 1: on a shared 2-core machine more threads spin and run slower)")
    top = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)
    groups = {"top": top}
    for name, what in (("rtl", "generate Verilog + memory init files"),
                       ("sim", "cocotb simulation against the golden model"),
                       ("watermark", "embed / deploy / extract / attack watermarks"),
                       ("plot", "figures from results files"),
                       ("bench", f"benchmarks -> {BENCH_RESULTS}/NAME*.json + PNGs")):
        g = top.add_parser(name, help=what)
        groups[name] = g.add_subparsers(dest="kind", required=True, parser_class=_Parser)
    for mod in _command_modules():
        mod.register(groups)
    benches = dict(groups["bench"].choices)
    for p in benches.values():
        _out_arg(p)
        p.set_defaults(func=_run_bench)
    left_out = [n for n, b in benches.items() if b.get_default("in_all") is False]
    p = groups["bench"].add_parser("all", help="every benchmark with its defaults"
                                   + (f" but {', '.join(left_out)}" if left_out else ""))
    _out_arg(p)
    p.set_defaults(func=lambda a: _run_all(a, benches))
    return ap


def _out_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=BENCH_RESULTS, metavar="DIR", help=f"results folder (default {BENCH_RESULTS})")


def _command_modules() -> list:
    import importlib
    import pkgutil

    import licforge.flows

    names = sorted(m.name for m in pkgutil.iter_modules(licforge.flows.__path__) if m.name.startswith("cmd_"))
    return [importlib.import_module(f"licforge.flows.{n}") for n in names]


def _run_bench(args: argparse.Namespace) -> int:
    """``licforge bench NAME``: run one benchmark, print its summary line."""
    print(f"bench {args.kind}: {args.bench(out_dir(args.out), Path(args.build), args)}", flush=True)
    return 0


def _run_all(args: argparse.Namespace, benches: dict[str, argparse.ArgumentParser]) -> int:
    """``licforge bench all``: every benchmark in ``all``, each with the defaults of its parser."""
    for name, parser in benches.items():
        if parser.get_default("in_all") is False:
            continue
        one = parser.parse_args(["--out", args.out])
        one.build, one.threads, one.kind = args.build, args.threads, name
        _run_bench(one)
    return 0


def _set_threads(args: argparse.Namespace) -> None:
    """Apply ``--threads`` to torch, once, for the commands that use torch."""
    need_int(args.threads, "--threads", 1, 256)
    if getattr(args, "torch", True):
        import torch

        torch.set_num_threads(args.threads)


def _quiet_third_party() -> None:
    """Silence two notices that third-party imports print on every command that loads them, which
    would bury the command's one-line error: torch_geometric's (imported by compressai)
    ``torch.jit.script`` deprecation warning, and torch's "No CUDA runtime is found" log line
    (brevitas imports ``torch.utils.cpp_extension``) on machines without CUDA."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``licforge`` console script."""
    _quiet_third_party()
    try:
        args = build_parser().parse_args(argv)
        _set_threads(args)
        out_dir(args.build, "--build")
        if getattr(args, "json", None):  # every --json is a results file the command writes after its work
            out_file(args.json, "--json")
        rc = args.func(args)
        sys.stdout.flush()  # here, so that a closed pipe is caught below, not reported at exit
        return rc
    except UsageError as e:
        print(f"licforge: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        print(f"licforge: error: {e}", file=sys.stderr)
        return 2
    except CheckFailed as e:
        print(f"licforge: check failed: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader of stdout left (``licforge inspect B | head``): stop without a traceback
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor one when Python flushes at exit
        return 1
    except Exception as e:  # errors of our own boundary checks carry their own message
        from licforge.quant.bundle import BundleError
        from licforge.sim.runner import SimulationFailed, SimulatorUnavailable
        from licforge.rtl.yosys import YosysError
        if isinstance(e, (BundleError, SimulatorUnavailable)):
            print(f"licforge: error: {e}", file=sys.stderr)
            return 2
        if isinstance(e, SimulationFailed):  # a failing cocotb test: its message names the log
            print(f"licforge: check failed: {e}", file=sys.stderr)
            return 1
        if isinstance(e, YosysError):  # a tool failure, not bad input: its log tail, no traceback
            print(f"licforge: {e}", file=sys.stderr)
            return 1
        raise
    except KeyboardInterrupt:
        print("licforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
