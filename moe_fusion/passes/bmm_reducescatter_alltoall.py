"""Pattern b: BMM -> ReduceScatter(TP) (+bias) -> AllToAll(EP)
=> ``moe_fusion.npu_bmm_reducescatter_alltoall`` (SPEC §6).

The return half of an expert-parallel layer with tensor-parallel experts: the second expert
matmul gives partial sums over this TP rank's slice of M; the reduce-scatter sums them and
keeps this rank's slice of the capacity dim (``y_shard_type`` 1) or of the hidden dim
(``y_shard_type`` 0); the bias is added; the all-to-all sends every expert's slots back to the
EP rank they came from. Same forms as pattern a (``alltoall_allgather_bmm``); a TP group of one
rank needs no reduce-scatter.

The op adds its bias after the reduce-scatter. A bias added before it would be summed over the
``tp`` ranks, so only a bias add between the reduce-scatter and the all-to-all is fused. The
chain is checked exactly with ``_layout``: the reduce-scatter must split on the op's TP chunk,
the all-to-all on the op's EP chunk, and the all-to-all result must be the op's ``y``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.fx as fx

from ..meta import op_overload
from ..op_protos.bmm_reducescatter_alltoall import NAME
from ._graph import cast, erase_unused, fused_ops_or_refusal, insert_call, is_op, val
from ._layout import (Atom, Chain, Layout, apply_shape_step, atom, canonical, reshape, same, split_leading, static_shape,
                      walk)
from .collectives import SOLO_TP_GROUP, Collective, collective_producing, group_size_refusal
from .context import PassContext, Refusal, attempt
from .emit import bias_dtype

aten, prims = torch.ops.aten, torch.ops.prims
PATTERN = "bmm_reducescatter_alltoall"


@dataclass(frozen=True)
class ReturnLayout:
    """Where the op moves the bmm output ``t1`` ``(local, rows, H)`` (coordinates ``L``, ``R``,
    ``N``), SPEC §6.3: ``tp_chunk``/``ep_chunk`` are the digits the reduce-scatter and the
    all-to-all split on; ``y`` is the op's output ``(ep*local, c', h')``, ``S`` the source EP peer."""

    shard_type: int
    tp_chunk: Atom
    ep_chunk: Atom
    row: Atom        # the c' rows each peer keeps
    col: Atom        # the h' columns each peer keeps

    def y(self, ep: int, local: int) -> Layout:
        return (atom("S", ep), atom("L", local)), (self.row,), (self.col,)


def return_layout(shard_type: int, rows: int, hidden: int, ep: int, tp: int) -> Optional[ReturnLayout]:
    if shard_type == 1 and rows % (ep * tp) == 0:   # TP chunk q = rows (p*tp + q)*c' + r
        c = rows // (ep * tp)
        return ReturnLayout(1, atom("R", tp, c), atom("R", ep, tp * c), atom("R", c), atom("N", hidden))
    if shard_type == 0 and rows % ep == 0 and hidden % tp == 0:   # TP chunk q = columns q*h' + j
        c, h = rows // ep, hidden // tp
        return ReturnLayout(0, atom("N", tp, h), atom("R", ep, c), atom("R", c), atom("N", h))
    return None


def _broadcast_add(node: fx.Node, value: fx.Node) -> bool:
    """``value + other`` (either order) that keeps ``value``'s shape and dtype: a bias candidate."""
    if not is_op(node, aten.add.Tensor) or node.kwargs.get("alpha", 1) != 1:
        return False
    if sum(a is value for a in node.args[:2]) != 1:
        return False
    other = next(a for a in node.args[:2] if a is not value)
    if not isinstance(other, fx.Node) or not isinstance(val(other), torch.Tensor):
        return False
    out, v = val(node), val(value)
    return tuple(out.shape) == tuple(v.shape) and out.dtype == v.dtype == val(other).dtype


def _is_all_to_all_result(node: fx.Node) -> bool:
    found = collective_producing(node)
    return found is not None and found.kind == "all_to_all" and found.result is node


