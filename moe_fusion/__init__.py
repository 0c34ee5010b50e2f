"""moe_fusion: Ascend MoE fused operators as ordinary PyTorch ops, and the compiler passes that
produce them.

``import moe_fusion`` defines ``torch.ops.moe_fusion.*`` with torch_npu's schemas, their fake
kernels and reference kernels for every device. It never needs torch_npu or torchair.
"""
from __future__ import annotations

from .errors import OpValidationError
from .functional import npu_ffn, npu_moe_re_routing, npu_moe_update_expert
from .functional import npu_alltoall_allgather_bmm, npu_bmm_reducescatter_alltoall
from .functional import (npu_moe_distribute_combine_add_rms_norm, npu_moe_distribute_combine_v2,
                         npu_moe_distribute_dispatch_v2)
from .int4 import pack_int4, unpack_int4
from .targets import get_target, set_target, target

__all__ = [
    "OpValidationError", "npu_ffn", "npu_moe_re_routing", "npu_moe_update_expert",
    "npu_alltoall_allgather_bmm", "npu_bmm_reducescatter_alltoall",
    "npu_moe_distribute_dispatch_v2", "npu_moe_distribute_combine_v2", "npu_moe_distribute_combine_add_rms_norm",
    "pack_int4", "unpack_int4", "get_target", "set_target", "target",
]
