"""Capacity all-to-all MoE (GShard/DeepSpeed) => ``dispatch_v2 -> npu_ffn_grouped -> combine_v2``
(pass ``moe_capacity_a2a``).

The static-shape form with per-expert capacity ``C``::

    combine = gating(topk(scores))                        # (S, E, C): weight of token s in slot c of expert e
    d = einsum("sec,sm->ecm", combine.bool(), x)          # (E, C, H)
    r = all_to_all(d)                                     # over EP: (W, L, C, H), source-rank-major
    o = <expert i on the rows (p, i, c) of r, for each local expert i>
    y = einsum("sec,ecm->sm", combine, all_to_all(o))  [+ shared(x)]

When every token fits (no slot is taken twice, every chosen expert gets a slot), token ``s``'s row is
``sum_k combine_weight(s, ids[s,k]) * expert_{ids[s,k]}(x[s])``: dispatch_v2/combine_v2 with
``expert_scales[s,k] = combine[s, ids[s,k], :].sum()`` (one non-zero slot, so exactly that weight).

Guards, checked on what the graph computes rather than assumed from its look:

* both all_to_alls run over one group with equal splits; ``E == W * L``;
* the all_to_all input is ``einsum("sec,sm->ecm", mask, x)`` and the output
  ``einsum("sec,ecm->sm", combine, returned)``: the subgraphs between them and their inputs are
  multilinear (views, permutes, mm/bmm, mul, sum), so one evaluation on random float64 inputs that
  equals the einsum's shows the identity (a polynomial identity test; a false match needs the
  random point to be a root of a nonzero polynomial);
* the expert section between the all_to_alls only moves rows (views, split/chunk, cat, ...) into and
  out of FFNs: evaluated with ``r = arange`` and each FFN replaced by ``row + tag_i``, it must send
  every row ``(p, i, c)`` through one FFN (one per local expert ``i``) back to ``(p, i, c)``;
* dropless: ``C >= S`` (an expert has at most ``S`` tokens), and the gating subgraph from the top-k
  scores to ``mask`` and ``combine``, evaluated on 5 routings (all tokens on experts ``0..K-1``, all
  on the last ``K``, round robin, two random), gives every (token, chosen expert) exactly one slot,
  no slot two tokens, and no weight outside a token's own slots. This is sampled, not proven;
* the expert FFNs share activation and shapes; the target's protos accept the fused ops.

The evaluations run on a reduced instance of the block when the graph's own sizes would make them
costly (``S * E * C > FULL_SIZE_LIMIT``): the same nodes with the batch sizes ``S`` and ``C``
divided by a common factor (``evaluate.Instance``; at least ``REDUCED_TOKENS`` tokens), so a
guard's cost does not grow with the batch. A block whose ints do not resize consistently is refused.

A capacity that can drop tokens is refused: dispatch_v2 is dropless, so "capacity dropping stays
capacity dropping" could not hold.

DeepSpeed >= 0.19 writes the same block in the *slot form* (``scatter``/``index`` over a padded
table instead of the einsums, argmax gating, a capacity read from the data): ``capacity_slots``
reads and checks it. There, dropped routes are exact: they become the 2-D ``x_active_mask`` of
dispatch_v2/combine_v2 (the library's own keep decision), so dropping stays dropping, on targets
whose protos accept a 2-D mask.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from ._graph import ancestors, in_graph_order, insert_call, is_op, is_size, val, widening_cast
from .collectives import Collective, as_collective, collective_nodes, find_collectives, group_rank, output_value
from .context import FusionReport, PassContext, Refusal, attempt
from . import cost
from .capacity_slots import check_slot_form, is_slot_dispatch, read_slot_form
from .evaluate import FULL, Instance, NotReducible, bind_unbacked, evaluate, on_real_tensors, reduced_instance
from .ffn_forms import FfnMatch, check_same_form, find_ffn_forms
from .moe_block import Builder, MoeBlock, existing, shared_addend, topk_layout
from .routing_eval import (argmax_choices, check_distinct, dies_with, leaf_value, region, run_routing, stacked_columns,
                           transposed)
from .vocabulary import ALLOCATION_OPS, MULTILINEAR_OPS, ROW_MOVE_OPS

aten = torch.ops.aten
PATTERN = "moe_capacity_a2a"
ROUTING_SEEDS = 2   # random routings tried besides the extreme ones
FULL_SIZE_LIMIT = 1 << 18   # S * E * C up to which the guards evaluate the graph at its own sizes
REDUCED_TOKENS = 16         # the fewest tokens a reduced instance keeps
ORDER_CAPACITY = 3          # the capacity the expert order is checked at when the graph reads it from the data


# ---------------------------------------------------------------------------------------------
# Evaluating subgraphs on chosen inputs
# ---------------------------------------------------------------------------------------------

def _multilinear_region(root: fx.Node, stop: set[fx.Node]) -> tuple[set[fx.Node], list[fx.Node]]:
    """``(region, leaves)``: the nodes above ``root`` (included) reached through single-use
    multilinear ops and widening casts, and the values they start from. A narrowing cast is a leaf:
    its rounding belongs to the value the einsum reads."""
    region: set[fx.Node] = set()
    leaves: list[fx.Node] = []
    stack = [root]
    while stack:
        node = stack.pop()
        if node in region or node in leaves:
            continue
        inner = node is root or len(node.users) == 1
        if node not in stop and inner and (is_op(node, *MULTILINEAR_OPS) or widening_cast(node)):
            region.add(node)
            stack.extend(node.all_input_nodes)
        else:
            leaves.append(node)
    return region, leaves


@on_real_tensors
def _check_einsum(root: fx.Node, region: set[fx.Node], leaves: dict[str, fx.Node], equation: str,
                  operands: tuple[str, ...], shapes: dict[str, tuple], instance: Instance) -> None:
    """``root == einsum(equation, *operands)``: evaluate the region on random leaf values (of
    ``instance``'s sizes; ``shapes`` are the operands' einsum shapes at the graph's own sizes)."""
    gen = torch.Generator().manual_seed(0)
    env: dict[fx.Node, object] = {}
    for name, node in leaves.items():
        env[node] = torch.randn(instance.shape(val(node).shape), generator=gen, dtype=torch.float64)
    evaluate(region, env, identity_casts=True, instance=instance)
    expected = torch.einsum(equation, *(env[leaves[n]].reshape(instance.shape(shapes[n])) for n in operands))
    got = env[root]
    if got.numel() != expected.numel() or not torch.allclose(got.reshape(expected.shape), expected, rtol=1e-9,
                                                              atol=1e-9):
        raise Refusal(f"{root.name} is not einsum('{equation}') of {', '.join(leaves[n].name for n in operands)}")


# ---------------------------------------------------------------------------------------------
# The pieces of a block
# ---------------------------------------------------------------------------------------------

def _dispatch_einsum(a2a: Collective) -> tuple[fx.Node, fx.Node, set[fx.Node], tuple[int, int, int, int]]:
    """``(mask, x, region, (S, E, C, H))`` of what may be ``einsum("sec,sm->ecm", mask, x)`` feeding
    ``a2a`` (its structure; ``_check_einsum`` checks the values)."""
    region, leaves = _multilinear_region(a2a.input, set())
    sizes = [n.name for n in leaves if not isinstance(val(n), torch.Tensor)]
    if sizes:       # a graph dynamo recompiled with dynamic sizes: the checks need concrete shapes
        raise Refusal(f"the all_to_all input {a2a.input.name} is scaled by the dynamic size {', '.join(sizes)}: the "
                      "block fuses at static shapes only (moe_fusion.compile recompiles a model with collectives at "
                      "static shapes unless given dynamic=True)")
    # The mask is the operand computed from the routing (a top-k or argmaxes); the tokens are the other one.
    masks = [n for n in leaves if val(n).dim() == 3 and any(is_op(a, aten.topk, aten.argmax) for a in ancestors(n))]
    if len(leaves) != 2 or len(masks) != 1:
        raise Refusal(f"the all_to_all input {a2a.input.name} is not einsum('sec,sm->ecm', mask, x) of a 3-D mask "
                      f"from the routing and the tokens (it reads {', '.join(n.name for n in leaves)})")
    mask = masks[0]
    x = leaves[1] if leaves[0] is mask else leaves[0]
    s, e, c = val(mask).shape
    h = val(x).size(-1)
    if val(x).numel() != s * h:
        raise Refusal(f"the tokens {x.name} {tuple(val(x).shape)} do not match the {s} rows of the mask {mask.name}")
    return mask, x, region, (s, e, c, h)


def _continues_einsum(node: fx.Node) -> bool:
    return is_op(node, *MULTILINEAR_OPS) or widening_cast(node)


def _combine_einsum(returned: fx.Node, sizes: tuple[int, int, int, int]) -> tuple[fx.Node, fx.Node, set[fx.Node]]:
    """``(y, combine, region)`` of what may be ``y = einsum("sec,ecm->sm", combine, returned)`` (its
    structure; ``_check_einsum`` checks the values)."""
    s, e, c, h = sizes
    y = returned
    while len(y.users) == 1 and _continues_einsum(next(iter(y.users))):
        y = next(iter(y.users))
    region, leaves = _multilinear_region(y, {returned})
    others = [n for n in leaves if n is not returned]
    if y is returned or returned not in leaves or len(others) != 1 or tuple(val(others[0]).shape) != (s, e, c):
        raise Refusal(f"the returned expert outputs {returned.name} do not feed einsum('sec,ecm->sm', combine, .) "
                      f"with a ({s}, {e}, {c}) combine tensor")
    combine = others[0]
    if val(y).numel() != s * h:
        raise Refusal(f"the combine einsum result {y.name} {tuple(val(y).shape)} is not ({s}, {h})")
    return y, combine, region


def _row_moves_from(node: fx.Node) -> set[fx.Node]:
    """``node`` and every node reached from it through row moves (``ROW_MOVE_OPS``, getitem)."""
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(u for u in current.users if is_op(u, *ROW_MOVE_OPS) or u.target is operator.getitem)
    return seen


def _reaches_an_expert(received: fx.Node, experts: dict[fx.Node, FfnMatch]) -> bool:
    """Some expert FFN reads rows of ``received`` through row moves: the all_to_all is a candidate."""
    return not _row_moves_from(received).isdisjoint(m.x for m in experts.values())


def _expert_section(received: fx.Node, experts: dict[fx.Node, FfnMatch]
                    ) -> tuple[Collective, list[FfnMatch], set[fx.Node]]:
    """Walk from the first all_to_all's result to the second one's input: ``(a2a back, FFNs in
    order of first use, row-moving nodes)``; raises Refusal on any other op."""
    owner = {n: m for m in experts.values() for n in m.nodes | {m.out}}
    section: set[fx.Node] = set()
    used: list[FfnMatch] = []
    back: list[Collective] = []
    frontier = [received]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            found = as_collective(user)
            if found is not None and found.kind == "all_to_all" and found.input is node:
                back.append(found)
            elif user in owner:
                match = owner[user]
                if all(match.out is not m.out for m in used):
                    used.append(match)
                    frontier.append(match.out)
            elif is_op(user, *ROW_MOVE_OPS) or user.target is operator.getitem or is_size(user):
                if user not in section:
                    section.add(user)
                    frontier.append(user)
            elif is_size(node) and is_op(user, *ALLOCATION_OPS):
                continue    # an out= buffer sized from the rows (a data-dependent capacity): reads no values
            else:
                raise Refusal(f"between the all_to_alls, {user.name} ({user.target}) is neither a row move nor "
                              "an expert FFN")
    if len(back) != 1:
        raise Refusal(f"the received tokens reach {len(back)} all_to_alls, not one that returns the expert outputs")
    inside = section | {received} | {m.out for m in used}
    for match in used:
        if match.x not in inside:
            raise Refusal(f"the expert FFN {match.out.name} reads {match.x.name}, not rows of the received tokens")
    for node in section:
        # A row from outside (padding, another tensor) would be returned as an expert output.
        outside = [n.name for n in node.all_input_nodes if n not in inside and not is_size(n)]
        if outside:
            raise Refusal(f"{node.name} between the all_to_alls also reads {', '.join(outside)}")
    return back[0], used, section


@on_real_tensors
def _order_experts(received: fx.Node, back: Collective, used: list[FfnMatch], section: set[fx.Node],
                   world: int, hidden: int, instance: Instance) -> list[FfnMatch]:
    """Check that row ``(p, i, c)`` of the received ``(W, L, C, H)`` goes through exactly one FFN
    and back to ``(p, i, c)`` (every row, on ``instance``); return the FFNs in local-expert order ``i``."""
    local = len(used)
    shape, hidden = instance.shape(val(received).shape), instance.size(hidden)
    numel = math.prod(shape)
    if numel % (world * local * hidden):
        raise Refusal(f"the received tokens {tuple(val(received).shape)} do not split into "
                      f"({world}, {local}, C, {hidden})")
    for m in used:
        rows_in, rows_out = instance.shape(val(m.x).shape), instance.shape(val(m.out).shape)
        if math.prod(rows_in) != math.prod(rows_out) or rows_in[-1] != rows_out[-1]:
            raise Refusal(f"the expert FFN {m.out.name} changes the rows {tuple(val(m.x).shape)}")
    env: dict[fx.Node, object] = {received: torch.arange(numel, dtype=torch.float64).view(shape)}
    # Sizes read from outside (a capacity from the data) take their value in this instance.
    env.update({n: instance.size(val(n)) for node in section for n in node.all_input_nodes
                if n not in section and is_size(n)})
    tags = {m.out: float((i + 1) * 2 * numel) for i, m in enumerate(used)}
    columns = torch.arange(hidden, dtype=torch.float64)
    order = in_graph_order(section | {m.out for m in used})
    for node in order:
        match = next((m for m in used if m.out is node), None)
        if match is None:
            evaluate([node], env, instance=instance)
            continue
        rows = env[match.x].reshape(-1, hidden)
        # An FFN works on whole token rows: its input rows must be rows of the received tensor.
        if not (torch.equal(rows - rows[:, :1], columns.expand_as(rows)) and bool((rows[:, 0] % hidden == 0).all())):
            raise Refusal(f"the rows fed to expert FFN {match.out.name} are not whole received token rows")
        env[node] = (env[match.x] + tags[node]).reshape(instance.shape(val(node).shape))
    diff = (env[back.input].reshape(world, local, -1) - env[received].reshape(world, local, -1))
    by_tag = {tags[m.out]: m for m in used}
    ordered = []
    for i in range(local):
        tag = float(diff[0, i, 0])
        if tag not in by_tag or not bool((diff[:, i] == tag).all()):
            raise Refusal(f"the rows of local expert {i} do not all go through one expert FFN and back to their "
                          "place before the return all_to_all")
        ordered.append(by_tag[tag])
    if len({m.out for m in ordered}) != local:
        raise Refusal("two local experts' rows go through the same FFN")
    return ordered


def _gating(mask: fx.Node, combine: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """``(topk, nodes)``: the one top-k the mask and combine tensors derive from, and every node
    between its scores and them; raises Refusal if they read anything else."""
    topks = [n for n in ancestors(combine) if is_op(n, torch.ops.aten.topk)]
    if len(topks) != 1 or topks[0] not in ancestors(mask):
        raise Refusal(f"the combine weights {combine.name} do not derive from exactly one torch.topk shared with "
                      "the dispatch mask")
    topk = topks[0]
    scores = topk.args[0]
    nodes: set[fx.Node] = set()
    stack = [mask, combine]
    while stack:
        node = stack.pop()
        if node is scores or node in nodes:
            continue
        # Evaluating the gating needs it to be a pure function of the scores.
        if node.op != "call_function" or node.is_impure() or "rand" in str(node.target):
            raise Refusal(f"the routing tensors depend on {node.name} ({node.op} {node.target}) besides the "
                          f"top-k scores {scores.name}")
        nodes.add(node)
        stack.extend(node.all_input_nodes)
    return topk, in_graph_order(nodes)


def _routings(tokens: int, experts: int, k: int) -> list[tuple[str, torch.Tensor]]:
    """Expert choices ``(S, K)`` to evaluate the gating on: the extremes of per-expert load and random."""
    ids = [("all tokens on experts 0..K-1", torch.arange(k).expand(tokens, k)),
           ("all tokens on the last K experts", torch.arange(experts - 1, experts - 1 - k, -1).expand(tokens, k)),
           ("round robin", (torch.arange(tokens).unsqueeze(1) * k + torch.arange(k)) % experts)]
    gen = torch.Generator().manual_seed(0)
    ids += [(f"random #{i}", torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)]))
            for i in range(ROUTING_SEEDS)]
    return ids


