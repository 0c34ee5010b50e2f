"""``python -m moe_fusion export <module:factory> out.onnx``: export a model to ONNX.

The factory is a function of no arguments returning ``(model, inputs)`` (as for ``explain``).
Outside the ``moe_fusion.onnx`` package, so the CLI builds without onnx installed (the command
then says which extra to install). The opset and the output path are checked before the model is
built: an opset the exporter does not produce, or a path that cannot be written, is a usage error.
"""
from __future__ import annotations

import argparse
import importlib
import os
from pathlib import Path
from types import ModuleType

from .factory import UsageError, load_factory
from .targets import TARGETS


def _exporter() -> ModuleType:
    """``moe_fusion.onnx.export``; RuntimeError naming the extra to install when onnx is missing."""
    try:
        return importlib.import_module("moe_fusion.onnx.export")
    except ModuleNotFoundError as error:
        if (error.name or "").partition(".")[0] == "moe_fusion":
            raise
        raise RuntimeError(f"export needs the onnx extra (pip install -e '.[onnx]'): {error}") from error


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The export command's arguments (the opset range is the exporter's, when onnx is installed)."""
    try:
        exporter = _exporter()
        opset_default, opset_help = exporter.DEFAULT_OPSET, (
            f"default-domain opset, {exporter.MIN_OPSET}..{exporter.MAX_OPSET} (the ones the exporter produces)")
    except RuntimeError as missing:
        opset_default, opset_help = None, f"default-domain opset ({missing})"
    parser.add_argument("factory", help="module:function returning (model, inputs)")
    parser.add_argument("output", help="path of the .onnx file to write")
    parser.add_argument("--no-fuse", dest="fuse", action="store_false",
                        help="export the model as written, without the fusion passes")
    parser.add_argument("--opset", type=int, default=opset_default, help=opset_help)
    parser.add_argument("--target", choices=TARGETS, default="portable",
                        help="compile target whose limits the fusion passes respect")
    parser.add_argument("--no-functions", dest="functions", action="store_false",
                        help="do not attach standard-op bodies to the local ops")


def check_output(path: str) -> None:
    """UsageError unless ``path`` names a file that can be written (its directory exists and is
    writable, and it is not a directory or a read-only file)."""
    out = Path(path)
    directory = out.parent
    if out.is_dir():
        raise UsageError(f"output {path} is a directory; give the path of the .onnx file to write")
    if not directory.is_dir():
        raise UsageError(f"cannot write {path}: {directory} is not a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {path}: directory {directory} is not writable")
    if out.exists() and not os.access(out, os.W_OK):
        raise UsageError(f"cannot write {path}: the file is read-only")


def main(args: argparse.Namespace) -> int:
    """Check the opset and the output path, build the model, export it; print what was written."""
    from .passes import FusionReport

    exporter = _exporter()
    try:
        opset = exporter.check_opset(args.opset)
    except ValueError as error:
        raise UsageError(f"argument --opset: {error}") from error
    check_output(args.output)
    model, inputs = load_factory(args.factory)
    report = FusionReport()
    proto = exporter.export(model, inputs, args.output, fuse=args.fuse, opset=opset, target=args.target,
                            functions=args.functions, report=report)
    fused = [e for e in report.events if e.fused]
    custom = [n.op_type for n in proto.graph.node if n.domain == "ai.moe_fusion"]
    print(f"wrote {args.output}: {len(proto.graph.node)} nodes, custom {custom}, {len(fused)} fusion(s)")
    return 0
