"""Reference kernel of ``npu_moe_re_routing`` (SPEC §7.3): one gather of the token rows."""
from __future__ import annotations

from typing import Optional

import torch

from ..op_protos.moe_re_routing import ReRoutingConfig, validate_values


def gather_index(counts: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Source row of each output row: rank-major/expert-minor blocks read expert-major/rank-minor.

    ``counts`` ``(N, E)`` integer; returns ``(A,)`` int64 with ``A = num_tokens = counts.sum()``.
    """
    c = counts.to(torch.int64)
    src_start = (torch.cumsum(c.reshape(-1), 0) - c.reshape(-1)).reshape(c.shape)   # exclusive, (i, j) order
    block_len = c.t().reshape(-1)                 # blocks in output (j, i) order
    block_src = src_start.t().reshape(-1)
    block_dst = torch.cumsum(block_len, 0) - block_len
    # out row r of block b reads src_start[b] + (r - dst_start[b]).
    shift = torch.repeat_interleave(block_src - block_dst, block_len, output_size=num_tokens)
    return shift + torch.arange(num_tokens, dtype=torch.int64, device=counts.device)


def moe_re_routing(config: ReRoutingConfig, tokens: torch.Tensor, expert_token_num_per_rank: torch.Tensor, *,
                   per_token_scales: Optional[torch.Tensor] = None,
                   **_: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``tokens`` ``(A, H)``, ``expert_token_num_per_rank`` ``(N, E)`` int32/int64 (its values are
    checked here), ``per_token_scales`` ``(A,)`` fp32 (or fp64); the other attrs have their one valid value.

    Returns ``permute_tokens`` ``(A, H)`` (tokens dtype), ``permute_per_token_scales`` ``(A,)``
    in the scales' dtype (fp32 zeros when no scales are given; the device leaves it undefined), ``permute_token_idx``
    ``(A,)`` int32 (gather index), ``expert_token_num`` ``(E,)`` (counts dtype)."""
    validate_values(config, expert_token_num_per_rank)
    num_tokens = config.num_tokens
    index = gather_index(expert_token_num_per_rank, num_tokens)
    # Contiguous like the fake kernel's output, whatever the layout of ``tokens``.
    permute_tokens = torch.empty_like(tokens, memory_format=torch.contiguous_format)
    torch.index_select(tokens, 0, index, out=permute_tokens)
    if per_token_scales is None:
        permute_scales = torch.zeros(num_tokens, dtype=config.scales_dtype, device=tokens.device)
    else:
        permute_scales = per_token_scales.index_select(0, index)
    expert_token_num = expert_token_num_per_rank.sum(0, dtype=expert_token_num_per_rank.dtype)
    return permute_tokens, permute_scales, index.to(torch.int32), expert_token_num
