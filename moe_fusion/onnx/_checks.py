"""The checks every custom node passes before either runtime runs it, so a model from an untrusted
file meets the same rules in onnxruntime (``attach_functions``) and in the reference evaluator.

``check_node(node, declared)`` takes the node and, per GE input, its element type and dims (the
model's declared ones for ``attach_functions``, the arrays' own for the evaluator), and raises
``OpValidationError`` naming the GE op (or the torch op, for the op's own rules), the attr or
input, the rule and the value:

1. arity: at most the GE prototype's inputs and outputs, every required input present;
2. attrs (``node_attrs``): known names, each once, of its GE type (``Int``/``Bool`` an INT, a
   ``Bool`` 0 or 1, ``Float`` a FLOAT or INT, ``Str`` UTF-8 text); absent ones take their defaults;
3. inputs: an element type the op's ONNX schema allows, a declared rank of at most ``MAX_RANK``,
   dims >= 0 and at most ``MAX_ELEMENTS`` elements; FFN's ``expert_tokens`` 1-D with at most
   ``MAX_FFN_EXPERTS`` entries (GE's prototype, and a bound on the checks' own work);
4. the op's own structural rules: ``ge_mapping.to_torch`` (fixed and derived attrs, e.g. FFN's
   ``output_dtype``, the BMM ops' ``transpose_weight``) and the proto's ``validate`` on meta
   tensors of the declared shapes, on the portable target. Nothing is allocated from a dim.

Rules on tensor *contents* (counts, ids) are checked by the reference kernels in the evaluator
and by the function bodies themselves at run time (``Builder.guard``). A symbolic dim is checked
at ``SYMBOLIC_DIM_SIZE`` (the same size for every symbolic dim, so dims the exporter named alike
agree; FFN's expert count takes ``weight1``'s); at run time the evaluator checks the arrays, and a
body checks its inputs against their declared dims and the symbolic dims the op relates (scales
of A rows, masks of BS rows). ``npu_ffn``'s ``expert_tokens`` values are checked at run time too:
for the structural rules they stand in as counts covering every row.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import onnx
import torch
from onnx import helper

from ..errors import fail
from ..op_protos import OpProto
from ..op_protos.ge_mapping import proto_for_node, proto_of_ge_type, to_torch
from ..targets import target
from ._dtypes import ONNX_TO_TORCH
from ._schema import onnx_types

MAX_RANK = 8                  # the largest rank a GE input takes (FFN's x: 2-D to 8-D)
MAX_ELEMENTS = 2 ** 40        # per input: beyond any one host's memory, and numel * 8 bytes stays < 2**63
MAX_FFN_EXPERTS = 2 ** 16     # FFN experts (entries of expert_tokens); the device takes 256
SYMBOLIC_DIM_SIZE = 64        # the size a symbolic dim is checked at

_PY_TYPES = {"Int": int, "Bool": int, "Float": float, "Str": str, "ListInt": list}
_ATTR_KINDS = {onnx.AttributeProto.INT, onnx.AttributeProto.FLOAT, onnx.AttributeProto.STRING,
               onnx.AttributeProto.INTS}


@dataclass(frozen=True)
class Declared:
    """One input's element type (``TensorProto`` enum) and dims (None where symbolic)."""

    elem_type: int
    shape: tuple[Optional[int], ...]


@dataclass(frozen=True)
class CheckedNode:
    """A node that passed ``check_node``: the op it is a call of and its typed GE attrs (defaults
    filled in, ``Bool`` as bool)."""

    proto: OpProto
    attrs: dict[str, Any]


def _attr_value(ge_type: str, attr: onnx.AttributeProto) -> Any:
    """The Python value of a scalar or INTS attribute; other kinds (tensors, graphs) are no GE attr."""
    kind = onnx.AttributeProto.AttributeType.Name(attr.type)
    if attr.type not in _ATTR_KINDS:
        fail(ge_type, attr.name, "must be an INT, FLOAT, STRING or INTS attribute", f"a {kind} attribute")
    value = helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            fail(ge_type, attr.name, "must be UTF-8 text", f"{len(value)} bytes that are not")
    return value


def node_attrs(proto: OpProto, node: onnx.NodeProto) -> dict[str, Any]:
    """The node's GE attrs with defaults filled in, each checked against its GE type (step 2)."""
    given: dict[str, Any] = {}
    known = {a.name for a in proto.ge_attrs}
    for attr in node.attribute:
        if attr.name not in known:
            fail(proto.ge_type, attr.name, "is not an attr of the op", f"a {attr.name!r} attribute")
        if attr.name in given:
            fail(proto.ge_type, attr.name, "must be given once", "twice")
        given[attr.name] = _attr_value(proto.ge_type, attr)
    attrs = {}
    for a in proto.ge_attrs:
        if a.name not in given and a.required:
            fail(proto.ge_type, a.name, "is a required attr", "nothing")
        value = given.get(a.name, a.default)
        if a.type == "Float" and isinstance(value, int):
            value = float(value)
        if not isinstance(value, _PY_TYPES[a.type]):
            fail(proto.ge_type, a.name, f"must be a {a.type} attr", repr(value))
        if a.type == "Bool":
            # ONNX has no bool attr: any other int would read as True in one runtime and fail in another.
            if value not in (0, 1):
                fail(proto.ge_type, a.name, "must be one of (0, 1)", value)
            value = bool(value)
        attrs[a.name] = value
    return attrs


