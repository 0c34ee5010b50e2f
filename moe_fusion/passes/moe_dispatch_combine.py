"""What the expert-parallel MoE passes share: the ``MoeBlock`` match record, the rewrite into
``dispatch_v2 -> npu_ffn_grouped -> combine_v2``, and small graph readers.

The two pattern families live in ``allgather_ep.py`` (all_gather + masked dense experts +
reduce_scatter) and ``capacity_a2a.py`` (capacity einsums + all_to_all). Each builds a
``MoeBlock`` once every guard has passed; ``rewrite`` then emits, before the block's output::

    expert_ids:  "i32[S, K]"       = convert_element_type(topk_ids, int32)
    scales:      "f32[S, K]"       = <the block's top-k weights, as fp32>
    dispatch:    (7 tensors)       = moe_fusion.npu_moe_distribute_dispatch_v2(x, expert_ids, group, W, r, E)
    expand_x:    "T[A, H]"         = dispatch[0]     (rows local-expert-major; A = S*W*min(L, K))
    ffn:         "T[A, H]"         = moe_fusion.npu_ffn_grouped(expand_x, stack(W1_e), stack(W2_e), act,
                                                                expert_tokens=dispatch[3])
    out:         "T[S, H]"         = moe_fusion.npu_moe_distribute_combine_v2(ffn, expert_ids, dispatch[2],
                                         dispatch[4], scales, group, W, r, E, tp_send_counts=dispatch[5],
                                         shared_expert_x=shared)

The per-expert row counts stay on the device (``dispatch[3]`` feeds ``npu_ffn_grouped``): no host
read, no data-dependent shape. Every op is built through its fake kernel, which runs the op
proto's checks under the compile target (``run_fusion_passes`` sets it), so a block the target's
kernels would reject is refused with the proto's message and the graph is left as it was.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.distributed as dist
import torch.fx as fx

from ..errors import OpValidationError
from ._graph import VIEW_OPS, erase_unused, insert_call, insert_getitem, is_op, val
from ._layout import is_identity_copy
from .collectives import Collective, collective_producing
from .context import PassContext, Refusal

if TYPE_CHECKING:
    from .ffn import FfnMatch

aten, prims = torch.ops.aten, torch.ops.prims
mf = torch.ops.moe_fusion
F32 = torch.float32

# Ops that move or copy elements without changing them (what lies between a collective and its users).
MOVE_OPS = VIEW_OPS + (aten.permute.default, aten.transpose.int, aten.unsqueeze.default, aten.squeeze.dim,
                       aten.squeeze.default, aten.squeeze.dims, aten.clone.default, aten.alias.default,
                       aten.expand.default, aten.flatten.using_ints)


# ---------------------------------------------------------------------------------------------
# Graph readers
# ---------------------------------------------------------------------------------------------

def float_cast(node: fx.Node) -> bool:
    """``node`` converts a floating tensor to another floating dtype."""
    return (is_op(node, prims.convert_element_type) and isinstance(node.args[0], fx.Node)
            and val(node.args[0]).dtype.is_floating_point and node.args[1].is_floating_point)


def widening_cast(node: fx.Node) -> bool:
    """A float cast that keeps every value (e.g. bf16 -> fp32)."""
    return float_cast(node) and torch.finfo(node.args[1]).bits >= torch.finfo(val(node.args[0]).dtype).bits


def strip_up(node: fx.Node) -> fx.Node:
    """The first node above ``node`` that is not a view."""
    while is_op(node, *VIEW_OPS):
        node = node.args[0]
    return node


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
    if len(users) == 1 and is_op(users[0], aten.copy.default) and is_identity_copy(users[0], found.result):
        return users[0]
    return found.result


def group_rank(group_name: str) -> int:
    """This process's rank in the named group (the rewrite bakes it into ``ep_rank_id``)."""
    try:
        from torch.distributed.distributed_c10d import _resolve_process_group

        return dist.get_rank(_resolve_process_group(group_name))
    except Exception as error:  # noqa: BLE001 - any failure means the rank is unknown
        raise Refusal(f"the group {group_name!r} does not resolve to a process group here ({error}); "
                      "dispatch_v2 needs this rank's position in it") from error


def depends_on(node: fx.Node, ancestor: fx.Node) -> bool:
    """``ancestor`` is ``node`` or one of its inputs, transitively."""
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if current is ancestor:
            return True
        if current in seen:
            continue
        seen.add(current)
        stack.extend(current.all_input_nodes)
    return False


def topk_source(node: fx.Node) -> fx.Node:
    """The ``aten.topk`` node whose indices ``node`` is (through views and integer casts)."""
    while is_op(node, *VIEW_OPS) or is_op(node, prims.convert_element_type):
        node = node.args[0]
    if node.target.__name__ == "getitem" and node.args[1] == 1 and is_op(node.args[0], aten.topk):
        return node.args[0]
    raise Refusal(f"the expert ids ({node.name}) are not the indices of a torch.topk in the graph, so they are "
                  "not provably unique per token and within [0, E) as dispatch_v2 requires")