@dataclass
class BmmReduceScatterAllToAllMatch:
    """One candidate: ``bmm(x, weight) -> chain (reduce-scatter, bias add) -> all_to_all``;
    ``chain.end`` is the value the op's ``y`` replaces."""

    bmm: fx.Node
    chain: Chain
    want: Optional[ReturnLayout] = None      # set once the guards proved the chain is the op's data movement

    @property
    def x(self) -> fx.Node:
        return self.bmm.args[0]

    @property
    def weight(self) -> fx.Node:
        return self.bmm.args[1]

    @property
    def all_to_all(self) -> Collective:
        return self.chain.collectives("all_to_all")[0]

    @property
    def reduce_scatter(self) -> Optional[Collective]:
        found = self.chain.collectives("reduce_scatter")
        return found[0] if found else None

    @property
    def bias_adds(self) -> list[fx.Node]:
        return [s for s in self.chain.steps if isinstance(s, fx.Node) and is_op(s, aten.add.Tensor)]

    @property
    def ep(self) -> int:
        return self.all_to_all.group_size

    @property
    def tp(self) -> int:
        return 1 if self.reduce_scatter is None else self.reduce_scatter.group_size

    @property
    def group_tp(self) -> str:
        return SOLO_TP_GROUP if self.reduce_scatter is None else self.reduce_scatter.group_name

    def bias_operand(self) -> Optional[fx.Node]:
        """The tensor the (first) add adds to the chain's value."""
        adds, on_chain = self.bias_adds, self.chain.values()
        return next(a for a in adds[0].args[:2] if a not in on_chain) if adds else None

    def adds_before_reduce_scatter(self) -> list[fx.Node]:
        if self.reduce_scatter is None:
            return []
        index = self.chain.steps.index(self.reduce_scatter)
        return [s for s in self.chain.steps[:index] if s in self.bias_adds]

    def return_layout(self) -> tuple[Optional[ReturnLayout], Optional[Layout]]:
        """``(layout, at_bias)``: the op's data movement the chain reproduces exactly (None if
        neither shard type), and the chain's layout where the bias is added."""
        local, rows, hidden = static_shape(self.bmm)
        for shard_type in (0, 1):
            want = return_layout(shard_type, rows, hidden, self.ep, self.tp)
            if want is not None:
                found, at_bias = self._follow(want, local)
                if found:
                    return want, at_bias
        return None, None

    def _follow(self, want: ReturnLayout, local: int) -> tuple[bool, Optional[Layout]]:
        layout: Optional[Layout] = ((atom("L", local),), (atom("R", static_shape(self.bmm)[1]),),
                                    (atom("N", static_shape(self.bmm)[2]),))
        at_bias = None
        for step in self.chain.steps:
            if isinstance(step, Collective):
                chunk, replacement = ((want.tp_chunk, ()) if step.kind == "reduce_scatter"
                                      else (want.ep_chunk, (atom("S", step.group_size),)))
                split = split_leading(layout, step.group_size)
                if split is None or not same((split[0],), ((chunk,),)):
                    return False, None
                rest = split[1]
                layout = (replacement + rest[0],) + rest[1:]
            elif step in self.bias_adds:
                at_bias = layout
            else:
                layout = apply_shape_step(layout, step)
                if layout is None:
                    return False, None
        end_shape = static_shape(self.chain.end)
        expected = reshape(want.y(self.ep, local), end_shape) if end_shape is not None else None
        return expected is not None and same(layout, expected), at_bias

    def bias_refusal(self, want: ReturnLayout, at_bias: Layout) -> Optional[str]:
        """Why the bias add is not the op's ``bias[local expert, output column]``, if it is not."""
        add, bias = self.bias_adds[0], self.bias_operand()
        shape, b_shape = static_shape(add), static_shape(bias)
        if b_shape is None:
            return "the bias has a symbolic shape"
        padded = (1,) * (len(shape) - len(b_shape)) + b_shape
        if len(padded) != len(shape):
            return f"the bias {b_shape} has more dims than the value it is added to {shape}"
        indexed = [canonical((at_bias[i],))[0] for i, n in enumerate(padded) if n != 1]
        wanted = [(a,) for a in (atom("L", static_shape(self.bmm)[0]), want.col) if a.size > 1]
        if indexed != wanted:
            return (f"the bias {b_shape} added after the reduce-scatter is not indexed by (local expert, output "
                    "column) as the op's bias (E/ep, 1, H') is")
        return None

    def bias_shape(self) -> tuple[int, int, int]:
        return static_shape(self.bmm)[0], 1, self.want.col.size

    def replace_with(self, graph: fx.Graph) -> fx.Node:
        """Insert the fused op and route the all-to-all result's uses to its output.

        Before (``t1`` ``(local, ep*C, H)``, ``c = C/tp``; y_shard_type 1 shown)::

            t1 = bmm(x, weight)                                                   # partial sums over TP
            send = clone(permute(view(t1, [local, ep, tp, c, H]), [2, 0, 1, 3, 4]))
            rs = wait_tensor(reduce_scatter_tensor(view(send, [tp*local, ep, c, H]), "sum", tp, group_tp))
            rs = add(rs, view(bias, [local, 1, 1, H]))                            # after the reduction
            out = clone(permute(rs, [1, 0, 2, 3]))                                # (ep, local, c, H)
            y = wait_tensor(all_to_all_single(out, [local]*ep, [local]*ep, group_ep))

        After::

            y = view(moe_fusion.npu_bmm_reducescatter_alltoall(x, weight, group_ep, ep, group_tp, tp,
                         bias=view(bias, [local, 1, H]), shard_type=1), [ep, local, c, H])

        A bf16 graph's bias gets a (lossless) cast to fp32, the op's bias dtype for bf16. Refused
        (graph unchanged) when the compile target's op rejects the call (dtypes, world sizes, shapes).
        """
        end = self.chain.end
        with fused_ops_or_refusal(graph, NAME):
            bias = None
            if self.bias_adds:
                bias = insert_call(graph, end, aten.reshape.default, (self.bias_operand(), list(self.bias_shape())))
                bias = cast(graph, end, bias, bias_dtype(val(self.x).dtype))
            args = (self.x, self.weight, self.all_to_all.group_name, self.ep, self.group_tp, self.tp)
            fused = insert_call(graph, end, op_overload(NAME), args, {"bias": bias, "shard_type": self.want.shard_type})
            result = fused
            if tuple(val(fused).shape) != static_shape(end):
                result = insert_call(graph, end, aten.reshape.default, (fused, list(static_shape(end))))
        end.replace_all_uses_with(result)
        return fused

    @property
    def anchor(self) -> fx.Node:
        return self.bmm

    @property
    def nodes(self) -> frozenset[fx.Node]:
        return frozenset([self.bmm, *self.chain.nodes])

    def erase(self) -> None:
        """Erase the replaced nodes, collectives included (dead-code elimination keeps those)."""
        erase_unused(self.nodes)

    def describe(self) -> str:
        return (f"{NAME}(shard_type={self.want.shard_type}, ep={self.ep}, tp={self.tp}, "
                f"bias={bool(self.bias_adds)}) from {self.bmm.name}")


