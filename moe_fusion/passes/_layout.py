"""Exact element tracking through the view/permute/copy chains around collectives.

A fused communication op is only a legal replacement if every element it reads lands where the
unfused graph put it. Rather than recognizing a few permutation patterns, the BMM passes
*compute* where each element of a chain's output comes from and compare that with the op's data
movement (SPEC §6.3).

A ``Layout`` describes a tensor whose elements are indexed by named source coordinates: one tuple
of ``Atom`` per dim, most significant first. An atom ``(coord, stride, size)`` says that the
dim index digit of radix ``size`` contributes ``digit * stride`` to the source coordinate
``coord``. Reshapes regroup (and split) atoms, permutes reorder dims, collectives add or remove
coordinates. Two layouts with equal ``canonical`` forms index their sources identically.

Steps of a chain are walked with ``walk``; a chain is a path of single-purpose nodes: shape ops,
copies that keep values, and the collectives a pattern accepts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
import torch.fx as fx

from ._graph import is_op, val
from .collectives import Collective, as_collective, is_identity_copy
from .vocabulary import PERMUTE_OPS, RESHAPE_OPS

aten = torch.ops.aten


@dataclass(frozen=True)
class Atom:
    coord: str
    stride: int
    size: int


Dim = tuple[Atom, ...]
Layout = tuple[Dim, ...]


def atom(coord: str, size: int, stride: int = 1) -> Atom:
    return Atom(coord, stride, size)


def canonical(layout: Sequence[Sequence[Atom]]) -> Layout:
    """Drop size-1 atoms and merge neighbours that continue each other (``outer.stride ==
    inner.stride * inner.size`` on the same coordinate): a unique form per index map."""
    out = []
    for dim in layout:
        merged: list[Atom] = []
        for a in dim:
            if a.size == 1:
                continue
            last = merged[-1] if merged else None
            if last is not None and last.coord == a.coord and last.stride == a.stride * a.size:
                merged[-1] = Atom(a.coord, a.stride, last.size * a.size)
            else:
                merged.append(a)
        out.append(tuple(merged))
    return tuple(out)


def reshape(layout: Layout, shape: Sequence[int]) -> Optional[Layout]:
    """The layout after a row-major reshape to ``shape``; None when a new dim boundary cuts an
    atom into pieces that are not digits of it (no exact description, never seen in practice)."""
    atoms = [a for dim in layout for a in dim if a.size != 1]
    out = []
    for size in shape:
        dim, need = [], size
        while need > 1:
            if not atoms:
                return None
            a = atoms.pop(0)
            if a.size <= need:
                if need % a.size:
                    return None
                dim.append(a)
                need //= a.size
            else:
                if a.size % need:
                    return None
                dim.append(Atom(a.coord, a.stride * (a.size // need), need))
                atoms.insert(0, Atom(a.coord, a.stride, a.size // need))
                need = 1
        out.append(tuple(dim))
    return None if atoms else tuple(out)


def permute(layout: Layout, dims: Sequence[int]) -> Layout:
    return tuple(layout[d % len(layout)] for d in dims)


def split_leading(layout: Layout, size: int) -> Optional[tuple[Dim, Layout]]:
    """``(factor, rest)``: the leading digit of radix ``size`` of dim 0 (a collective's chunk
    index), and the layout of one chunk."""
    rest_size = _dim_size(layout[0]) // size if size and _dim_size(layout[0]) % size == 0 else None
    if rest_size is None:
        return None
    split = reshape((layout[0],), (size, rest_size))
    if split is None:
        return None
    return split[0], (split[1],) + tuple(layout[1:])


def _dim_size(dim: Dim) -> int:
    n = 1
    for a in dim:
        n *= a.size
    return n


def same(a: Sequence[Sequence[Atom]], b: Sequence[Sequence[Atom]]) -> bool:
    return canonical(a) == canonical(b)


def static_shape(node: fx.Node) -> Optional[tuple[int, ...]]:
    """The node's shape when every size is a plain int (symbolic shapes are not tracked)."""
    value = val(node)
    if not isinstance(value, torch.Tensor) or not all(isinstance(s, int) for s in value.shape):
        return None
    return tuple(value.shape)


# -- chain steps ---------------------------------------------------------------------------------