def topk_layout(topk: fx.Node) -> tuple[int, int]:
    """``(num_experts, k)`` of a top-k over the last dim of a 2-D gate ``(S, E)``; raises Refusal."""
    scores = val(topk.args[0])
    k = topk.args[1]
    dim = topk.args[2] if len(topk.args) > 2 else topk.kwargs.get("dim", -1)
    largest = topk.args[3] if len(topk.args) > 3 else topk.kwargs.get("largest", True)
    # dispatch_v2 takes (S, K) ids of a 2-D token batch; top-k over another dim is no expert choice.
    if scores.dim() != 2 or dim % 2 != 1 or not largest or not isinstance(k, int):
        raise Refusal(f"the top-k {topk.name} is not a largest-k over the last dim of a 2-D gate")
    return scores.size(1), k


def ffn_matches(graph: fx.Graph) -> dict[fx.Node, FfnMatch]:
    """Every plain/GLU FFN of the graph by its output node (expert candidates)."""
    # Imported here: importing ffn registers its pass, which must come after ours in PASSES.
    from .ffn import FfnMatch, find_ffn_patterns

    return {m.out: m for m in find_ffn_patterns(graph) if isinstance(m, FfnMatch)}


def check_same_experts(experts: list[FfnMatch]) -> None:
    """One npu_ffn_grouped call has one activation, one weight shape and one bias layout."""
    ref = experts[0]
    for e in experts[1:]:
        same = (e.activation == ref.activation and e.dtype == ref.dtype and e.has_bias1 == ref.has_bias1
                and (e.second.bias is None) == (ref.second.bias is None) and len(e.first) == len(ref.first)
                and val(e.second.weight).shape == val(ref.second.weight).shape
                and all(a.width == b.width and val(a.linear.weight).shape == val(b.linear.weight).shape
                        for a, b in zip(e.first, ref.first)))
        if not same:
            raise Refusal(f"the local experts differ ({ref.describe()} vs {e.describe()}); one grouped FFN needs "
                          "the same activation, shapes and biases")


# ---------------------------------------------------------------------------------------------
# Match record and rewrite
# ---------------------------------------------------------------------------------------------

@dataclass
class MoeBlock:
    """An expert-parallel MoE block proven equal to ``dispatch_v2 -> grouped FFN -> combine_v2``.

    ``x`` ``(S, H)`` (or a view-compatible shape) local tokens; ``expert_ids`` ``(S, K)`` integer
    top-k ids; ``scales`` builds the ``(S, K)`` weight of each (token, choice) in the graph;
    ``experts`` the FFNs of local experts ``0..L-1`` (global ``rank * L + i``); ``out`` the node the
    block's result replaces (the shared-expert add when ``shared`` is set); ``nodes`` the nodes
    the rewrite makes dead, collectives included.
    """

    pattern: str
    anchor: fx.Node
    x: fx.Node
    expert_ids: fx.Node
    scales: Callable[[fx.Graph, fx.Node], fx.Node]
    experts: list[FfnMatch]
    group_name: str
    world: int
    rank: int
    num_experts: int
    out: fx.Node
    shared: Optional[fx.Node] = None
    nodes: set[fx.Node] = field(default_factory=set)

    def describe(self) -> str:
        shared = ", shared expert as shared_expert_x" if self.shared is not None else ""
        return (f"dispatch_v2 -> npu_ffn_grouped({self.experts[0].activation}, {len(self.experts)} local experts) -> "
                f"combine_v2 over group {self.group_name!r} (W={self.world}, E={self.num_experts}, "
                f"K={val(self.expert_ids).size(1)}{shared})")


def _transposed(node: fx.Node) -> Optional[fx.Node]:
    """``w`` when ``node`` is ``w.t()`` of a 2-D ``w`` (how ``nn.Linear`` weights reach an mm)."""
    if is_op(node, aten.permute.default) and list(node.args[1]) == [1, 0]:
        return node.args[0]
    return None


def _stack(graph: fx.Graph, before: fx.Node, parts: list[fx.Node]) -> fx.Node:
    """``(E, ...)`` from ``E`` parts, as ``cat`` of ``unsqueeze``: post-grad graphs hold no
    ``aten.stack`` (a decomposed op inductor cannot lower there). Transposed 2-D parts are stacked
    untransposed and the stack transposed (a plain copy instead of a strided one, per step)."""
    plain = [_transposed(p) for p in parts]
    if all(p is not None for p in plain):
        stacked = _stack(graph, before, plain)
        return insert_call(graph, before, aten.permute.default, (stacked, [0, 2, 1]))
    rows = [insert_call(graph, before, aten.unsqueeze.default, (p, 0)) for p in parts]
    return insert_call(graph, before, aten.cat.default, (rows,))


