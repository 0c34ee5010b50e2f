"""Test-side shim to import torchtitan's MoE on a CPU-only machine (never in model code).

``torchtitan.models.common.token_dispatcher`` imports ``torchtitan.distributed.minimal_async_ep``,
whose kernels import Triton (GPU-only, not installable here) for its symmetric-memory EP
dispatcher. The local and all-to-all dispatchers the tests use never call it: the module is
replaced by a stub whose entry points raise if called.

``torchtitan.tools.utils.device_type`` falls back to ``"cuda"`` when no accelerator is present, and
its device meshes and ``distribute_tensor`` then move every tensor to CUDA: ``install`` sets it to
the CPU before any other torchtitan module imports it.
"""
from __future__ import annotations

import sys
import types

MODULE = "torchtitan.distributed.minimal_async_ep"


def _needs_triton(*_: object, **__: object) -> None:
    raise RuntimeError("torchtitan's MinimalAsyncEP dispatcher needs Triton and symmetric memory (GPU only)")


class MinimalAsyncEPDispatchMetadata:
    """Stands in for the stubbed module's metadata class (only named in type annotations)."""


def install() -> None:
    """Register the stub and the CPU device before the first ``import torchtitan.models``."""
    if MODULE in sys.modules:
        return
    import torch
    import torchtitan.tools.utils as tools

    tools.device_type, tools.device_module = "cpu", torch.cpu
    stub = types.ModuleType(MODULE)
    stub.combine_op = stub.dispatch_op = stub.init_buffer = _needs_triton
    stub.MinimalAsyncEPDispatchMetadata = MinimalAsyncEPDispatchMetadata
    sys.modules[MODULE] = stub
