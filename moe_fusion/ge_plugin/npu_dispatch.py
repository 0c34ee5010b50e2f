"""NPU kernels of the ops torch_npu ships (``TORCH_NPU_OPS``): on ``PrivateUse1`` tensors each of
them calls ``torch_npu.<same name>`` with the same arguments, so CANN's kernels run instead of the
reference kernels. The other ops (the BMM pair, ``npu_ffn_grouped``) have no torch_npu op and keep
the reference kernel.

``register_npu_dispatch()`` is a no-op returning False when torch_npu is not importable.
"""
from __future__ import annotations

import importlib.util
import sys
from types import ModuleType
from typing import Any, Callable, Optional

import torch

from ..op_protos import PROTOS

# The torch_npu 2.13 ops with the same name and schema (SPEC §2-§7).
TORCH_NPU_OPS = frozenset({"npu_moe_re_routing", "npu_moe_update_expert", "npu_ffn", "npu_moe_distribute_dispatch_v2",
                           "npu_moe_distribute_combine_v2", "npu_moe_distribute_combine_add_rms_norm"})
NPU_OPS = tuple(name for name in PROTOS if name in TORCH_NPU_OPS)

_library: Optional[torch.library.Library] = None


def _torch_npu() -> Optional[ModuleType]:
    if "torch_npu" in sys.modules:  # imported already (or injected: find_spec needs a __spec__)
        return sys.modules["torch_npu"]
    if importlib.util.find_spec("torch_npu") is None:
        return None
    import torch_npu

    return torch_npu


def _forward(torch_npu: ModuleType, name: str) -> Callable[..., Any]:
    def kernel(*args: Any, **kwargs: Any) -> Any:
        return getattr(torch_npu, name)(*args, **kwargs)

    kernel.__name__ = f"{name}_torch_npu"
    return kernel


def register_npu_dispatch() -> bool:
    """Register the ``PrivateUse1`` kernels once; True if they are registered."""
    global _library
    if _library is not None:
        return True
    torch_npu = _torch_npu()
    if torch_npu is None:
        return False
    library = torch.library.Library("moe_fusion", "IMPL")
    for name in NPU_OPS:
        if hasattr(torch_npu, name):  # an older torch_npu may lack an op: it keeps the reference kernel
            library.impl(name, _forward(torch_npu, name), "PrivateUse1")
    _library = library
    return True


def unregister_npu_dispatch() -> None:
    """Drop the ``PrivateUse1`` kernels again (tests register them with a fake torch_npu)."""
    global _library
    if _library is not None:
        _library._destroy()
        _library = None
