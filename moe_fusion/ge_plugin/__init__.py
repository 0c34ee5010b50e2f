"""GE plugin: the ops on Ascend through torchair (graph mode) and torch_npu (eager mode).

* ``register_converters()``: a GE converter for every op (``converters``, emitted from the
  torch<->GE table ``op_protos.ge_mapping``), registered with torchair when torchair is
  importable. Nothing here imports torchair or torch_npu otherwise.
* ``ir``: the GE IR definitions derived from the protos.
* ``register_npu_dispatch()``: NPU tensors call torch_npu's kernels (``npu_dispatch``).
* ``torchair_env``: torchair's Python layer without CANN, for tests and development.
* ``backend``: ``moe_fusion.torchair_backend()``, torchair's backend with the fusion passes.
"""
from __future__ import annotations

import importlib.util
import sys
from types import ModuleType
from typing import Optional

import torch

from ..op_protos import PROTOS
from .npu_dispatch import register_npu_dispatch, unregister_npu_dispatch

__all__ = ["register_converters", "register_npu_dispatch", "unregister_npu_dispatch"]


def importable_torchair() -> Optional[ModuleType]:
    """torchair if it is imported already or comes with an installed torch_npu, else None."""
    if "torchair" in sys.modules:
        return sys.modules["torchair"]
    if importlib.util.find_spec("torch_npu") is None:
        return None
    import torch_npu  # noqa: F401  (torchair lives in torch_npu)
    try:
        import torchair
    except ImportError:
        return None
    return torchair


def register_converters() -> bool:
    """Register the GE converter of every moe_fusion op with torchair; False (and nothing
    registered) when torchair is not importable. Idempotent: a later call re-registers the same
    converters."""
    torchair = importable_torchair()
    if torchair is None:
        return False
    from .converters import CONVERTERS

    for name in PROTOS:
        torchair.register_fx_node_ge_converter(getattr(torch.ops.moe_fusion, name).default)(CONVERTERS[name])
    return True