def declared_of(value_type: Optional[onnx.TypeProto]) -> Optional[Declared]:
    """The ``Declared`` of a value's ONNX type, or None when it is no tensor of known rank."""
    if value_type is None or not value_type.HasField("tensor_type") or not value_type.tensor_type.HasField("shape"):
        return None
    tensor = value_type.tensor_type
    return Declared(tensor.elem_type, tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim))


def _type_name(elem_type: int) -> str:
    """An element type as ONNX schemas write it (``tensor(float16)``)."""
    if elem_type not in onnx.TensorProto.DataType.values():
        return f"element type {elem_type}"
    return f"tensor({onnx.TensorProto.DataType.Name(elem_type).lower()})"


def _check_input(ge_type: str, name: str, declared: Declared, allowed: list[str]) -> torch.dtype:
    """Step 3 for one input; returns its torch dtype."""
    if _type_name(declared.elem_type) not in allowed or declared.elem_type not in ONNX_TO_TORCH:
        fail(ge_type, name, f"element type must be one of ({', '.join(allowed)})", _type_name(declared.elem_type))
    if len(declared.shape) > MAX_RANK:
        fail(ge_type, name, f"must have rank <= {MAX_RANK}", f"rank {len(declared.shape)}")
    dims = [d for d in declared.shape if d is not None]
    if any(d < 0 for d in dims):
        fail(ge_type, name, "must have dims >= 0", f"shape {declared.shape}")
    if math.prod(dims) > MAX_ELEMENTS:
        fail(ge_type, name, f"must have at most {MAX_ELEMENTS} elements", f"shape {declared.shape}")
    return ONNX_TO_TORCH[declared.elem_type]


def _ffn_counts_stand_in(experts: int, rows: int, flag: bool) -> torch.Tensor:
    """``npu_ffn``'s ``expert_tokens`` ``(E,)`` int64 for the structural check: counts ``[M, 0, ...]``
    (ends ``[M, M, ...]``) covering every row."""
    values = [rows] * experts if flag else [rows] * min(experts, 1) + [0] * (experts - 1)
    return torch.tensor(values, dtype=torch.int64)


def _ffn_experts(declared: dict[str, Optional[Declared]]) -> dict[str, Optional[Declared]]:
    """FFN's ``expert_tokens`` is 1-D (GE's prototype) and the expert count, its length or
    ``weight1``'s dim 0, at most ``MAX_FFN_EXPERTS``. Returns ``declared`` with a symbolic length
    of ``expert_tokens`` set to ``weight1``'s static expert count (the one length the op accepts)."""
    tokens, weight1 = declared.get("expert_tokens"), declared["weight1"]
    if tokens is None:
        return declared
    if len(tokens.shape) != 1:
        fail("FFN", "expert_tokens", "must be 1-D (E,)", f"shape {tokens.shape}")
    for name, item, rank in (("expert_tokens", tokens, 1), ("weight1", weight1, 3)):
        if len(item.shape) == rank and (item.shape[0] or 0) > MAX_FFN_EXPERTS:
            fail("FFN", name, f"must have at most {MAX_FFN_EXPERTS} experts in dim 0", f"shape {item.shape}")
    experts = tokens.shape[0]
    if experts is None:
        experts = weight1.shape[0] if len(weight1.shape) == 3 and weight1.shape[0] is not None else SYMBOLIC_DIM_SIZE
    return {**declared, "expert_tokens": Declared(tokens.elem_type, (experts,))}


def check_node(node: onnx.NodeProto, declared: dict[str, Optional[Declared]]) -> CheckedNode:
    """Steps 1-4 of the module docstring for one custom node. ``declared`` maps each GE input name
    to its ``Declared`` (None when absent). Raises ``OpValidationError``."""
    ge_type = node.op_type
    prototype = proto_of_ge_type(ge_type)
    if len(node.input) > len(prototype.ge_inputs):
        fail(ge_type, "inputs", f"must be at most {len(prototype.ge_inputs)}", len(node.input))
    if len(node.output) > len(prototype.ge_outputs):
        fail(ge_type, "outputs", f"must be at most {len(prototype.ge_outputs)}", len(node.output))
    for spec in prototype.ge_inputs:
        if spec.kind != "optional" and declared.get(spec.name) is None:
            fail(ge_type, spec.name, "is a required input", "nothing")
    attrs = node_attrs(prototype, node)
    if ge_type == "FFN":
        declared = _ffn_experts(declared)
    metas: dict[str, Optional[torch.Tensor]] = {}
    for spec in prototype.ge_inputs:
        item = declared.get(spec.name)
        if item is None:
            metas[spec.name] = None
            continue
        dtype = _check_input(ge_type, spec.name, item, onnx_types(spec.dtypes))
        shape = [SYMBOLIC_DIM_SIZE if d is None else d for d in item.shape]
        metas[spec.name] = torch.empty(shape, dtype=dtype, device="meta")
    proto = proto_for_node(ge_type, metas)
    tokens = declared.get("expert_tokens") if ge_type == "FFN" else None
    if tokens is not None and proto.name == "npu_ffn":   # a host list of values: a stand-in (module docstring)
        metas["expert_tokens"] = _ffn_counts_stand_in(tokens.shape[0], math.prod(metas["x"].shape[:-1]),
                                                      attrs["tokens_index_flag"])
    kwargs = to_torch(proto, metas, attrs)
    with target("portable"):
        proto.check(**kwargs)
    return CheckedNode(proto, attrs)
