"""A small writer of ONNX function bodies: fresh value names, constants, one call per node."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import fail


@dataclass(frozen=True)
class NodeView:
    """What a body builder may know about one custom node of a model.

    ``inputs`` maps each GE input name to its value name, or None when absent; ``attrs`` every GE
    attr (defaults filled in); ``elem_types``/``shapes`` the element type and static dims (None for
    a symbolic dim) of each present input, from the model's value infos.
    """

    op: str                                   # GE op type, for error messages
    inputs: dict[str, Optional[str]]
    attrs: dict[str, Any]
    elem_types: dict[str, int]
    shapes: dict[str, tuple[Optional[int], ...]]

    def has(self, name: str) -> bool:
        return self.inputs.get(name) is not None

    def dim(self, name: str, axis: int) -> int:
        """A static dim of an input; an OpValidationError when the model leaves it symbolic."""
        size = self.shapes[name][axis]
        if size is None:
            fail(self.op, name, f"needs a static dim {axis} to build its standard-op body", self.shapes[name])
        return size


class Builder:
    """Appends nodes; every call returns the name(s) of its fresh output value(s)."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self._count = 0

    def _fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def __call__(self, op_type: str, *inputs: str, outputs: int = 1, **attrs: Any) -> Any:
        names = [self._fresh(op_type) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if outputs == 1 else names

    def const(self, value: Any, dtype: Any = np.int64) -> str:
        name = self._fresh("const")
        tensor = numpy_helper.from_array(np.asarray(value, dtype=dtype), name)
        self.nodes.append(helper.make_node("Constant", [], [name], value=tensor))
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

    def output(self, value: str, name: str) -> None:
        """Name ``value`` as the function output ``name``."""
        self.nodes.append(helper.make_node("Identity", [value], [name]))
