"""``moe_fusion.onnx.export``: torch.export -> (fusion passes) -> ONNX with the custom domain.

Steps:

1. ``torch.export.export(model, args, dynamic_shapes=...)``;
2. with ``fuse=True``: decompose to core ATen (``run_decompositions()``: ``linear`` becomes
   ``addmm``, as in post-grad graphs; inductor's own table would leave ``prims`` ops ONNX cannot
   translate) and run ``moe_fusion.passes.run_fusion_passes`` on the program's graph, so a model
   written unfused exports with fused nodes;
3. collectives of a group of one rank (``_c10d_functional`` all_to_all_single,
   all_gather_into_tensor, reduce_scatter_tensor, all_reduce + wait_tensor) become identities:
   they are, and ONNX has no collective ops. A collective on a larger group is an error;
4. ``torch.onnx.export(program, dynamo=True, custom_translation_table=translation_table())``;
5. with ``functions=True``: standard-op bodies for the local ops (``attach_functions``), so
   onnxruntime runs the model.
"""
from __future__ import annotations

import os
from dataclasses import replace
from typing import Any, Optional, Union

import onnx
import torch
import torch.fx as fx
from torch.export import ExportedProgram
from torch.export.graph_signature import TensorArgument

from ..groups import registered_group
from ..passes import FusionReport, run_fusion_passes
from ..passes.collectives import find_collectives
from .functions import Skipped, attach_functions
from .translation import translation_table

DEFAULT_OPSET = 20
# The default-domain opsets the export produces, checked one by one (at each, every single-op case
# of the ONNX tests exports at that opset, passes full_check and matches eager): torch.onnx's
# translations are written at opset 18 and onnxscript's version converter moves a model up to 25.
# Outside 18..25 torch.onnx.export either raises from the converter or keeps opset 18 and only
# logs it (onnx's own down-converter lacks adapters for ops such as Div-14 and BitwiseAnd).
MIN_OPSET, MAX_OPSET = 18, 25
NO_BODY_KEY = "moe_fusion.nodes_without_body"   # metadata_props key listing the nodes left without a body
_c10d = torch.ops._c10d_functional


def _group_size(name: str, declared: int) -> int:
    """The collective's group size: as the graph declares it, else the registered group's."""
    if declared:
        return declared
    group = registered_group(name)
    if group is None:
        raise ValueError(f"moe_fusion.onnx.export: an all_reduce runs on group {name!r}, which is not a process group "
                         "of this process; its size is unknown")
    return group.size()


def _all_reduces(graph: fx.Graph) -> list[tuple[fx.Node, fx.Node, str]]:
    """``(all_reduce, wait_tensor, group name)`` triples."""
    found = []
    for node in graph.find_nodes(op="call_function", target=_c10d.all_reduce.default):
        users = list(node.users)
        if len(users) == 1 and users[0].target == _c10d.wait_tensor.default:
            found.append((node, users[0], node.args[2]))
    return found


def _collectives(graph: fx.Graph) -> list[tuple[str, fx.Node, fx.Node, tuple, str, int]]:
    """``(kind, input, result, nodes, group name, declared group size or 0)`` of every collective."""
    records = [(c.kind, c.input, c.result, c.nodes, c.group_name, c.group_size) for c in find_collectives(graph)]
    return records + [("all_reduce", ar.args[0], wait, (ar, wait), name, 0) for ar, wait, name in _all_reduces(graph)]


def collectives_of_one_as_identity(graph: fx.Graph) -> int:
    """Replace every collective of a one-rank group by its input (in place); returns how many.
    Raises ValueError naming any collective left (on a larger group, or in an unknown form)."""
    replaced = 0
    while records := _collectives(graph):   # re-read: a replacement changes the next one's input
        kind, source, result, nodes, group, declared = records[0]
        size = _group_size(group, declared)
        if size != 1:
            raise ValueError(f"moe_fusion.onnx.export: {kind} on group {group!r} of {size} ranks has no ONNX form; "
                             "export the model for a world of one rank, or let the fusion passes fuse it")
        result.replace_all_uses_with(source)
        for node in reversed(nodes):
            graph.erase_node(node)
        replaced += 1
    left = [n for n in graph.nodes
            if n.op == "call_function" and getattr(n.target, "namespace", "") == "_c10d_functional"]
    if left:
        raise ValueError(f"moe_fusion.onnx.export: collective {left[0].target} has no ONNX form")
    return replaced


