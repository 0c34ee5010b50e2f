"""Evaluating an MoE routing from its expert choices: how the capacity guards check gating that
routes with successive argmaxes (DeepSpeed, fairscale) instead of one ``torch.topk``.

The choices (the ``argmax`` nodes, one per route of a token) are the evaluation's inputs: each guard
sets them to sampled routings and runs the graph from them (``region`` / ``run_routing``), taking
every other value the routing reads from the model's inputs (scores, noise parameters) at random,
and its constants and random draws as they are. Whatever a guard concludes therefore holds for the
sampled routings whatever the scores and the noise, which is what an exact rewrite needs.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
import torch.fx as fx

from ._graph import ancestors, float_cast, in_graph_order, insert_call, is_op, is_size, val
from .context import Refusal
from .evaluate import Instance, evaluate, on_real_tensors
from .moe_block import Builder
from .vocabulary import ALLOCATION_OPS

aten = torch.ops.aten
c10d = torch.ops._c10d_functional
SIZE_CHECK_OPS = (aten._assert_scalar, aten.sym_constrain_range_for_size, aten.sym_constrain_range)
COLLECTIVE_NAMESPACES = ("_c10d_functional", "_c10d_functional_autograd")


def argmax_choices(routed: fx.Node) -> tuple[fx.Node, ...]:
    """The argmaxes over the experts ``routed`` derives from (one per route: its expert before any
    drop), in graph order; raises Refusal."""
    found = in_graph_order(n for n in ancestors(routed) if is_op(n, aten.argmax.default))
    for node in found:
        scores = val(node.args[0])
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if scores.dim() != 2 or dim not in (1, -1) or keepdim:
            raise Refusal(f"the routing's {node.name} is not an argmax over the experts of a 2-D gate")
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
def check_distinct(choices: tuple[fx.Node, ...], instance: Instance) -> None:
    """Each later argmax masks exactly the earlier choices' experts (evaluated on random choices)."""
    gen = torch.Generator().manual_seed(2)
    for j in range(1, len(choices)):
        mask = _masked_by_earlier(choices[j], choices[:j])
        tokens, experts = instance.shape(val(choices[j].args[0]).shape)
        env: dict[fx.Node, Any] = {c: torch.randint(experts, (tokens,), generator=gen) for c in choices[:j]}
        nodes, leaves = region([mask], set(choices[:j]))
        if leaves:
            raise Refusal(f"the mask {mask.name} of the argmax {choices[j].name} reads "
                          f"{', '.join(n.name for n in leaves)} besides the earlier choices")
        evaluate(nodes, env, instance=instance)
        expected = torch.zeros(tokens, experts, dtype=torch.bool)
        for c in choices[:j]:
            expected[torch.arange(tokens), env[c]] = True
        got = env[mask]
        if got.dtype != torch.bool or not torch.equal(got.expand(tokens, experts), expected):
            raise Refusal(f"the argmax {choices[j].name} masks {mask.name}, not the one-hot of the earlier choices")


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


def region(targets: list[fx.Node], stops: set[fx.Node]) -> tuple[list[fx.Node], list[fx.Node]]:
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


def leaf_value(node: fx.Node, instance: Instance, gen: torch.Generator, experts: int) -> torch.Tensor:
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


def run_routing(nodes: list[fx.Node], env: dict[fx.Node, Any], instance: Instance, raise_capacity: int) -> None:
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
        elif isinstance(node.target, torch._ops.OpOverload) and node.target.namespace in COLLECTIVE_NAMESPACES:
            raise Refusal(f"the routing runs the collective {node.name}")   # evaluating it would communicate
        elif float_cast(node) and isinstance(env.get(node.args[0]), torch.Tensor):
            env[node] = env[node.args[0]]
        else:
            evaluate([node], env, instance=instance)


def stacked_columns(choices: tuple[fx.Node, ...]) -> Builder:
    """Builds ``stack(choices, 1)`` (``(S, K)``), as a cat of columns (post-grad graphs hold no stack)."""
    def build(graph: fx.Graph, before: fx.Node) -> fx.Node:
        columns = [insert_call(graph, before, aten.unsqueeze.default, (c, 1)) for c in choices]
        return insert_call(graph, before, aten.cat.default, (columns, 1))
    return build


def transposed(node: fx.Node) -> Builder:
    """Builds ``node.T`` (``(K, S)`` -> contiguous ``(S, K)``)."""
    def build(graph: fx.Graph, before: fx.Node) -> fx.Node:
        t = insert_call(graph, before, aten.permute.default, (node, [1, 0]))
        return insert_call(graph, before, aten.clone.default, (t,), {"memory_format": torch.contiguous_format})
    return build


def dies_with(out: fx.Node, kept: set[fx.Node]) -> frozenset[fx.Node]:
    """The nodes that become dead when ``out`` is replaced, except ``kept`` and their inputs (the
    values the fused ops read)."""
    protected = set().union(*(ancestors(n) for n in kept)) if kept else set()
    dead = {out}
    # Runtime checks of a size read from the data (``u0 >= 0``) do not keep it alive: they go with it.
    checks = {n for n in out.graph.nodes if is_op(n, *SIZE_CHECK_OPS)}
    for node in reversed(list(out.graph.nodes)):
        if node in dead or node in protected or node.op != "call_function" or node in checks:
            continue
        # An unused buffer or size (an out= buffer whose copy the compiler dropped) dies with what it sizes.
        unused_shape = not node.users and (is_op(node, *ALLOCATION_OPS) or is_size(node))
        if unused_shape or (node.users and all(user in dead or user in checks for user in node.users)):
            dead.add(node)
    dead |= {check for check in checks if all(n in dead for n in check.all_input_nodes)}
    return frozenset(dead - {out})
