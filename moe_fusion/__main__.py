"""``python -m moe_fusion {demo,explain,export,bench}``."""
from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path


def _explain(args: argparse.Namespace) -> int:
    from .factory import load_factory
    from .passes import explain

    model, inputs = load_factory(args.factory, "explain")
    explain(model, *inputs, target=args.target)
    return 0


def _bench(args: argparse.Namespace) -> int:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / f"bench_{args.which}.py"
    if not script.exists():
        raise SystemExit(f"bench: {script} not found (benchmarks live in the source checkout)")
    sys.path.insert(0, str(script.parent))
    sys.argv = [str(script)]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_fusion", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    from .demo import run as demo

    demo_parser = commands.add_parser("demo", help="fuse an unfused MoE layer on 4 gloo ranks, check and time it")
    demo.add_arguments(demo_parser)

    explain_parser = commands.add_parser("explain", help="print the fusion report of a model")
    explain_parser.add_argument("factory", help="module:function returning (model, inputs)")
    explain_parser.add_argument("--target", choices=["portable", "A2", "A3"], default=None)

    from . import onnx_cli

    onnx_cli.add_arguments(commands.add_parser("export", help="export a model to ONNX (fused ops as ai.moe_fusion nodes)"))

    bench_parser = commands.add_parser("bench", help="run a benchmark script of the source checkout")
    bench_parser.add_argument("which", choices=["local_ops", "comm_ops", "fusion"])

    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo.main(args)
    if args.command == "explain":
        return _explain(args)
    if args.command == "export":
        return onnx_cli.main(args)
    return _bench(args)


if __name__ == "__main__":
    sys.exit(main())
