"""The operator registry: one proto module per operator, the single source of truth.

``PROTOS`` maps the torch_npu op name to its ``OpProto`` (generic in the config type its
``validate`` returns). Consumers (``meta``, ``kernels``, ``ge_plugin``, ``onnx``, ``passes``)
iterate over it; adding an operator means adding a module here and one entry in each consumer.
"""
from __future__ import annotations

from typing import Any

from . import alltoall_allgather_bmm, bmm_reducescatter_alltoall, ffn, moe_re_routing, moe_update_expert
from . import moe_distribute_combine_add_rms_norm, moe_distribute_combine_v2, moe_distribute_dispatch_v2
from . import ffn_grouped
from ._proto import GeAttr, GeInput, GeOutput, OpProto, OutSpec

PROTOS: dict[str, OpProto[Any]] = {p.name: p for p in (moe_re_routing.PROTO, moe_update_expert.PROTO, ffn.PROTO,
                                                       alltoall_allgather_bmm.PROTO, bmm_reducescatter_alltoall.PROTO)}

PROTOS.update({p.name: p for p in (moe_distribute_dispatch_v2.PROTO, moe_distribute_combine_v2.PROTO,
                                   moe_distribute_combine_add_rms_norm.PROTO)})
PROTOS[ffn_grouped.PROTO.name] = ffn_grouped.PROTO

__all__ = ["PROTOS", "OpProto", "OutSpec", "GeInput", "GeAttr", "GeOutput"]
