"""Zero-filled buffers for the kernels' outputs and accumulators."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch


def zeroed(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled tensor for a kernel's output or accumulator. On CPU a ``calloc`` buffer
    (numpy's zeros): the OS maps a large one's pages zero-filled when first touched (rows nobody
    writes cost nothing), and numpy asks for transparent huge pages from 4 MB on, which faults a
    fresh buffer in a fraction of the time 4 KB pages take. Elsewhere, and for empty tensors (numpy
    gives them stride 0), ``torch.zeros``."""
    nbytes = math.prod(shape) * dtype.itemsize
    if device.type != "cpu" or nbytes == 0:
        return torch.zeros(tuple(shape), dtype=dtype, device=device)
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(tuple(shape))
