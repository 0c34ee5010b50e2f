"""Recognize collectives in post-grad FX graphs, whatever form the user wrote them in.

``torch.distributed._functional_collectives`` and ``dist.all_to_all_single`` /
``dist.all_gather_into_tensor`` / ``dist.reduce_scatter_tensor`` traced by dynamo all become
``_c10d_functional.<op>`` followed by ``_c10d_functional.wait_tensor``. Each recognizer turns
one such pair into a ``Collective`` record naming the group, its size and the input and result
nodes, so patterns never look at argument positions themselves. Group names are resolved here
(``group_rank``, ``group_size_refusal``) for the passes that bake a rank or a size into the graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.fx as fx

from ..groups import registered_group
from ._graph import is_op
from .context import Refusal

aten = torch.ops.aten
c10d = torch.ops._c10d_functional
# group_tp for a TP group of one rank: never looked up, only has to differ from group_ep.
SOLO_TP_GROUP = "moe_fusion.solo_tp"


@dataclass(frozen=True)
class Collective:
    """One collective call. ``result`` is the node whose value is the collective's output (the
    ``wait_tensor``); ``nodes`` are the nodes to erase when the collective is replaced."""

    kind: str                    # "all_to_all" | "all_gather" | "reduce_scatter"
    input: fx.Node
    result: fx.Node
    group_name: str
    group_size: int
    nodes: tuple[fx.Node, ...]
    # all_to_all only: the split sizes, None when equal splits are implied.
    output_split_sizes: Optional[tuple] = None
    input_split_sizes: Optional[tuple] = None
    reduce_op: Optional[str] = None

    @property
    def equal_splits(self) -> bool:
        """All-to-all with the same number of dim-0 rows to and from every peer."""
        if self.kind != "all_to_all":
            return False
        rows = self.input.meta["val"].size(0)
        even = (rows // self.group_size,) * self.group_size
        return rows % self.group_size == 0 and all(
            s is None or tuple(s) == even for s in (self.output_split_sizes, self.input_split_sizes))


def waited_by(node: fx.Node) -> Optional[fx.Node]:
    """The wait_tensor consuming ``node`` when it is the only user besides reads of its sizes (an
    all-to-all with split sizes read from the data has a symbolic row count others read)."""
    users = [u for u in node.users if not is_op(u, aten.sym_size.int)]
    if len(users) == 1 and is_op(users[0], c10d.wait_tensor):
        return users[0]
    return None


def _c10d_all_to_all(node: fx.Node) -> Optional[Collective]:
    # The differentiable form (funcol's ``all_to_all_single_autograd``) computes the same forward.
    if not is_op(node, c10d.all_to_all_single, torch.ops._c10d_functional_autograd.all_to_all_single):
        return None
    wait = waited_by(node)
    if wait is None:
        return None
    inp, out_splits, in_splits, group_name = node.args[:4]
    size = len(out_splits) if out_splits else len(in_splits)
    return Collective("all_to_all", inp, wait, group_name, size, (node, wait),
                      tuple(out_splits) if out_splits else None, tuple(in_splits) if in_splits else None)


def _c10d_all_gather(node: fx.Node) -> Optional[Collective]:
    if not is_op(node, c10d.all_gather_into_tensor):
        return None
    wait = waited_by(node)
    if wait is None:
        return None
    inp, group_size, group_name = node.args[:3]
    return Collective("all_gather", inp, wait, group_name, group_size, (node, wait))


def _c10d_reduce_scatter(node: fx.Node) -> Optional[Collective]:
    if not is_op(node, c10d.reduce_scatter_tensor):
        return None
    wait = waited_by(node)
    if wait is None:
        return None
    inp, reduce_op, group_size, group_name = node.args[:4]
    return Collective("reduce_scatter", inp, wait, group_name, group_size, (node, wait), reduce_op=reduce_op)


# Recognizers tried on every node; torchair's forms register here too (passes.torchair_collectives).
RECOGNIZERS: list[Callable[[fx.Node], Optional[Collective]]] = [_c10d_all_to_all, _c10d_all_gather, _c10d_reduce_scatter]


def as_collective(node: fx.Node) -> Optional[Collective]:
    """The collective whose issuing node is ``node``, if any."""
    for recognize in RECOGNIZERS:
        found = recognize(node)
        if found is not None:
            return found
    return None


def collective_producing(result: fx.Node) -> Optional[Collective]:
    """The collective whose result node is ``result`` (e.g. a ``wait_tensor``), if any."""
    for candidate in result.all_input_nodes:
        found = as_collective(candidate)
        if found is not None and found.result is result:
            return found
    return as_collective(result)


def find_collectives(graph: fx.Graph, kind: Optional[str] = None) -> list[Collective]:
    found = [c for c in map(as_collective, graph.nodes) if c is not None]
    return [c for c in found if kind is None or c.kind == kind]


def is_identity_copy(node: fx.Node, src: fx.Node) -> bool:
    """``aten.copy(dst, src)`` into a same-shape, same-dtype buffer: how dynamo's out= collectives
    (``dist.all_to_all_single(out, inp)``) hand their result over; the value is ``src``'s."""
    if not is_op(node, aten.copy.default) or node.args[1] is not src or node.args[0] is src:
        return False
    dst, value = node.args[0].meta["val"], src.meta["val"]
    return tuple(dst.shape) == tuple(value.shape) and dst.dtype == value.dtype


def collective_value(node: fx.Node) -> Optional[tuple[Collective, fx.Node]]:
    """``(collective, value node)`` when ``node`` is a collective's result: its ``wait_tensor``, or
    the ``copy`` of it into an ``out=`` buffer (``dist.all_gather_into_tensor(out, x)`` traced)."""
    if is_op(node, aten.copy.default) and is_identity_copy(node, node.args[1]):
        found = collective_producing(node.args[1])
        if found is not None and found.result is node.args[1]:
            return found, node
    found = collective_producing(node)
    return (found, node) if found is not None and found.result is node else None


def collective_nodes(found: Collective, value: fx.Node) -> set[fx.Node]:
    """The nodes a replaced collective leaves behind: issue, wait, and the out= copy and buffer."""
    nodes = set(found.nodes) | {value}
    if value is not found.result:
        buffer = value.args[0]
        if buffer.op == "call_function" and len(buffer.users) == 1:
            nodes.add(buffer)
    return nodes


def output_value(found: Collective) -> fx.Node:
    """The node holding ``found``'s result for its users: the out= copy when there is one."""
    users = list(found.result.users)
    if len(users) == 1 and is_identity_copy(users[0], found.result):
        return users[0]
    return found.result


def group_rank(group_name: str) -> int:
    """This process's rank in the named group (a rewrite that bakes it into the graph needs it)."""
    group = registered_group(group_name)
    if group is None:
        raise Refusal(f"the group {group_name!r} does not resolve to a process group here; the fused op needs "
                      "this rank's position in it")
    return group.rank()


def group_size_refusal(collective: Collective, what: str) -> Optional[str]:
    """Why the collective's group size in the graph disagrees with the registered group, if it does."""
    group = registered_group(collective.group_name)
    if group is not None and group.size() != collective.group_size:
        return (f"group sizes inconsistent: the {what} treats group {collective.group_name!r} as "
                f"{collective.group_size} ranks but it has {group.size()}")
    return None
