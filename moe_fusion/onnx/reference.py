"""Every custom node for ``onnx.reference.ReferenceEvaluator``, in a world of one rank.

Each node runs the moe_fusion reference kernel of its op (``torch.ops.moe_fusion.*``, portable
target), after checks that make it safe on a model from an untrusted file:

1. ``_checks.check_node`` on the arrays' types and shapes: arity, attr types, element types,
   ranks and sizes, and the op's own structural rules (the checks ``attach_functions`` runs on
   the declared types before it gives onnxruntime a body);
2. the communication attrs describe a world of one rank (EP and TP group sizes 1, no shared-expert
   ranks), and the attrs that size outputs are capped by the inputs or the device limits
   (``global_bs`` 0 or ``BS``, ``moe_expert_num`` <= 1024);
3. the op's own value rules (counts, ids), inside the kernel.

Every failure is an ``OpValidationError`` naming the op, the attr or input, the rule and the value.
What a node allocates is bounded by its inputs (outputs and intermediates the size of the inputs,
or of a matmul of them): no attr sizes an allocation. Collectives of a group of one are
identities, so the kernels need no process group.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import onnx
import torch
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from ..errors import fail
from ..op_protos import PROTOS, OpProto
from ..op_protos.ge_mapping import proto_of_ge_type, to_torch
from ..op_protos.moe_distribute_common import A3_MAX_EXPERTS
from ..targets import target
from ._checks import Declared, check_node, node_attrs
from ._dtypes import numpy_to_torch, torch_to_numpy
from ._schema import DOMAIN, register_schemas

_DIST_OPS = ("npu_moe_distribute_dispatch_v2", "npu_moe_distribute_combine_v2",
             "npu_moe_distribute_combine_add_rms_norm")
_BMM_OPS = ("npu_alltoall_allgather_bmm", "npu_bmm_reducescatter_alltoall")


def check_world_of_one(proto: OpProto, attrs: dict[str, Any], declared: dict[str, Optional[Declared]]) -> None:
    """World-of-one and size-cap rules (module docstring, step 2), on the typed attrs and the
    inputs' ``Declared``."""
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
    ids = declared.get("expert_ids")
    bs = ids.shape[0] if ids is not None and ids.shape else 0
    if attrs["global_bs"] not in (0, bs):
        fail(proto.ge_type, "global_bs", f"must be 0 or BS = {bs} in a world of one rank", attrs["global_bs"])


def _declared(ge_type: str, name: str, array: np.ndarray) -> Declared:
    """An input array's element type and shape, as ``check_node`` reads a declared input."""
    try:
        elem_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
    except (KeyError, TypeError, ValueError):
        fail(ge_type, name, "must be a tensor of an ONNX element type", f"numpy dtype {array.dtype}")
    return Declared(elem_type, tuple(array.shape))


def run_node(ge_type: str, node: onnx.NodeProto, arrays: Sequence[Optional[np.ndarray]]) -> tuple[np.ndarray, ...]:
    """Outputs of one custom node (GE output order) computed by its op's reference kernel."""
    prototype = proto_of_ge_type(ge_type)
    if len(arrays) > len(prototype.ge_inputs):
        fail(ge_type, "inputs", f"must be at most {len(prototype.ge_inputs)}", len(arrays))
    arrays = [None if a is None else np.asarray(a) for a in arrays]
    declared = {spec.name: None if array is None else _declared(ge_type, spec.name, array)
                for spec, array in zip(prototype.ge_inputs, arrays)}
    # Before the op's rules: an attr sized for a larger world fails as such, not as a shape mismatch.
    check_world_of_one(prototype, node_attrs(prototype, node), declared)
    checked = check_node(node, declared)
    inputs = {i.name: None for i in prototype.ge_inputs}
    for spec, array in zip(prototype.ge_inputs, arrays):
        inputs[spec.name] = None if array is None else numpy_to_torch(array)
    kwargs = to_torch(checked.proto, inputs, checked.attrs)
    with target("portable"):
        outputs = getattr(torch.ops.moe_fusion, checked.proto.name)(**kwargs)
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
