"""``python -m moe_fusion export <module:factory> out.onnx``: export a model to ONNX.

The factory is a function of no arguments returning ``(model, inputs)`` (as for ``explain``).
Outside the ``moe_fusion.onnx`` package, so the CLI builds without onnx installed.
"""
from __future__ import annotations

import argparse

from .factory import load_factory


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("factory", help="module:function returning (model, inputs)")
    parser.add_argument("output", help="path of the .onnx file to write")
    parser.add_argument("--no-fuse", dest="fuse", action="store_false", help="export the model as written")
    parser.add_argument("--opset", type=int, default=None, help="default-domain opset (default 20)")
    parser.add_argument("--target", choices=["portable", "A2", "A3"], default="portable",
                        help="compile target whose limits the fusion passes respect")
    parser.add_argument("--no-functions", dest="functions", action="store_false",
                        help="do not attach standard-op bodies to the local ops")


def main(args: argparse.Namespace) -> int:
    from .onnx.export import DEFAULT_OPSET, export
    from .passes import FusionReport

    model, inputs = load_factory(args.factory, "export")
    report = FusionReport()
    proto = export(model, inputs, args.output, fuse=args.fuse, opset=args.opset or DEFAULT_OPSET,
                   target=args.target, functions=args.functions, report=report)
    fused = [e for e in report.events if e.fused]
    custom = [n.op_type for n in proto.graph.node if n.domain == "ai.moe_fusion"]
    print(f"wrote {args.output}: {len(proto.graph.node)} nodes, custom {custom}, {len(fused)} fusion(s)")
    return 0
