"""Process groups named by strings (``ProcessGroup.group_name``), as in torch_npu and PyTorch's
functional collectives: the one place a name is looked up in the c10d group registry.

Kernels, passes, the GE backend and the ONNX exporter all resolve names here. Fake kernels and GE
converters never do (on an NPU the same strings are HCCL communicator names).
"""
from __future__ import annotations

from typing import Optional

import torch.distributed as dist


class GroupPeerError(RuntimeError):
    """A collective of an operator failed because a peer of its group is gone (exited, stopped, or
    never called the op) or did not arrive within the process group's timeout. The message names
    the op, the group and the peer ranks that did not arrive, then the backend's own error."""


def registered_group(name: str) -> Optional[dist.ProcessGroup]:
    """The process group called ``name`` in this process, None when torch.distributed is not
    initialized or no group has that name."""
    if not name or not dist.is_available() or not dist.is_initialized():
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group

    try:
        return _resolve_process_group(name)
    except Exception:  # noqa: BLE001 - the registry raises several types for unknown names
        return None
