"""Reference kernel of ``npu_moe_update_expert`` (SPEC §2.3), vectorized over all (token, slot).

balance_mode 0 maps each logical expert once (every token of this rank picks the same replica of
it) and then gathers the map by id; balance_mode 1 picks a replica per token.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch

from ..op_protos.moe_update_expert import UpdateExpertConfig, validate_values


@lru_cache(maxsize=16)
def _column_of_count(world_size: int, local_rank_id: int, size: int, device: torch.device) -> torch.Tensor:
    """balance_mode 0: ``(size,)`` int64, entry ``c`` the eplb_table column this rank uses for a row of
    replica count ``c``: ``1 + local_rank_id // ceil(world_size / c)`` (``<= c`` since
    ``local_rank_id < world_size``), computed in int64; entry 0 is never read.

    ``size = min(F, world_size + 1)``: a count ``c >= world_size`` picks the column of
    ``c = world_size`` (``ceil(world_size / c) = 1``), so the kernel clamps counts to ``world_size``
    and the table never outgrows the world (at most ``2**16 + 1`` entries, validate's bound), however
    wide eplb_table is. Cached: one table per (world, rank) replaces a per-row division chain."""
    count = torch.arange(size, dtype=torch.int64, device=device).clamp_(min=1)
    span = torch.div(count + (world_size - 1), count, rounding_mode="floor")    # ceil(world_size / c)
    return torch.div(torch.full_like(count, local_rank_id), span, rounding_mode="floor").add_(1)


@lru_cache(maxsize=64)
def _row_starts(num_rows: int, table_width: int, device: torch.device) -> torch.Tensor:
    """``(N_log,)`` int64 flat offset of each eplb_table row: ``row * F``."""
    return torch.arange(0, num_rows * table_width, table_width, dtype=torch.int64, device=device)


def moe_update_expert(config: UpdateExpertConfig, expert_ids: torch.Tensor, eplb_table: torch.Tensor, *,
                      expert_scales: Optional[torch.Tensor] = None, pruning_threshold: Optional[torch.Tensor] = None,
                      active_mask: Optional[torch.Tensor] = None, **_: object) -> tuple[torch.Tensor, torch.Tensor]:
    """``expert_ids`` ``(BS, K)`` int32/int64, ``eplb_table`` ``(N_log, F)`` int32 (ids in range and
    used rows' counts in ``[1, F-1]``, checked here). Returns ``balanced_expert_ids``
    ``(BS, K)`` (expert_ids dtype) and ``balanced_active_mask`` ``(BS, K)`` bool (all True without
    pruning, where the device leaves it undefined; SPEC §9 #2)."""
    bs, k, width = config.num_tokens, config.top_k, config.table_width
    device = expert_ids.device
    flat_ids = expert_ids.reshape(-1)
    replica_count = validate_values(config, flat_ids, eplb_table.select(1, 0))
    if config.balance_mode == 0:
        world = config.world_size
        if width - 1 > world:
            replica_count = replica_count.clamp(max=world)                  # same column as count == world
        columns = _column_of_count(world, config.local_rank_id, min(width, world + 1), device)
        positions = columns.index_select(0, replica_count).add_(_row_starts(config.num_logical, width, device))
        mapped = torch.take(eplb_table, positions)                          # (N_log,) this rank's instance
        if mapped.dtype != config.ids_dtype:
            mapped = mapped.to(config.ids_dtype)
        balanced_ids = mapped.index_select(0, flat_ids).view(bs, k)
    else:
        counts = replica_count.index_select(0, flat_ids).view(bs, k)
        token = torch.arange(bs, device=device).unsqueeze(1)
        column = torch.remainder(token, counts).add_(1)                     # (BS, K) int64; count 1 -> column 1
        positions = column.add_(flat_ids.view(bs, k) * width)
        balanced_ids = torch.take(eplb_table, positions).to(config.ids_dtype)

    if expert_scales is None:
        return balanced_ids, torch.ones((bs, k), dtype=torch.bool, device=device)
    # Contiguous so the mask is laid out like the fake kernel's output, whatever the scales' strides.
    scales = expert_scales.float().contiguous()
    threshold = pruning_threshold.reshape(-1)[:k].float() * scales.sum(1, keepdim=True)
    keep = scales >= threshold
    if active_mask is not None:
        keep &= active_mask.unsqueeze(1)
    return balanced_ids, keep
