"""Pattern a: AllToAll(EP) -> AllGather(TP) -> reshape/permute -> BMM (+bias) (+act)
=> ``moe_fusion.npu_alltoall_allgather_bmm`` (SPEC §6).

The forward half of an expert-parallel layer with tensor-parallel experts: send each expert's
capacity slots to the EP rank owning it, gather the TP ranks' shards (of the capacity dim,
``x_shard_type`` 1, or of the hidden dim, ``x_shard_type`` 0), and run the first expert matmul.
Matched in every form dynamo and make_fx produce: ``_c10d_functional`` collectives from
``torch.distributed._functional_collectives`` or from ``dist.all_to_all_single`` /
``dist.all_gather_into_tensor`` (with their ``aten.copy`` into the out= buffer), views or
reshapes, permutes or transposes, with or without ``clone``. A TP group of one rank needs no
all-gather: an AllToAll -> BMM chain is the op with ``tp = 1``.

The permute/reshape chain is checked exactly: ``_layout`` derives, for every element of the bmm
input, which element of which peer's ``x`` it is, and the match is accepted only when that equals
the op's ``y2`` for shard type 0 or 1.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.fx as fx

from ..meta import op_overload
from ..op_protos.alltoall_allgather_bmm import NAME
from ._graph import cast, erase_unused, fused_ops_or_refusal, insert_call, insert_getitem, is_op, val
from ._layout import Chain, Layout, atom, apply_shape_step, same, static_shape, walk
from .activations import ActivationMatch, activation_from_input
from .collectives import SOLO_TP_GROUP, Collective, find_collectives, group_size_refusal
from .context import PassContext, Refusal, attempt
from .emit import bias_dtype

aten, prims = torch.ops.aten, torch.ops.prims
PATTERN = "alltoall_allgather_bmm"
# activation kind -> the op's act_type; gelu_tanh is not computed by the op (its GELU is erf).
ACT_TYPES = {"gelu_erf": 1, "silu": 2, "relu": 3, "fastgelu": 4}


def gathered_layout(shard_type: int, local: int, ep: int, tp: int, c: int, h: int) -> Layout:
    """The op's ``y2`` ``(local, rows, H)``, SPEC §6.3: coordinates ``P`` (source EP peer), ``Q``
    (source TP peer), ``L`` (local expert), ``C`` and ``H`` (dims 1 and 2 of the peer's ``x``)."""
    experts, p, q = (atom("L", local),), atom("P", ep), atom("Q", tp)
    if shard_type == 0:   # y2[e, p*c + cc, q*h + hh]
        return experts, (p, atom("C", c)), (q, atom("H", h))
    return experts, (p, q, atom("C", c)), (atom("H", h),)   # y2[e, (p*tp + q)*c + cc, hh]


@dataclass
class AllToAllAllGatherBmmMatch:
    """One candidate: ``x -> all_to_all -> chain (with the all-gather) -> bmm(chain.end, weight)
    [-> + bias] [-> activation]``."""

    all_to_all: Collective
    chain: Chain                          # from the all-to-all's result to the bmm's input (y2)
    bmm: fx.Node
    bias_add: Optional[fx.Node]
    activation: Optional[ActivationMatch]
    shard_type: Optional[int] = None      # set once the guards proved the chain is the op's y2 layout
    left_out: Optional[str] = None        # what follows the fused prefix unfused (an activation the op lacks)

    @property
    def x(self) -> fx.Node:
        return self.all_to_all.input

    @property
    def weight(self) -> fx.Node:
        return self.bmm.args[1]

    @property
    def bias(self) -> Optional[fx.Node]:
        return None if self.bias_add is None else next(a for a in self.bias_add.args if a is not self.bmm)

    @property
    def all_gather(self) -> Optional[Collective]:
        gathers = self.chain.collectives("all_gather")
        return gathers[0] if gathers else None

    @property
    def ep(self) -> int:
        return self.all_to_all.group_size

    @property
    def tp(self) -> int:
        return 1 if self.all_gather is None else self.all_gather.group_size

    @property
    def group_tp(self) -> str:
        return SOLO_TP_GROUP if self.all_gather is None else self.all_gather.group_name

    @property
    def y2(self) -> fx.Node:
        return self.chain.end

    @property
    def y3(self) -> fx.Node:
        return self.bias_add if self.bias_add is not None else self.bmm

    @property
    def y1(self) -> fx.Node:
        return self.activation.output if self.activation is not None else self.y3

    @property
    def act_type(self) -> int:
        return 0 if self.activation is None else ACT_TYPES.get(self.activation.kind, -1)

    @property
    def need_allgather_out(self) -> bool:
        return any(u is not self.bmm for u in self.y2.users)

    @property
    def need_activation_feature(self) -> bool:
        return self.activation is not None and any(u not in self.activation.nodes for u in self.y3.users)

    def layout_shard_type(self) -> Optional[int]:
        """0 or 1 when the chain puts every element where the op's ``y2`` has it, else None."""
        shape = static_shape(self.x)
        if shape is None or len(shape) != 3:
            return None
        experts, c, h = shape
        local, ep, tp = experts // self.ep, self.ep, self.tp
        layout: Optional[Layout] = ((atom("P", ep), atom("L", local)), (atom("C", c),), (atom("H", h),))
        for step in self.chain.steps:
            if isinstance(step, Collective):   # all_gather_into_tensor: concatenated along dim 0
                layout = ((atom("Q", step.group_size),) + layout[0],) + layout[1:]
            else:
                layout = apply_shape_step(layout, step)
            if layout is None:
                return None
        return next((s for s in (0, 1) if same(layout, gathered_layout(s, local, ep, tp, c, h))), None)

    def op_args(self) -> tuple[tuple, dict]:
        args = (self.x, self.weight, self.all_to_all.group_name, self.ep, self.group_tp, self.tp)
        kwargs = {"bias": self.bias, "shard_type": self.shard_type, "act_type": self.act_type,
                  "need_allgather_out": self.need_allgather_out,
                  "need_activation_feature": self.need_activation_feature}
        return args, kwargs

    def replace_with(self, graph: fx.Graph) -> fx.Node:
        """Insert the fused op and route every outside use to its outputs.

        Before (``x`` ``(E, c, h)``, ``local = E/ep``; shard 1 shown)::

            a2a = wait_tensor(all_to_all_single(x, [local]*ep, [local]*ep, group_ep))
            t = clone(permute(view(a2a, [ep, local, c, h]), [1, 0, 2, 3]))
            g = wait_tensor(all_gather_into_tensor(t, tp, group_tp))           # (tp*local, ep, c, h)
            y2 = view(clone(permute(view(g, [tp, local, ep, c, h]), [1, 2, 0, 3, 4])), [local, ep*tp*c, h])
            y3 = add(bmm(y2, weight), bias)                                    # bias (local, 1, M/tp)
            y1 = gelu(y3)                                                      # or its decomposition

        After::

            fused = moe_fusion.npu_alltoall_allgather_bmm(x, weight, group_ep, ep, group_tp, tp,
                        bias=bias, shard_type=1, act_type=1, need_allgather_out=<y2 used elsewhere>,
                        need_activation_feature=<y3 used elsewhere>)
            y1, y2, y3 = fused[0], fused[1], fused[2]

        A bf16 graph's bias gets a (lossless) cast to fp32, the op's bias dtype for bf16. Refused
        (graph unchanged) when the compile target's op rejects the call (dtypes, world sizes, shapes).
        """
        args, kwargs = self.op_args()
        with fused_ops_or_refusal(graph, NAME):
            if kwargs["bias"] is not None:
                kwargs["bias"] = cast(graph, self.bmm, kwargs["bias"], bias_dtype(val(self.x).dtype))
            fused = insert_call(graph, self.bmm, op_overload(NAME), args, kwargs)
        if kwargs["need_allgather_out"]:
            self.y2.replace_all_uses_with(insert_getitem(graph, self.bmm, fused, 1),
                                          delete_user_cb=lambda user: user is not self.bmm)
        if kwargs["need_activation_feature"]:
            self.y3.replace_all_uses_with(insert_getitem(graph, self.bmm, fused, 2),
                                          delete_user_cb=lambda user: user not in self.activation.nodes)
        self.y1.replace_all_uses_with(insert_getitem(graph, self.bmm, fused, 0))
        return fused

    @property
    def anchor(self) -> fx.Node:
        return self.all_to_all.result

    @property
    def nodes(self) -> frozenset[fx.Node]:
        nodes = {*self.all_to_all.nodes, *self.chain.nodes, self.bmm}
        nodes |= {self.bias_add} if self.bias_add is not None else set()
        nodes |= set(self.activation.nodes) if self.activation is not None else set()
        return frozenset(nodes)

    def erase(self) -> None:
        """Erase the replaced nodes, collectives included (dead-code elimination keeps those)."""
        erase_unused(self.nodes)

    def describe(self) -> str:
        left_out = f"; left out: {self.left_out}" if self.left_out else ""
        return (f"{NAME}(shard_type={self.shard_type}, act_type={self.act_type}, ep={self.ep}, tp={self.tp}, "
                f"bias={self.bias is not None}) from {self.all_to_all.result.name}{left_out}")


def _feeds_bmm(node: fx.Node) -> bool:
    return any(is_op(u, aten.bmm.default) and u.args[0] is node for u in node.users)


def _bias_add(bmm: fx.Node) -> Optional[fx.Node]:
    """The sole user of ``bmm`` when it adds a per-expert bias ``(local, 1, M)`` without
    changing the bmm's shape or dtype (the op adds exactly that bias)."""
    users = list(bmm.users)
    if len(users) != 1 or not is_op(users[0], aten.add.Tensor) or users[0].kwargs.get("alpha", 1) != 1:
        return None
    add = users[0]
    other = next((a for a in add.args[:2] if a is not bmm), None)
    if not isinstance(other, fx.Node) or sum(a is bmm for a in add.args[:2]) != 1:
        return None
    out, b = val(bmm), val(other)
    per_expert = tuple(b.shape) == (out.size(0), 1, out.size(2))
    keeps = tuple(val(add).shape) == tuple(out.shape) and val(add).dtype == out.dtype == b.dtype
    return add if per_expert and keeps else None


def _activation(y3: fx.Node) -> Optional[ActivationMatch]:
    """The activation applied to ``y3``, also in inductor's low-precision form ``to(act(to(y3,
    fp32)), y3.dtype)``, which is the op's own precision rule (fp32 on the rounded value, rounded)."""
    found = activation_from_input(y3)
    upcast = next(iter(y3.users)) if len(y3.users) == 1 else None
    if found is not None or not is_op(upcast, prims.convert_element_type.default) or upcast.args[1] != torch.float32:
        return found
    inner = activation_from_input(upcast)
    users = list(inner.output.users) if inner is not None else []
    if len(users) != 1 or not is_op(users[0], prims.convert_element_type.default) or users[0].args[1] != val(y3).dtype:
        return None
    return ActivationMatch(inner.kind, y3, users[0], (upcast, *inner.nodes, users[0]))


def _guarded(match: AllToAllAllGatherBmmMatch) -> AllToAllAllGatherBmmMatch:
    """``match`` with its shard type when every guard passes; raises Refusal."""
    a2a, gathers = match.all_to_all, match.chain.collectives("all_gather")
    # The op sends E/ep whole experts to every EP peer.
    if not a2a.equal_splits:
        raise Refusal(f"uneven splits: the all-to-all sends {a2a.input_split_sizes} rows and receives "
                      f"{a2a.output_split_sizes}; the op needs E/ep experts to and from every peer")
    # The op gathers once, over one TP group.
    if len(gathers) > 1:
        raise Refusal(f"{len(gathers)} all-gathers between the all-to-all and the bmm; the op gathers once")
    # EP and TP must be different groups (aclnn rejects equal names; the data movement differs).
    if match.all_gather is not None and match.all_gather.group_name == a2a.group_name:
        raise Refusal(f"different groups needed: the all-to-all and the all-gather both run on group {a2a.group_name!r}; "
                      "the op's EP and TP groups must differ")
    for collective, what in ((a2a, "all-to-all"), *((g, "all-gather") for g in gathers)):
        reason = group_size_refusal(collective, what)
        if reason:
            raise Refusal(reason)
    # Values inside the chain are not outputs of the op: their collectives would have to stay.
    shared = match.chain.shared_value()
    if shared is not None:
        raise Refusal(f"extra users change semantics: {shared[0].name} (between the all-to-all and the bmm input) is also "
                      f"used by {shared[1].name}; the op only returns the gathered bmm input (y2)")
    # The layout check works on static shapes.
    if static_shape(match.x) is None or static_shape(match.y2) is None:
        raise Refusal("symbolic shapes: the layout check needs static shapes")
    if len(static_shape(match.x)) != 3:
        raise Refusal(f"the all-to-all input must be a 3-D (E, C, H) tensor, got shape {static_shape(match.x)}")
    if match.activation is not None and match.act_type < 0:
        # The largest exact prefix: all-to-all, all-gather and bmm (+ bias) fuse, the activation stays after them.
        match = replace(match, activation=None, left_out=f"the {match.activation.kind} activation after the bmm stays "
                        "unfused (the op computes GELU (erf), SiLU, ReLU and FastGELU)")
    shard_type = match.layout_shard_type()
    # Exact data movement: anything else would feed the matmul permuted rows or columns.
    if shard_type is None:
        raise Refusal("the reshape/permute chain between the all-to-all and the bmm does not reproduce the op's layout "
                      "(SPEC §6.3) for x_shard_type 0 (gather H) or 1 (gather C)")
    return replace(match, shard_type=shard_type)


def find_alltoall_allgather_bmm(graph: fx.Graph, ctx: Optional[PassContext] = None) -> list[AllToAllAllGatherBmmMatch]:
    """Every all-to-all whose result reaches the first operand of a bmm through shape ops and one
    all-gather, and whose guards pass (the op's own limits are checked by ``replace_with``)."""
    matches = []
    for a2a in find_collectives(graph, "all_to_all"):
        chain = walk(a2a.result, collective_kinds=("all_gather",), stop=_feeds_bmm)
        if not _feeds_bmm(chain.end):
            continue
        bmm = next(u for u in chain.end.users if is_op(u, aten.bmm.default) and u.args[0] is chain.end)
        bias_add = _bias_add(bmm)
        activation = _activation(bias_add if bias_add is not None else bmm)
        if activation is not None and not activation.internal_nodes_private():
            activation = None   # its pieces are used elsewhere: leave it in the graph, after y1
        candidate = AllToAllAllGatherBmmMatch(a2a, chain, bmm, bias_add, activation)
        match = attempt(ctx, PATTERN, a2a.result, lambda: _guarded(candidate))
        if match is not None:
            matches.append(match)
    return matches
