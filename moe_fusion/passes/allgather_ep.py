"""AllGather-EP MoE => ``dispatch_v2 -> npu_ffn_grouped -> combine_v2`` (pass ``moe_allgather_ep``).

The static-shape MoE form where every EP rank sees every token::

    gx, gids, gw = all_gather(x), all_gather(topk_ids), all_gather(topk_weights)     # over EP, (W*S, ..)
    out = sum_i expert_i(gx) * (gw * (gids == r*L + i)).sum(-1, keepdim=True)      # local experts i < L
    y = reduce_scatter(out, "sum")  [+ shared(x)]                                   # (S, H)

Token ``t``'s row of ``y`` is ``sum_k w[t,k] * expert_{ids[t,k]}(x[t])`` (+ ``shared(x[t])``): exactly
what dispatch_v2/combine_v2 compute with ``expert_scales = topk_weights``, routing each token only
to its own experts instead of running every local expert on every gathered token.

Guards (each refusal names the node and the reason in the fusion report):

* the three all_gathers and the reduce_scatter run over one group (same name, same size) and the
  reduction is a sum;
* each summed term is ``ffn(gx) * w`` with ``w = (gw * (gids == e)).sum(-1, keepdim=True)`` (a
  bool mask, possibly cast, times the gathered top-k weights; any other weight formula is refused);
* the ids are the indices of a ``torch.topk`` over a 2-D gate of width ``E`` (unique per token, in
  ``[0, E)``), and ``E == W * L``;
* this rank's experts are exactly ``[r*L, (r+1)*L)`` (contiguous placement, as dispatch_v2 places them);
* the experts are FFNs with one activation and one shape; the gathered tensors and intermediates
  are used by the block only (they disappear);
* the target's dispatch/FFN/combine protos accept the fused call (e.g. bf16/fp16 and H in
  [1024, 8192] on A3).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from ._graph import is_op, strip_views, val
from .collectives import Collective, collective_nodes, collective_value, find_collectives, group_rank, output_value
from .context import PassContext, Refusal, attempt
from .ffn_forms import FfnMatch, check_same_form, find_ffn_forms
from .moe_block import MoeBlock, existing, shared_addend, topk_layout, topk_source
from .vocabulary import VIEW_OPS

aten, prims = torch.ops.aten, torch.ops.prims
PATTERN = "moe_allgather_ep"
_WEIGHT_VIEWS = VIEW_OPS + (aten.unsqueeze.default,)
_ZERO_FILLS = (aten.full.default, aten.zeros.default, aten.zeros_like.default, aten.full_like.default)


@dataclass(frozen=True)
class _Term:
    """``expert(gx) * weight``, the contribution of global expert ``expert_id``."""

    expert: FfnMatch
    expert_id: int
    gathered_ids: fx.Node
    gathered_weights: fx.Node
    nodes: frozenset[fx.Node]


def _is_zero_fill(node: object) -> bool:
    """``0``, ``zeros(..)`` or ``full(.., 0)``: the start value of an accumulation."""
    if isinstance(node, (int, float)):
        return node == 0
    if not is_op(node, *_ZERO_FILLS):
        return False
    return is_op(node, aten.zeros.default, aten.zeros_like.default) or node.args[1] == 0


def _summands(root: fx.Node) -> tuple[list[fx.Node], set[fx.Node]]:
    """The non-zero leaves of the add tree at ``root`` and the tree's nodes (adds and zero fills)."""
    leaves: list[fx.Node] = []
    nodes: set[fx.Node] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if _is_zero_fill(node):
            if isinstance(node, fx.Node):
                nodes.add(node)
            continue
        inner = node is root or len(node.users) == 1
        if is_op(node, aten.add.Tensor) and node.kwargs.get("alpha", 1) == 1 and inner:
            nodes.add(node)
            stack.extend(reversed(node.args[:2]))
        else:
            leaves.append(node)
    return leaves, nodes


def _mask_of(node: fx.Node) -> Optional[tuple[fx.Node, int, tuple[fx.Node, ...]]]:
    """``(ids, e, nodes)`` when ``node`` is ``ids == e`` (optionally cast to a float dtype)."""
    nodes: tuple[fx.Node, ...] = ()
    if is_op(node, prims.convert_element_type):
        nodes, node = (node,), node.args[0]
    if is_op(node, aten.eq.Scalar) and isinstance(node.args[1], int):
        return node.args[0], node.args[1], nodes + (node,)
    return None


