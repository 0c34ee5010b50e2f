"""Reference kernel of ``npu_moe_update_expert`` (SPEC §2.3), vectorized over all (token, slot)."""
from __future__ import annotations

from typing import Optional

import torch


def moe_update_expert(expert_ids: torch.Tensor, eplb_table: torch.Tensor, *,
                      expert_scales: Optional[torch.Tensor] = None, pruning_threshold: Optional[torch.Tensor] = None,
                      active_mask: Optional[torch.Tensor] = None, local_rank_id: int = -1, world_size: int = -1,
                      balance_mode: int = 0):
    """Returns ``balanced_expert_ids`` ``(BS, K)`` (expert_ids dtype) and ``balanced_active_mask``
    ``(BS, K)`` bool (all True without pruning, where the device leaves it undefined; SPEC §9 #2)."""
    bs, k = expert_ids.shape
    flat_ids = expert_ids.reshape(-1)
    table_width = eplb_table.size(1)
    # Rows no token uses may hold any count: clamp so mapping them stays in bounds.
    replica_count = eplb_table[:, 0].clamp(1, table_width - 1)
    if balance_mode == 0:
        # Every token of this rank uses the same replica of a logical expert: map per expert, then gather.
        block = (replica_count + (world_size - 1)).div_(replica_count, rounding_mode="floor")   # ceil(W / count)
        column = torch.div(local_rank_id, block, rounding_mode="floor").add_(1)  # <= count since local_rank_id < W
        mapped = eplb_table.gather(1, column.unsqueeze(1).long()).squeeze(1)
        out = mapped.index_select(0, flat_ids)
    else:
        counts = replica_count.index_select(0, flat_ids).long()
        token = torch.arange(bs, device=expert_ids.device).repeat_interleave(k)
        column = token % counts + 1                                           # count 1 -> column 1
        out = eplb_table.reshape(-1).index_select(0, flat_ids.long() * table_width + column)
    balanced_ids = out.reshape(bs, k).to(expert_ids.dtype)

    if expert_scales is None:
        return balanced_ids, torch.ones((bs, k), dtype=torch.bool, device=expert_ids.device)
    # Contiguous so the mask is laid out like the fake kernel's output, whatever the scales' strides.
    scales = expert_scales.float().contiguous()
    threshold = pruning_threshold.reshape(-1)[:k].float() * scales.sum(1, keepdim=True)
    keep = scales >= threshold
    if active_mask is not None:
        keep &= active_mask.unsqueeze(1)
    return balanced_ids, keep
