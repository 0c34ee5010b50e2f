"""Variable-split all-to-all MoE (torchtitan's ``AllToAllTokenDispatcher``) =>
``dispatch_v2 -> npu_ffn_grouped -> combine_v2`` (pass ``moe_split_a2a``).

The dropless form where every route's token row travels to the rank owning its expert, with split
sizes exchanged at run time (``T`` tokens, ``K`` choices, ``E = W * L`` experts over ``W`` ranks)::

    order    = sort(ids.view(-1), stable).indices            # (T*K,) routes in expert order
    rows     = x[order // K]       # (T*K, H); or index_select / gather(0, expanded index)
    counts   = <routes per expert> (E,); recv = all_to_all(counts.view(W, L))   # (W*L,) static splits
    send, got = counts.view(W, L).sum(1).tolist(), recv.view(W, L).sum(1).tolist()
    received = all_to_all_single(rows, got, send)            # (R, H), source-rank-major
    h        = grouped_ffn(received[perm], offs=cumsum(recv.view(W, L).sum(0)))   # expert-major
    returned = all_to_all_single(empty(R, H).index_put([perm], h), send, got)     # (T*K, H) in order
    y        = zeros(T, H).scatter_add(0, order // K, returned * scores.view(-1)[order])  [+ shared(x)]

Token ``t``'s row is ``sum_k scores[t, k] * expert_{ids[t, k]}(x[t])``: dispatch_v2/combine_v2 with
``expert_scales = scores``, the expert FFN's weights (already ``(L, ., .)`` stacks) as they are.

Guards, checked on what the graph computes rather than assumed from its look:

* two ``all_to_all_single`` over one group, splits read from the data, the second's input splits
  the first's output splits and the reverse; ``E == W * L``;
* the ids are the indices of a largest top-k over the last dim (``E`` experts) of the gate: unique
  per token and in ``[0, E)``;
* between the two, one grouped FFN (``ffn_forms``' grouped form, ``L`` experts) reads the received
  rows and its result reaches the second all-to-all; nothing else of the block is used elsewhere;
* the block reads nothing but the tokens, the top-k ids and the scores (and constants);
* evaluated in lockstep on ``W`` virtual ranks (the collectives computed across them) in float64
  (float casts as the identity: the check is about where rows go),
  with the FFN replaced by ``row + tag(global expert of its segment)``, it gives
  ``y[t] = sum_k scores[t, k] * (x[t] + tag(ids[t, k]))`` on every rank for four routings (every
  route on experts ``0..K-1``, every route on the last ``K``, two random). Sampled, not proven.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Optional

import torch
import torch.fx as fx

from ._graph import ancestors, float_cast, in_graph_order, insert_call, is_op, val
from .collectives import (Collective, collective_producing, find_collectives, group_rank, group_size_refusal,
                          output_value)
from .context import PassContext, Refusal, attempt
from .evaluate import Instance, evaluate, on_real_tensors, reduced_instance
from .ffn_forms import FfnMatch, find_ffn_forms
from .moe_block import Builder, MoeBlock, shared_addend
from .vocabulary import ALLOCATION_OPS, RESHAPE_OPS, VIEW_OPS

aten, prims = torch.ops.aten, torch.ops.prims
c10d = torch.ops._c10d_functional
PATTERN = "moe_split_a2a"
ROUTING_SEEDS = 2   # random routings simulated besides the extreme ones
FULL_SIZE_LIMIT = 1 << 22   # W * T * K * H up to which the block is simulated at its own sizes
REDUCED_TOKENS = 32         # the fewest tokens a reduced simulation keeps
# Allocations whose float dtype the simulation widens to float64 (it tracks values exactly).
FLOAT_ALLOCATIONS = ALLOCATION_OPS + (aten.full.default, aten.zeros.default)


def _data_splits(a2a: Collective) -> bool:
    """The all-to-all's split sizes are read from the data (some split is a graph value)."""
    splits = (a2a.output_split_sizes or ()) + (a2a.input_split_sizes or ())
    return any(isinstance(s, fx.Node) for s in splits)


