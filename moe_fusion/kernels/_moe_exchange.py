"""Transport shared by the MoE dispatch and combine kernels.

Every EP all-to-all is one **count exchange** (equal splits, int64: a header of the sender's
attributes and error flag, then its per-destination counts) followed by one **payload exchange**
(``all_to_all_single`` with split sizes over a ``uint8`` buffer: each row packs its payload,
scales and metadata bytes side by side, so one collective moves everything a row needs).

The header lets every rank check, before any payload moves, that its peers agree on the
attributes that shape the payload, and learn whether any peer rejected its inputs: then every
rank raises together, instead of the healthy ones waiting forever in the next collective.

A group of one rank is never looked up and moves nothing (``group is None``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from ..errors import OpValidationError, fail
from ._groups import resolve_group

Tensor = torch.Tensor
DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3}


def group_or_none(op: str, arg: str, name: str, world: int, rank: int) -> Optional[dist.ProcessGroup]:
    """The process group named ``name``, or None for a world of one rank (no communication)."""
    return None if world == 1 else resolve_group(op, arg, name, world, rank)


# ---------------------------------------------------------------------------------------------
# Byte packing: rows of several dtypes side by side in one uint8 buffer.
# ---------------------------------------------------------------------------------------------

def pack_rows(parts: Sequence[Tensor]) -> Tensor:
    """``(N, B)`` uint8 with each part's row bytes side by side. Parts are ``(N, w_i)`` tensors."""
    return torch.cat([p.contiguous().view(torch.uint8) for p in parts], dim=1)


def unpack_rows(buf: Tensor, layout: Sequence[tuple[torch.dtype, int]]) -> list[Tensor]:
    """Inverse of ``pack_rows``: ``layout`` lists each part's ``(dtype, width in elements)``."""
    out, offset = [], 0
    for dtype, width in layout:
        nbytes = width * dtype.itemsize
        out.append(buf[:, offset:offset + nbytes].contiguous().view(dtype))
        offset += nbytes
    return out


def row_bytes(layout: Sequence[tuple[torch.dtype, int]]) -> int:
    return sum(width * dtype.itemsize for dtype, width in layout)


# ---------------------------------------------------------------------------------------------
# Count exchange with agreement, and payload exchange.
# ---------------------------------------------------------------------------------------------

def exchange_counts(group: Optional[dist.ProcessGroup], header: Sequence[int], counts: Tensor) -> tuple[Tensor, Tensor]:
    """Send ``header`` to every rank and ``counts[d]`` to rank ``d``.

    ``counts`` ``(W, C)`` int64. Returns ``headers`` ``(W, len(header))`` (row ``s`` = rank ``s``'s
    header) and ``recv`` ``(W, C)`` (row ``s`` = what rank ``s`` sent to this rank).
    """
    world = counts.size(0)
    head = torch.tensor(list(header), dtype=torch.int64, device=counts.device).expand(world, len(header))
    send = torch.cat([head, counts.to(torch.int64)], dim=1).contiguous()
    if group is None:
        recv = send
    else:
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv.view(-1), send.view(-1), group=group)
    return recv[:, :len(header)], recv[:, len(header):]


def exchange_rows(group: Optional[dist.ProcessGroup], buf: Tensor, send_splits: Tensor, recv_splits: Tensor) -> Tensor:
    """All-to-all of ``buf`` ``(N, B)`` uint8 rows: ``send_splits[d]`` consecutive rows go to rank ``d``."""
    if group is None:
        return buf
    out = buf.new_empty((int(recv_splits.sum()), buf.size(1)))
    dist.all_to_all_single(out, buf.contiguous(), output_split_sizes=recv_splits.tolist(),
                           input_split_sizes=send_splits.tolist(), group=group)
    return out


def any_error(group: Optional[dist.ProcessGroup], error: Optional[OpValidationError],
              device: torch.device) -> Tensor:
    """``(G,)`` int64 error flags of every rank of ``group`` (one all-gather), this rank's alone without a group."""
    flag = torch.tensor([int(error is not None)], dtype=torch.int64, device=device)
    if group is None:
        return flag
    flags = flag.new_empty(group.size())
    dist.all_gather_single(flags, flag, group=group)
    return flags


def raise_agreed(op: str, arg: str, error: Optional[OpValidationError], flags: Tensor) -> None:
    """Raise this rank's error, or a peer's verdict, so that every rank of the group stops together."""
    if error is not None:
        raise error
    bad = flags.nonzero()
    if bad.numel():
        fail(op, arg, "ranks must all accept their inputs",
             f"a rejection by rank {int(bad[0])} of {arg} or its TP peer (see that rank's error)")


def check_agreement(op: str, arg: str, names: Sequence[str], headers: Tensor, rank: int) -> None:
    """Every rank of the group must send the same header values (apart from per-rank fields,
    which callers leave out of ``names``): they shape the payload rows and their meaning."""
    mine = headers[rank]
    differs = (headers != mine).any(dim=0).nonzero()
    if differs.numel():
        column = int(differs[0])
        peer = int((headers[:, column] != mine[column]).nonzero()[0])
        fail(op, names[column], f"must be the same on every rank of {arg}",
             f"{int(mine[column])} on this rank, {int(headers[peer, column])} on rank {peer}")
