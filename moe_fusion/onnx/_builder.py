"""A small writer of ONNX function bodies: fresh value names, constants, one call per node, ``Loop``
bodies, and runtime checks that stop the run with the rule in the failing node's name."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

TO_END = 2 ** 62   # a Slice end past any dim: "to the end" (ends are clamped to the dim)


class Unsupported(Exception):
    """The node has no standard-op body (the message says why); it runs in the reference evaluator."""


@dataclass(frozen=True)
class NodeView:
    """What a body builder may know about one custom node of a model, after ``_checks.check_node``.

    ``op`` is the GE op type and ``torch_op`` the op the node is a call of (``npu_ffn`` or
    ``npu_ffn_grouped`` for ``FFN``); ``inputs`` maps each GE input name to its value name, or None
    when absent; ``attrs`` every GE attr (defaults filled in, each of its GE type); ``elem_types``/
    ``shapes`` the element type and declared dims (None for a symbolic dim) of each present input.
    """

    op: str
    torch_op: str
    inputs: dict[str, Optional[str]]
    attrs: dict[str, Any]
    elem_types: dict[str, int]
    shapes: dict[str, tuple[Optional[int], ...]]

    def has(self, name: str) -> bool:
        return self.inputs.get(name) is not None

    def dim(self, name: str, axis: int) -> int:
        """A static dim of an input; ``Unsupported`` when the model leaves it symbolic."""
        size = self.shapes[name][axis]
        if size is None:
            raise Unsupported(f"{self.op}: {name} needs a static dim {axis} to build its standard-op body, "
                              f"got shape {self.shapes[name]}")
        return size


class Builder:
    """Appends nodes; every call returns the name(s) of its fresh output value(s). Builders of
    ``Loop`` bodies share their parent's name counter, so names are unique across scopes (a body
    reads its enclosing scope's values by name), and reuse its constants; a constant is written
    once per scope."""

    def __init__(self, counter: Optional[Iterator[int]] = None, outer: Optional["Builder"] = None) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self._counter = counter if counter is not None else itertools.count(1)
        self._outer = outer
        self._constants: dict[tuple, str] = {}

    def _fresh(self, hint: str) -> str:
        return f"{hint}_{next(self._counter)}"

    def __call__(self, op_type: str, *inputs: str, outputs: int = 1, node_name: str = "", **attrs: Any) -> Any:
        names = [self._fresh(op_type) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=node_name or None, **attrs))
        return names[0] if outputs == 1 else names

    def const(self, value: Any, dtype: Any = np.int64) -> str:
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        scope: Optional[Builder] = self
        while scope is not None:
            if key in scope._constants:
                return scope._constants[key]
            scope = scope._outer
        name = self._constants[key] = self._fresh("const")
        self.nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name)))
        return name

    def ints(self, values: Sequence[int]) -> str:
        """A 1-D int64 constant (shapes, axes, starts...)."""
        return self.const(list(values), np.int64)

    def f32(self, value: str) -> str:
        return self("Cast", value, to=TensorProto.FLOAT)

    def cast(self, value: str, elem_type: int) -> str:
        return self("Cast", value, to=elem_type)

    def round_to(self, value: str, elem_type: int) -> str:
        """fp32 ``value`` rounded to ``elem_type`` and back (a no-op for fp32)."""
        if elem_type == TensorProto.FLOAT:
            return value
        return self.f32(self.cast(value, elem_type))

    def scalar_f(self, value: float) -> str:
        return self.const(value, np.float32)

    def dim_of(self, value: str, axis: int) -> str:
        """The runtime size of ``value``'s dim ``axis`` (negative counts from the end) as an int64 scalar."""
        end = axis + 1 if axis != -1 else TO_END
        return self("Squeeze", self("Slice", self("Shape", value), self.ints([axis]), self.ints([end])), self.ints([0]))

    def none_outside(self, value: str, low: Any, high: Any) -> str:
        """Bool scalar: no element of ``value`` is below ``low`` or above ``high`` (value names of
        scalars broadcasting against it). True for an empty ``value``: ``ReduceSum`` of nothing is 0."""
        outside = self("Or", self("Less", value, low), self("Greater", value, high))
        return self("Equal", self("ReduceSum", self.cast(outside, TensorProto.INT64), keepdims=0), self.const(0))

    def all_of(self, *conditions: str) -> str:
        """Bool scalar: every one of ``conditions`` (bool scalars) holds."""
        result = conditions[0]
        for condition in conditions[1:]:
            result = self("And", result, condition)
        return result

    def guard(self, value: str, ok: str, rule: str) -> str:
        """``value`` unchanged when the bool scalar ``ok`` holds; else the run fails in a ``Reshape``
        named ``moe_fusion check: <rule>`` (runtimes name the failing node in their error)."""
        return self.guard_all([value], ok, rule)[0]

    def guard_all(self, values: Sequence[str], ok: str, rule: str) -> list[str]:
        """``guard`` of several values on one condition. Each target shape is the value's own
        shape, plus a dim -2 when ``ok`` is false (an invalid dim for any rank, also a scalar or an
        empty tensor)."""
        bad_dim = self("Slice", self.ints([-2]), self.ints([0]), self("Where", ok, self.ints([0]), self.ints([1])))
        suffix = lambda n: f" [{n + 1} of {len(values)}]" if len(values) > 1 else ""  # noqa: E731  unique node names
        return [self("Reshape", value, self("Concat", self("Shape", value), bad_dim, axis=0),
                     node_name=f"moe_fusion check: {rule}{suffix(n)}") for n, value in enumerate(values)]

    def has_shape(self, value: str, dims: Sequence[Optional[int]]) -> str:
        """Bool scalar: ``value`` has rank ``len(dims)`` and every static entry of ``dims`` (None
        is a symbolic dim, not compared)."""
        shape = self("Shape", value)
        rank_ok = self("Equal", self("Size", shape), self.const(len(dims)))
        static = [(axis, size) for axis, size in enumerate(dims) if size is not None]
        if not static:
            return rank_ok
        # Padded to the declared rank first: Gather past a shorter runtime shape would fail unnamed.
        padded = self("Concat", shape, self.ints([-1] * len(dims)), axis=0)
        seen = self("Gather", padded, self.ints([axis for axis, _ in static]), axis=0)
        differs = self("Not", self("Equal", seen, self.ints([size for _, size in static])))
        return self("And", rank_ok, self("Equal", self("ReduceSum", self.cast(differs, TensorProto.INT64), keepdims=0),
                                         self.const(0)))

    def loop(self, trip_count: str, carried: Sequence[tuple[str, onnx.TypeProto]],
             body: Callable[["Builder", str, list[str]], list[str]]) -> list[str]:
        """ONNX ``Loop`` of ``trip_count`` (int64 scalar) iterations over the ``carried`` values
        (initial value, type). ``body(builder, iteration, carried values)`` writes one iteration
        into ``builder`` and returns the next carried values; returns the final ones."""
        inner = Builder(self._counter, outer=self)
        iteration, cond = inner._fresh("iteration"), inner._fresh("cond")
        formals = [inner._fresh("carried") for _ in carried]
        results = body(inner, iteration, formals)
        cond_out = inner("Identity", cond)
        scalar = lambda name, elem: helper.make_tensor_value_info(name, elem, [])  # noqa: E731
        graph = helper.make_graph(
            inner.nodes, self._fresh("loop_body"),
            [scalar(iteration, TensorProto.INT64), scalar(cond, TensorProto.BOOL),
             *[helper.make_value_info(name, kind) for name, (_, kind) in zip(formals, carried)]],
            [scalar(cond_out, TensorProto.BOOL),
             *[helper.make_value_info(name, kind) for name, (_, kind) in zip(results, carried)]])
        finals = self("Loop", trip_count, "", *[value for value, _ in carried], outputs=len(carried), body=graph)
        return [finals] if len(carried) == 1 else finals

    def output(self, value: str, name: str) -> None:
        """Name ``value`` as the function output ``name``."""
        self.nodes.append(helper.make_node("Identity", [value], [name]))
