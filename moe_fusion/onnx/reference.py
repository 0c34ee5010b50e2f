"""Every custom node for ``onnx.reference.ReferenceEvaluator``, in a world of one rank.

Each node runs the moe_fusion reference kernel of its op (``torch.ops.moe_fusion.*``, portable
target), after checks that make it safe on a model from an untrusted file:

1. attrs have their GE type (``Int``/``Bool`` int, ``Float`` float, ``Str`` str);
2. the communication attrs describe a world of one rank (EP and TP group sizes 1, no shared-expert
   ranks), and the attrs that size outputs are capped by the inputs or the device limits
   (``global_bs`` 0 or ``BS``, ``moe_expert_num`` <= 1024);
3. the op's own validation (shapes, dtypes, values) runs inside the kernel.

Every failure is an ``OpValidationError`` naming the op, the attr or input, the rule and the value.
Collectives of a group of one are identities, so the kernels need no process group.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import onnx
import torch
from onnx import helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from ..errors import fail
from ..op_protos import PROTOS, OpProto
from ..op_protos.ge_mapping import proto_for_node, proto_of_ge_type, to_torch
from ..op_protos.moe_distribute_common import A3_MAX_EXPERTS
from ..targets import target
from ._dtypes import numpy_to_torch, torch_to_numpy
from ._schema import DOMAIN, register_schemas

_PY_TYPES = {"Int": int, "Bool": int, "Float": float, "Str": str, "ListInt": list}
_DIST_OPS = ("npu_moe_distribute_dispatch_v2", "npu_moe_distribute_combine_v2",
             "npu_moe_distribute_combine_add_rms_norm")
_BMM_OPS = ("npu_alltoall_allgather_bmm", "npu_bmm_reducescatter_alltoall")


def node_attrs(proto: OpProto, node: onnx.NodeProto) -> dict[str, Any]:
    """The node's GE attrs with defaults filled in, each checked against its GE type."""
    given = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    unknown = sorted(set(given) - {a.name for a in proto.ge_attrs})
    if unknown:
        fail(proto.ge_type, unknown[0], "is not an attr of the op", repr(given[unknown[0]]))
    attrs = {}
    for a in proto.ge_attrs:
        if a.name not in given and a.required:
            fail(proto.ge_type, a.name, "is a required attr", "nothing")
        value = given.get(a.name, a.default)
        value = value.decode() if isinstance(value, bytes) else value
        if a.type == "Float" and isinstance(value, int):
            value = float(value)
        if not isinstance(value, _PY_TYPES[a.type]):
            fail(proto.ge_type, a.name, f"must be a {a.type} attr", repr(value))
        attrs[a.name] = bool(value) if a.type == "Bool" else value
    return attrs


def check_world_of_one(proto: OpProto, attrs: dict[str, Any], inputs: dict[str, Optional[torch.Tensor]]) -> None:
    """World-of-one and size-cap rules (module docstring, step 2)."""
    if proto.name in _BMM_OPS:
        for attr in ("ep_world_size", "tp_world_size"):
            if attrs[attr] != 1:
                fail(proto.ge_type, attr, "must be 1 (the ONNX reference runs a world of one rank)", attrs[attr])
    if proto.name not in _DIST_OPS:
        return
    if attrs["ep_world_size"] != 1:
        fail(proto.ge_type, "ep_world_size", "must be 1 (the ONNX reference runs a world of one rank)",
             attrs["ep_world_size"])
    if attrs["tp_world_size"] not in (0, 1):
        fail(proto.ge_type, "tp_world_size", "must be 0 or 1 (the ONNX reference runs a world of one rank)",
             attrs["tp_world_size"])
    if not 0 < attrs["moe_expert_num"] <= A3_MAX_EXPERTS:
        fail(proto.ge_type, "moe_expert_num", f"must be in [1, {A3_MAX_EXPERTS}]", attrs["moe_expert_num"])
    ids = inputs["expert_ids"]
    bs = ids.size(0) if ids is not None else 0
    if attrs["global_bs"] not in (0, bs):
        fail(proto.ge_type, "global_bs", f"must be 0 or BS = {bs} in a world of one rank", attrs["global_bs"])


def run_node(ge_type: str, node: onnx.NodeProto, arrays: Sequence[Optional[np.ndarray]]) -> tuple[np.ndarray, ...]:
    """Outputs of one custom node (GE output order) computed by its op's reference kernel."""
    prototype = proto_of_ge_type(ge_type)
    if len(arrays) > len(prototype.ge_inputs):
        fail(ge_type, "inputs", f"must be at most {len(prototype.ge_inputs)}", len(arrays))
    inputs = {i.name: None for i in prototype.ge_inputs}
    for spec, array in zip(prototype.ge_inputs, arrays):
        inputs[spec.name] = None if array is None else numpy_to_torch(np.asarray(array))
    missing = [i.name for i in prototype.ge_inputs if i.kind != "optional" and inputs[i.name] is None]
    if missing:
        fail(ge_type, missing[0], "is a required input", "nothing")
    proto = proto_for_node(ge_type, inputs)
    attrs = node_attrs(proto, node)
    check_world_of_one(proto, attrs, inputs)
    kwargs = to_torch(proto, inputs, attrs)
    with target("portable"):
        outputs = getattr(torch.ops.moe_fusion, proto.name)(**kwargs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return tuple(torch_to_numpy(t) for t in outputs)


def _op_run_class(ge_type: str) -> type[OpRun]:
    def _run(self: OpRun, *arrays: Optional[np.ndarray], **_: Any) -> tuple[np.ndarray, ...]:
        return run_node(ge_type, self.onnx_node, arrays)

    return type(ge_type, (OpRun,), {"op_domain": DOMAIN, "_run": _run,
                                    "__doc__": f"{DOMAIN}::{ge_type} by its torch.ops.moe_fusion reference kernel"})


def reference_ops() -> list[type[OpRun]]:
    """``new_ops`` for ``ReferenceEvaluator``: one ``OpRun`` class per GE op type in ``PROTOS``."""
    register_schemas()
    return [_op_run_class(ge_type) for ge_type in dict.fromkeys(p.ge_type for p in PROTOS.values())]


def reference_evaluator(model: Any, **kwargs: Any) -> ReferenceEvaluator:
    """``ReferenceEvaluator(model, new_ops=reference_ops())``: runs every custom node (also those
    with a function body) with the reference kernels, in a world of one rank."""
    return ReferenceEvaluator(model, new_ops=reference_ops(), **kwargs)