def _token_weight(weight: fx.Node) -> tuple[fx.Node, fx.Node, int, frozenset[fx.Node]]:
    """Read ``(gw * (gids == e)).sum(-1, keepdim=True)``: ``(gathered ids, gathered weights, e, nodes)``."""
    nodes = []
    node = weight
    while is_op(node, *_WEIGHT_VIEWS):
        nodes.append(node)
        node = node.args[0]
    bad = Refusal(f"the weight {weight.name} of an expert term is not sum(gathered_topk_weights * "
                  "(gathered_topk_ids == e), -1): combine_v2 weights each expert by the token's plain top-k weight")
    if not is_op(node, aten.sum.dim_IntList) or list(node.args[1]) not in ([-1], [1]):
        raise bad
    product = node.args[0]
    if not is_op(product, aten.mul.Tensor) or not all(isinstance(a, fx.Node) for a in product.args[:2]):
        raise bad
    for maybe_mask, gw in (product.args[:2], product.args[1::-1]):
        mask = _mask_of(maybe_mask)
        if mask is not None and val(gw).dtype.is_floating_point:
            gids, e, mask_nodes = mask
            if val(gids).shape != val(gw).shape:
                raise bad
            return gids, gw, e, frozenset(nodes + [node, product, *mask_nodes])
    raise bad


def _term(leaf: fx.Node, experts: dict[fx.Node, FfnMatch]) -> _Term:
    if not is_op(leaf, aten.mul.Tensor) or not all(isinstance(a, fx.Node) for a in leaf.args[:2]):
        raise Refusal(f"the summed term {leaf.name} is not expert(gathered_x) * weight")
    for out, weight in (leaf.args[:2], leaf.args[1::-1]):
        if out in experts:
            if len(out.users) != 1:
                raise Refusal(f"the expert output {out.name} is also used outside the weighted sum")
            # The weight must scale whole rows: (N, 1), not a broadcast along H.
            if tuple(val(weight).shape) != (val(out).size(0), 1):
                raise Refusal(f"the weight {weight.name} of expert output {out.name} has shape "
                              f"{tuple(val(weight).shape)}, not one weight per token (N, 1)")
            gids, gw, e, nodes = _token_weight(weight)
            return _Term(experts[out], e, gids, gw, nodes | {leaf})
    raise Refusal(f"the summed term {leaf.name} multiplies no expert FFN output")


def _gathered(node: fx.Node, what: str, group: Collective) -> tuple[Collective, fx.Node]:
    """The all_gather (over ``group``'s group) whose value ``node`` is, and that value node."""
    found = collective_value(node)
    if found is None or found[0].kind != "all_gather":
        raise Refusal(f"the {what} ({node.name}) is not the result of an all_gather")
    gather, value = found
    # One EP group: tokens gathered over one group and reduce-scattered over another would mix ranks.
    if gather.group_name != group.group_name or gather.group_size != group.group_size:
        raise Refusal(f"the {what} is all-gathered over group {gather.group_name!r} (size {gather.group_size}) but "
                      f"reduce-scattered over {group.group_name!r} (size {group.group_size})")
    return gather, value


def _only_used_by(value: fx.Node, allowed: set[fx.Node], what: str) -> None:
    # The all_gather disappears with the rewrite: any other reader would lose its input.
    others = sorted(u.name for u in value.users if u not in allowed)
    if others:
        raise Refusal(f"the {what} {value.name} is also used by {', '.join(others)}")


def _weights_an_expert(leaf: fx.Node, experts: dict[fx.Node, FfnMatch]) -> bool:
    return is_op(leaf, aten.mul.Tensor) and any(a in experts for a in leaf.args[:2])