@on_real_tensors
def _check_dropless(topk: fx.Node, nodes: list[fx.Node], mask: fx.Node, combine: fx.Node, instance: Instance) -> None:
    """Every chosen (token, expert) gets exactly one slot, no slot holds two tokens and no weight
    lies outside a token's own slots, for every routing of ``_routings`` (on ``instance``)."""
    scores = topk.args[0]
    tokens, experts = instance.shape(val(scores).shape)
    k = topk.args[1]
    gen = torch.Generator().manual_seed(1)
    for name, ids in _routings(tokens, experts, k):
        values = 0.1 * torch.rand(tokens, experts, generator=gen, dtype=torch.float64)
        values.scatter_(1, ids, (1.0 - 0.01 * torch.arange(k, dtype=torch.float64)).expand(tokens, k))
        env: dict[fx.Node, object] = {scores: values.to(val(scores).dtype)}
        evaluate(nodes, env, instance=instance)
        dm, cw = env[mask].double(), env[combine].double()
        chosen = torch.zeros(tokens, experts, dtype=torch.float64).scatter_(1, ids, 1.0)
        problems = [("a dispatch mask entry is not 0 or 1", bool(((dm != 0) & (dm != 1)).any())),
                    ("a slot holds two tokens", bool((dm.sum(0) > 1).any())),
                    ("a chosen expert does not get exactly one slot of the token (dropped)",
                     not torch.equal(dm.sum(-1), chosen)),
                    ("a combine weight lies outside the token's dispatched slots", bool(((cw != 0) & (dm == 0)).any()))]
        for problem, found in problems:
            if found:
                raise Refusal(f"the capacity gating is not dropless one-slot routing: with {name}, {problem}")


