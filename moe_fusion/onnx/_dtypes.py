"""Dtype vocabularies the ONNX layer translates between: torch dtypes, ONNX ``TensorProto`` element
types and the GE dtype names of the protos (``"DT_BF16"``). GE's ``DataType`` enum values are in
``op_protos.ge_mapping``."""
from __future__ import annotations

import numpy as np
import torch
from onnx import TensorProto

TORCH_TO_ONNX: dict[torch.dtype, int] = {
    torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16, torch.bfloat16: TensorProto.BFLOAT16,
    torch.float64: TensorProto.DOUBLE, torch.int8: TensorProto.INT8, torch.uint8: TensorProto.UINT8,
    torch.int16: TensorProto.INT16, torch.int32: TensorProto.INT32, torch.int64: TensorProto.INT64,
    torch.uint64: TensorProto.UINT64, torch.bool: TensorProto.BOOL,
}
ONNX_TO_TORCH: dict[int, torch.dtype] = {v: k for k, v in TORCH_TO_ONNX.items()}

# GE dtype name (as in GeInput/GeOutput) -> ONNX type string. DT_INT4 is moe_fusion's uint8 carrier
# (``moe_fusion.int4``); GE dtypes without an ONNX counterpart (DT_HIFLOAT8) are left out.
GE_TO_ONNX_TYPE: dict[str, str] = {
    "DT_FLOAT": "tensor(float)", "DT_FLOAT16": "tensor(float16)", "DT_BF16": "tensor(bfloat16)",
    "DT_INT8": "tensor(int8)", "DT_INT32": "tensor(int32)", "DT_INT64": "tensor(int64)",
    "DT_UINT64": "tensor(uint64)", "DT_BOOL": "tensor(bool)", "DT_INT4": "tensor(uint8)",
    "DT_FLOAT8_E5M2": "tensor(float8e5m2)", "DT_FLOAT8_E4M3FN": "tensor(float8e4m3fn)",
    "DT_FLOAT8_E8M0": "tensor(float8e8m0)",
}

def onnx_to_torch(elem_type: int) -> torch.dtype:
    """The torch dtype of an ONNX element type; ValueError for one moe_fusion never uses."""
    if elem_type not in ONNX_TO_TORCH:
        name = TensorProto.DataType.Name(elem_type)
        raise ValueError(f"moe_fusion.onnx: ONNX element type {name} has no torch dtype")
    return ONNX_TO_TORCH[elem_type]


def numpy_to_torch(array: np.ndarray) -> torch.Tensor:
    """A torch tensor with the values of a reference-evaluator array (bfloat16 arrays are
    ``ml_dtypes.bfloat16``, which torch cannot read directly), a copy with row-major strides:
    numpy gives an empty array strides 0, which kernels taking ``.contiguous()`` at its word fail on."""
    array = np.ascontiguousarray(array)
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.uint16)).clone(memory_format=torch.contiguous_format).view(torch.bfloat16)
    return torch.from_numpy(array).clone(memory_format=torch.contiguous_format)


def torch_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """The reference-evaluator array of a torch tensor (bfloat16 as ``ml_dtypes.bfloat16``)."""
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        return tensor.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()
