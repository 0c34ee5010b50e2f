"""Running pieces of a graph on chosen real values: how guards check what the graph computes
instead of trusting its look (polynomial identity tests, row tracking, constant tables).

Passes run inside the compiler's fake mode; ``on_real_tensors`` leaves it for a check. Every
evaluation goes through ``evaluate``, which runs nodes in graph order on the values in ``env``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence, TypeVar

import sympy
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


def evaluate(nodes: Iterable[fx.Node], env: dict[fx.Node, Any], *, identity_casts: bool = False,
             instance: Optional["Instance"] = None) -> None:
    """Run ``nodes`` (in graph order) on the values in ``env``, storing each result there; nodes
    already in ``env`` keep their value. Widening float casts are the identity when
    ``identity_casts`` (exact float64 tracking). On a reduced ``instance`` the nodes' int
    arguments are resized and every result's shape is checked (``Instance``). Call on real
    tensors (``on_real_tensors``)."""
    instance = instance or FULL
    for node in in_graph_order(nodes):
        if node in env:
            continue
        args, kwargs = instance.args(node, env)
        if identity_casts and widening_cast(node):
            env[node] = args[0]
            continue
        if "device" in kwargs:      # a check's values live on the host whatever the graph's device
            kwargs = {**kwargs, "device": "cpu"}
        try:
            env[node] = node.target(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - on a reduced instance, any failure means a misread int
            if instance is FULL:
                raise
            raise NotReducible(f"{node.name} fails on the reduced instance ({error})") from error
        instance.check(node, env[node])


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



class NotReducible(Exception):
    """The graph region has no consistent smaller instance (an int is ambiguous, or a node's
    shape does not shrink as its sizes say)."""


@dataclass(frozen=True)
class Instance:
    """The sizes a region is evaluated at: the graph's own (``factor`` 1), or a reduced instance
    where the batch sizes ``bigs`` (tokens, capacity) are divided by ``factor``.

    A guard whose evaluation grows with the batch runs on the reduced instance instead: every int
    of the region's nodes (view sizes, iota lengths, scalar bounds such as the capacity) that is a
    batch size times a product of the fixed sizes ``smalls`` (experts, top-k, ranks, hidden) is
    divided by ``factor`` (by ``factor**2`` for two batch sizes; an integral float of the region's
    scalar arithmetic too, and one that is a batch size over such a product, ``_scalar_size``),
    and every node's result must then have its shape divided the same way, else ``NotReducible``:
    an int read wrongly (sizes are often all powers of two) shows up as a shape that does not shrink
    as its sizes say. The ratios between the batch sizes are kept (``factor`` divides each), so it
    does not matter which one an int was.
    """

    bigs: tuple[int, ...] = ()
    smalls: tuple[int, ...] = ()
    factor: int = 1
    # Values given to the graph's data-dependent sizes (unbacked symbols, e.g. a capacity read with
    # ``.item()``): any value is one instance of the region.
    bindings: tuple[tuple[Any, int], ...] = ()

    def size(self, n: Any) -> Any:
        if isinstance(n, torch.SymInt):
            n = _bound(n, self.bindings)
        if self.factor != 1 and isinstance(n, float) and n.is_integer() and n > 1:
            return float(self._scalar_size(int(n)))
        if self.factor == 1 or isinstance(n, bool) or not isinstance(n, int):
            return n
        batches = self._batch_factors(abs(n))
        if batches == 0 and n > 1 and self._batch_factors(n - 1):
            return self.size(n - 1) + 1     # a batch size plus one: a padding row or a scratch slot
        return n // self.factor ** batches

    def shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(self.size(d) if isinstance(d, torch.SymInt) else self.size(int(d)) for d in shape)

    def _scalar_size(self, n: int) -> int:
        """An integral float scalar: sizes in the region's scalar arithmetic (a capacity formula's
        ``S / E``, a Python float in the graph) are resized like ints, and a batch size divided by a
        product of the fixed sizes is divided too (it is a share of a batch size: tokens per expert).
        A fixed size stays (ambiguous: a misread shows up as a guard failing, a refusal)."""
        if n in self.smalls:
            return n
        if self._batch_factors(n):
            return self.size(n)
        products = _products(self.smalls)
        if n % self.factor == 0 and any(big % n == 0 and big // n in products for big in self.bigs):
            return n // self.factor
        return n

    def _batch_factors(self, n: int) -> int:
        """How many batch sizes ``n`` holds: 0 for a fixed size itself, else the most batch sizes
        it is a product of (times fixed sizes); a wrong reading shows up in ``check``."""
        if n in self.smalls:
            return 0
        products = _products(self.smalls)
        if any(n % (a * b) == 0 and n // (a * b) in products for a in self.bigs for b in self.bigs):
            return 2
        return 1 if any(n % big == 0 and n // big in products for big in self.bigs) else 0

    def args(self, node: fx.Node, env: dict[fx.Node, Any]) -> tuple[tuple, dict]:
        """The node's arguments with graph values from ``env`` and ints resized."""
        def resized(a: Any) -> Any:
            if isinstance(a, fx.Node):
                return env[a]
            if isinstance(a, list):
                return [resized(x) for x in a]
            if isinstance(a, tuple):
                return tuple(resized(x) for x in a)
            return self.size(a)
        return resized(node.args), {k: resized(v) for k, v in node.kwargs.items()}

    def check(self, node: fx.Node, value: Any) -> None:
        """``value`` (the node's result on this instance) has the node's shapes resized."""
        if self.factor == 1:
            return
        expected = [self._checked_shape(t.shape) for t in _tensors(val(node))]
        got = [tuple(t.shape) for t in _tensors(value)]
        if len(got) != len(expected) or any(len(g) != len(e) or any(d is not None and d != h for h, d in zip(g, e))
                                            for g, e in zip(got, expected)):
            raise NotReducible(f"{node.name} has shapes {got} on the reduced instance, {expected} expected")

    def _checked_shape(self, shape: Sequence[Any]) -> tuple[Optional[int], ...]:
        """``shape`` resized, None for a size read from the data (its value is whatever the
        evaluation computes)."""
        def resized(d: Any) -> Optional[int]:
            if isinstance(d, torch.SymInt) and sympy.sympify(d.node.expr).free_symbols - {s for s, _ in self.bindings}:
                return None
            return self.size(d) if isinstance(d, torch.SymInt) else self.size(int(d))
        return tuple(resized(d) for d in shape)