def _scales_builder(combine: fx.Node, ids: Builder) -> Builder:
    """``combine.sum(-1).gather(1, ids)``: each (token, choice)'s weight, exact (one non-zero slot)."""
    def build(graph: fx.Graph, before: fx.Node) -> fx.Node:
        per_expert = insert_call(graph, before, aten.sum.dim_IntList, (combine, [-1]))
        return insert_call(graph, before, aten.gather.default, (per_expert, 1, ids(graph, before)))
    return build


def _kept_builder(mask: fx.Node, ids: Builder) -> Builder:
    """``mask.sum(-1).gather(1, ids) != 0``: the (token, choice) routes the gating gave a slot."""
    def build(graph: fx.Graph, before: fx.Node) -> fx.Node:
        slots = insert_call(graph, before, aten.sum.dim_IntList, (mask, [-1]))
        routed = insert_call(graph, before, aten.gather.default, (slots, 1, ids(graph, before)))
        return insert_call(graph, before, aten.ne.Scalar, (routed, 0))
    return build


def _argmax_gating(mask: fx.Node, combine: fx.Node, sizes: tuple[int, int, int],
                   instance: Instance) -> tuple[tuple[fx.Node, ...], bool]:
    """``(choices, drops)`` of gating by successive argmaxes (fairscale's ``Top2Gate``): the argmax
    of each route (the later ones masking the earlier choices), and whether the gating may leave a
    route without a slot (then dispatched with a 2-D ``x_active_mask``); raises Refusal."""
    s, e, c = sizes
    choices = argmax_choices(combine)
    if any(choice not in ancestors(mask) for choice in choices):
        raise Refusal(f"the combine weights {combine.name} and the dispatch mask {mask.name} derive from different "
                      "argmax routings")
    if tuple(val(choices[0].args[0]).shape) != (s, e):
        raise Refusal(f"the argmax routing scores {tuple(val(choices[0].args[0]).shape)} are not the ({s}, {e}) of the "
                      "capacity tensors")
    check_distinct(choices, instance)
    drops = _check_slots(choices, mask, combine, instance)
    return choices, drops or c < s