def _routing_topk(dispatched: fx.Node) -> tuple[fx.Node, int, int]:
    """``(ids, E, K)``: the top-k indices the dispatched rows are sorted by, checked to be a largest
    top-k over the last dim of the gate (unique per token, in ``[0, E)``)."""
    above = {n for n in ancestors(dispatched) if is_op(n, aten.topk)}
    # The routing's own top-k is the last: earlier ones feed it (an earlier layer, a group-limited gate).
    topks = [t for t in above if not any(t is not u and t in ancestors(u) for u in above)]
    if len(topks) != 1:
        raise Refusal(f"the dispatched rows {dispatched.name} depend on {len(topks)} last top-k nodes; one routing "
                      "top-k is needed to read the expert ids from")
    topk = topks[0]
    gate = val(topk.args[0])
    k = topk.args[1]
    dim = topk.args[2] if len(topk.args) > 2 else topk.kwargs.get("dim", -1)
    largest = topk.args[3] if len(topk.args) > 3 else topk.kwargs.get("largest", True)
    # Only a largest-k over the expert dim picks K distinct experts per token in [0, E).
    if (dim % gate.dim() != gate.dim() - 1 or not largest or not isinstance(k, int)
            or not isinstance(gate.size(-1), int)):
        raise Refusal(f"the top-k {topk.name} is not a largest-k over the last (expert) dim of the gate")
    ids = [u for u in topk.users if u.target is operator.getitem and u.args[1] == 1]
    if len(ids) != 1:
        raise Refusal(f"the top-k {topk.name}'s indices are not one node")
    return ids[0], gate.size(-1), k


def _past_casts(node: fx.Node) -> fx.Node:
    """``node``, or the end of the chain of dtype casts that is its only use."""
    while len(node.users) == 1 and is_op(next(iter(node.users)), prims.convert_element_type):
        node = next(iter(node.users))
    return node


def _scores(returned: fx.Node, tokens: int, k: int) -> tuple[fx.Node, fx.Node]:
    """``(scores, weighted)``: the ``(.., K)`` scores the returned rows (past their casts) are
    multiplied by, followed up from the product's other factor through reshapes, casts and row gathers
    to the first node of ``T * K`` elements that is none of those; ``weighted`` the product."""
    rows = _past_casts(returned)
    users = [u for u in rows.users if is_op(u, aten.mul.Tensor)]
    if len(users) != 1 or len(rows.users) != 1:
        raise Refusal(f"the returned rows {returned.name} are not (only) multiplied by routing scores")
    mul = users[0]
    node = mul.args[1] if mul.args[0] is rows else mul.args[0]
    while isinstance(node, fx.Node) and (is_op(node, *RESHAPE_OPS) or is_op(node, aten.index.Tensor)
                                         or is_op(node, prims.convert_element_type)):
        node = node.args[0]
    if not isinstance(node, fx.Node) or val(node).numel() != tokens * k or not val(node).is_floating_point():
        raise Refusal(f"the weights of the returned rows do not come from ({tokens}, {k}) routing scores")
    return node, mul


def _block_output(weighted: fx.Node, tokens: int, hidden: int) -> tuple[fx.Node, fx.Node]:
    """``(summed, out)``: the single user of the weighted rows (past casts) that sums them per token
    (a scatter-add), and the block's ``(T, H)`` result: ``summed`` past its single-use views."""
    node = _past_casts(weighted)
    if len(node.users) != 1:
        raise Refusal(f"the weighted rows {node.name} have {len(node.users)} users, not one per-token sum")
    summed = next(iter(node.users))
    if not isinstance(val(summed), torch.Tensor) or val(summed).numel() != tokens * hidden:
        raise Refusal(f"the weighted rows are summed into {summed.name}, not a ({tokens}, {hidden}) result")
    out = summed
    while len(out.users) == 1 and is_op(next(iter(out.users)), *VIEW_OPS):
        out = next(iter(out.users))
    return summed, out


