"""Test-side shims to run DeepSpeed 0.19.8's MoE on CPU gloo ranks (no library file is patched).

* ``deepspeed.comm.torch.build_shm_op`` is stubbed: on the CPU accelerator, ``TorchBackend``
  JIT-builds its shared-memory all-reduce op (ninja + c++, minutes, under a lock the other ranks
  wait on). Accelerator users never run it, and dynamo cannot trace it.
* ``deepspeed.init_distributed`` adopts the gloo group ``moe_fusion.launch.run_ranks`` created.
* ``layer.set_deepspeed_parallelism()`` builds the expert-parallel group (``deepspeed.initialize``
  does it in a training script).
"""
from __future__ import annotations

import os
import sys

import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def init_deepspeed() -> None:
    """Make deepspeed.comm use this process's gloo group (call on every rank, once)."""
    import deepspeed
    import deepspeed.comm.torch  # noqa: F401  (``import deepspeed.comm.torch as m`` binds the torch package)

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)


def deepspeed_moe(expert: torch.nn.Module, hidden: int, experts: int, ep_size: int, seed: int, rank: int,
                  **options) -> torch.nn.Module:
    """``deepspeed.moe.layer.MoE(hidden, expert, experts, ep_size, **options)`` with its gate drawn
    from ``seed`` (the same on every rank), this rank's experts from ``seed + 1 + rank``, and its
    expert-parallel group built."""
    from deepspeed.moe.layer import MoE

    torch.manual_seed(seed)
    layer = MoE(hidden, expert, num_experts=experts, ep_size=ep_size, **options)
    gen = torch.Generator().manual_seed(seed + 1 + rank)
    with torch.no_grad():
        for p in layer.deepspeed_moe.experts.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    layer.set_deepspeed_parallelism()
    return layer
