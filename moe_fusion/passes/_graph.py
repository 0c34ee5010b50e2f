"""Small FX helpers shared by the fusion passes: op tests, view chains, node insertion with
``meta["val"]``, and erasing replaced nodes (collectives included)."""
from __future__ import annotations

import contextlib
import operator
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch.utils._pytree import tree_leaves, tree_map

aten = torch.ops.aten

VIEW_OPS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
# A copy that keeps values: inductor materializes permuted tensors with clone before a reshape.
COPY_OPS = (aten.clone.default, aten.contiguous.default)


def is_op(node: Any, *targets: Any) -> bool:
    """``node`` calls one of ``targets`` (OpOverloads or OpOverloadPackets)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    packet = getattr(node.target, "overloadpacket", None)
    return any(node.target is t or packet is t for t in targets)


def val(node: Any) -> Any:
    """The example value (FakeTensor) of a node, or the constant itself."""
    return node.meta.get("val") if isinstance(node, fx.Node) else node


def shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(val(node).shape)


def single_user(node: fx.Node) -> Optional[fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def follow_single_users(node: fx.Node, targets: Sequence[Any]) -> tuple[fx.Node, list[fx.Node]]:
    """Walk down from ``node`` through single-user nodes calling ``targets``; return the last node
    reached and the nodes walked (excluding ``node``)."""
    walked: list[fx.Node] = []
    current = node
    while True:
        user = single_user(current)
        if user is None or not is_op(user, *targets) or user.args[0] is not current:
            return current, walked
        walked.append(user)
        current = user


def insert_call(graph: fx.Graph, before: fx.Node, target: Any, args: tuple, kwargs: Optional[dict] = None) -> fx.Node:
    """Insert ``target(*args, **kwargs)`` before ``before``, with ``meta["val"]`` from its fake kernel."""
    kwargs = kwargs or {}
    with graph.inserting_before(before):
        node = graph.call_function(target, args, kwargs)
    example_args, example_kwargs = tree_map(val, (args, kwargs))
    fake_mode = detect_fake_mode(tuple(a for a in tree_leaves((example_args, example_kwargs))
                                       if isinstance(a, torch.Tensor)))
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
