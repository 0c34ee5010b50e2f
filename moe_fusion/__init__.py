"""moe_fusion: Ascend MoE fused operators as ordinary PyTorch ops, and the compiler passes that
produce them.

``import moe_fusion`` defines ``torch.ops.moe_fusion.*`` with torch_npu's schemas, their fake
kernels and reference kernels for every device. It never needs torch_npu or torchair.
"""
from __future__ import annotations

import importlib
from typing import Any

from .autograd import NotDifferentiableError
from .errors import OpValidationError
from .functional import npu_ffn, npu_ffn_grouped, npu_moe_re_routing, npu_moe_update_expert
from .functional import npu_alltoall_allgather_bmm, npu_bmm_reducescatter_alltoall
from .functional import (npu_moe_distribute_combine_add_rms_norm, npu_moe_distribute_combine_v2,
                         npu_moe_distribute_dispatch_v2)
from .ge_plugin import register_npu_dispatch
from .int4 import pack_int4, unpack_int4
from .targets import get_target, set_target, target

register_npu_dispatch()   # NPU tensors run CANN's kernels through torch_npu when it is installed

__all__ = [
    "OpValidationError", "NotDifferentiableError", "npu_ffn", "npu_ffn_grouped", "npu_moe_re_routing", "npu_moe_update_expert",
    "npu_alltoall_allgather_bmm", "npu_bmm_reducescatter_alltoall",
    "npu_moe_distribute_dispatch_v2", "npu_moe_distribute_combine_v2", "npu_moe_distribute_combine_add_rms_norm",
    "pack_int4", "unpack_int4", "get_target", "set_target", "target",
    "backend", "compile", "explain", "MoeFusionGraphPass", "FusionReport", "torchair_backend", "onnx",
]

_PASS_EXPORTS = ("backend", "compile", "explain", "MoeFusionGraphPass", "FusionReport")


def __getattr__(name: str) -> Any:
    # The passes import inductor and the ONNX package imports onnx: load them on first use, not with the ops.
    if name == "onnx":   # ``moe_fusion.onnx.export(...)`` after a plain ``import moe_fusion``, as with torch.onnx
        return importlib.import_module(".onnx", __name__)
    if name in _PASS_EXPORTS:
        from . import passes

        return getattr(passes, name)
    if name == "torchair_backend":   # the passes, and torchair when the backend is built
        from .ge_plugin.backend import torchair_backend

        return torchair_backend
    raise AttributeError(f"module 'moe_fusion' has no attribute {name!r}")