def _read_block(rs: Collective, experts: dict[fx.Node, FfnMatch]) -> Optional[MoeBlock]:
    """The MoE block ending in reduce_scatter ``rs``, None when ``rs`` sums no weighted expert
    output (not a candidate); raises Refusal."""
    leaves, sum_nodes = _summands(rs.input)
    if not any(_weights_an_expert(leaf, experts) for leaf in leaves):
        return None
    if rs.reduce_op != "sum":
        raise Refusal(f"the reduce_scatter reduces with {rs.reduce_op!r}, not a sum")
    terms = [_term(leaf, experts) for leaf in leaves]
    first = terms[0]
    gx_gather, gx = _gathered(strip_views(first.expert.x), "gathered x", rs)
    gids_gather, gids = _gathered(first.gathered_ids, "gathered top-k ids", rs)
    gw_gather, gw = _gathered(first.gathered_weights, "gathered top-k weights", rs)
    for t in terms:
        # Every expert reads the same gathered tokens, ids and weights.
        if strip_views(t.expert.x) is not gx or t.gathered_ids is not gids or t.gathered_weights is not gw:
            raise Refusal(f"the term of expert {t.expert_id} reads other gathered tensors than expert {first.expert_id}")
    _only_used_by(gx, {n for t in terms for n in t.expert.nodes} | {t.expert.x for t in terms}, "gathered x")
    _only_used_by(gids, {n for t in terms for n in t.nodes}, "gathered top-k ids")
    _only_used_by(gw, {n for t in terms for n in t.nodes}, "gathered top-k weights")

    x, ids = gx_gather.input, gids_gather.input
    num_experts, k = topk_layout(topk_source(ids))
    world, local = rs.group_size, len(terms)
    rank = group_rank(rs.group_name)
    ids_seen = sorted(t.expert_id for t in terms)
    # dispatch_v2 places expert e on rank e // L: the local experts must be that contiguous block.
    if ids_seen != list(range(rank * local, (rank + 1) * local)):
        raise Refusal(f"rank {rank} of {world} holds experts {ids_seen}, not the contiguous block "
                      f"[{rank * local}, {(rank + 1) * local}) dispatch_v2 assigns it")
    # Every expert id the gate can produce must have an owner: E == W * L.
    if num_experts != world * local:
        raise Refusal(f"the gate chooses among {num_experts} experts but the {world} ranks hold {local} each")
    ordered = [t.expert for t in sorted(terms, key=lambda t: t.expert_id)]
    check_same_form(ordered, "local experts")
    dtype = val(x).dtype
    # combine_v2 returns x's dtype and the FFN runs in it: the unfused sum must too.
    if ordered[0].dtype != dtype or val(rs.input).dtype != dtype:
        raise Refusal(f"x is {dtype} but the experts run in {ordered[0].dtype} and the sum in {val(rs.input).dtype}")

    routed = output_value(rs)
    out, shared = shared_addend(routed)
    nodes = set(sum_nodes) | {n for t in terms for n in t.nodes}
    for gather, value in ((gx_gather, gx), (gids_gather, gids), (gw_gather, gw), (rs, routed)):
        nodes |= collective_nodes(gather, value)
    weights = gw_gather.input
    return MoeBlock(PATTERN, rs.nodes[0], x, existing(ids), val(ids).size(1), existing(weights), ordered,
                    rs.group_name, world, rank, num_experts, out, shared, frozenset(nodes))


def find_moe_allgather_ep(graph: fx.Graph, ctx: Optional[PassContext] = None) -> list[MoeBlock]:
    """Every AllGather-EP MoE block whose guards pass, anchored at its reduce_scatter;
    refusals go to ``ctx``. ``MoeBlock.replace_with`` rewrites each:

    Before (W = 2, S = 8, H = 16, L = 2 local experts on rank 1, post-grad)::

        all_gather_into_tensor:   = _c10d_functional.all_gather_into_tensor(x, 2, "0")
        wait_tensor:  "f32[16, 16]" = _c10d_functional.wait_tensor(all_gather_into_tensor)
        copy:         "f32[16, 16]" = aten.copy(empty, wait_tensor)                  # gathered x
        copy_1:       "i64[16, 2]"  = <same for topk ids>;  copy_2: "f32[16, 2]" = <same for weights>
        eq:           "b8[16, 2]"   = aten.eq.Scalar(copy_1, 2)
        mul:          "f32[16, 2]"  = aten.mul.Tensor(copy_2, eq)
        sum_3:        "f32[16, 1]"  = aten.sum.dim_IntList(mul, [-1], True)
        mm_2:         "f32[16, 16]" = <FFN of expert 2 on copy>
        mul_1:        "f32[16, 16]" = aten.mul.Tensor(mm_2, sum_3)
        add_1:        "f32[16, 16]" = aten.add.Tensor(full, mul_1)
        ... expert 3 ...
        add_3:        "f32[16, 16]" = aten.add.Tensor(add_1, mul_3)
        reduce_scatter_tensor:      = _c10d_functional.reduce_scatter_tensor(add_3, "sum", 2, "0")
        copy_3:       "f32[8, 16]"  = aten.copy(empty_3, wait_tensor_3)
        add_5:        "f32[8, 16]"  = aten.add.Tensor(copy_3, mm_6)                   # + shared(x)

    After::

        convert_element_type: "i32[8, 2]" = prims.convert_element_type(topk_ids, torch.int32)
        npu_moe_distribute_dispatch_v2 = moe_fusion.npu_moe_distribute_dispatch_v2(x, convert_element_type,
                                                                                     "0", 2, 1, 4)
        getitem_*                      = dispatch[0], [2], [3], [4], [5]
        npu_ffn_grouped: "f32[32, 16]" = moe_fusion.npu_ffn_grouped(getitem, stack, stack_1, "silu",
                                                                    expert_tokens=getitem_2, inner_precise=0)
        npu_moe_distribute_combine_v2: "f32[8, 16]" = moe_fusion.npu_moe_distribute_combine_v2(
            npu_ffn_grouped, convert_element_type, getitem_1, getitem_3, weights, "0", 2, 1, 4,
            tp_send_counts=getitem_4, shared_expert_x=mm_6)
    """
    experts = {m.out: m for m in find_ffn_forms(graph)}
    blocks = []
    for rs in find_collectives(graph, "reduce_scatter"):
        block = attempt(ctx, PATTERN, rs.nodes[0], lambda: _read_block(rs, experts))
        if block is not None:
            blocks.append(block)
    return blocks