@on_real_tensors
def _check_slots(choices: tuple[fx.Node, ...], mask: fx.Node, combine: fx.Node, instance: Instance) -> bool:
    """On every routing of ``_routings``: the mask is 0/1, no slot holds two tokens, a route holds at
    most one slot and only of its chosen expert, and no combine weight lies outside the token's
    slots. Returns whether some route got no slot (dropped)."""
    nodes, leaves = region([mask, combine], set(choices))
    tokens, experts, _ = instance.shape(val(mask).shape)
    gen = torch.Generator().manual_seed(4)
    dropped = False
    for name, ids in _routings(tokens, experts, len(choices)):
        env: dict[fx.Node, object] = {leaf: leaf_value(leaf, instance, gen, experts) for leaf in leaves}
        env.update({choice: ids[:, k].clone() for k, choice in enumerate(choices)})
        run_routing(nodes, env, instance, 0)
        dm, cw = env[mask].double(), env[combine].double()
        chosen = torch.zeros(tokens, experts, dtype=torch.bool).scatter_(1, ids, True)
        per_route = dm.sum(-1)
        problems = [("a dispatch mask entry is not 0 or 1", bool(((dm != 0) & (dm != 1)).any())),
                    ("a slot holds two tokens", bool((dm.sum(0) > 1).any())),
                    ("a route holds two slots", bool((per_route > 1).any())),
                    ("a token holds a slot of an expert it did not choose", bool(((per_route > 0) & ~chosen).any())),
                    ("a combine weight lies outside the token's dispatched slots", bool(((cw != 0) & (dm == 0)).any()))]
        for problem, found in problems:
            if found:
                raise Refusal(f"the argmax capacity gating is not one-slot routing: with {name}, {problem}")
        dropped = dropped or bool((chosen & (per_route == 0)).any())
    return dropped