def shape_step(node: fx.Node, src: fx.Node) -> bool:
    """``node`` rearranges (or copies) ``src`` without changing any value or dtype."""
    if is_op(node, *RESHAPE_OPS, *PERMUTE_OPS) and node.args[0] is src:
        return True
    if is_op(node, aten.expand.default) and node.args[0] is src:
        return tuple(val(node).shape) == tuple(val(src).shape)
    if is_op(node, aten.select.int) and node.args[0] is src:   # t[0] of a size-1 dim drops the dim
        return val(src).size(node.args[1]) == 1
    return is_identity_copy(node, src)


def apply_shape_step(layout: Layout, node: fx.Node) -> Optional[Layout]:
    """The layout of ``node``'s output, given the layout of its chain input."""
    if is_op(node, aten.permute.default):
        return permute(layout, node.args[1])
    if is_op(node, aten.transpose.int):
        order = list(range(len(layout)))
        i, j = (d % len(layout) for d in node.args[1:3])
        order[i], order[j] = order[j], order[i]
        return permute(layout, order)
    shape = static_shape(node)
    return None if shape is None else reshape(layout, shape)


Step = Union[fx.Node, Collective]


@dataclass
class Chain:
    """A walked path: ``steps`` in order (shape-op nodes and collectives), ``end`` the last value,
    ``nodes`` every node the path owns (collective nodes and out= buffers included), and
    ``extra_users`` the users off the path of each value before ``end``."""

    start: fx.Node
    steps: list[Step] = field(default_factory=list)
    nodes: list[fx.Node] = field(default_factory=list)
    extra_users: dict[fx.Node, list[fx.Node]] = field(default_factory=dict)

    @property
    def end(self) -> fx.Node:
        last = self.steps[-1] if self.steps else self.start
        return last.result if isinstance(last, Collective) else last

    def collectives(self, kind: str) -> list[Collective]:
        return [s for s in self.steps if isinstance(s, Collective) and s.kind == kind]

    def append(self, step: Step) -> None:
        """Add the step that continues ``end``; the users of ``end`` not taking it become extras."""
        current = self.end
        via = step.nodes[0] if isinstance(step, Collective) else step
        owned = list(step.nodes) if isinstance(step, Collective) else [step]
        if via is step and is_identity_copy(step, current):
            buffer = step.args[0]
            if len(buffer.users) == 1 and buffer.op == "call_function":   # the out= buffer dies with the copy
                owned.insert(0, buffer)
        self.extra_users[current] = [u for u in current.users if u is not via]
        self.steps.append(step)
        self.nodes.extend(owned)

    def absorb_copies(self) -> None:
        """Take in the copies of ``end`` into out= buffers (dynamo's ``dist.*(out, inp)`` form)."""
        while len(self.end.users) == 1 and is_identity_copy(next(iter(self.end.users)), self.end):
            self.append(next(iter(self.end.users)))

    def values(self) -> set[fx.Node]:
        """Every value on the path, ``start`` included."""
        return {self.start} | {s.result if isinstance(s, Collective) else s for s in self.steps}

    def shared_value(self) -> Optional[tuple[fx.Node, fx.Node]]:
        """``(value, user)`` for the first value on the path used off it, if any."""
        for node, users in self.extra_users.items():
            if users:
                return node, users[0]
        return None


def walk(start: fx.Node, *, collective_kinds: Sequence[str],
         extra_step: Optional[Callable[[fx.Node, fx.Node], bool]] = None,
         stop: Callable[[fx.Node], bool] = lambda node: False) -> Chain:
    """Follow ``start`` down through shape steps, collectives of ``collective_kinds`` (issue node
    taking the value, then its result) and ``extra_step(user, value)`` nodes, while exactly one
    user continues the path and ``stop(value)`` is false."""
    chain = Chain(start)
    while not stop(chain.end):
        current = chain.end
        moves: list[Step] = []
        for user in current.users:
            found = as_collective(user)
            if found is not None and found.input is current and found.kind in collective_kinds:
                moves.append(found)
            elif shape_step(user, current) or (extra_step is not None and extra_step(user, current)):
                moves.append(user)
        if len(moves) != 1:
            break
        chain.append(moves[0])
    return chain
