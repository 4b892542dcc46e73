"""``licforge``: one command line, subcommands by stage (DESIGN.md).

Exit codes: 0 success; 1 a failed check (a mismatch, a BER above the asked threshold) or a
failed tool run (Yosys, printed with the tail of its log);
2 bad input (an argument, a key, a file), printed as one line naming it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from licforge.errors import CheckFailed, UsageError

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments as one line and exit code 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    """The ``licforge`` argument parser.

    Subcommands are contributed by the modules ``flows/cmd_*.py``: each defines
    ``register(groups)`` where ``groups`` maps ``"top"`` to the top-level subparsers and
    ``"rtl"``, ``"sim"``, ``"watermark"`` to those groups' subparsers, and may define
    ``BENCHES = {name: callable(results_dir, build_dir) -> str}`` for ``licforge bench NAME``.
    """
    ap = _Parser(prog="licforge", description=__doc__.splitlines()[0])
    ap.add_argument("--build", default="build",
                    help="folder of generated files: Verilog, simulations, synthesis runs (default ./build)")
    top = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)
    groups = {"top": top}
    for name, what in (("rtl", "generate Verilog + memory init files"),
                       ("sim", "cocotb simulation against the golden model"),
                       ("watermark", "embed / extract / attack / report watermarks")):
        g = top.add_parser(name, help=what)
        groups[name] = g.add_subparsers(dest="kind", required=True, parser_class=_Parser)
    benches: dict = {}
    for mod in _command_modules():
        mod.register(groups)
        benches.update(getattr(mod, "BENCHES", {}))
    bench = top.add_parser("bench", help="benchmarks -> bench/results/*.json")
    bench.add_argument("what", choices=sorted(benches) + ["all"])
    bench.add_argument("--results", default="bench/results")
    bench.set_defaults(func=lambda a: _run_benches(a, benches))
    return ap


def _command_modules() -> list:
    import importlib
    import pkgutil

    import licforge.flows

    names = sorted(m.name for m in pkgutil.iter_modules(licforge.flows.__path__) if m.name.startswith("cmd_"))
    return [importlib.import_module(f"licforge.flows.{n}") for n in names]


def _run_benches(args, benches: dict) -> int:
    names = sorted(benches) if args.what == "all" else [args.what]
    for n in names:
        print(f"bench {n}: {benches[n](Path(args.results), Path(args.build))}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``licforge`` console script."""
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UsageError as e:
        print(f"licforge: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        print(f"licforge: error: {e}", file=sys.stderr)
        return 2
    except CheckFailed as e:
        print(f"licforge: check failed: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # errors of our own boundary checks carry their own message
        from licforge.quant.bundle import BundleError
        from licforge.sim.runner import SimulatorUnavailable
        from licforge.rtl.yosys import YosysError
        if isinstance(e, (BundleError, SimulatorUnavailable)):
            print(f"licforge: error: {e}", file=sys.stderr)
            return 2
        if isinstance(e, YosysError):  # a tool failure, not bad input: its log tail, no traceback
            print(f"licforge: {e}", file=sys.stderr)
            return 1
        raise
    except KeyboardInterrupt:
        print("licforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