def _topk_indices(topk: fx.Node) -> fx.Node:
    for user in topk.users:
        if user.target is operator.getitem and user.args[1] == 1:
            return user
    raise Refusal(f"the indices of the top-k {topk.name} are not used; the routing has no expert ids")


def _instance(mask: fx.Node, sizes: tuple[int, int, int, int], world: int, local: int) -> Instance:
    """Where the guards evaluate the block: the graph's own sizes when small, else a reduced
    instance dividing the batch sizes ``S`` and ``C`` (``evaluate.Instance``)."""
    s, e, c, h = sizes
    if s * e * c <= FULL_SIZE_LIMIT:
        return FULL
    top_ks = {n.args[1] for n in ancestors(mask) if is_op(n, aten.topk)}
    k = max(top_ks | {sum(1 for n in ancestors(mask) if is_op(n, aten.argmax.default))})
    return _reduced((s, c), h, (e, world, local, k))


def _reduced(batch: tuple[int, ...], hidden: int, fixed: tuple[int, ...]) -> Instance:
    """The reduced instance dividing the batch sizes, and the hidden size with them when it can:
    then a hidden size equal to a batch product (``H == E * C`` with powers of two) shrinks under
    either reading, so the value cannot be misread."""
    for bigs, smalls in (((*batch, hidden), fixed), (batch, (*fixed, hidden))):
        instance = reduced_instance(bigs, smalls, REDUCED_TOKENS)
        if instance is not FULL:
            return instance
    raise NotReducible(f"the batch sizes {batch} share no factor that leaves {REDUCED_TOKENS} tokens")


