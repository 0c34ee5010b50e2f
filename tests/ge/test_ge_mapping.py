"""The torch<->GE table (``moe_fusion.op_protos.ge_mapping``) that the GE converters and the ONNX
translation both read: it accounts for every torch argument and GE slot, its GE ``DataType``
values are torchair's, and a call GE cannot express fails in both consumers with the same
``OpValidationError`` (the op's own validation message), never with a made-up attr value."""
from __future__ import annotations

import pytest
import torch

from moe_fusion import OpValidationError
from moe_fusion.op_protos import PROTOS
from moe_fusion.op_protos.ge_mapping import GE_DATATYPE, GE_MAPPINGS


@pytest.mark.parametrize("name", list(PROTOS))
def test_mapping_accounts_for_every_argument_and_slot(name):
    """Each torch argument passes through to a GE slot or is listed as torch-only or consumed;
    each GE attr is passed, fixed or derived; a GE input nothing fills is optional (left empty)."""
    proto, mapping = PROTOS[name], GE_MAPPINGS[name]
    arguments = [a.name for a in getattr(torch.ops.moe_fusion, name).default._schema.arguments]
    inputs = {i.name: i.kind for i in proto.ge_inputs}
    ge_attrs = {a.name for a in proto.ge_attrs}
    consumed = set(mapping.derived.consumes) if mapping.derived else set()
    produced = set(mapping.derived.produces) if mapping.derived else set()
    assert set(mapping.renames) | set(mapping.torch_only) | consumed <= set(arguments)
    passed = {mapping.renames.get(a, a) for a in arguments if a not in set(mapping.torch_only) | consumed}
    assert passed <= set(inputs) | ge_attrs, "arguments without a GE slot"
    assert not passed & (produced | set(mapping.fixed_attrs)), "a GE slot filled twice"
    assert produced <= set(inputs) | ge_attrs and set(mapping.fixed_attrs) <= ge_attrs
    assert ge_attrs <= passed | produced | set(mapping.fixed_attrs), "GE attrs left unset"
    assert all(inputs[i] == "optional" for i in set(inputs) - passed - produced), "required GE inputs left empty"
    assert set(mapping.int_list_inputs) <= produced & set(inputs)


def test_ge_datatype_values_are_torchairs(torchair):
    from torchair.ge._ge_graph import torch_type_to_ge_type

    assert {dtype: torch_type_to_ge_type(dtype) for dtype in GE_DATATYPE} == GE_DATATYPE


# SPEC §5.1: GE's FFN has one expert_tokens input and output_dtype codes for fp16/bf16 only.
_INEXPRESSIBLE_FFN_CALLS = {
    "int8-x-float32-output": (
        torch.int8, {"output_dtype": torch.float32},
        "npu_ffn: output_dtype must be one of (None, torch.float16, torch.bfloat16), got torch.float32"),
    "both-expert-lists": (
        torch.float16, {"expert_tokens": [2, 2], "expert_tokens_index": [2, 4]},
        "npu_ffn: expert_tokens/expert_tokens_index must not both be given, got both"),
}


def _ge_ffn(x_dtype: torch.dtype, kwargs: dict) -> None:
    """The GE converter of npu_ffn on graph inputs of ``x_dtype`` (weights of the same dtype),
    each carrying its meta tensor as torchair's FX->GE compiler sets it."""
    from torchair.ge._ge_graph import Data, GeGraph, torch_type_to_ge_type

    from moe_fusion.ge_plugin.converters import CONVERTERS

    with GeGraph():
        tensors = []
        for index, shape in enumerate(([4, 8], [8, 16], [16, 8])):
            tensor = Data(index=index, dtype=torch_type_to_ge_type(x_dtype), shape=shape, placement="NPU")
            tensor.set_meta(torch.empty(shape, dtype=x_dtype, device="meta"))
            tensors.append(tensor)
        CONVERTERS["npu_ffn"](*tensors, "relu", **kwargs)


def _onnx_ffn(x_dtype: torch.dtype, kwargs: dict) -> None:
    """The ONNX translation of npu_ffn on exporter values of ``x_dtype``, dtype arguments as the
    exporter hands them over (ONNX element types)."""
    import onnx_ir as ir

    from moe_fusion.onnx._dtypes import TORCH_TO_ONNX
    from moe_fusion.onnx.translation import translation

    x, w1, w2 = (ir.Value(name=n, type=ir.TensorType(ir.DataType(TORCH_TO_ONNX[x_dtype]))) for n in ("x", "w1", "w2"))
    onnx_kwargs = {k: TORCH_TO_ONNX[v] if isinstance(v, torch.dtype) else v for k, v in kwargs.items()}
    translation(PROTOS["npu_ffn"])(x, w1, w2, "relu", **onnx_kwargs)


@pytest.mark.parametrize("case", list(_INEXPRESSIBLE_FFN_CALLS))
def test_calls_ge_cannot_express_fail_alike_in_ge_and_onnx(torchair, case):
    x_dtype, kwargs, message = _INEXPRESSIBLE_FFN_CALLS[case]
    with pytest.raises(OpValidationError) as in_ge:
        _ge_ffn(x_dtype, kwargs)
    with pytest.raises(OpValidationError) as in_onnx:
        _onnx_ffn(x_dtype, kwargs)
    assert str(in_ge.value) == str(in_onnx.value) == message

