"""The operator registry: one proto module per operator, the single source of truth.

``PROTOS`` maps the torch_npu op name to its ``OpProto``. Consumers (``meta``, ``kernels``,
``ge_plugin``, ``onnx``, ``passes``) iterate over it; adding an operator means adding a module
here and one entry in each consumer.
"""
from __future__ import annotations

from . import ffn, moe_re_routing, moe_update_expert
from ._proto import GeAttr, GeInput, GeOutput, OpProto, OutSpec

PROTOS: dict[str, OpProto] = {p.name: p for p in (moe_re_routing.PROTO, moe_update_expert.PROTO, ffn.PROTO)}

__all__ = ["PROTOS", "OpProto", "OutSpec", "GeInput", "GeAttr", "GeOutput"]
