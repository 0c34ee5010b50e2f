"""Loop-based oracles of the local (single-rank) operators, written from SPEC alone.

Each oracle is plain Python over Python ints and fp32 scalars: no vectorized torch, and nothing
imported from ``moe_fusion``. The kernels are tested against these.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch


def re_routing_oracle(tokens: torch.Tensor, expert_token_num_per_rank: torch.Tensor,
                      per_token_scales: Optional[torch.Tensor] = None):
    """``npu_moe_re_routing`` by SPEC §7.3.

    ``tokens`` ``(A, H)`` holds rank-major, expert-minor blocks of ``c[i][j]`` rows; the output is
    expert-major, rank-minor. Returns ``permute_tokens`` ``(A, H)`` (tokens dtype),
    ``permute_per_token_scales`` ``(A,)`` fp32 (zeros without scales: moe_fusion's documented
    choice for an output the device leaves undefined), ``permute_token_idx`` ``(A,)`` int32 and
    ``expert_token_num`` ``(E,)`` (counts dtype). Rows are copied one by one (a bit copy).
    """
    c = expert_token_num_per_rank.tolist()
    num_ranks = len(c)
    num_experts = expert_token_num_per_rank.shape[1]
    num_tokens = tokens.shape[0]

    def src_off(i, j):  # exclusive: all blocks of earlier ranks, then earlier experts of rank i
        return sum(c[ii][jj] for ii in range(i) for jj in range(num_experts)) + sum(c[i][jj] for jj in range(j))

    def dst_off(i, j):  # exclusive: all blocks of earlier experts, then earlier ranks of expert j
        return sum(c[ii][jj] for jj in range(j) for ii in range(num_ranks)) + sum(c[ii][j] for ii in range(i))

    idx = [None] * num_tokens
    for i in range(num_ranks):
        for j in range(num_experts):
            s, d = src_off(i, j), dst_off(i, j)
            for r in range(c[i][j]):
                idx[d + r] = s + r
    assert None not in idx, "counts do not cover every token"

    permute_tokens = torch.empty(tuple(tokens.shape), dtype=tokens.dtype)
    for d, s in enumerate(idx):
        permute_tokens[d] = tokens[s]
    permute_scales = torch.zeros(num_tokens, dtype=torch.float32)
    if per_token_scales is not None:
        src = per_token_scales.tolist()
        permute_scales = torch.tensor([src[s] for s in idx], dtype=torch.float32)
    counts = [sum(c[i][j] for i in range(num_ranks)) for j in range(num_experts)]
    return (permute_tokens, permute_scales, torch.tensor(idx, dtype=torch.int32).reshape(num_tokens),
            torch.tensor(counts, dtype=expert_token_num_per_rank.dtype).reshape(num_experts))


def update_expert_oracle(expert_ids: torch.Tensor, eplb_table: torch.Tensor, *,
                         expert_scales: Optional[torch.Tensor] = None, pruning_threshold: Optional[torch.Tensor] = None,
                         active_mask: Optional[torch.Tensor] = None, local_rank_id: int = -1, world_size: int = -1,
                         balance_mode: int = 0):
    """``npu_moe_update_expert`` by SPEC §2.3.

    ``eplb_table[l] = [count, inst_0, ...]``. Mode 0: replica ``local_rank_id // ceil(W / count)``;
    mode 1: replica ``token % count``; count 1: replica 0. Pruning (scales and threshold given):
    keep ``[i, j]`` iff ``scale[i, j] >= threshold[j] * sum_k scale[i, k]`` in fp32 (sequential
    sum), all False for an inactive token. Without pruning the mask is all True (moe_fusion's
    documented choice for an output the device leaves undefined).
    Returns ``(BS, K)`` ids (expert_ids dtype) and ``(BS, K)`` bool.
    """
    ids = expert_ids.tolist()
    table = eplb_table.tolist()
    bs, k = len(ids), len(ids[0])
    out = [[0] * k for _ in range(bs)]
    for i in range(bs):
        for j in range(k):
            row = table[ids[i][j]]
            count = row[0]
            if count == 1:
                replica = 0
            elif balance_mode == 0:
                mode_value = -(-world_size // count)  # ceil(W / count)
                replica = local_rank_id // mode_value
            else:
                replica = i % count
            out[i][j] = row[1 + replica]

    if expert_scales is None or pruning_threshold is None:
        mask = [[True] * k for _ in range(bs)]
    else:
        scales = [[np.float32(v) for v in row] for row in expert_scales.tolist()]  # fp16/bf16 -> fp32 is exact
        thr = [np.float32(v) for v in pruning_threshold.reshape(-1).tolist()[:k]]
        active = [True] * bs if active_mask is None else [bool(v) for v in active_mask.tolist()]
        mask = []
        for i in range(bs):
            if not active[i]:
                mask.append([False] * k)
                continue
            total = np.float32(0.0)
            for j in range(k):
                total = np.float32(total + scales[i][j])
            mask.append([bool(scales[i][j] >= np.float32(thr[j] * total)) for j in range(k)])
    return (torch.tensor(out, dtype=expert_ids.dtype).reshape(bs, k),
            torch.tensor(mask, dtype=torch.bool).reshape(bs, k))
