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

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

from ._graph import ancestors, float_cast, is_op, strip_views, val
from .context import Refusal
from .evaluate import Instance, NotReducible, on_real_tensors
from .routing_eval import argmax_choices, check_distinct, leaf_value, region, run_routing
from .vocabulary import VIEW_OPS

aten = torch.ops.aten
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
    choices = argmax_choices(slots)
    if len(choices) != k:
        raise Refusal(f"the {k} routes per token derive from {len(choices)} argmaxes, not one per route")
    return SlotForm(x, choices, keep, slots, gates, y)


@on_real_tensors
def check_slot_form(form: SlotForm, a2a_input: fx.Node, returned: fx.Node, num_experts: int,
                    routings: Callable[[int, int, int], list[tuple[str, torch.Tensor]]], instance: Instance) -> None:
    """The guards of the module docstring, on every routing ``routings(S, E, K)`` gives (``(S, K)``
    expert choices, distinct per token) and two capacities; raises Refusal."""
    check_distinct(form.choices, instance)
    stops = {form.x, returned, *form.choices}
    nodes, leaves = region([a2a_input, form.y], stops)    # run_routing refuses any other collective
    after_return = [n for n in nodes if returned in ancestors(n)]
    before_return = [n for n in nodes if n not in set(after_return)]
    tokens, hidden = instance.shape(val(form.x).shape)
    gen = torch.Generator().manual_seed(3)
    for name, ids in routings(tokens, num_experts, len(form.choices)):
        for raise_capacity in (0, CAPACITY_RAISE):
            env: dict[fx.Node, Any] = {leaf: leaf_value(leaf, instance, gen, num_experts) for leaf in leaves}
            env[form.x] = torch.arange(tokens * hidden, dtype=torch.float64).view(tokens, hidden)
            env.update({c: ids[:, k].clone() for k, c in enumerate(form.choices)})
            try:
                run_routing(before_return, env, instance, raise_capacity)
                table = env[a2a_input]
                capacity = table.numel() // (num_experts * hidden)
                env[returned] = torch.randn(num_experts, capacity, hidden, generator=gen, dtype=torch.float64)
                run_routing(after_return, env, instance, raise_capacity)
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


