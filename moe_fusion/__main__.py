"""python -m moe_fusion {demo,explain,export,bench}: the demo, fusion reports, ONNX export, benchmarks.

Exit status: 0 on success; 2 for a usage error (an argument argparse rejects, a factory that
cannot be loaded, an opset the exporter does not produce, an output path that cannot be written);
1 for a failure while running (the demo's check failing, an export or a benchmark raising). An
error is one line on stderr; --traceback shows the whole traceback instead.
"""
from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path
from typing import Any, NoReturn

from .factory import UsageError
from .targets import TARGETS

PROG = "python -m moe_fusion"
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
BENCH_SCRIPTS = ("local_ops", "comm_ops", "fusion", "pass_compile", "models")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; every option's help ends with its default, a flag's being ``off``
    (not given)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.option_strings and action.nargs == 0 and action.default is not argparse.SUPPRESS:
            return f"{action.help} (default: off)"
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse's parser (and the class of its subcommands' parsers) with ``HelpFormatter`` and
    one-line errors, exit status 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _explain(args: argparse.Namespace) -> int:
    from .factory import load_factory
    from .passes import explain

    model, inputs = load_factory(args.factory)
    explain(model, *inputs, target=args.target, compiler=args.compiler)
    return 0


def _bench(args: argparse.Namespace) -> int:
    script = BENCHMARKS / f"bench_{args.which}.py"
    if not script.exists():
        raise UsageError(f"{script} not found (benchmarks live in the source checkout)")
    sys.path.insert(0, str(script.parent))
    sys.argv = [str(script)] + args.args   # the script's argparse exits on --help or a bad option
    runpy.run_path(str(script), run_name="__main__")
    return 0


def build_parser() -> Parser:
    """The parser of every command; ``handler`` of the parsed arguments runs the command."""
    parser = Parser(prog=PROG, description=__doc__)
    parser.add_argument("--traceback", action="store_true", help="on an error, show the whole traceback")
    commands = parser.add_subparsers(dest="command", required=True)

    from .demo import run as demo

    demo_parser = commands.add_parser(
        "demo", help="fuse an unfused MoE layer on 4 gloo ranks, check and time it",
        description="Fuse an unfused MoE layer on gloo ranks, check it against eager and time fused vs unfused.")
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(handler=demo.main)

    explain_parser = commands.add_parser("explain", help="print the fusion report of a model",
                                         description="Print what the fusion passes fuse in a model, and why not.")
    explain_parser.add_argument("factory", help="module:function returning (model, inputs)")
    explain_parser.add_argument("--target", choices=TARGETS, default="portable",
                                help="compile target whose limits the fusion passes respect")
    explain_parser.add_argument("--compiler", choices=("eager", "inductor"), default="eager",
                                help="eager: no code generated, no cost gate; inductor: what moe_fusion.compile "
                                     "does by default, the cost gate's refusals included")
    explain_parser.set_defaults(handler=_explain)

    from . import onnx_cli

    export_parser = commands.add_parser(
        "export", help="export a model to ONNX (fused ops as ai.moe_fusion nodes)",
        description="Export a model to ONNX, fused ops as ai.moe_fusion nodes (needs the onnx extra).")
    onnx_cli.add_arguments(export_parser)
    export_parser.set_defaults(handler=onnx_cli.main)

    bench_parser = commands.add_parser(
        "bench", help="run a benchmark script of the source checkout",
        description=f"Run benchmarks/bench_<which>.py of the source checkout ({BENCHMARKS}).")
    bench_parser.add_argument("which", choices=BENCH_SCRIPTS, help="the benchmark")
    bench_parser.add_argument("args", nargs=argparse.REMAINDER,
                              help="the script's own options (bench <which> --help lists them)")
    bench_parser.set_defaults(handler=_bench)
    return parser


def _one_line(error: BaseException) -> str:
    """``error``'s message on one line: its first line, or, when that line only introduces the
    rest (it ends with ':'), with the last line too (a rank's traceback ends with its exception)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    first = lines[0] if isinstance(error, UsageError) else f"{type(error).__name__}: {lines[0]}"
    if len(lines) > 1 and lines[0].endswith(":"):
        return f"{first} {lines[-1]}"
    return first + (" [more with --traceback]" if len(lines) > 1 else "")


def main(argv: list[str] | None = None) -> int:
    """Run the command of ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except Exception as error:
        if args.traceback:
            raise
        status = 2 if isinstance(error, UsageError) else 1
        print(f"{PROG} {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
