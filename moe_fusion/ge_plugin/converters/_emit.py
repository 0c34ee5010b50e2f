"""What every converter shares: binding an FX node's arguments to the op schema, and emitting one
GE node checked against the GE IR registry.

``emit`` asks the IR registry for the op's definition (``_torchair.get_registered_ir_def``: CANN's
registry on an NPU install, ``moe_fusion.ge_plugin.ir`` through the stub elsewhere), rejects input
and attr names it does not define, orders the inputs as the IR does with an empty slot for each
absent optional input, types every attr with the IR's value type (``ge.attr.Int``, ``Str``...)
and names the outputs as the IR does.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

from torchair import ge
from torchair.core import _torchair  # pylint: disable=no-name-in-module

from ...op_protos import PROTOS
from ..ir import VT_TAGS

_ATTR_BUILDERS = {tag: getattr(ge.attr, type_name) for type_name, tag in VT_TAGS.items()}

Args = dict[str, Any]


def pick(args: Args, *names: str) -> Args:
    """The named arguments, for GE inputs/attrs named as in the torch schema."""
    return {name: args[name] for name in names}


def emit(op_type: str, *, inputs: Mapping[str, Optional[Any]], attrs: Mapping[str, Any]) -> Any:
    """One GE node of type ``op_type``. ``inputs`` maps GE input names to ``ge.Tensor`` or None
    (any optional input not given is empty); ``attrs`` maps GE attr names to plain values.
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


CONVERTERS: dict[str, Callable[..., Any]] = {}


def converter(op_name: str) -> Callable[[Callable[[Args], Any]], Callable[[Args], Any]]:
    """Declare ``fn(args)`` the converter of ``torch.ops.moe_fusion.<op_name>``: the FX-facing
    function stored in ``CONVERTERS`` binds the node's arguments and calls it."""

    def declare(fn: Callable[[Args], Any]) -> Callable[[Args], Any]:
        def fx_converter(*args: Any, **kwargs: Any) -> Any:
            return fn(PROTOS[op_name].bind(args, kwargs))

        fx_converter.__name__ = fx_converter.__qualname__ = f"convert_{op_name}"
        fx_converter.__doc__ = fn.__doc__
        CONVERTERS[op_name] = fx_converter
        return fn

    return declare
