"""GE IR definitions (the REG_OP of each op) derived from the protos.

``IR_DEFS`` maps a GE op type to its ``IrDef``: inputs with their kind, attrs with type and default,
outputs, all in GE order. ``registered_ir_def`` answers in the format of torchair's native
``_torchair.get_registered_ir_def(op_type)``, which the stub native module serves from here::

    ("SUCCESS", [(input, "required" | "optional" | "dynamic"), ...],
                [(output, "required" | "dynamic"), ...],
                [(attr, "VT_INT" | "VT_STRING" | ...), ...])

and ``("ERROR", [], [], [])`` for an op type GE does not know. ``check_op_def`` checks a GE
``OpDef`` (a node of a built graph) against such a definition.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..op_protos import PROTOS, GeAttr, OpProto

# GE attr type name (as in GeAttr.type and torchair.ge.attr) -> torchair's value-type tag.
VT_TAGS = {
    "Int": "VT_INT", "Float": "VT_FLOAT", "Bool": "VT_BOOL", "Str": "VT_STRING", "DataType": "VT_DATA_TYPE",
    "ListInt": "VT_LIST_INT", "ListFloat": "VT_LIST_FLOAT", "ListBool": "VT_LIST_BOOL", "ListStr": "VT_LIST_STRING",
}
# Which field of a GE AttrDef proto each type fills.
ATTR_FIELDS = {"Int": "i", "Float": "f", "Bool": "b", "Str": "s", "DataType": "dt", "ListInt": "list",
               "ListFloat": "list", "ListBool": "list", "ListStr": "list"}

RegisteredIrDef = tuple[str, list[tuple[str, str]], list[tuple[str, str]], list[tuple[str, str]]]


@dataclass(frozen=True)
class IrDef:
    """One GE op prototype, in GE order."""

    op_type: str
    inputs: tuple[tuple[str, str], ...]      # (name, kind)
    attrs: tuple[GeAttr, ...]        # type is a key of VT_TAGS
    outputs: tuple[str, ...]

    def attr(self, name: str) -> GeAttr:
        return next(a for a in self.attrs if a.name == name)

    def registered(self) -> RegisteredIrDef:
        """This definition as ``_torchair.get_registered_ir_def`` returns it."""
        return ("SUCCESS", list(self.inputs), [(o, "required") for o in self.outputs],
                [(a.name, VT_TAGS[a.type]) for a in self.attrs])


def ir_def_of(proto: OpProto) -> IrDef:
    """The GE IR definition an op's proto declares."""
    for a in proto.ge_attrs:
        if a.type not in VT_TAGS:
            raise ValueError(f"{proto.name}: GE attr {a.name} has unknown type {a.type!r}")
    return IrDef(op_type=proto.ge_type,
                 inputs=tuple((i.name, i.kind) for i in proto.ge_inputs),
                 attrs=proto.ge_attrs,
                 outputs=tuple(o.name for o in proto.ge_outputs))


IR_DEFS: dict[str, IrDef] = {p.ge_type: ir_def_of(p) for p in PROTOS.values()}


def registered_ir_def(op_type: str) -> RegisteredIrDef:
    """``_torchair.get_registered_ir_def`` for the ops of this package."""
    ir = IR_DEFS.get(op_type)
    return ir.registered() if ir is not None else ("ERROR", [], [], [])


def check_op_def(op: Any, registered: Optional[RegisteredIrDef] = None) -> None:
    """Check a built GE ``OpDef`` against its IR definition: input names in IR order with every
    optional input present (empty when absent) and every required one connected, only known attrs
    of the right value type, every required attr set, output names in IR order. ``registered``
    defaults to this package's definition of ``op.type``. Raises ``ValueError`` naming the
    first mismatch."""
    status, inputs, outputs, attrs = registered if registered is not None else registered_ir_def(op.type)
    if status != "SUCCESS":
        raise ValueError(f"{op.type}: no GE IR definition ({status})")
    where = f"{op.type} node {op.name!r}"
    if any(kind == "dynamic" for _, kind in inputs):
        raise ValueError(f"{where}: dynamic inputs are not supported by this check")
    names, expected = [d.name for d in op.input_desc], [name for name, _ in inputs]
    if names != expected:
        raise ValueError(f"{where}: inputs {names} do not match the IR inputs {expected}")
    data_inputs = [i for i in op.input if not i.startswith("^")]  # "^x" entries are control edges
    for (name, kind), source in zip(inputs, data_inputs):
        if kind == "required" and not source:
            raise ValueError(f"{where}: required input {name!r} is not connected")
    vt_of = dict(attrs)
    tag_to_type = {tag: t for t, tag in VT_TAGS.items()}
    for name in op.attr:
        if name.startswith("_"):  # torchair's own annotations (_input_name_key, ...), not GE attrs
            continue
        if name not in vt_of:
            raise ValueError(f"{where}: attr {name!r} is not in the IR attrs {list(vt_of)}")
        field = op.attr[name].WhichOneof("value")
        if field != ATTR_FIELDS[tag_to_type[vt_of[name]]]:
            raise ValueError(f"{where}: attr {name!r} holds a {field!r} value, the IR says {vt_of[name]}")
    ir = IR_DEFS.get(op.type)
    if ir is not None:
        missing = [a.name for a in ir.attrs if a.required and a.name not in op.attr]
        if missing:
            raise ValueError(f"{where}: required attrs {missing} are not set")
    out_names = [d.name for d in op.output_desc]
    if out_names != [name for name, _ in outputs]:
        raise ValueError(f"{where}: outputs {out_names} do not match the IR outputs {[n for n, _ in outputs]}")
