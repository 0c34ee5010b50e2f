"""torch.library definitions of every moe_fusion op, and their fake (Meta) kernels.

Each op is defined in the ``moe_fusion`` namespace with torch_npu's schema from its proto. The
fake kernel is the proto's ``check`` (target + structural validation, once) followed by its
``infer_shape`` on the config ``check`` returns; it works on FakeTensors, meta tensors and
SymInts, so a bad call fails at trace time with the same error as in eager mode.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence, Union

import torch

from ..op_protos import PROTOS, OpProto, OutSpec

LIBRARY = torch.library.Library("moe_fusion", "DEF")


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError("moe_fusion op called without a tensor argument")


def allocate_outputs(specs: Sequence[OutSpec],
                     like: torch.Tensor) -> Union[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Empty outputs with the shapes and dtypes of ``specs`` (an ``infer_shape`` result), on
    ``like``'s device (a real, fake or meta tensor). A single tensor for one spec, else a tuple."""
    outs = tuple(like.new_empty(spec.shape, dtype=spec.dtype) for spec in specs)
    return outs[0] if len(outs) == 1 else outs


def _make_fake(proto: OpProto[Any]) -> Callable[..., Any]:
    def fake(*args: Any, **kwargs: Any) -> Any:
        return allocate_outputs(proto.infer_shape(proto.check(*args, **kwargs)), _first_tensor(args, kwargs))

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
