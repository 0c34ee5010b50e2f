"""What the expert-parallel MoE passes share: the ``MoeBlock`` match record, its rewrite into
``dispatch_v2 -> npu_ffn_grouped -> combine_v2``, and the routing readers (top-k, shared expert).

The two pattern families live in ``allgather_ep.py`` (all_gather + masked dense experts +
reduce_scatter) and ``capacity_a2a.py`` (capacity einsums + all_to_all). Each builds a
``MoeBlock`` once every guard has passed; ``MoeBlock.replace_with`` then emits the fused ops.

The per-expert row counts stay on the device (``dispatch[3]`` feeds ``npu_ffn_grouped``): no host
read, no data-dependent shape. Every op is built through its fake kernel, which runs the op
proto's checks under the compile target (``run_fusion_passes`` sets it), so a block the target's
kernels would reject is refused with the proto's message and the graph is left as it was.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.fx as fx

from ._graph import cast, depends_on, erase_unused, fused_ops_or_refusal, insert_call, insert_getitem, is_op, val
from .context import Refusal
from .cost import refuse_slower_ffn
from .emit import ffn_operands
from .ffn_forms import FfnMatch
from .vocabulary import VIEW_OPS

aten, prims = torch.ops.aten, torch.ops.prims
mf = torch.ops.moe_fusion
# Builds a value of the rewrite in the graph: ``build(graph, before)`` inserts its nodes before ``before``.
Builder = Callable[[fx.Graph, fx.Node], fx.Node]


def existing(node: fx.Node) -> Builder:
    """The builder of a value the graph already holds."""
    return lambda graph, before: node


def topk_source(node: fx.Node) -> fx.Node:
    """The ``aten.topk`` node whose indices ``node`` is (through views and integer casts)."""
    while is_op(node, *VIEW_OPS) or is_op(node, prims.convert_element_type):
        node = node.args[0]
    if node.target is operator.getitem and node.args[1] == 1 and is_op(node.args[0], aten.topk):
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


@dataclass
class MoeBlock:
    """An expert-parallel MoE block proven equal to ``dispatch_v2 -> grouped FFN -> combine_v2``.

    ``x`` ``(S, H)`` (or a view-compatible shape) local tokens; ``expert_ids`` builds the ``(S, K)``
    integer expert of each (token, choice) in the graph (``top_k`` = K), ``scales`` its weight and
    ``active_mask`` (when routes may be dropped) its bool ``(S, K)`` "this route is computed";
    ``experts`` the FFNs of local experts ``0..L-1`` (global ``rank * L + i``), or one grouped FFN
    over the ``L`` local experts' stacked weights (whose dtype the rows are cast to); ``out`` the
    node the block's result replaces (the shared-expert add when ``shared`` is set); ``replaced``
    the other nodes the rewrite makes dead, collectives included.
    """

    pattern: str
    anchor: fx.Node
    x: fx.Node
    expert_ids: Builder
    top_k: int
    scales: Builder
    experts: list[FfnMatch]
    group_name: str
    world: int
    rank: int
    num_experts: int
    out: fx.Node
    shared: Optional[fx.Node]
    replaced: frozenset[fx.Node]
    active_mask: Optional[Builder] = None

    @property
    def nodes(self) -> frozenset[fx.Node]:
        return self.replaced | {self.out} | frozenset().union(*(e.nodes for e in self.experts))

    def describe(self) -> str:
        shared = ", shared expert as shared_expert_x" if self.shared is not None else ""
        mask = ", dropped routes as a 2-D x_active_mask" if self.active_mask is not None else ""
        local = self.num_experts // self.world
        return (f"dispatch_v2 -> npu_ffn_grouped({self.experts[0].activation}, {local} local experts) -> "
                f"combine_v2 over group {self.group_name!r} (W={self.world}, E={self.num_experts}, "
                f"K={self.top_k}{shared}{mask})")

    def replace_with(self, graph: fx.Graph) -> fx.Node:
        """Emit the fused ops before ``out`` and route its uses to them.

        After (``S`` tokens, ``K`` choices, ``W`` ranks, ``L`` local experts, rank ``r``)::

            expert_ids:  "i32[S, K]"   = convert_element_type(topk_ids, int32)
            scales:      "f32[S, K]"   = <the block's top-k weights, as fp32>
            dispatch:    (7 tensors)   = moe_fusion.npu_moe_distribute_dispatch_v2(x, expert_ids, group, W, r, E)
            expand_x:    "T[A, H]"     = dispatch[0]     (rows local-expert-major; A = S*W*min(L, K))
            ffn:         "T[A, H]"     = moe_fusion.npu_ffn_grouped(expand_x, stack(W1_e), stack(W2_e), act,
                                                                    expert_tokens=dispatch[3])
            out:         "T[S, H]"     = moe_fusion.npu_moe_distribute_combine_v2(ffn, expert_ids, dispatch[2],
                                             dispatch[4], scales, group, W, r, E, tp_send_counts=dispatch[5],
                                             shared_expert_x=shared)

        The "before" forms are in the passes' docstrings (``allgather_ep``, ``capacity_a2a``).
        """
        before = self.out
        refuse_slower_ffn(self.experts[0].dtype, val(self.x).device)
        with fused_ops_or_refusal(graph, "dispatch_v2 -> npu_ffn_grouped -> combine_v2"):
            x = self.x
            if val(x).dim() != 2:
                x = insert_call(graph, before, aten.view.default, (x, [-1, val(x).size(-1)]))
            ids = cast(graph, before, self.expert_ids(graph, before), torch.int32)
            scales = cast(graph, before, self.scales(graph, before), torch.float32)
            attrs = (self.group_name, self.world, self.rank, self.num_experts)
            masked = {} if self.active_mask is None else {"x_active_mask": self.active_mask(graph, before)}
            dispatch = insert_call(graph, before, mf.npu_moe_distribute_dispatch_v2.default, (x, ids) + attrs, masked)
            expand_x, assist, counts, ep_recv, tp_recv = (insert_getitem(graph, before, dispatch, i)
                                                          for i in (0, 2, 3, 4, 5))
            grouped = self.experts[0].offs is not None      # its weights are the (L, ., .) stacks already
            w1, w2, ffn_kwargs = ffn_operands(graph, before, self.experts, stacked=not grouped)
            ffn_in = cast(graph, before, expand_x, self.experts[0].dtype)
            rows = insert_call(graph, before, mf.npu_ffn_grouped.default, (ffn_in, w1, w2, self.experts[0].activation),
                               {"expert_tokens": counts, **ffn_kwargs})
            rows = cast(graph, before, rows, val(expand_x).dtype)
            kwargs = {"tp_send_counts": tp_recv, **masked}
            if self.shared is not None:
                kwargs["shared_expert_x"] = self.shared
            fused = insert_call(graph, before, mf.npu_moe_distribute_combine_v2.default,
                                (rows, ids, assist, ep_recv, scales) + attrs, kwargs)
            if tuple(val(fused).shape) != tuple(val(before).shape):
                fused = insert_call(graph, before, aten.view.default, (fused, list(val(before).shape)))
        before.replace_all_uses_with(fused)
        return fused

    def erase(self) -> None:
        erase_unused(self.nodes)