def _guarded(match: BmmReduceScatterAllToAllMatch) -> BmmReduceScatterAllToAllMatch:
    """``match`` with the op's data movement it reproduces when every guard passes; raises Refusal."""
    a2a, scatters = match.all_to_all, match.chain.collectives("reduce_scatter")
    # The op sends E/ep whole experts back to every EP peer.
    if not a2a.equal_splits:
        raise Refusal(f"uneven splits: the all-to-all sends {a2a.input_split_sizes} rows and receives "
                      f"{a2a.output_split_sizes}; the op needs E/ep experts to and from every peer")
    if len(scatters) > 1:
        raise Refusal(f"{len(scatters)} reduce-scatters between the bmm and the all-to-all; the op reduces once")
    rs = match.reduce_scatter
    # The op sums over TP.
    if rs is not None and str(rs.reduce_op).lower() != "sum":
        raise Refusal(f"the reduce-scatter computes {rs.reduce_op!r}; the op sums")
    # EP and TP must be different groups (aclnn rejects equal names; the data movement differs).
    if rs is not None and rs.group_name == a2a.group_name:
        raise Refusal(f"different groups needed: the reduce-scatter and the all-to-all both run on group {a2a.group_name!r}; "
                      "the op's EP and TP groups must differ")
    for collective, what in ((a2a, "all-to-all"), *((s, "reduce-scatter") for s in scatters)):
        reason = group_size_refusal(collective, what)
        if reason:
            raise Refusal(reason)
    # A bias before the reduce-scatter is summed over the TP ranks; the op adds it once, after.
    early = match.adds_before_reduce_scatter()
    if early:
        raise Refusal(f"bias before the reduce-scatter: {early[0].name} adds to the partial sums, so the unfused graph adds "
                      f"it {match.tp} times; the op adds its bias once, after the reduce-scatter")
    if len(match.bias_adds) > 1:
        raise Refusal(f"{len(match.bias_adds)} adds between the reduce-scatter and the all-to-all; the op adds one bias")
    # Values inside the chain are not outputs of the op: their collectives would have to stay.
    shared = match.chain.shared_value()
    if shared is not None:
        raise Refusal(f"extra users change semantics: {shared[0].name} (between the bmm and the all-to-all result) is also "
                      f"used by {shared[1].name}; the op only returns the all-to-all result")
    if any(static_shape(n) is None for n in (match.bmm, match.chain.end)):
        raise Refusal("symbolic shapes: the layout check needs static shapes")
    want, at_bias = match.return_layout()
    # Exact data movement: anything else would return rows or columns to the wrong peer or slot.
    if want is None:
        raise Refusal("the reshape/permute chain between the bmm and the all-to-all does not reproduce the op's layout "
                      "(SPEC §6.3) for y_shard_type 0 (scatter H) or 1 (scatter C)")
    if match.bias_adds:
        reason = match.bias_refusal(want, at_bias)
        if reason:
            raise Refusal(reason)
    return replace(match, want=want)


def find_bmm_reducescatter_alltoall(graph: fx.Graph,
                                    ctx: Optional[PassContext] = None) -> list[BmmReduceScatterAllToAllMatch]:
    """Every bmm whose output reaches an all-to-all through shape ops, reduce-scatters and adds, and
    whose guards pass (the op's own limits are checked by ``replace_with``)."""
    matches = []
    for bmm in [n for n in graph.nodes if is_op(n, aten.bmm.default)]:
        chain = walk(bmm, collective_kinds=("reduce_scatter", "all_to_all"), extra_step=_broadcast_add,
                     stop=_is_all_to_all_result)
        if not chain.collectives("all_to_all"):
            continue
        chain.absorb_copies()   # dynamo's out= form copies the result into its buffer: y replaces the copy
        candidate = BmmReduceScatterAllToAllMatch(bmm, chain)
        match = attempt(ctx, PATTERN, bmm, lambda: _guarded(candidate))
        if match is not None:
            matches.append(match)
    return matches
