"""Zero-filled buffers for the kernels' outputs and accumulators."""
from __future__ import annotations

import math
import mmap
import os
import sys
import threading
from typing import Optional, Sequence

import torch
from torch.multiprocessing.reductions import StorageWeakRef

# From this size on a buffer gets pages of its own (one transparent huge page: 2 MB on x86-64).
MAPPED_BYTES = 2 << 20
# Mappings kept for reuse once their tensor is freed (``zero_past``): enough for the outputs of a
# few MoE layers in flight; beyond it a buffer is mapped afresh and unmapped when freed.
POOLED_MAPPINGS = 8
# From this size on glibc's allocator maps every buffer afresh (its largest dynamic mmap threshold,
# 32 MB on 64-bit): such a buffer mostly written would fault all its pages in on every call.
ALWAYS_MAPPED_BYTES = 32 << 20
# Linux's MADV_DONTNEED makes private anonymous pages read back as zeros (elsewhere it may not).
_CLEARS_BY_DROPPING = sys.platform.startswith("linux") and hasattr(mmap, "MADV_DONTNEED")


def _mapping(nbytes: int) -> mmap.mmap:
    """A fresh private anonymous mapping of ``nbytes`` (zero-filled pages, faulted in on first touch),
    asking for transparent huge pages, which fault in a fraction of the time 4 KB pages take."""
    pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):      # Linux only: elsewhere the mapping keeps small pages
        try:
            pages.madvise(mmap.MADV_HUGEPAGE)
        except OSError:                     # a kernel without transparent huge pages: small pages
            pass
    return pages


def _tensor(pages: mmap.mmap, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    return torch.frombuffer(pages, dtype=torch.uint8).view(dtype).view(tuple(shape))


def zeroed(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled tensor for a kernel's output or accumulator.

    On CPU, from ``MAPPED_BYTES`` on, a fresh anonymous mapping (unmapped when the tensor is freed):
    the OS hands out its pages zero-filled when they are first touched, so rows nobody writes
    (dispatch's padding, often most of an output) cost nothing. Memory from the allocator would have
    to be cleared first: glibc's ``calloc`` clears the heap memory it reuses, which it does for
    buffers this size once a few have been freed (its adaptive mmap threshold).
    Elsewhere, and below that size, ``torch.zeros``."""
    nbytes = math.prod(shape) * dtype.itemsize
    if device.type != "cpu" or nbytes < MAPPED_BYTES:
        return torch.zeros(tuple(shape), dtype=dtype, device=device)
    return _tensor(_mapping(nbytes), shape, dtype)


class _Pool:
    """Anonymous mappings that ``zero_past`` hands out again once the tensor built on one is freed.

    A reused mapping keeps its pages resident, so the rows the caller writes (the received rows of a
    dispatch, about the same count every step) cost no page faults, which on a loaded CPU cost more
    than the copy into them. Whatever the last user wrote, the rows past the written ones are
    cleared: a memset up to the next huge-page boundary, then MADV_DONTNEED, which drops the pages
    so that they read back as zeros and cost nothing until someone touches them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._mappings: list[tuple[mmap.mmap, StorageWeakRef]] = []   # (mapping, its last tensor's storage)

    def take(self, written_bytes: int, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        with self._lock:
            pages = self._free_mapping(nbytes)
            reused = pages is not None
            if pages is None:
                pages = _mapping(nbytes)
            out = _tensor(pages, shape, dtype)
            if reused or len(self._mappings) < POOLED_MAPPINGS:
                self._mappings.append((pages, StorageWeakRef(out.untyped_storage())))
        if reused:
            _clear_from(pages, out, written_bytes)
        return out

    def _free_mapping(self, nbytes: int) -> Optional[mmap.mmap]:
        """Removes and returns a pooled mapping of ``nbytes`` that no tensor uses any more; when the
        pool is full of other sizes, drops one no tensor uses to make room (it is unmapped)."""
        free = [i for i, (_, user) in enumerate(self._mappings) if user.expired()]
        for i in free:
            if len(self._mappings[i][0]) == nbytes:
                return self._mappings.pop(i)[0]
        if free and len(self._mappings) >= POOLED_MAPPINGS:
            self._mappings.pop(free[0])
        return None


def _clear_from(pages: mmap.mmap, view: torch.Tensor, start: int) -> None:
    """Bytes ``[start, len(pages))`` of the mapping ``view`` covers read as zeros afterwards."""
    base = view.data_ptr()
    boundary = min(len(pages), -(-(base + start) // MAPPED_BYTES) * MAPPED_BYTES - base)
    flat = view.view(-1).view(torch.uint8)
    flat[start:boundary].zero_()            # dropping part of a huge page would split it
    if boundary < len(pages):
        try:
            pages.madvise(mmap.MADV_DONTNEED, boundary, len(pages) - boundary)
        except OSError:                     # locked memory (mlockall) cannot be dropped: clear it instead
            flat[boundary:].zero_()


_POOL = _Pool()


def _empty_pool_in_child() -> None:
    """A forked child starts with an empty pool (its lock may have been held by a parent thread)."""
    global _POOL
    _POOL = _Pool()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_empty_pool_in_child)


def zero_past(written_rows: int, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of ``shape`` whose rows from ``written_rows`` on are zero, the rows before it left for
    the caller to write (it must write every one of them). Mostly unwritten (dispatch's padding): on
    CPU from ``MAPPED_BYTES`` on, a mapping from ``_Pool``, reused from an earlier call whose tensor
    is gone, or else fresh. Mostly written (every row counted): from the allocator, only the few rows
    past cleared, since faulting fresh pages in for the rows about to be written costs more; from
    ``ALWAYS_MAPPED_BYTES`` on from the pool too, since the allocator's are always fresh pages there
    (dispatch's ``expand_x`` over 2 ranks, 2100 of 4096 rows of 8 KB: 9.5 ms a call, 0.2 ms pooled)."""
    nbytes = math.prod(shape) * dtype.itemsize
    if 2 * written_rows <= shape[0] or nbytes >= ALWAYS_MAPPED_BYTES:
        if device.type != "cpu" or nbytes < MAPPED_BYTES or not _CLEARS_BY_DROPPING:
            return zeroed(shape, dtype, device)
        return _POOL.take(written_rows * (nbytes // max(shape[0], 1)), shape, dtype)
    out = torch.empty(tuple(shape), dtype=dtype, device=device)
    out[written_rows:].zero_()
    return out
