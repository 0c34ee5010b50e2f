"""torch.library definitions of every moe_fusion op, and their fake (Meta) kernels.

Each op is defined in the ``moe_fusion`` namespace with torch_npu's schema from its proto. The
fake kernel is the proto's ``check`` (target + structural validation) followed by its
``infer_shape``; it works on FakeTensors, meta tensors and SymInts, so a bad call fails at
trace time with the same error as in eager mode.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..op_protos import PROTOS, OpProto

LIBRARY = torch.library.Library("moe_fusion", "DEF")


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError("moe_fusion op called without a tensor argument")


def allocate_outputs(proto: OpProto, args: tuple, kwargs: dict) -> Any:
    """Empty outputs with the shapes and dtypes of ``proto.infer_shape``, on the inputs' device.

    Returns a single tensor for one-output ops, else a tuple.
    """
    anchor = _first_tensor(args, kwargs)
    outs = tuple(anchor.new_empty(spec.shape, dtype=spec.dtype) for spec in proto.infer_shape(*args, **kwargs))
    return outs[0] if len(outs) == 1 else outs


def _make_fake(proto: OpProto) -> Callable[..., Any]:
    def fake(*args: Any, **kwargs: Any) -> Any:
        proto.check(*args, **kwargs)
        return allocate_outputs(proto, args, kwargs)

    fake.__name__ = f"{proto.name}_fake"
    return fake


def _define_all() -> None:
    for proto in PROTOS.values():
        LIBRARY.define(proto.name + proto.schema)
        torch.library.register_fake(proto.qualname, _make_fake(proto), lib=LIBRARY)


_define_all()


def op_overload(name: str) -> torch._ops.OpOverload:
    """``torch.ops.moe_fusion.<name>.default``."""
    return getattr(torch.ops.moe_fusion, name).default
