"""Reference kernels, registered for every device (``CompositeExplicitAutograd``).

Each kernel is plain, vectorized torch code, so it runs on CPU and CUDA tensors alike. Before
computing, the registered wrapper runs the proto's structural checks and, where the op has
them, the checks that need tensor values (counts, ids), which only eager mode can see.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from .. import meta
from ..op_protos import PROTOS, OpProto
from .bmm_collectives import npu_alltoall_allgather_bmm, npu_bmm_reducescatter_alltoall
from .ffn import npu_ffn
from .ffn_grouped import npu_ffn_grouped
from .moe_distribute_combine import moe_distribute_combine_add_rms_norm, moe_distribute_combine_v2
from .moe_distribute_dispatch import moe_distribute_dispatch_v2
from .re_routing import moe_re_routing
from .update_expert import moe_update_expert

KERNELS: dict[str, Callable[..., Any]] = {
    "npu_moe_re_routing": moe_re_routing,
    "npu_moe_update_expert": moe_update_expert,
    "npu_ffn": npu_ffn,
    "npu_ffn_grouped": npu_ffn_grouped,
    "npu_alltoall_allgather_bmm": npu_alltoall_allgather_bmm,
    "npu_bmm_reducescatter_alltoall": npu_bmm_reducescatter_alltoall,
    "npu_moe_distribute_dispatch_v2": moe_distribute_dispatch_v2,
    "npu_moe_distribute_combine_v2": moe_distribute_combine_v2,
    "npu_moe_distribute_combine_add_rms_norm": moe_distribute_combine_add_rms_norm,
}


def _checked(proto: OpProto, compute: Callable[..., Any]) -> Callable[..., Any]:
    def kernel(*args: Any, **kwargs: Any) -> Any:
        proto.check(*args, **kwargs)
        if proto.validate_values is not None:
            proto.validate_values(*args, **kwargs)
        return compute(*args, **kwargs)

    kernel.__name__ = f"{proto.name}_kernel"
    return kernel


def _register_all() -> None:
    for name, proto in PROTOS.items():
        torch.library.impl(proto.qualname, "CompositeExplicitAutograd", _checked(proto, KERNELS[name]), lib=meta.LIBRARY)


_register_all()