FULL = Instance()


def _bound(n: torch.SymInt, bindings: tuple[tuple[Any, int], ...]) -> int:
    """``n``'s value with ``bindings`` given to its symbols (``NotReducible`` if one is unbound)."""
    expr = sympy.sympify(sympy.sympify(n.node.expr).xreplace(dict(bindings)))
    if expr.free_symbols:
        unbound = sorted(map(str, expr.free_symbols))
        raise NotReducible(f"the size {n} has no value in this instance (unbound {unbound})")
    return int(expr)


def bind_unbacked(shapes: Iterable[Sequence[Any]], value: int, instance: Instance = FULL) -> Instance:
    """``instance`` with every free symbol of ``shapes``' sizes bound to ``value``."""
    symbols = {s for shape in shapes for d in shape if isinstance(d, torch.SymInt)
               for s in sympy.sympify(d.node.expr).free_symbols}
    bound = {s for s, _ in instance.bindings}
    extra = tuple((s, value) for s in sorted(symbols - bound, key=str))
    return Instance(instance.bigs, instance.smalls, instance.factor, instance.bindings + extra)


def reduced_instance(bigs: Sequence[int], smalls: Sequence[int], min_size: int) -> Instance:
    """The smallest instance whose batch sizes stay ``>= min_size`` (``FULL`` when none is smaller).
    A fixed size equal to a batch size cannot be told apart from it: it is resized with it (the
    guard reading it must then take its size from the instance)."""
    common = math.gcd(*bigs)
    factors = [f for f in range(common, 1, -1) if common % f == 0 and min(bigs) // f >= min_size]
    if not factors:
        return FULL
    return Instance(tuple(bigs), tuple(s for s in smalls if s not in bigs), factors[0])


@functools.lru_cache(maxsize=64)
def _products(smalls: tuple[int, ...]) -> frozenset[int]:
    """Products of every sub-multiset of ``smalls`` (1 for the empty one)."""
    out = {1}
    for s in smalls:
        out |= {p * s for p in out}
    return frozenset(out)


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []
