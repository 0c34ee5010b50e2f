"""Build GE graphs from torch code with torchair, and read them back.

* ``trace_ge_graph(torchair, fn, inputs)``: ``make_fx`` with fake tensors, then torchair's FX→GE
  compiler (``torchair.get_compiler``) on the traced graph; no dynamo.
* ``compile_ge_graph(torchair, fn, inputs, dump_dir)``: ``torch.compile`` with
  ``torchair.get_npu_backend()`` and a text graph dump, called on CPU tensors; the stub raises
  when torchair loads the finished graph, and the dump is parsed back into a ``GraphDef``.
* ``compile_training_ge_graphs(...)``: the same for inputs that require grad, with AOT autograd
  compiling the backward at once (``force_non_lazy_backward_lowering``): the forward and backward
  GE graphs as torchair converted them, before its own GE-level optimizations.

Readers: ``nodes`` (of one op type), ``wiring`` (GE input name → source ``"<node>:<index>"``, or
``""`` for an empty optional input), ``attrs`` (plain values), ``output_dtypes`` (``DT_*`` names).
"""
from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional, Sequence

import pytest
import torch
from google.protobuf import text_format
from torch.fx.experimental.proxy_tensor import make_fx


def _as_tuple(fn: Callable[..., Any]) -> Callable[..., tuple]:
    """torchair's compiler expects an FX graph returning a tuple, as AOT graphs do."""
    def wrapped(*args: Any) -> tuple:
        out = fn(*args)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    return wrapped


def trace_ge_graph(torchair: ModuleType, fn: Callable[..., Any], inputs: Sequence[torch.Tensor]) -> Any:
    """The GE ``GraphDef`` torchair builds for ``fn(*inputs)`` traced with fake tensors."""
    gm = make_fx(_as_tuple(fn), tracing_mode="fake")(*inputs)
    compiled = torchair.get_compiler(torchair.CompilerConfig())(gm, list(inputs))
    return compiled.runner.graph._proto


def compile_ge_graph(torchair: ModuleType, fn: Callable[..., Any], inputs: Sequence[torch.Tensor],
                     dump_dir: Path, make_backend: Optional[Callable[[Any], Any]] = None) -> Any:
    """The GE ``GraphDef`` dumped by ``torch.compile(fn, backend=make_backend(config))``, where
    ``config`` is a ``CompilerConfig`` with the text dump set up (default backend: torchair's npu backend)."""
    from moe_fusion.ge_plugin._torchair_stub import GeRuntimeUnavailable
    from torchair._ge_concrete_graph.ge_ir_pb2 import GraphDef

    config = torchair.CompilerConfig()
    config.debug.graph_dump.type = "txt"
    config.debug.graph_dump.path = str(dump_dir)
    backend = make_backend(config) if make_backend is not None else torchair.get_npu_backend(compiler_config=config)
    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    with pytest.raises(GeRuntimeUnavailable, match="cannot load GE graph"):
        compiled(*inputs)
    dumps = sorted(dump_dir.glob("dynamo_optimized_graph_*.txt"))
    assert len(dumps) == 1, f"expected one optimized GE graph dump, found {dumps}"
    return text_format.Parse(dumps[0].read_text(), GraphDef())


def compile_training_ge_graphs(torchair: ModuleType, fn: Callable[..., Any], inputs: Sequence[torch.Tensor],
                               dump_dir: Path, make_backend: Callable[[Any], Any]) -> tuple[Any, Any]:
    """``(forward, backward)`` GE ``GraphDef``s of ``torch.compile(fn, backend=make_backend(config))``
    called on ``inputs`` (some requiring grad). The backward is compiled with the forward, so both
    are dumped although the stub cannot run the forward."""
    from moe_fusion.ge_plugin._torchair_stub import GeRuntimeUnavailable
    from torchair._ge_concrete_graph.ge_ir_pb2 import GraphDef

    config = torchair.CompilerConfig()
    config.debug.graph_dump.type = "txt"
    config.debug.graph_dump.path = str(dump_dir)
    compiled = torch.compile(fn, backend=make_backend(config), fullgraph=True)
    with torch._functorch.config.patch(force_non_lazy_backward_lowering=True), \
            pytest.raises(GeRuntimeUnavailable, match="cannot load GE graph"):
        compiled(*inputs)
    dumps = sorted(dump_dir.glob("dynamo_original_graph_*.txt"), key=lambda p: int(p.name.split("_")[3]))
    assert len(dumps) == 2, f"expected a forward and a backward GE graph dump, found {dumps}"
    return tuple(text_format.Parse(d.read_text(), GraphDef()) for d in dumps)


def nodes(graph: Any, op_type: str) -> list[Any]:
    return [op for op in graph.op if op.type == op_type]


def node(graph: Any, op_type: str) -> Any:
    """The one node of ``op_type``."""
    found = nodes(graph, op_type)
    assert len(found) == 1, f"expected one {op_type} node, found {len(found)} in {[op.type for op in graph.op]}"
    return found[0]


def wiring(op: Any) -> dict[str, str]:
    """GE input name → ``"<source node>:<output index>"``, ``""`` for an empty optional input."""
    sources = [i for i in op.input if not i.startswith("^")]
    return {desc.name: source for desc, source in zip(op.input_desc, sources)}


def _value(attr: Any) -> Any:
    field = attr.WhichOneof("value")
    if field == "s":
        return attr.s.decode()
    if field == "list":
        return list(attr.list.i) or list(attr.list.f) or [s.decode() for s in attr.list.s] or list(attr.list.b)
    return getattr(attr, field)


def attrs(op: Any) -> dict[str, Any]:
    """The GE attrs of a node as plain values (torchair's own ``_*`` annotations left out)."""
    return {name: _value(value) for name, value in op.attr.items() if not name.startswith("_")}


def output_dtypes(op: Any) -> list[str]:
    from torchair._ge_concrete_graph.ge_ir_pb2 import DataType

    return [DataType.Name(desc.dtype) for desc in op.output_desc]


def data_shape(graph: Any, source: str) -> list[int]:
    """Shape of the graph input (Data node) behind ``source`` (``"<node>:0"``)."""
    data = next(op for op in graph.op if op.name == source.split(":")[0])
    assert data.type == "Data", f"{source} is a {data.type}, not a graph input"
    return list(data.output_desc[0].shape.dim)
