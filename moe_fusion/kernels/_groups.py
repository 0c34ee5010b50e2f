"""Process groups named by strings, as in torch_npu and PyTorch's functional collectives.

A name is a ``ProcessGroup.group_name``, looked up with ``moe_fusion.groups.registered_group`` (the
one place that reads the c10d group registry). Only reference kernels resolve names; fake kernels
and GE converters never do (on an NPU the same strings are HCCL communicator names).
"""
from __future__ import annotations

from typing import Optional

import torch.distributed as dist

from ..errors import fail
from ..groups import registered_group


def resolve_group(op: str, arg: str, name: str, world_size: int, rank: Optional[int] = None) -> dist.ProcessGroup:
    """The group called ``name``, checked to have ``world_size`` ranks with this process at ``rank``
    (any rank when ``rank`` is None: ops without a rank argument)."""
    if not dist.is_available() or not dist.is_initialized():
        fail(op, arg, f"needs an initialized torch.distributed default group for a world of {world_size} ranks",
             "no process group")
    group = registered_group(name)
    if group is None:
        fail(op, arg, "must name a registered process group (ProcessGroup.group_name)", repr(name))
    if group.size() != world_size:
        fail(op, arg, f"must have {world_size} ranks (the world size argument)", f"group {name!r} of size {group.size()}")
    if rank is not None and group.rank() != rank:
        fail(op, arg, f"must hold this process at rank {rank} (the rank argument)",
             f"rank {group.rank()} in group {name!r}")
    return group