def _sync_output_specs(program: ExportedProgram) -> None:
    """Point the program's output specs at the graph's (possibly rewritten) output nodes."""
    outputs = program.graph.output_node().args[0]
    specs = program.graph_signature.output_specs
    for i, (spec, node) in enumerate(zip(specs, outputs)):
        if isinstance(spec.arg, TensorArgument) and isinstance(node, fx.Node):
            specs[i] = replace(spec, arg=TensorArgument(name=node.name))


def prepare_program(model: Union[torch.nn.Module, ExportedProgram], args: tuple, *, fuse: bool = True,
                    target: str = "portable", dynamic_shapes: Any = None,
                    report: Optional[FusionReport] = None) -> ExportedProgram:
    """Steps 1–3 of the module docstring: the program ``torch.onnx.export`` then translates."""
    program = model if isinstance(model, ExportedProgram) else torch.export.export(
        model, tuple(args), dynamic_shapes=dynamic_shapes)
    if fuse:
        program = program.run_decompositions()
        run_fusion_passes(program.graph, target=target, report=report)
    collectives_of_one_as_identity(program.graph)
    program.graph.eliminate_dead_code()
    program.graph_module.recompile()
    _sync_output_specs(program)
    return program


def check_opset(opset: int) -> int:
    """``opset`` when the export produces it (``MIN_OPSET``..``MAX_OPSET``); else ValueError."""
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset {opset} is not one the export produces: give {MIN_OPSET}..{MAX_OPSET} "
                         f"(default {DEFAULT_OPSET})")
    return opset


def export(model: Union[torch.nn.Module, ExportedProgram], args: tuple,
           path: Optional[Union[str, os.PathLike]] = None, *, fuse: bool = True, opset: int = DEFAULT_OPSET,
           target: str = "portable", dynamic_shapes: Any = None, functions: bool = True,
           report: Optional[FusionReport] = None) -> onnx.ModelProto:
    """Export ``model`` called on ``args`` to ONNX, moe_fusion ops as ``ai.moe_fusion`` nodes.

    Args:
        model: an ``nn.Module`` (or an ``ExportedProgram``) using plain torch and/or moe_fusion ops.
        args: example positional inputs.
        path: where to save the model (optional); the ``ModelProto`` is returned either way.
        fuse: run the fusion passes first (module docstring, step 2).
        opset: the default-domain opset, ``MIN_OPSET``..``MAX_OPSET`` (else ValueError, before any work).
        target: the compile target whose limits the fusion passes respect.
        dynamic_shapes: as for ``torch.export.export`` (e.g. a dynamic batch dim).
        functions: attach standard-op bodies to the local ops (onnxruntime runs them).
        report: a ``FusionReport`` to fill with what the passes fused or refused.
    """
    check_opset(opset)
    program = prepare_program(model, args, fuse=fuse, target=target, dynamic_shapes=dynamic_shapes, report=report)
    onnx_program = torch.onnx.export(program, tuple(args), dynamo=True, opset_version=opset,
                                     custom_translation_table=translation_table(), verbose=False)
    proto = onnx_program.model_proto
    if functions:
        skipped: list[Skipped] = attach_functions(proto)
        if skipped:   # these nodes run in the reference evaluator only
            onnx.helper.set_model_props(proto, {NO_BODY_KEY: "; ".join(f"{s.node}: {s.reason}" for s in skipped)})
    if path is not None:
        onnx.save(proto, os.fspath(path))
    return proto