@dataclass(frozen=True)
class RefusedExpert:
    """An expert-placed FFN the FFN forms refused: its second matmul, what it reads, and why."""

    second: fx.Node
    reads: set[fx.Node]
    reason: str


def _ffns_and_refused_experts(graph: fx.Graph, ctx: Optional[PassContext]
                              ) -> tuple[dict[fx.Node, FfnMatch], list[RefusedExpert]]:
    """The graph's FFNs by output node, and the FFNs the FFN forms refused whose output goes to an
    all_to_all by row moves only, as an expert's does (a dense MLP after the combine does not)."""
    not_ffns = FusionReport()
    experts = {m.out: m for m in find_ffn_forms(graph, PassContext(ctx.target if ctx else "portable", not_ffns))}
    by_name = {node.name: node for node in graph.nodes}
    sent = {c.input for c in find_collectives(graph, "all_to_all")}
    refused = []
    for event in not_ffns.refused():
        second = by_name[event.where]
        if not sent.isdisjoint(_row_moves_from(second)):
            refused.append(RefusedExpert(second, ancestors(second), event.detail))
    return experts, refused


def _refused_expert(received: fx.Node, refused: list[RefusedExpert]) -> Optional[str]:
    """Why the block is not fused when the rows ``received`` go through a refused expert FFN."""
    for expert in refused:
        if received in expert.reads:
            return (f"the rows it receives go through {expert.second.name}, an expert FFN the fused ops cannot "
                    f"compute: {expert.reason}")
    return None


