"""Running pieces of a graph on chosen real values: how guards check what the graph computes
instead of trusting its look (polynomial identity tests, row tracking, constant tables).

Passes run inside the compiler's fake mode; ``on_real_tensors`` leaves it for a check. Every
evaluation goes through ``evaluate``, which runs nodes in graph order on the values in ``env``.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Optional, TypeVar

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from ._graph import in_graph_order, is_op, val, widening_cast

Fn = TypeVar("Fn", bound=Callable[..., Any])


def on_real_tensors(fn: Fn) -> Fn:
    """Run ``fn`` on real tensors (outside the compile's fake mode), without autograd."""
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with unset_fake_temporarily(), torch.no_grad():
            return fn(*args, **kwargs)
    return run  # type: ignore[return-value]


def evaluate(nodes: Iterable[fx.Node], env: dict[fx.Node, Any], *, identity_casts: bool = False) -> None:
    """Run ``nodes`` (in graph order) on the values in ``env``, storing each result there; nodes
    already in ``env`` keep their value. Widening float casts are the identity when
    ``identity_casts`` (exact float64 tracking). Call on real tensors (``on_real_tensors``)."""
    for node in in_graph_order(nodes):
        if node in env:
            continue
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: env[n])
        if identity_casts and widening_cast(node):
            env[node] = args[0]
            continue
        if "device" in kwargs:      # a check's values live on the host whatever the graph's device
            kwargs = {**kwargs, "device": "cpu"}
        env[node] = node.target(*args, **kwargs)


def constant_value(node: fx.Node, allowed: tuple, max_numel: int,
                   cache: dict[fx.Node, Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
    """The value of ``node`` when it is computed from literals only, by ``allowed`` ops, with at
    most ``max_numel`` elements per node; None otherwise. ``cache`` holds every node tried (None
    for the non-constant ones). Call on real tensors."""
    if node in cache:
        return cache[node]
    cache[node] = None
    numel = getattr(val(node), "numel", lambda: None)()
    if node.op != "call_function" or not is_op(node, *allowed) or not (isinstance(numel, int) and numel <= max_numel):
        return None
    if all(constant_value(n, allowed, max_numel, cache) is not None for n in node.all_input_nodes):
        env = {n: cache[n] for n in node.all_input_nodes}
        evaluate([node], env)
        cache[node] = env[node]
    return cache[node]

