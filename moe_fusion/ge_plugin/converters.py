"""GE converters of every moe_fusion op, by op name (``CONVERTERS``), emitted from the one
torch<->GE table (``moe_fusion.op_protos.ge_mapping``).

A converter binds the FX node's arguments to the op schema, maps them to GE inputs and attrs with
``to_ge`` (renames, fixed and derived attrs; SPEC §2.1–§7.1), makes the int lists GE takes as
tensors int64 Consts, and ``emit``s one node. Importing this module needs torchair;
``moe_fusion.ge_plugin.register_converters()`` imports it only when torchair is importable.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch
from torchair import ge
from torchair._ge_concrete_graph.utils import dtype_promote
from torchair.core import _torchair  # pylint: disable=no-name-in-module
from torchair.ge._ge_graph import ge_type_to_torch_type

from ..op_protos import PROTOS, OpProto
from ..op_protos._proto import require
from ..op_protos.ge_mapping import GE_MAPPINGS, to_ge
from .ir import VT_TAGS

_ATTR_BUILDERS = {tag: getattr(ge.attr, type_name) for type_name, tag in VT_TAGS.items()}


def emit(op_type: str, *, inputs: Mapping[str, Optional[Any]], attrs: Mapping[str, Any]) -> Any:
    """One GE node of type ``op_type``, checked against the GE IR registry
    (``_torchair.get_registered_ir_def``: CANN's registry on an NPU install, ``ge_plugin.ir``
    through the stub elsewhere). ``inputs`` maps GE input names to ``ge.Tensor`` or None (any
    optional input not given is empty); ``attrs`` maps GE attr names to plain values, typed here
    with the IR's value type (``ge.attr.Int``, ``Str``...). Names the IR lacks are rejected.
    Returns the output tensor, or a tuple of them in IR order."""
    status, ir_inputs, ir_outputs, ir_attrs = _torchair.get_registered_ir_def(op_type)
    if status != "SUCCESS":
        raise RuntimeError(f"GE op {op_type} is not registered ({status})")
    kinds = dict(ir_inputs)
    value_types = dict(ir_attrs)
    unknown_inputs = sorted(set(inputs) - set(kinds))
    unknown_attrs = sorted(set(attrs) - set(value_types))
    if unknown_inputs or unknown_attrs:
        raise ValueError(f"GE op {op_type} has no input(s) {unknown_inputs} / attr(s) {unknown_attrs}; "
                         f"its inputs are {list(kinds)}, its attrs {list(value_types)}")
    ordered = {}
    for name, kind in ir_inputs:
        value = inputs.get(name)
        if value is None and kind != "optional":
            raise ValueError(f"GE op {op_type}: {kind} input {name!r} is missing")
        ordered[name] = value
    typed = {name: _ATTR_BUILDERS[value_types[name]](value) for name, value in attrs.items()}
    return ge.custom_op(op_type, inputs=ordered, attrs=typed, outputs=[name for name, _ in ir_outputs])


def _dtype_of(tensor: ge.Tensor) -> torch.dtype:
    """The torch dtype of a GE tensor (``to_ge`` derives attrs from torch dtypes)."""
    return ge_type_to_torch_type(tensor.dtype)


def convert(proto: OpProto, args: tuple, kwargs: dict) -> Any:
    """The GE node of one call of ``proto``'s op, as ``GE_MAPPINGS`` describes it. Raises
    ``OpValidationError`` for a float64 tensor: CANN's ops have no ``DT_DOUBLE`` (float64 is the
    portable target's gradient-check dtype)."""
    bound = proto.bind(args, kwargs)
    for name, value in bound.items():
        if isinstance(value, ge.Tensor):
            require(_dtype_of(value) != torch.float64, proto.name, name,
                    "must not be float64 on GE (CANN's ops have no float64)", "float64")
    inputs, attrs = to_ge(proto, bound, _dtype_of)
    for name in GE_MAPPINGS[proto.name].int_list_inputs:
        if inputs[name] is not None:   # ints, or a ge.Tensor torchair packed from SymInts
            inputs[name] = dtype_promote(inputs[name], target_dtype=torch.int64)
    return emit(proto.ge_type, inputs=inputs, attrs=attrs)


def _converter(proto: OpProto) -> Callable[..., Any]:
    """The FX-facing converter of ``torch.ops.moe_fusion.<proto.name>``."""

    def fx_converter(*args: Any, **kwargs: Any) -> Any:
        return convert(proto, args, kwargs)

    fx_converter.__name__ = fx_converter.__qualname__ = f"convert_{proto.name}"
    fx_converter.__doc__ = f"torch.ops.moe_fusion.{proto.name} -> GE {proto.ge_type} (``convert``)."
    return fx_converter


CONVERTERS: dict[str, Callable[..., Any]] = {name: _converter(proto) for name, proto in PROTOS.items()}
