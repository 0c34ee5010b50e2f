"""Small FX helpers shared by the fusion passes: op tests, walking views and ancestors, node
insertion with ``meta["val"]``, and erasing replaced nodes (collectives included)."""
from __future__ import annotations

import contextlib
import operator
from typing import Any, Iterable, Iterator

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.utils._pytree import tree_leaves, tree_map

from ..errors import OpValidationError
from ..targets import get_target
from .context import Refusal, untrainable
from .vocabulary import VIEW_OPS


def is_op(node: Any, *targets: Any) -> bool:
    """``node`` calls one of ``targets`` (OpOverloads or OpOverloadPackets)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    packet = getattr(node.target, "overloadpacket", None)
    return any(node.target is t or packet is t for t in targets)


def val(node: Any) -> Any:
    """The example value (FakeTensor) of a node, or the constant itself."""
    return node.meta.get("val") if isinstance(node, fx.Node) else node


def same_size(a: Any, b: Any) -> bool:
    """Sizes (ints or SymInts) known equal without adding a guard."""
    return statically_known_true(a == b)


def is_size(node: fx.Node) -> bool:
    """``node`` holds a size (an int or SymInt: ``sym_size``, ``operator.mul`` of sizes, a count read
    with ``.item()``), not tensor values."""
    value = node.meta.get("val")
    return isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool)


def strip_views(node: fx.Node) -> fx.Node:
    """The first node above ``node`` that is not a view."""
    while is_op(node, *VIEW_OPS):
        node = node.args[0]
    return node


def ancestors(node: fx.Node) -> set[fx.Node]:
    """``node`` and every node it reads, transitively."""
    out, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current not in out:
            out.add(current)
            stack.extend(current.all_input_nodes)
    return out


def depends_on(node: fx.Node, ancestor: fx.Node) -> bool:
    """``ancestor`` is ``node`` or one of its inputs, transitively."""
    return ancestor in ancestors(node)


def in_graph_order(nodes: Iterable[fx.Node]) -> list[fx.Node]:
    nodes = set(nodes)
    if len(nodes) <= 1:   # no graph walk for one node (guards evaluate node by node)
        return list(nodes)
    graph = next(iter(nodes)).graph
    return [n for n in graph.nodes if n in nodes]


def insert_call(graph: fx.Graph, before: fx.Node, target: Any, args: tuple, kwargs: dict | None = None) -> fx.Node:
    """Insert ``target(*args, **kwargs)`` before ``before``, with ``meta["val"]`` from its fake kernel
    (run in the fake mode of the tensor arguments, or of ``before``'s value for an op without any,
    e.g. ``aten.arange``)."""
    kwargs = kwargs or {}
    with graph.inserting_before(before):
        node = graph.call_function(target, args, kwargs)
    example_args, example_kwargs = tree_map(val, (args, kwargs))
    tensors = [a for a in tree_leaves((example_args, example_kwargs)) if isinstance(a, torch.Tensor)]
    fake_mode = detect_fake_mode(tuple(tensors or [a for a in tree_leaves(val(before)) if isinstance(a, torch.Tensor)]))
    try:
        with fake_mode if fake_mode is not None else contextlib.nullcontext():
            node.meta["val"] = target(*example_args, **example_kwargs)
    except Exception:
        graph.erase_node(node)   # leave the graph as it was when the op rejects its inputs
        raise
    return node


def insert_getitem(graph: fx.Graph, before: fx.Node, tuple_node: fx.Node, index: int) -> fx.Node:
    with graph.inserting_before(before):
        node = graph.call_function(operator.getitem, (tuple_node, index))
    node.meta["val"] = tuple_node.meta["val"][index]
    return node


def cast(graph: fx.Graph, before: fx.Node, node: fx.Node, dtype: torch.dtype) -> fx.Node:
    """``node`` converted to ``dtype`` (``node`` itself when it has that dtype)."""
    if val(node).dtype == dtype:
        return node
    return insert_call(graph, before, torch.ops.prims.convert_element_type.default, (node, dtype))


@contextlib.contextmanager
def fused_ops_or_refusal(graph: fx.Graph, what: str) -> Iterator[None]:
    """Insert fused ops inside this block; when one of them rejects its inputs under the compile
    target (its fake kernel raises ``OpValidationError``), or cannot be trained in the graph being
    fused for training (``context.untrainable``), erase every node inserted in the block and raise
    ``Refusal`` with the reason, leaving the graph as it was."""
    existing = set(graph.nodes)
    try:
        yield
    except OpValidationError as error:
        erase_unused([n for n in graph.nodes if n not in existing])
        raise Refusal(f"{what} would be invalid on target {get_target()}: {error}") from error
    inserted = [n for n in graph.nodes if n not in existing]
    reasons = sorted({reason for n in inserted if n.op == "call_function"
                      for reason in [untrainable(n.target)] if reason})
    if reasons:
        erase_unused(inserted)
        raise Refusal(f"{what} cannot be trained here: {'; '.join(reasons)}")


def erase_unused(nodes: Iterable[fx.Node]) -> None:
    """Erase ``nodes`` (last first) that no longer have users. Done by hand because dead-code
    elimination keeps collectives (they have side effects) and they would then run twice."""
    nodes = set(nodes)
    if not nodes:
        return
    graph = next(iter(nodes)).graph
    for node in reversed(list(graph.nodes)):
        if node in nodes and not node.users:
            graph.erase_node(node)


def float_cast(node: fx.Node) -> bool:
    """``node`` converts a floating tensor to another floating dtype."""
    return (is_op(node, torch.ops.prims.convert_element_type) and isinstance(node.args[0], fx.Node)
            and val(node.args[0]).dtype.is_floating_point and node.args[1].is_floating_point)


def widening_cast(node: fx.Node) -> bool:
    """A float cast that keeps every value (e.g. bf16 -> fp32)."""
    return float_cast(node) and torch.finfo(node.args[1]).bits >= torch.finfo(val(node.args[0]).dtype).bits
