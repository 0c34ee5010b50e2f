"""Public Python API: one function per operator, with torch_npu's signature.

Code written for torch_npu ports by replacing ``torch_npu.`` with ``moe_fusion.``. Each function
calls ``torch.ops.moe_fusion.<name>``, so it traces into graphs as one op.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from . import kernels  # noqa: F401  (registers the ops and their kernels)

Tensor = torch.Tensor


def npu_moe_re_routing(tokens: Tensor, expert_token_num_per_rank: Tensor, *, per_token_scales: Optional[Tensor] = None,
                       expert_token_num_type: int = 1, idx_type: int = 0,
                       tokens_dtype: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Regroup all-to-all output from rank-major to expert-major order (SPEC §7).

    Args:
        tokens: ``(A, H)`` fp16/bf16/int8 (fp32 on the portable target), rank-major blocks.
        expert_token_num_per_rank: ``(N, E)`` int32/int64; ``[i, j]`` rows of rank ``i`` for
            local expert ``j``; non-negative, summing to ``A``.
        per_token_scales: optional ``(A,)`` fp32, permuted like the tokens.
        expert_token_num_type: 1 (counts); the only mode the device implements.
        idx_type: 0 (gather index); the only mode the device implements.

    Returns:
        ``permute_tokens`` ``(A, H)`` (tokens dtype), expert-major; ``permute_per_token_scales``
        ``(A,)`` fp32 (zeros without ``per_token_scales``); ``permute_token_idx`` ``(A,)`` int32
        with ``permute_tokens == tokens[permute_token_idx]``; ``expert_token_num`` ``(E,)``
        rows per expert (counts dtype).
    """
    return torch.ops.moe_fusion.npu_moe_re_routing(
        tokens, expert_token_num_per_rank, per_token_scales=per_token_scales,
        expert_token_num_type=expert_token_num_type, idx_type=idx_type, tokens_dtype=tokens_dtype)


def npu_moe_update_expert(expert_ids: Tensor, eplb_table: Tensor, *, expert_scales: Optional[Tensor] = None,
                          pruning_threshold: Optional[Tensor] = None, active_mask: Optional[Tensor] = None,
                          local_rank_id: int = -1, world_size: int = -1, balance_mode: int = 0) -> Tuple[Tensor, Tensor]:
    """Map logical top-k experts to physical instances, optionally pruning (SPEC §2).

    Args:
        expert_ids: ``(BS, K)`` int32/int64 logical expert ids.
        eplb_table: ``(N_log, F)`` int32 rows ``[count, inst_0, ..., inst_{F-2}]``.
        expert_scales: ``(BS, K)`` fp32/fp16/bf16 top-k weights (pruning).
        pruning_threshold: ``(K,)`` or ``(1, K)`` fp32; slot ``j`` is kept iff
            ``scale[j] >= threshold[j] * sum(scale)``.
        active_mask: ``(BS,)`` bool; inactive tokens are pruned entirely.
        local_rank_id, world_size: this rank and the EP world size (balance_mode 0).
        balance_mode: 0 picks replica ``local_rank_id // ceil(W / count)``; 1 picks replica
            ``token_index % count``.

    Returns:
        ``balanced_expert_ids`` ``(BS, K)`` (expert_ids dtype) and ``balanced_active_mask``
        ``(BS, K)`` bool (all True without pruning).
    """
    return torch.ops.moe_fusion.npu_moe_update_expert(
        expert_ids, eplb_table, expert_scales=expert_scales, pruning_threshold=pruning_threshold,
        active_mask=active_mask, local_rank_id=local_rank_id, world_size=world_size, balance_mode=balance_mode)


def npu_ffn(x: Tensor, weight1: Tensor, weight2: Tensor, activation: str, *, expert_tokens: Optional[List[int]] = None,
            expert_tokens_index: Optional[List[int]] = None, bias1: Optional[Tensor] = None,
            bias2: Optional[Tensor] = None, scale: Optional[Tensor] = None, offset: Optional[Tensor] = None,
            deq_scale1: Optional[Tensor] = None, deq_scale2: Optional[Tensor] = None,
            antiquant_scale1: Optional[Tensor] = None, antiquant_scale2: Optional[Tensor] = None,
            antiquant_offset1: Optional[Tensor] = None, antiquant_offset2: Optional[Tensor] = None,
            inner_precise: Optional[int] = None, output_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Feed-forward block ``y = act(x @ W1 + b1) @ W2 + b2``, per expert when counts are given (SPEC §5).

    Args:
        x: ``(..., K1)`` fp16/bf16/int8 (fp32 on the portable target); ``M`` rows.
        weight1, weight2: ``(K1, N1)``, ``(K2, N2)``; ``(E, K1, N1)``, ``(E, K2, N2)`` with experts.
            int8 (quant/antiquant) or int4 packed in uint8 (antiquant, see ``moe_fusion.int4``).
        activation: fastgelu, gelu (tanh form), relu, silu, or GLU forms geglu/swiglu/reglu
            (``left * f(right)`` over the two halves of ``x @ W1``); case-insensitive.
        expert_tokens: rows per expert (contiguous segments of x in expert order).
        expert_tokens_index: cumulative segment ends instead of counts.
        bias1, bias2: ``(N1,)``/``(N2,)`` or ``(E, N1)``/``(E, N2)``; fp16 for fp16 x, fp32 for
            bf16/fp32 x, int32 for int8 x.
        scale, offset, deq_scale1, deq_scale2: quant parameters (int8 x).
        antiquant_scale1/2, antiquant_offset1/2: weight dequant parameters, per channel
            ``(.., N)`` or per group ``(.., G, N)``.
        inner_precise: 0 high precision (fp32 intermediate), 1 fp16 intermediate (fp16 only).
        output_dtype: fp16 or bf16 output for int8 x; ignored otherwise (as torch_npu does).

    Returns:
        ``y`` ``x.shape[:-1] + (N2,)``.
    """
    return torch.ops.moe_fusion.npu_ffn(
        x, weight1, weight2, activation, expert_tokens=expert_tokens, expert_tokens_index=expert_tokens_index,
        bias1=bias1, bias2=bias2, scale=scale, offset=offset, deq_scale1=deq_scale1, deq_scale2=deq_scale2,
        antiquant_scale1=antiquant_scale1, antiquant_scale2=antiquant_scale2, antiquant_offset1=antiquant_offset1,
        antiquant_offset2=antiquant_offset2, inner_precise=inner_precise, output_dtype=output_dtype)
