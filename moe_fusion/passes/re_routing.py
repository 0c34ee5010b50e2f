"""Re-routing fusion: the rank-major -> expert-major row permutation of all-to-all output, written
with torch ops, => ``moe_fusion.npu_moe_re_routing`` (SPEC §7).

The form users write (``counts`` ``(N, E)``: rows from rank ``i`` for local expert ``j``;
``tokens`` ``(A, H)`` in rank-major, expert-minor blocks)::

    expert_of_block = torch.arange(E).repeat(N)                    # (N*E,), block b = i*E + j -> j
    expert_of_row = expert_of_block.repeat_interleave(counts.flatten(), output_size=A)
    order = torch.argsort(expert_of_row, stable=True)              # (A,) gather index
    permuted = tokens[order]                                       # or index_select(tokens, 0, order)
    per_expert = counts.sum(0)

A stable sort of rows by a key that depends only on the row's expert ``j`` (and increases with
``j``) lists the rows expert by expert, and within an expert in their original, rank-major order:
exactly SPEC §7.3's ``dst_off(i, j)``. The matcher proves each part from the graph:

* the row -> block map is ``repeat_interleave`` of the flattened 2-D ``counts`` (``aten`` form, or
  inductor's ``searchsorted(cumsum(counts), iota(A), right=True)`` decomposition);
* the block keys are a compile-time constant (evaluated here from ``iota``/``repeat``/... nodes)
  whose ``(N, E)`` reshape has equal rows, strictly monotone along ``j`` in the sort's direction;
* the sort is stable.

Outputs wired: the gathered tokens (``permute_tokens``), a gathered fp32 ``(A,)`` tensor as
``per_token_scales``, later uses of ``order`` (``permute_token_idx``, cast to int64), and
``counts.sum(0)`` (``expert_token_num``). The op requires ``counts.sum() == A`` at run time, as
``repeat_interleave(..., output_size=A)`` does in eager mode.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from ._graph import cast, erase_unused, fused_ops_or_refusal, insert_call, insert_getitem, is_op, same_size, val
from .context import PassContext, Refusal, attempt
from .evaluate import constant_value, on_real_tensors
from .vocabulary import CONSTANT_OPS, VIEW_OPS

aten, prims = torch.ops.aten, torch.ops.prims
PATTERN = "re_routing"
_MAX_CONSTANT_NUMEL = 1 << 20


@dataclass
class ReRoutingMatch:
    """One re-routing. ``tokens`` ``(A, H)``, ``counts`` ``(N, E)`` int32/int64, ``scales``
    ``(A,)`` fp32 or None; ``gather``/``scales_gather`` are ``tokens[order]``/``scales[order]``;
    ``order_uses`` other nodes reading ``order`` (int64 ``(A,)``); ``sums`` are ``counts.sum(0)``;
    ``key_nodes`` the key/sort computation, erased when nothing else uses it."""

    sort: fx.Node
    tokens: fx.Node
    counts: fx.Node
    gather: fx.Node
    scales: Optional[fx.Node]
    scales_gather: Optional[fx.Node]
    order: fx.Node
    order_uses: tuple[fx.Node, ...]
    sums: tuple[fx.Node, ...]
    key_nodes: frozenset[fx.Node]

    @property
    def anchor(self) -> fx.Node:
        return self.sort

    @property
    def nodes(self) -> frozenset[fx.Node]:
        scales = {self.scales_gather} if self.scales_gather is not None else set()
        return self.key_nodes | {self.gather, self.order} | set(self.sums) | scales

    def replace_with(self, graph: fx.Graph) -> fx.Node:
        """One ``npu_moe_re_routing`` whose outputs take the replaced values' uses.

        Before (``E = 3`` local experts, ``N = 2`` ranks, ``A`` rows, inductor's decomposition)::

            iota:       "i64[3]"  = prims.iota(3, start=0, step=1)
            repeat:     "i64[6]"  = aten.repeat(iota, [2])
            view:       "i64[6]"  = aten.view(counts, [6])                 # counts "i64[2, 3]"
            cumsum:     "i64[6]"  = aten.cumsum(view, 0)
            iota_1:     "i64[A]"  = prims.iota(A, start=0, step=1)
            searchsorted            = aten.searchsorted(cumsum, iota_1, right=True)
            clamp_max:  "i64[A]"  = aten.clamp_max(searchsorted, 5)
            index:      "i64[A]"  = aten.index(repeat, [clamp_max])        # expert id of each row
            sort                    = aten.sort.stable(index, stable=True)
            getitem_1:  "i64[A]"  = getitem(sort, 1)
            index_1:    "f16[A, H]" = aten.index(tokens, [getitem_1])
            sum_1:      "i64[3]"  = aten.sum.dim_IntList(counts, [0])

        After::

            npu_moe_re_routing = moe_fusion.npu_moe_re_routing(tokens, counts)
            getitem:    "f16[A, H]" = getitem(npu_moe_re_routing, 0)         # was index_1
            getitem_2:  "i32[A]"    = getitem(npu_moe_re_routing, 2)
            convert:    "i64[A]"    = prims.convert_element_type(getitem_2, i64)  # was getitem_1, if used
            getitem_3:  "i64[3]"    = getitem(npu_moe_re_routing, 3)         # was sum_1

        Refused (graph unchanged) when the compile target's op rejects the call (e.g. fp32 tokens
        or ``H > 16384`` on A2/A3).
        """
        before = self.gather
        kwargs = {} if self.scales is None else {"per_token_scales": self.scales}
        with fused_ops_or_refusal(graph, "npu_moe_re_routing"):
            fused = insert_call(graph, before, torch.ops.moe_fusion.npu_moe_re_routing.default,
                                (self.tokens, self.counts), kwargs)
        self.gather.replace_all_uses_with(insert_getitem(graph, before, fused, 0))
        if self.scales_gather is not None:
            self.scales_gather.replace_all_uses_with(insert_getitem(graph, before, fused, 1))
        if self.order_uses:
            index = cast(graph, before, insert_getitem(graph, before, fused, 2), val(self.order).dtype)
            for use in self.order_uses:
                use.replace_input_with(self.order, index)
        if self.sums:
            per_expert = insert_getitem(graph, before, fused, 3)
            for node in self.sums:
                node.replace_all_uses_with(cast(graph, before, per_expert, val(node).dtype))
        return fused

    def erase(self) -> None:
        erase_unused(self.nodes)

    def describe(self) -> str:
        a, h = val(self.tokens).shape
        n, e = val(self.counts).shape
        extras = [name for name, on in (("per_token_scales", self.scales is not None), ("idx", bool(self.order_uses)),
                                        ("expert_token_num", bool(self.sums))) if on]
        wired = f", wires {', '.join(extras)}" if extras else ""
        return f"npu_moe_re_routing(tokens ({a}, {h}), counts ({n}, {e}){wired})"


def _static(*sizes) -> bool:
    return all(isinstance(s, int) for s in sizes)


def _block_index(node: fx.Node) -> Optional[tuple[fx.Node, object, tuple[fx.Node, ...]]]:
    """``(repeats, A, nodes)`` when ``node`` is ``repeat_interleave(repeats, output_size=A)``: the
    block of each of the A rows. Also inductor's decomposition
    ``clamp_max(searchsorted(cumsum(repeats, 0), iota(A), right=True), len(repeats) - 1)``."""
    if is_op(node, aten.repeat_interleave.Tensor):
        size = node.kwargs.get("output_size", node.args[1] if len(node.args) > 1 else None)
        return (node.args[0], size, (node,)) if size is not None else None
    clamp = node if is_op(node, aten.clamp_max) else None
    search = node.args[0] if clamp is not None else node
    if not is_op(search, aten.searchsorted.Tensor) or not search.kwargs.get("right", False):
        return None
    cumsum, rows = search.args[:2]
    if not is_op(cumsum, aten.cumsum) or cumsum.args[1] not in (0, -1) or not is_op(rows, prims.iota):
        return None
    if rows.kwargs.get("start", 0) != 0 or rows.kwargs.get("step", 1) != 1:
        return None
    repeats = cumsum.args[0]
    if clamp is not None and not same_size(clamp.args[1], val(repeats).numel() - 1):
        return None
    return repeats, rows.args[0], tuple(n for n in (clamp, search, cumsum, rows) if n is not None)


def _keys(node: fx.Node) -> Optional[tuple[fx.Node, fx.Node, object, tuple[fx.Node, ...]]]:
    """``(block keys, repeats, A, nodes)`` when ``node`` is ``block_keys[block_index]``."""
    if is_op(node, aten.index.Tensor) and len(node.args[1]) == 1 and node.args[1][0] is not None:
        table, index = node.args[0], node.args[1][0]
    elif is_op(node, aten.index_select) and node.args[1] in (0, -1):
        table, index = node.args[0], node.args[2]
    else:
        return None
    found = _block_index(index)
    if found is None:
        return None
    repeats, rows, nodes = found
    return table, repeats, rows, (node,) + nodes


@on_real_tensors
def _check_keys(table: fx.Node, counts_shape: tuple[int, int], descending: bool) -> tuple[fx.Node, ...]:
    """Block keys must be a constant ``g(j)`` for block ``b = i*E + j``, strictly monotone in ``j``.
    Returns the nodes computing them."""
    n, e = counts_shape
    cache: dict = {}
    keys = constant_value(table, CONSTANT_OPS, _MAX_CONSTANT_NUMEL, cache)
    if keys is None:
        raise Refusal("the expert key of each block is not a compile-time constant (build it from "
                      "torch.arange, e.g. torch.arange(E).repeat(N))")
    if keys.dim() != 1 or keys.numel() != n * e:
        raise Refusal(f"the block keys have shape {tuple(keys.shape)}, the counts ({n}, {e}) need {n * e} keys")
    by_rank = keys.reshape(n, e)
    if not bool((by_rank == by_rank[:1]).all()):
        raise Refusal("the block keys differ between ranks: the sort would not group rows by local expert")
    step = by_rank[0, 1:] - by_rank[0, :-1]
    if not bool((step < 0).all() if descending else (step > 0).all()):
        raise Refusal(f"the block keys {by_rank[0].tolist()} do not order the experts 0..E-1 "
                      f"{'descending' if descending else 'ascending'} as the sort reads them")
    return tuple(node for node, value in cache.items() if value is not None)


def _sort_flags(sort: fx.Node) -> tuple[bool, bool]:
    """``(stable, descending)`` of an ``aten.sort`` call (``.stable`` or ``.default``) on a 1-D key."""
    if is_op(sort, aten.sort.stable):
        return bool(sort.kwargs.get("stable")), bool(sort.kwargs.get("descending", False))
    return False, bool(sort.kwargs.get("descending", sort.args[2] if len(sort.args) > 2 else False))


def _gathers(order: fx.Node, rows) -> list[tuple[fx.Node, fx.Node]]:
    """``(source, gather)`` for every ``source[order]`` / ``index_select(source, 0, order)``."""
    found = []
    for use in order.users:
        if is_op(use, aten.index.Tensor) and list(use.args[1]) == [order]:
            source = use.args[0]
        elif is_op(use, aten.index_select) and use.args[1] == 0 and use.args[2] is order:
            source = use.args[0]
        else:
            continue
        if same_size(val(source).size(0), rows):
            found.append((source, use))
    return found


def _match_at(sort: fx.Node, position: dict[fx.Node, int]) -> Optional[ReRoutingMatch]:
    """The re-routing whose sort is ``sort``; None when it is no such sort; raises Refusal."""
    keyed = _keys(sort.args[0])
    if keyed is None:
        return None
    table, repeats, rows, key_nodes = keyed
    stable, descending = _sort_flags(sort)
    # An unstable sort may reorder the rows of one expert; the op keeps them in rank order.
    if not stable:
        raise Refusal("the sort is not stable: rows of one expert may leave rank order; use stable=True")
    counts, flatten = repeats, []
    while len(val(counts).shape) != 2 and is_op(counts, *VIEW_OPS):
        flatten.append(counts)
        counts = counts.args[0]
    # The op reads counts as (N, E), rank-major: the repeats must be that tensor flattened.
    if len(val(counts).shape) != 2 or len(val(repeats).shape) != 1:
        raise Refusal(f"the repeat counts {tuple(val(counts).shape)} are not a 2-D (N, E) tensor flattened rank-major")
    if not _static(*val(counts).shape):
        raise Refusal("the counts have a symbolic (N, E) shape; the key table cannot be checked against it")
    key_nodes += _check_keys(table, tuple(val(counts).shape), descending)
    items = {u.args[1]: u for u in sort.users if u.target is operator.getitem}
    order = items.get(1)
    gathers = _gathers(order, rows) if order is not None else []
    tokens = [(s, g) for s, g in gathers if len(val(s).shape) == 2]
    if not tokens:
        raise Refusal(f"the sorted order gathers no 2-D token rows of length {rows}")
    source, gather = tokens[0]
    # Per-token scales must exist before the fused op, which is inserted at the token gather.
    scales = [(s, g) for s, g in gathers if len(val(s).shape) == 1 and val(s).dtype == torch.float32
              and position[s] < position[gather]]
    scale, scales_gather = scales[0] if scales else (None, None)
    replaced = {gather, scales_gather}
    order_uses = tuple(u for u in order.users if u not in replaced and position[u] > position[gather])
    sums = tuple(u for u in counts.users if is_op(u, aten.sum.dim_IntList) and list(u.args[1]) in ([0], [-2])
                 and not (u.args[2] if len(u.args) > 2 else u.kwargs.get("keepdim", False))
                 and u.kwargs.get("dtype") is None and position[u] > position[gather])
    nodes = frozenset(key_nodes + tuple(flatten) + (sort, order) + tuple(items.values()))
    return ReRoutingMatch(sort, source, counts, gather, scale, scales_gather, order, order_uses, sums, nodes)


def find_re_routing(graph: fx.Graph, ctx: Optional[PassContext] = None) -> list[ReRoutingMatch]:
    """Every re-routing candidate (one per sort); refusals go to ``ctx``."""
    position = {n: i for i, n in enumerate(graph.nodes)}
    matches = []
    for sort in graph.nodes:
        if not is_op(sort, aten.sort):
            continue
        found = attempt(ctx, PATTERN, sort, lambda: _match_at(sort, position))
        if found is not None:
            matches.append(found)
    return matches
