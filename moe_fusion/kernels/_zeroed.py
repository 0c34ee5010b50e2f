"""Zero-filled buffers for the kernels' outputs and accumulators."""
from __future__ import annotations

import math
import mmap
from typing import Sequence

import torch

# From this size on a buffer gets pages of its own (one transparent huge page: 2 MB on x86-64).
MAPPED_BYTES = 2 << 20


def zeroed(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled tensor for a kernel's output or accumulator.

    On CPU, from ``MAPPED_BYTES`` on, a fresh anonymous mapping (unmapped when the tensor is freed):
    the OS hands out its pages zero-filled when they are first touched, so rows nobody writes
    (dispatch's padding, often most of an output) cost nothing, and the mapping asks for
    transparent huge pages, which fault in a fraction of the time 4 KB pages take. Memory from the
    allocator would have to be cleared first: glibc's ``calloc`` clears the heap memory it reuses,
    which it does for buffers this size once a few have been freed (its adaptive mmap threshold).
    Elsewhere, and below that size, ``torch.zeros``."""
    nbytes = math.prod(shape) * dtype.itemsize
    if device.type != "cpu" or nbytes < MAPPED_BYTES:
        return torch.zeros(tuple(shape), dtype=dtype, device=device)
    pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):      # Linux only: elsewhere the mapping keeps small pages
        pages.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(pages, dtype=torch.uint8).view(dtype).view(tuple(shape))


def zero_past(written_rows: int, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of ``shape`` whose rows from ``written_rows`` on are zero, the rows before it left for
    the caller to write. Mostly unwritten (dispatch's padding): ``zeroed``, whose untouched pages
    cost nothing. Mostly written (every row counted): from the allocator, only the few rows past
    cleared, since faulting fresh pages in for the rows about to be written costs more."""
    if 2 * written_rows <= shape[0]:
        return zeroed(shape, dtype, device)
    out = torch.empty(tuple(shape), dtype=dtype, device=device)
    out[written_rows:].zero_()
    return out