def _read_block(a2a: Collective, experts: dict[fx.Node, FfnMatch], refused: list[RefusedExpert]
                ) -> Optional[MoeBlock]:
    """The capacity MoE block whose dispatch all_to_all is ``a2a``; None when ``a2a`` feeds no
    expert FFN (not a candidate); raises Refusal (also when its experts are FFNs the FFN forms
    refused, ``refused``)."""
    received = output_value(a2a)
    if not _reaches_an_expert(received, experts):
        why = _refused_expert(received, refused)
        if why is not None:
            raise Refusal(why)
        return None
    back, used, section = _expert_section(received, experts)
    # One EP group with equal splits: chunk p of dim 0 (experts [p*L, (p+1)*L)) goes to rank p.
    if back.group_name != a2a.group_name or back.group_size != a2a.group_size:
        raise Refusal(f"the all_to_alls run over different groups ({a2a.group_name!r}, {back.group_name!r})")
    if not (a2a.equal_splits and back.equal_splits):
        raise Refusal("an all_to_all has unequal splits; the capacity layout sends E/W experts to each rank")
    world = a2a.group_size
    if is_slot_dispatch(a2a.input):
        return _read_slot_block(a2a, received, back, used, section)
    mask, x, dispatch_region, (s, e, c, h) = _dispatch_einsum(a2a)
    instance = _instance(mask, (s, e, c, h), world, len(used))
    try:
        _check_einsum(a2a.input, dispatch_region, {"mask": mask, "x": x}, "sec,sm->ecm", ("mask", "x"),
                      {"mask": (s, e, c), "x": (s, h)}, instance)
        if e != world * len(used):
            raise Refusal(f"the mask has {e} experts but the {world} ranks run {len(used)} expert FFNs each")
        ordered = _order_experts(received, back, used, section, world, h, instance)
        check_same_form(ordered, "local experts")
        returned = output_value(back)
        y, combine, combine_region = _combine_einsum(returned, (s, e, c, h))
        _check_einsum(y, combine_region, {"combine": combine, "returned": returned}, "sec,ecm->sm",
                      ("combine", "returned"), {"combine": (s, e, c), "returned": (e, c, h)}, instance)
        if any(is_op(n, aten.topk) for n in ancestors(combine)):
            topk, gating_nodes = _gating(mask, combine)
            gate_experts, _ = topk_layout(topk)
            if gate_experts != e or val(topk.args[0]).size(0) != s:
                raise Refusal(f"the top-k chooses among {gate_experts} experts for {val(topk.args[0]).size(0)} "
                              f"tokens, the capacity tensors have ({s}, {e}, C)")
            # Dropless by counting: one expert receives at most S tokens, so C >= S slots always suffice.
            if c < s:
                raise Refusal(f"capacity C={c} < tokens per rank S={s}: an expert chosen by more than {c} tokens "
                              "drops some, and dispatch_v2 is dropless")
            _check_dropless(topk, gating_nodes, mask, combine, instance)
            # The gating stays (the scales read it); the dispatch mask chain only the einsum read dies with it.
            ids, k, kept, gating = existing(_topk_indices(topk)), topk.args[1], None, set(gating_nodes)
        else:
            choices, drops = _argmax_gating(mask, combine, (s, e, c), instance)
            ids, k, gating = stacked_columns(choices), len(choices), set()
            kept = _kept_builder(mask, ids) if drops else None
    except NotReducible as error:
        raise Refusal(f"the guards cannot run on a reduced instance of this block ({error}), and at its own sizes "
                      f"(S={s}, E={e}, C={c}) they would cost as much as the layer") from error
    dtype = val(x).dtype
    if ordered[0].dtype != dtype or val(y).dtype != dtype:
        raise Refusal(f"x is {dtype} but the experts run in {ordered[0].dtype} and the combine in {val(y).dtype}")

    out, shared = shared_addend(y)
    nodes = (dispatch_region | section | combine_region | collective_nodes(a2a, received)
             | collective_nodes(back, returned) | {mask} | gating)
    return MoeBlock(PATTERN, a2a.nodes[0], x, ids, k, _scales_builder(combine, ids), ordered, a2a.group_name, world,
                    group_rank(a2a.group_name), e, out, shared, frozenset(nodes), active_mask=kept)


