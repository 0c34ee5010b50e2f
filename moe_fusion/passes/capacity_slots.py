"""The slot form of the capacity all-to-all MoE block (DeepSpeed >= 0.19's sparse routing), read
for ``capacity_a2a``: where the GShard form dispatches with ``einsum("sec,sm->ecm")``, this one
gives each route ``(choice k, token s)`` a row of the ``(E * C, H)`` dispatch table and moves rows
with ``scatter`` and ``index``::

    slots  = where(keep, ids * C + loc, E * C)          # (K, S) int: the row of route (k, s); E*C: none
    source = full([E*C + 1], S).scatter(0, slots.flatten(), arange(S).expand(K, S).flatten())
    d      = cat([x, zeros(1, H)])[source[:-1]].view(E, C, H)   # row e*C + c: the token in slot c of e
    returned = all_to_all(experts(all_to_all(d)))                 # (E, C, H), rows back in place
    y      = (cat([returned.view(E*C, H), zeros(1, H)])[slots.flatten()].view(K, S, H)
              * gates.unsqueeze(-1)).sum(0)

``C`` may be read from the data (an all-reduced maximum count, ``.item()``: an unbacked size).
The routing chose expert ``argmax_k[s]`` for route ``(k, s)`` (successive argmaxes, the later ones
masking the earlier choices), and ``keep`` says which routes hold a row (capacity drops the rest).
That is ``dispatch_v2 -> npu_ffn_grouped -> combine_v2`` with ``expert_ids = stack(argmax_k)``,
``x_active_mask = keep.T`` and ``expert_scales = gates.T``, provided that

* every kept route's row lies in its expert's block: ``slots[k, s] // C == argmax_k[s]``;
* no two kept routes share a row, and a dropped route's row is none (``>= E*C``): dropped routes
  are neither sent nor summed, as in ``dispatch_v2``/``combine_v2`` with the mask;
* ``d`` holds exactly the kept routes' tokens at their rows (zeros elsewhere), and ``y`` is
  ``sum_k keep * gates * returned[slots]``;
* a token's choices are distinct (``dispatch_v2`` needs unique ids per token): each later argmax
  reads its scores with the earlier choices' one-hot masked to ``-inf``.

The first three are checked by evaluating the graph from the argmaxes (and the tokens, and the
returned rows) on sampled routings (the extremes of load, round robin, random), the capacity's
all-reduce taken as this rank's own maximum and as a larger one of another rank: sampled, not
proven, as the einsum form's dropless check. The routing's random draws (DeepSpeed's random token
selection, Gumbel noise) stay in the graph: ``keep`` reads them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx

from ._graph import ancestors, float_cast, in_graph_order, insert_call, is_op, size_arithmetic, strip_views, val
from .context import Refusal
from .evaluate import Instance, NotReducible, evaluate, on_real_tensors
from .moe_block import Builder
from .vocabulary import ALLOCATION_OPS, VIEW_OPS

aten, prims = torch.ops.aten, torch.ops.prims
c10d = torch.ops._c10d_functional
CAPACITY_RAISE = 2   # how much larger than this rank's own maximum count another rank's is taken


@dataclass(frozen=True)
class SlotForm:
    """A read slot-form block: ``x`` ``(S, H)`` tokens; ``choices`` the K ``(S,)`` int64 argmaxes
    (route k's expert before any drop); ``keep`` ``(K, S)`` bool; ``slots`` ``(K, S)`` int64;
    ``gates`` ``(K, S)`` float weights; ``y`` the combine result the fused block replaces."""

    x: fx.Node
    choices: tuple[fx.Node, ...]
    keep: fx.Node
    slots: fx.Node
    gates: fx.Node
    y: fx.Node

    def expert_ids(self, graph: fx.Graph, before: fx.Node) -> fx.Node:
        """``(S, K)`` int64: ``stack(choices, 1)``, as a cat of columns (post-grad graphs hold no stack)."""
        columns = [insert_call(graph, before, aten.unsqueeze.default, (c, 1)) for c in self.choices]
        return insert_call(graph, before, aten.cat.default, (columns, 1))

    def transposed(self, node: fx.Node) -> Builder:
        """Builds ``node.T`` (``(K, S)`` -> contiguous ``(S, K)``)."""
        def build(graph: fx.Graph, before: fx.Node) -> fx.Node:
            t = insert_call(graph, before, aten.permute.default, (node, [1, 0]))
            return insert_call(graph, before, aten.clone.default, (t,), {"memory_format": torch.contiguous_format})
        return build


def is_slot_dispatch(a2a_input: fx.Node) -> bool:
    """The all_to_all sends rows gathered by an index: the slot form (else the einsum form)."""
    return is_op(strip_views(a2a_input), aten.index.Tensor)


def _padded_table(node: fx.Node, what: str) -> fx.Node:
    """``rows`` of ``cat([rows, zeros(1, H)])`` (the table a -1/E*C index reads zeros from)."""
    if not (is_op(node, aten.cat.default) and len(node.args[0]) == 2 and (len(node.args) < 2 or node.args[1] == 0)):
        raise Refusal(f"the {what} {node.name} is not cat([rows, zeros(1, H)])")
    rows, pad = node.args[0]
    if not (is_op(pad, aten.full.default) and pad.args[1] == 0 and val(pad).size(0) == 1):
        raise Refusal(f"the {what} {node.name} pads its rows with {pad.name}, not one zero row")
    return rows


def _combine(returned: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node]:
    """``(y, slots, gates)`` of the combine reading ``returned`` (structure; values are checked)."""
    node = returned
    while len(node.users) == 1 and is_op(next(iter(node.users)), *VIEW_OPS):
        node = next(iter(node.users))
    users = list(node.users)
    if len(users) != 1 or not is_op(users[0], aten.cat.default):
        raise Refusal(f"the returned expert outputs {returned.name} are not padded with a zero row for the combine")
    _padded_table(users[0], "combine table")
    gather = next(iter(users[0].users)) if len(users[0].users) == 1 else None
    if gather is None or not is_op(gather, aten.index.Tensor) or len(gather.args[1]) != 1:
        raise Refusal(f"the combine table {users[0].name} is not read by one index")
    slots = strip_views(gather.args[1][0])
    node = gather
    while len(node.users) == 1 and is_op(next(iter(node.users)), *VIEW_OPS):
        node = next(iter(node.users))
    mul = next(iter(node.users)) if len(node.users) == 1 else None
    if mul is None or not is_op(mul, aten.mul.Tensor):
        raise Refusal(f"the gathered expert outputs {node.name} are not multiplied by the gates")
    gates = strip_views(mul.args[1] if mul.args[0] is node else mul.args[0])
    if is_op(gates, aten.unsqueeze.default):
        gates = gates.args[0]
    total = next(iter(mul.users)) if len(mul.users) == 1 else None
    if total is None or not is_op(total, aten.sum.dim_IntList) or list(total.args[1]) != [0]:
        raise Refusal(f"the weighted expert outputs {mul.name} are not summed over the choices")
    y = total
    while len(y.users) == 1 and (is_op(next(iter(y.users)), *VIEW_OPS) or float_cast(next(iter(y.users)))):
        y = next(iter(y.users))
    return y, slots, gates


def _choices(slots: fx.Node, k: int) -> tuple[fx.Node, ...]:
    """The K argmaxes over the experts the slots derive from, in graph order."""
    found = in_graph_order(n for n in ancestors(slots) if is_op(n, aten.argmax.default))
    for node in found:
        scores = val(node.args[0])
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if scores.dim() != 2 or dim not in (1, -1) or keepdim:
            raise Refusal(f"the routing's {node.name} is not an argmax over the experts of a 2-D gate")
    if len(found) != k:
        raise Refusal(f"the {k} routes per token derive from {len(found)} argmaxes, not one per route")
    return tuple(found)


def _masked_by_earlier(choice: fx.Node, earlier: tuple[fx.Node, ...]) -> fx.Node:
    """The mask of ``where(mask, -inf, scores)`` the argmax ``choice`` reads: the earlier choices."""
    scores = choice.args[0]
    fill = scores.args[1] if is_op(scores, aten.where.self) else None
    if is_op(fill, aten.scalar_tensor.default):
        fill = fill.args[0]
    elif is_op(fill, aten.full.default) and val(fill).dim() == 0:    # inductor's form of the scalar
        fill = fill.args[1]
    if fill != -math.inf:
        raise Refusal(f"the argmax {choice.name} does not mask the earlier choices "
                      f"({', '.join(c.name for c in earlier)}) to -inf (its scores are {scores.name}, "
                      f"{scores.target}): a token's experts may repeat")
    return scores.args[0]


@on_real_tensors
def _check_distinct(choices: tuple[fx.Node, ...], instance: Instance) -> None:
    """Each later argmax masks exactly the earlier choices' experts (evaluated on random choices)."""
    gen = torch.Generator().manual_seed(2)
    for j in range(1, len(choices)):
        mask = _masked_by_earlier(choices[j], choices[:j])
        tokens, experts = instance.shape(val(choices[j].args[0]).shape)
        env: dict[fx.Node, Any] = {c: torch.randint(experts, (tokens,), generator=gen) for c in choices[:j]}
        region, leaves = _region([mask], set(choices[:j]))
        if leaves:
            raise Refusal(f"the mask {mask.name} of the argmax {choices[j].name} reads "
                          f"{', '.join(n.name for n in leaves)} besides the earlier choices")
        evaluate(region, env, instance=instance)
        expected = torch.zeros(tokens, experts, dtype=torch.bool)
        for c in choices[:j]:
            expected[torch.arange(tokens), env[c]] = True
        got = env[mask]
        if got.dtype != torch.bool or not torch.equal(got.expand(tokens, experts), expected):
            raise Refusal(f"the argmax {choices[j].name} masks {mask.name}, not the one-hot of the earlier choices")


def read_slot_form(a2a_input: fx.Node, returned: fx.Node) -> SlotForm:
    """The slot-form block between the dispatch all_to_all's input and the combine (structure only;
    ``check_slot_form`` checks what it computes); raises Refusal."""
    gather = strip_views(a2a_input)
    x = _padded_table(gather.args[0], "dispatch table")
    if val(x).dim() != 2:
        raise Refusal(f"the dispatched tokens {x.name} {tuple(val(x).shape)} are not (S, H)")
    y, slots, gates = _combine(returned)
    if slots not in ancestors(gather.args[1][0]):
        raise Refusal(f"the dispatch rows {gather.args[1][0].name} do not derive from the combine's slots {slots.name}")
    if not is_op(slots, aten.where.self) or val(slots.args[0]).dtype != torch.bool:
        raise Refusal(f"the slots {slots.name} are not where(keep, row, none)")
    keep = slots.args[0]
    k, tokens = val(slots).shape
    if tuple(val(keep).shape) != (k, tokens) or tuple(val(gates).shape) != (k, tokens) or tokens != val(x).size(0):
        raise Refusal(f"the slots {tuple(val(slots).shape)}, keep {tuple(val(keep).shape)} and gates "
                      f"{tuple(val(gates).shape)} are not (K, S) for the {val(x).size(0)} tokens")
    return SlotForm(x, _choices(slots, k), keep, slots, gates, y)


def _downstream(sources: Iterable[fx.Node]) -> set[fx.Node]:
    """Every node computed from one of ``sources`` (not the sources themselves)."""
    found: set[fx.Node] = set()
    frontier = list(sources)
    while frontier:
        for user in frontier.pop().users:
            if user not in found:
                found.add(user)
                frontier.append(user)
    return found


def _region(targets: list[fx.Node], stops: set[fx.Node]) -> tuple[list[fx.Node], list[fx.Node]]:
    """``(nodes, leaves)`` to evaluate ``targets`` from ``stops``: nodes computed from a stop or
    from constants only (tables, random draws) are evaluated; the values computed from the graph's
    inputs without a stop (scores, distribution parameters) are leaves."""
    from_stops = _downstream(stops)
    placeholders = [n for n in next(iter(stops)).graph.nodes if n.op == "placeholder"]
    from_inputs = _downstream(placeholders) | set(placeholders)
    nodes, leaves, seen = [], [], set()
    stack = list(targets)
    while stack:
        node = stack.pop()
        if node in seen or node in stops:
            continue
        seen.add(node)
        if node.op == "placeholder" or (node not in from_stops and node in from_inputs):
            leaves.append(node)
        elif node.op == "get_attr":
            nodes.append(node)
        else:
            nodes.append(node)
            stack.extend(node.all_input_nodes)
    return in_graph_order(nodes), leaves


def _constant(node: fx.Node) -> torch.Tensor:
    """The value of a ``get_attr`` constant."""
    value = getattr(node.graph.owning_module, node.target, None)
    if not isinstance(value, torch.Tensor) or isinstance(value, torch._subclasses.FakeTensor):
        raise Refusal(f"the routing reads the constant {node.name}, whose value is not known at compile time")
    return value


def _leaf_value(node: fx.Node, instance: Instance, gen: torch.Generator, experts: int) -> torch.Tensor:
    """A random value for a leaf of the routing (scores, distribution parameters)."""
    fake = val(node)
    if not isinstance(fake, torch.Tensor):
        raise Refusal(f"the routing reads {node.name} ({fake!r}), which is not a tensor")
    shape = instance.shape(fake.shape)
    if fake.dtype == torch.bool:
        return torch.rand(shape, generator=gen) < 0.5
    if fake.is_floating_point():   # float64 throughout, as the tokens (float casts are the identity)
        return torch.rand(shape, generator=gen, dtype=torch.float64)
    return torch.randint(experts, shape, generator=gen, dtype=fake.dtype)


def _run(nodes: list[fx.Node], env: dict[fx.Node, Any], instance: Instance, raise_capacity: int) -> None:
    """Evaluate ``nodes``: a MAX all-reduce is this rank's value plus ``raise_capacity`` (another
    rank's larger maximum), float casts are the identity (the check is on values, not roundings)."""
    for node in nodes:
        if node in env:
            continue
        if node.op == "get_attr":
            env[node] = _constant(node)
        elif is_op(node, c10d.all_reduce):
            if str(node.args[1]).lower() != "max":
                raise Refusal(f"the routing all-reduces with {node.args[1]} ({node.name}); only a maximum is read")
            env[node] = env[node.args[0]] + raise_capacity
        elif is_op(node, c10d.wait_tensor):
            env[node] = env[node.args[0]]
        elif isinstance(node.target, torch._ops.OpOverload) and node.target.namespace == "_c10d_functional":
            raise Refusal(f"the routing runs the collective {node.name}")
        elif float_cast(node) and isinstance(env.get(node.args[0]), torch.Tensor):
            env[node] = env[node.args[0]]
        else:
            evaluate([node], env, instance=instance)


@on_real_tensors
def check_slot_form(form: SlotForm, a2a_input: fx.Node, returned: fx.Node, num_experts: int,
                    routings: Callable[[int, int, int], list[tuple[str, torch.Tensor]]], instance: Instance) -> None:
    """The guards of the module docstring, on every routing ``routings(S, E, K)`` gives (``(S, K)``
    expert choices, distinct per token) and two capacities; raises Refusal."""
    _check_distinct(form.choices, instance)
    stops = {form.x, returned, *form.choices}
    nodes, leaves = _region([a2a_input, form.y], stops)
    if any(is_op(n, c10d.all_to_all_single, c10d.all_gather_into_tensor, c10d.reduce_scatter_tensor) for n in nodes):
        raise Refusal("the routing runs a collective other than the capacity's all-reduce")
    after_return = [n for n in nodes if returned in ancestors(n)]
    before_return = [n for n in nodes if n not in set(after_return)]
    tokens, hidden = instance.shape(val(form.x).shape)
    gen = torch.Generator().manual_seed(3)
    for name, ids in routings(tokens, num_experts, len(form.choices)):
        for raise_capacity in (0, CAPACITY_RAISE):
            env: dict[fx.Node, Any] = {leaf: _leaf_value(leaf, instance, gen, num_experts) for leaf in leaves}
            env[form.x] = torch.arange(tokens * hidden, dtype=torch.float64).view(tokens, hidden)
            env.update({c: ids[:, k].clone() for k, c in enumerate(form.choices)})
            try:
                _run(before_return, env, instance, raise_capacity)
                table = env[a2a_input]
                capacity = table.numel() // (num_experts * hidden)
                env[returned] = torch.randn(num_experts, capacity, hidden, generator=gen, dtype=torch.float64)
                _run(after_return, env, instance, raise_capacity)
            except (Refusal, NotReducible):
                raise
            except Exception as error:  # noqa: BLE001 - a region the guards cannot run is refused, never a crash
                raise Refusal(f"the guards cannot evaluate the slot routing ({type(error).__name__}: "
                              f"{' '.join(str(error).split())[:200]})") from error
            problem = _slot_problem(env, form, table, env[returned], ids, capacity, num_experts)
            if problem:
                raise Refusal(f"the slot routing is not dispatch/combine with a keep mask: with {name}, {problem}")


def _slot_problem(env: dict[fx.Node, Any], form: SlotForm, table: torch.Tensor, returned: torch.Tensor,
                  ids: torch.Tensor, capacity: int, experts: int) -> str:
    """What in one evaluation breaks the guards ('' when nothing)."""
    slots, keep, gates = env[form.slots], env[form.keep], env[form.gates].double()
    tokens, hidden = env[form.x].shape
    rows = experts * capacity
    kept_slots = slots[keep]
    if kept_slots.numel() and (int(kept_slots.min()) < 0 or int(kept_slots.max()) >= rows):
        return "a kept route's row lies outside the dispatch table"
    if not torch.equal(kept_slots // capacity, ids.t()[keep]):
        return "a kept route's row lies outside its chosen expert's rows"
    if kept_slots.unique().numel() != kept_slots.numel():
        return "two kept routes share a row"
    if bool((slots[~keep] < rows).any()):
        return "a dropped route still holds a row"
    expected = torch.zeros(rows, hidden, dtype=torch.float64)
    k_idx, s_idx = keep.nonzero(as_tuple=True)
    expected[slots[k_idx, s_idx]] = env[form.x][s_idx]
    if table.shape[0] * table.shape[1] != rows or not torch.equal(table.reshape(rows, hidden), expected):
        return "the dispatch table does not hold exactly the kept routes' tokens at their rows"
    padded = torch.cat([returned.reshape(rows, hidden), torch.zeros(1, hidden, dtype=torch.float64)])
    weighted = torch.where(keep.unsqueeze(-1), gates.unsqueeze(-1) * padded[slots.clamp(0, rows)], 0.0)
    got = env[form.y].reshape(tokens, hidden)
    if not torch.allclose(got, weighted.sum(0), rtol=1e-6, atol=1e-6):
        return "the combine is not the sum of the kept routes' expert rows times their gates"
    return ""


def dies_with(out: fx.Node, kept: set[fx.Node]) -> frozenset[fx.Node]:
    """The nodes that become dead when ``out`` is replaced, except ``kept`` and their inputs (the
    values the fused ops read)."""
    protected = set().union(*(ancestors(n) for n in kept)) if kept else set()
    dead = {out}
    for node in reversed(list(out.graph.nodes)):
        if node in dead or node in protected or node.op != "call_function":
            continue
        # An unused buffer or size (an out= buffer whose copy the compiler dropped) dies with what it sizes.
        unused_shape = not node.users and (is_op(node, *ALLOCATION_OPS) or size_arithmetic(node))
        if unused_shape or (node.users and all(user in dead for user in node.users)):
            dead.add(node)
    return frozenset(dead - {out})
