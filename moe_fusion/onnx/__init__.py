"""ONNX export of moe_fusion models: one custom-domain node per fused op.

Every ``torch.ops.moe_fusion.<op>`` exports as ONE node ``ai.moe_fusion::<GE op type>`` (domain
``DOMAIN``, opset version ``OPSET_VERSION``): the GE prototype's inputs in GE order (an absent
optional input is an empty name, trailing ones are left out), every GE attr with its ONNX type
(``Bool`` as INT 0/1) and every GE output. ``register_schemas()`` registers an ONNX schema per op
with ``onnx.defs``, so ``onnx.checker.check_model(model, full_check=True)`` accepts the nodes.

    torch.onnx.export(model, args, dynamo=True, custom_translation_table=moe_fusion.onnx.translation_table())
    moe_fusion.onnx.export(model, args, "model.onnx")            # + fusion passes + function bodies

Where each node runs (a world of one rank for the communication ops, whose collectives are
identities then):

=====================================  ================================  =======================  ==================
op (GE type)                           onnxruntime (function body)       ReferenceEvaluator        body specialized on
=====================================  ================================  =======================  ==================
MoeReRouting                           yes                               yes                      attrs, scales given
MoeUpdateExpert                        yes (both balance modes, pruning) yes                      attrs, inputs given
FFN float fp32/fp16/bf16, all 7        yes (experts: a ``Loop``)         yes                      activation,
activations, experts (both forms)                                                                 inner_precise
FFN antiquant int8/int4, per-channel   yes                               yes                      as above + groups
and per-group
FFN quant (int8 x)                     no (uint64 deq scales hold fp32   yes                      -
                                       bits: no standard op reads them)
FFN from ``npu_ffn_grouped`` (counts   yes (rows past the counts: 0)     yes                      as float FFN
tensor, may cover fewer rows)
AlltoAllAllGatherBatchMatMul           ep = tp = 1 only                  ep = tp = 1              act_type, flags
BatchMatMulReduceScatterAlltoAll       ep = tp = 1 only                  ep = tp = 1              bias rank
MoeDistributeDispatchV2                no                                ep_world_size = 1        -
MoeDistributeCombineV2                 no                                ep_world_size = 1        -
MoeDistributeCombineAddRmsNorm         no                                ep_world_size = 1        -
=====================================  ================================  =======================  ==================

* onnxruntime: ``attach_functions(model)`` (done by ``export``) gives each node it can a
  ``FunctionProto`` in ``DOMAIN`` named by the node's ``overload`` (IR version 10), specialized to
  the node; plain onnxruntime then runs the model. Nodes without a body are listed in the model's
  ``metadata_props["moe_fusion.nodes_without_body"]``.
* ReferenceEvaluator: ``reference_evaluator(model)`` runs every custom node with the moe_fusion
  reference kernel (``reference``).

Models from untrusted files. Both runtimes apply the same checks first (``_checks.check_node``:
attr names and types, a ``Bool`` 0 or 1, element types, ranks <= 8, dims >= 0, at most 2**40
elements per input and 2**16 FFN experts, then the op's own ``ge_mapping`` and ``validate`` rules
on meta tensors of the declared shapes): ``attach_functions`` raises ``OpValidationError`` (naming
the op, the attr or input and the value) for a node its op rejects, before changing the model,
and the evaluator raises the same error on the arrays. Nothing is allocated from a declared dim or
an attr: a body's size is fixed (experts are ``Loop`` iterations; under 400 nodes), re_routing's
body runs in O(A + N*E) memory, and the evaluator allocates what its inputs size (the ops' own
caps: ``A``, ``N*E``, FFN's ``M`` <= 2**31 - 1, world sizes). Value rules (counts, ids, replica
counts) run inside the reference kernels and, in onnxruntime, inside the bodies: a run whose values
the op rejects fails in a node named ``moe_fusion check: <op>: <rule>``; so do runtime shapes that
differ from the declared dims a body was built for.
* ``npu_ffn`` and ``npu_ffn_grouped`` both export as ``FFN`` (one GE prototype); the evaluator
  runs a float FFN of a 2-D x with counts as ``npu_ffn_grouped`` (which equals ``npu_ffn`` when the
  counts cover every row), any other FFN as ``npu_ffn``.
* Function bodies and reference kernels agree up to fp32 rounding; FFN's high-precision cast rounds
  ties away from zero in the kernel, half to even in ONNX ``Cast`` (exact ties only).
"""
from __future__ import annotations

from ._schema import DOMAIN, OPSET_VERSION, register_schemas
from .export import DEFAULT_OPSET, NO_BODY_KEY, collectives_of_one_as_identity, export, prepare_program
from .functions import Skipped, attach_functions
from .reference import reference_evaluator, reference_ops
from .translation import translation_table

__all__ = ["DOMAIN", "OPSET_VERSION", "DEFAULT_OPSET", "NO_BODY_KEY", "Skipped", "attach_functions",
           "collectives_of_one_as_identity", "export", "prepare_program", "reference_evaluator", "reference_ops",
           "register_schemas", "translation_table"]
