"""Reference kernels, registered for every device (``CompositeExplicitAutograd``).

Each kernel is plain, vectorized torch code, so it runs on CPU and CUDA tensors alike. The
registered wrapper runs the proto's structural checks once (``check``, which returns the op's
config), then the kernel as ``kernel(config, *args, **kwargs)``. A dispatch/combine call that fails
those checks still joins its peers' agreement exchange with a rejection before raising
(``_moe_exchange.join_rejected``), so no peer waits for it until the process group's timeout. Kernels never validate the
structure again (they read sizes and modes from the config); each runs its op's value rules
(counts, ids: only eager mode sees them) once, where it reads those values.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from .. import meta
from ..errors import OpValidationError
from ..op_protos import PROTOS, OpProto
from ._moe_exchange import join_rejected
from .bmm_collectives import npu_alltoall_allgather_bmm, npu_bmm_reducescatter_alltoall
from .ffn import npu_ffn
from .ffn_grouped import npu_ffn_grouped
from .moe_distribute_combine import moe_distribute_combine_add_rms_norm, moe_distribute_combine_v2
from .moe_distribute_dispatch import moe_distribute_dispatch_v2
from .re_routing import moe_re_routing
from .update_expert import moe_update_expert

# name -> reference kernel, called as ``kernel(config, *args, **kwargs)`` with the op's arguments.
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


# Ops whose kernels start with the agreement exchange of ``_moe_exchange``.
AGREEING = frozenset({"npu_moe_distribute_dispatch_v2", "npu_moe_distribute_combine_v2",
                      "npu_moe_distribute_combine_add_rms_norm"})


def _checked(proto: OpProto[Any], compute: Callable[..., Any]) -> Callable[..., Any]:
    """The registered kernel: ``compute(proto.check(*args, **kwargs), *args, **kwargs)``."""
    def kernel(*args: Any, **kwargs: Any) -> Any:
        try:
            config = proto.check(*args, **kwargs)
        except OpValidationError as error:
            if proto.name in AGREEING:
                _join_rejected(proto, error, args, kwargs)
            raise
        return compute(config, *args, **kwargs)

    kernel.__name__ = f"{proto.name}_kernel"
    return kernel


def _join_rejected(proto: OpProto[Any], error: OpValidationError, args: tuple, kwargs: dict) -> None:
    """Join the peers' agreement exchange with ``error`` (then raise it), from the call's raw group
    arguments; a call whose arguments do not even bind has no group to join."""
    try:
        bound = proto.bind(args, kwargs)
    except TypeError:
        return
    join_rejected(proto.name, error, bound["group_ep"], bound["group_tp"], bound["tp_world_size"])


def _register_all() -> None:
    for name, proto in PROTOS.items():
        torch.library.impl(proto.qualname, "CompositeExplicitAutograd", _checked(proto, KERNELS[name]), lib=meta.LIBRARY)


_register_all()