def _region(out: fx.Node, roots: list[fx.Node], stop: set[fx.Node]) -> set[fx.Node]:
    """Every node ``out`` and ``roots`` read, up to (excluding) ``stop``; refused when one is an
    input of the graph (the block would read something besides its tokens, routing and scores)."""
    region: set[fx.Node] = set()
    stack = [out, *roots]
    while stack:
        node = stack.pop()
        if node in region or node in stop:
            continue
        if node.op != "call_function":
            raise Refusal(f"the block reads {node.name}, which is not its tokens, routing ids or scores")
        region.add(node)
        stack.extend(node.all_input_nodes)
    return region


# What may touch the rows' values between the tokens and the result: moving rows (gathers, puts,
# views, the all-to-alls), casts, allocations; the score weighting and the per-token sum are the
# two nodes ``_check_data_path`` is given.
ROW_PATH_OPS = RESHAPE_OPS + (aten.expand.default, aten.index.Tensor, aten.index_put.default, aten.index_select.default,
                              aten.gather.default, prims.convert_element_type.default, aten._to_copy.default,
                              c10d.all_to_all_single.default, c10d.wait_tensor.default) + FLOAT_ALLOCATIONS


def _reading(region: set[fx.Node], sources: set[fx.Node], *, sizes: bool = True) -> set[fx.Node]:
    """The nodes of ``region`` computed from ``sources`` (transitively, within the region), and the
    sources; without ``sizes``, a read of a tensor's size does not count as reading it."""
    reached = set(sources)
    for node in in_graph_order(region):
        if (sizes or not is_op(node, aten.sym_size.int)) and not reached.isdisjoint(node.all_input_nodes):
            reached.add(node)
    return reached


def _check_data_path(region: set[fx.Node], data: tuple[fx.Node, ...], allowed: set[fx.Node]) -> None:
    """Only row moves touch the values flowing from ``data`` (the tokens, the scores, the expert
    output) besides the ``allowed`` nodes, and the routing (every integer value of the block: ids,
    orders, counts, split sizes) reads none of them: a block that clamps, activates or offsets rows
    outside its expert, or routes by the token values, is no dispatch/combine."""
    # Within the block: the ids are a leaf, though the gate read the tokens.
    for node in in_graph_order(_reading(region, set(data), sizes=False) - set(data) - allowed):
        value = val(node)
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise Refusal(f"the routing value {node.name} ({node.target}) reads the tokens, the scores or the expert "
                          "output; dispatch_v2 routes by the expert ids alone")
        if not is_op(node, *ROW_PATH_OPS):
            raise Refusal(f"{node.name} ({node.target}) changes the rows' values outside the expert FFN; only row "
                          "moves, the score weighting and the per-token sum are a dispatch/combine")


def _dead_with(region: set[fx.Node]) -> set[fx.Node]:
    """The runtime asserts on the data-read sizes of ``region`` and the symbolic arithmetic feeding
    them: dead once the block is replaced, they would keep its count exchange alive."""
    out: set[fx.Node] = set()
    stack = [u for n in region if is_op(n, aten._local_scalar_dense) for u in n.users]
    while stack:
        node = stack.pop()
        if node in region or node in out:
            continue
        if is_op(node, aten._assert_scalar) or (node.op == "call_function" and not isinstance(val(node), torch.Tensor)):
            out.add(node)
            stack.extend(node.users)
    return out