def _read_slot_block(a2a: Collective, received: fx.Node, back: Collective, used: list[FfnMatch],
                     section: set[fx.Node]) -> MoeBlock:
    """The block whose dispatch is the slot form (``capacity_slots``); raises Refusal."""
    world, local = a2a.group_size, len(used)
    returned = output_value(back)
    form = read_slot_form(a2a.input, returned)
    k, tokens = val(form.slots).shape
    experts, hidden = world * local, val(form.x).size(1)
    if val(form.choices[0].args[0]).size(1) != experts:
        raise Refusal(f"the routing chooses among {val(form.choices[0].args[0]).size(1)} experts but the {world} ranks "
                      f"run {local} expert FFNs each")
    capacity = val(a2a.input).size(1) if val(a2a.input).dim() == 3 else None
    try:
        instance = FULL
        if tokens * experts * hidden > FULL_SIZE_LIMIT:
            batch = (tokens,) + ((capacity,) if isinstance(capacity, int) else ())
            instance = _reduced(batch, hidden, (experts, world, local, k))
        rows = bind_unbacked([val(received).shape], ORDER_CAPACITY, instance)
        ordered = _order_experts(received, back, used, section, world, hidden, rows)
        check_same_form(ordered, "local experts")
        check_slot_form(form, a2a.input, returned, experts, _routings, instance)
    except NotReducible as error:
        raise Refusal(f"the guards cannot evaluate this block ({error})") from error
    dtype = val(form.x).dtype
    if ordered[0].dtype != dtype or val(form.y).dtype != dtype:
        raise Refusal(f"x is {dtype} but the experts run in {ordered[0].dtype} and the combine in {val(form.y).dtype}")
    cost.refuse_unpadded_slot_block(val(a2a.input).numel() // hidden, tokens * k, val(form.x).device)
    out, shared = shared_addend(form.y)
    read = {form.x, form.keep, form.gates, *form.choices} | ({shared} if shared is not None else set())
    return MoeBlock(PATTERN, a2a.nodes[0], form.x, stacked_columns(form.choices), k, transposed(form.gates), ordered,
                    a2a.group_name, world, group_rank(a2a.group_name), experts, out, shared, dies_with(out, read),
                    active_mask=transposed(form.keep))


def find_moe_capacity_a2a(graph: fx.Graph, ctx: Optional[PassContext] = None) -> list[MoeBlock]:
    """Every dropless capacity all-to-all MoE block whose guards pass, anchored at its dispatch
    all_to_all; refusals go to ``ctx``. ``MoeBlock.replace_with`` rewrites each:

    Before (W = 2, S = 8, E = 4, C = 8, H = 16, post-grad; einsums as bmm between views)::

        view_5:        "f32[8, 4, 8]"  = <combine weights from topk(div, 2)>
        convert_4:     "f32[8, 4, 8]"  = prims.convert_element_type(convert_3 (bool), torch.float32)
        bmm:           "f32[1, 32, 16]" = aten.bmm(view_6 <- convert_4, view_7 <- x)     # dispatch einsum
        view_9:        "f32[4, 8, 16]" = aten.view(...)
        all_to_all_single = _c10d_functional.all_to_all_single(view_9, [2, 2], [2, 2], "0")
        copy:          "f32[4, 8, 16]" = aten.copy(empty, wait_tensor)
        view_12 -> split -> getitem_4 -> clone -> view_13 "f32[16, 16]" -> <FFN 0> -> view_14 "f32[2, 1, 8, 16]"
        ... local expert 1 -> view_17 ...
        cat:           "f32[2, 2, 8, 16]" = aten.cat([view_14, view_17], 1)
        all_to_all_single_1 = _c10d_functional.all_to_all_single(view_18, [2, 2], [2, 2], "0")
        copy_1:        "f32[4, 8, 16]" = aten.copy(empty_1, wait_tensor_1)
        bmm_2:         "f32[1, 8, 16]" = aten.bmm(view_19 <- view_5, view_20 <- copy_1)  # combine einsum
        view_22:       "f32[8, 16]"    = aten.view(...)
        add_3:         "f32[8, 16]"    = aten.add.Tensor(view_22, mm_6)                  # + shared(x)

    After::

        sum_5:   "f32[8, 4]" = aten.sum.dim_IntList(view_5, [-1])
        gather:  "f32[8, 2]" = aten.gather(sum_5, 1, getitem_1)                          # topk indices
        npu_moe_distribute_dispatch_v2 = moe_fusion.npu_moe_distribute_dispatch_v2(x, ids_i32, "0", 2, 1, 4)
        npu_ffn_grouped: "f32[32, 16]" = moe_fusion.npu_ffn_grouped(getitem, stack, stack_1, "silu",
                                                                    expert_tokens=getitem_2, inner_precise=0)
        npu_moe_distribute_combine_v2: "f32[8, 16]" = moe_fusion.npu_moe_distribute_combine_v2(
            npu_ffn_grouped, ids_i32, getitem_1, getitem_3, gather, "0", 2, 1, 4,
            tp_send_counts=getitem_4, shared_expert_x=mm_6)

    The gating stays; the dispatch mask chain it fed dies and is erased.
    """
    experts, refused = _ffns_and_refused_experts(graph, ctx)
    blocks = []
    for a2a in find_collectives(graph, "all_to_all"):
        block = attempt(ctx, PATTERN, a2a.nodes[0], lambda: _read_block(a2a, experts, refused))
        if block is not None:
            blocks.append(block)
    return blocks