def _grouped_ffn(graph: fx.Graph, before: fx.Node, experts: list[FfnMatch], rows: fx.Node,
                 counts: fx.Node) -> fx.Node:
    first = experts[0]
    w1 = _stack(graph, before, [e.weight1(graph, before) for e in experts])
    w2 = _stack(graph, before, [e.second.weight for e in experts])
    # npu_ffn_grouped takes fp32 biases with bf16 x (SPEC §5.5); the cast is exact.
    bias_dtype = F32 if first.dtype == torch.bfloat16 else first.dtype
    kwargs: dict = {"expert_tokens": counts}
    biases = (("bias1", [e.bias1(graph, before) for e in experts] if first.has_bias1 else None),
              ("bias2", [e.second.bias for e in experts] if first.second.bias is not None else None))
    for name, parts in biases:
        if parts is not None:
            bias = _stack(graph, before, parts)
            if val(bias).dtype != bias_dtype:
                bias = insert_call(graph, before, prims.convert_element_type.default, (bias, bias_dtype))
            kwargs[name] = bias
    # fp16 GLU keeps h in fp16 like the unfused graph (the device's only GLU mode); else high precision.
    kwargs["inner_precise"] = 1 if first.is_glu and first.dtype == torch.float16 else 0
    return insert_call(graph, before, mf.npu_ffn_grouped.default, (rows, w1, w2, first.activation), kwargs)


def _emit(graph: fx.Graph, block: MoeBlock) -> fx.Node:
    before = block.out
    x = block.x
    tokens, k = val(block.expert_ids).shape
    if val(x).dim() != 2:
        x = insert_call(graph, before, aten.view.default, (x, [tokens, val(x).size(-1)]))
    ids = insert_call(graph, before, prims.convert_element_type.default, (block.expert_ids, torch.int32))
    scales = block.scales(graph, before)
    if val(scales).dtype != F32:
        scales = insert_call(graph, before, prims.convert_element_type.default, (scales, F32))
    attrs = (block.group_name, block.world, block.rank, block.num_experts)
    dispatch = insert_call(graph, before, mf.npu_moe_distribute_dispatch_v2.default, (x, ids) + attrs)
    expand_x, assist, counts, ep_recv, tp_recv = (insert_getitem(graph, before, dispatch, i) for i in (0, 2, 3, 4, 5))
    rows = _grouped_ffn(graph, before, block.experts, expand_x, counts)
    kwargs = {"tp_send_counts": tp_recv}
    if block.shared is not None:
        kwargs["shared_expert_x"] = block.shared
    out = insert_call(graph, before, mf.npu_moe_distribute_combine_v2.default,
                      (rows, ids, assist, ep_recv, scales) + attrs, kwargs)
    if tuple(val(out).shape) != tuple(val(block.out).shape):
        out = insert_call(graph, before, aten.view.default, (out, list(val(block.out).shape)))
    return out


def rewrite(graph: fx.Graph, block: MoeBlock, ctx: PassContext) -> bool:
    """Replace ``block`` by dispatch -> grouped FFN -> combine; refuse (graph unchanged) when the
    compile target's protos reject the fused ops."""
    existing = set(graph.nodes)
    try:
        fused = _emit(graph, block)
    except OpValidationError as error:
        erase_unused([n for n in graph.nodes if n not in existing])
        ctx.refuse(block.pattern, block.anchor, f"the fused ops would be invalid on target {ctx.target}: {error}")
        return False
    block.out.replace_all_uses_with(fused)
    erase_unused(block.nodes | {block.out} | {n for e in block.experts for n in e.nodes | {e.out}})
    ctx.record_fused(block.pattern, fused, block.describe())
    return True


def shared_addend(routed: fx.Node) -> tuple[fx.Node, Optional[fx.Node]]:
    """``(out, shared)``: ``routed + shared`` when the routed result's only use adds a same-shape,
    same-dtype tensor computed without it (a shared expert, gated or not), else ``(routed, None)``."""
    users = list(routed.users)
    if len(users) != 1 or not is_op(users[0], aten.add.Tensor) or users[0].kwargs.get("alpha", 1) != 1:
        return routed, None
    add = users[0]
    other = add.args[1] if add.args[0] is routed else add.args[0]
    if (not isinstance(other, fx.Node) or other is routed or val(other).shape != val(routed).shape
            or val(other).dtype != val(routed).dtype or depends_on(other, routed)):
        return routed, None
    # combine_v2 adds shared_expert_x unweighted in fp32 and rounds once: the add's semantics.
    return add, other