class _Simulation:
    """The block's region evaluated on ``world`` virtual ranks in lockstep (float64), at the sizes of
    ``instance`` (the graph's own, or fewer tokens: ``evaluate.Instance``)."""

    def __init__(self, region: set[fx.Node], collectives: dict[fx.Node, Collective], ffn: FfnMatch,
                 world: int, local: int, instance: Instance) -> None:
        self.order = in_graph_order(region | {ffn.out})
        self.collectives, self.ffn, self.world, self.local, self.instance = collectives, ffn, world, local, instance

    def run(self, envs: list[dict[fx.Node, Any]], tags: torch.Tensor) -> None:
        for node in self.order:
            if node in envs[0]:
                continue
            if node in self.collectives:
                self._all_to_all(node, envs)
            elif is_op(node, c10d.wait_tensor):
                for env in envs:
                    env[node] = env[node.args[0]]
            elif node is self.ffn.out:
                for rank, env in enumerate(envs):
                    env[node] = self._tagged_rows(env, rank, tags)
            else:
                for env in envs:
                    self._evaluate(node, env)

    def _all_to_all(self, node: fx.Node, envs: list[dict[fx.Node, Any]]) -> None:
        a2a = self.collectives[node]
        sent = []
        for env in envs:
            rows = env[a2a.input]
            splits = self.instance.args(node, env)[0][2] or [rows.size(0) // self.world] * self.world
            sent.append(torch.split(rows, list(splits)))
        for rank, env in enumerate(envs):
            env[node] = torch.cat([chunks[rank] for chunks in sent])

    def _tagged_rows(self, env: dict[fx.Node, Any], rank: int, tags: torch.Tensor) -> torch.Tensor:
        rows, ends = env[self.ffn.x], env[self.ffn.offs].long()
        expert = torch.searchsorted(ends, torch.arange(rows.size(0)), right=True)
        # Rows past the last segment are no expert's: NaN shows any use of them in the result.
        tag = torch.where(expert < self.local, tags[(rank * self.local + expert).clamp(max=tags.numel() - 1)],
                          torch.nan)
        return rows + tag.unsqueeze(1)

    def _evaluate(self, node: fx.Node, env: dict[fx.Node, Any]) -> None:
        if float_cast(node):    # every float cast, narrowing ones included: the check tracks data movement
            env[node] = env[node.args[0]]
            return
        if is_op(node, *FLOAT_ALLOCATIONS) and node.kwargs.get("dtype") in (torch.float32, torch.bfloat16,
                                                                          torch.float16):
            args, kwargs = self.instance.args(node, env)
            env[node] = node.target(*args, **{**kwargs, "dtype": torch.float64, "device": "cpu"})
            return
        evaluate([node], env, instance=self.instance)


def _routings(shape: tuple[int, ...], experts: int, local: int, k: int, world: int) -> list[list[torch.Tensor]]:
    """Per routing, one ``ids`` tensor of ``shape`` (``(.., K)``, distinct experts per token) per
    rank: every route on experts ``0..K-1``; on the last ``K``; random among every expert's but
    each rank's first local one (so some experts are empty while others of their rank are not),
    when ``K`` others remain; random over all experts."""
    tokens = math.prod(shape) // k
    gen = torch.Generator().manual_seed(0)

    def random_among(choices: torch.Tensor) -> torch.Tensor:
        picks = [choices[torch.randperm(choices.numel(), generator=gen)[:k]] for _ in range(tokens)]
        return torch.stack(picks).reshape(shape)

    low = torch.arange(k).repeat(tokens, 1)
    out = [[low.reshape(shape)] * world, [(low + experts - k).reshape(shape)] * world]
    not_first = torch.tensor([e for e in range(experts) if e % local])
    if not_first.numel() >= k:
        out.append([random_among(not_first) for _ in range(world)])
    for _ in range(ROUTING_SEEDS):
        out.append([random_among(torch.arange(experts)) for _ in range(world)])
    return out


@on_real_tensors
def _check_block(sim: _Simulation, x: fx.Node, ids: fx.Node, scores: fx.Node, out: fx.Node, experts: int,
                 k: int) -> None:
    """The lockstep simulation gives ``y[t] = sum_k s[t, k] (x[t] + tag(ids[t, k]))`` on every rank.
    Tokens, scores and tags take both signs and magnitudes far from 0 and 1, so no step that leaves
    small or positive values alone (a clamp, a ReLU) goes unseen."""
    gen = torch.Generator().manual_seed(1)
    tags = 10.0 * torch.arange(1, experts + 1, dtype=torch.float64) * (-1.0) ** torch.arange(experts)
    shape = sim.instance.shape
    for routing in _routings(shape(val(ids).shape), experts, sim.local, k, sim.world):
        envs = [{x: 4.0 * torch.randn(shape(val(x).shape), generator=gen, dtype=torch.float64), ids: rank_ids,
                 scores: 2.0 * torch.randn(shape(val(scores).shape), generator=gen, dtype=torch.float64)}
                for rank_ids in routing]
        try:
            sim.run(envs, tags)
        except Exception as error:  # noqa: BLE001 - any failure on valid routings means a misread block
            raise Refusal(f"the block does not evaluate on {sim.world} simulated ranks ({error})") from error
        for rank, env in enumerate(envs):
            tokens = env[x].reshape(-1, env[x].size(-1))                       # (T, H)
            choice_ids, weights = env[ids].reshape(-1, k), env[scores].reshape(-1, k)
            want = (weights.unsqueeze(-1) * (tokens.unsqueeze(1) + tags[choice_ids].unsqueeze(-1))).sum(1)
            got = env[out]
            if got.numel() != want.numel() or not torch.allclose(got.reshape(want.shape).double(), want, rtol=1e-9,
                                                                 atol=1e-9):
                wrong = (got.reshape(want.shape).double() - want).abs().amax(-1).nonzero().flatten().tolist() \
                    if got.numel() == want.numel() else "all"
                raise Refusal(f"simulated on {sim.world} ranks, the block's result {out.name} is not the "
                              f"score-weighted sum of each token's routed experts (rank {rank}, tokens {wrong})")


def _gathered_tokens(rows: fx.Node) -> fx.Node:
    """The tokens ``(T, H)`` the dispatched rows gather: ``x[idx]``, ``x.index_select(0, idx)`` or
    ``x.gather(0, idx.view(-1, 1).expand(-1, H))`` (which rows they are, the simulation checks)."""
    if is_op(rows, aten.index.Tensor) and len(rows.args[1]) == 1:
        return rows.args[0]
    if is_op(rows, aten.index_select.default) and rows.args[1] == 0:
        return rows.args[0]
    if is_op(rows, aten.gather.default) and rows.args[1] == 0 and is_op(rows.args[2], aten.expand.default):
        return rows.args[0]
    raise Refusal(f"the dispatched rows {rows.name} are not a row gather of the tokens")


def _as_routes(node: fx.Node, tokens: int, k: int) -> Builder:
    """The builder of ``node`` (ids or scores of any ``(.., K)`` shape) viewed as ``(T, K)``."""
    return lambda graph, before: insert_call(graph, before, aten.view.default, (node, [tokens, k]))


def _read_block(dispatch: Collective, returning: Collective, ffns: list[FfnMatch]) -> MoeBlock:
    world = dispatch.group_size
    mismatch = group_size_refusal(dispatch, "dispatch all_to_all")
    if mismatch:
        raise Refusal(mismatch)
    received = output_value(dispatch)
    ffn = [f for f in ffns if f.offs is not None and received in ancestors(f.x) and f.out in ancestors(returning.input)]
    if len(ffn) != 1:
        raise Refusal(f"between the all_to_alls there is no single grouped expert FFN (found {len(ffn)}) reading the "
                      "received rows and feeding the rows sent back")
    ffn_match = ffn[0]
    x = _gathered_tokens(dispatch.input)
    ids, experts, k = _routing_topk(dispatch.input)
    tokens, hidden = val(ids).numel() // k, val(x).size(-1)
    # The simulation runs the block at its own sizes: a dynamic batch has none to run it at.
    if not all(isinstance(n, int) for n in (tokens, hidden, *val(x).shape)):
        raise Refusal(f"the token batch {tuple(val(x).shape)} has a dynamic size; the block is checked at static sizes")
    if val(x).numel() != tokens * hidden:
        raise Refusal(f"the tokens {x.name} {tuple(val(x).shape)} are not the {tokens} rows of the routing")
    local = experts // world
    if experts % world or val(ffn_match.second.weight).size(0) != local:
        raise Refusal(f"{experts} experts over {world} ranks do not give the FFN's "
                      f"{val(ffn_match.second.weight).size(0)} local experts")
    returned = output_value(returning)
    scores, weighted = _scores(returned, tokens, k)
    summed, y = _block_output(weighted, tokens, hidden)
    stop = {x, ids, scores, ffn_match.out}
    region = _region(y, [ffn_match.x, ffn_match.offs], stop)
    # The FFN's nodes, and the casts of its rows that only it reads (a GLU reads its rows twice).
    private = region | ffn_match.nodes | {n for n in ancestors(ffn_match.out) - region
                                          if is_op(n, prims.convert_element_type) and set(n.users) <= ffn_match.nodes}
    # What the received rows feed, the expert's output on (the FFN's own nodes are its to check).
    for node in _reading(region, {dispatch.result, ffn_match.out}) - {y, ffn_match.out}:
        if any(u not in private for u in node.users):
            raise Refusal(f"{node.name} of the block is also used outside it")
    _check_data_path(region, (x, scores, ffn_match.out), {weighted, summed})
    collectives = {c.nodes[0]: c for c in map(collective_producing, region) if c is not None}
    if any(c.kind != "all_to_all" or c.group_name != dispatch.group_name for c in collectives.values()):
        raise Refusal("the block holds collectives other than all_to_alls over the dispatch group")
    instance = Instance()
    if world * tokens * k * hidden > FULL_SIZE_LIMIT:   # keep the check's cost off the batch size
        instance = reduced_instance([tokens], [hidden, k, experts, world, local], REDUCED_TOKENS)
    _check_block(_Simulation(region, collectives, ffn_match, world, local, instance), x, ids, scores, y, experts, k)
    out, shared = shared_addend(y)
    return MoeBlock(PATTERN, dispatch.nodes[0], x, _as_routes(ids, tokens, k), k, _as_routes(scores, tokens, k),
                    [ffn_match], dispatch.group_name, world, group_rank(dispatch.group_name), experts, out, shared,
                    frozenset(private | _dead_with(region) | ({y} if out is not y else set())))


def find_moe_split_a2a(graph: fx.Graph, ctx: Optional[PassContext] = None) -> list[MoeBlock]:
    """Every variable-split all-to-all MoE block whose guards pass, anchored at its dispatch
    all_to_all; refusals go to ``ctx``. ``MoeBlock.replace_with`` rewrites each (torchtitan 0.3, W = 2,
    T = 12, K = 2, E = 4, H = 32; the graph of the module docstring, post-grad)::

        Before:
            index_1 = aten.index(view_2 (x), [div_1 (order // 2)])                      # (12*2, 32)
            all_to_all_single   = _c10d_functional.all_to_all_single(view_7 (counts), [1, 1], [1, 1], "0")
            _local_scalar_dense .. _3 = <split sizes read from the exchanged counts>
            all_to_all_single_1 = _c10d_functional.all_to_all_single(index_1, [u2, u3], [u0, u1], "0")
            index_5 = aten.index(wait_tensor_2, [sub_13 (perm)]) -> <grouped SwiGLU over cumsum_2>
            index_put = aten.index_put(empty, [sub_13], convert_element_type_7)
            all_to_all_single_2 = _c10d_functional.all_to_all_single(index_put, [u0, u1], [u2, u3], "0")
            mul_44 = aten.mul(wait_tensor_3, view_15 (scores[order]))
            deterministic_scatter_add = torchtitan.deterministic_scatter_add(full_1, expand, mul_44)

        After:
            dispatch_v2(x, view(ids, [12, 2]) as int32, "0", 2, r, 4) -> npu_ffn_grouped(bf16 rows, w1, w3, w2,
                "swiglu", expert_tokens=dispatch[3]) -> combine_v2(..., view(scores, [12, 2]), "0", 2, r, 4)
    """
    a2as = [c for c in find_collectives(graph, "all_to_all") if _data_splits(c)]
    pairs = [(d, c) for d in a2as for c in a2as
             if c is not d and c.group_name == d.group_name and c.input_split_sizes == d.output_split_sizes
             and c.output_split_sizes == d.input_split_sizes and d.result in ancestors(c.input)]
    if not pairs:
        return []
    ffns = find_ffn_forms(graph)
    blocks = []
    for dispatch, returning in pairs:
        block = attempt(ctx, PATTERN, dispatch.nodes[0], lambda: _read_block(dispatch, returning, ffns))
        if block is not None and not any(block.nodes & b.nodes for b in blocks):
            blocks.append(block)
    return blocks
