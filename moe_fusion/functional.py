"""Public Python API: one function per operator, with torch_npu's signature.

Code written for torch_npu ports by replacing ``torch_npu.`` with ``moe_fusion.``. Each function
calls ``torch.ops.moe_fusion.<name>``, so it traces into graphs as one op.
"""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch

from . import kernels  # noqa: F401  (registers the ops and their kernels)
from .op_protos.alltoall_allgather_bmm import act_type_code

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


def npu_ffn_grouped(x: Tensor, weight1: Tensor, weight2: Tensor, activation: str, *, expert_tokens: Tensor,
                    bias1: Optional[Tensor] = None, bias2: Optional[Tensor] = None,
                    inner_precise: Optional[int] = None, tokens_index_flag: bool = False) -> Tensor:
    """Per-expert FFN whose expert row counts are a device tensor (GE ``FFN``, see ``op_protos.ffn_grouped``).

    Feed it ``npu_moe_distribute_dispatch_v2``'s ``expand_x`` and ``expert_token_nums`` in a static
    graph: no host read of the counts, no data-dependent shapes.

    Args:
        x: ``(M, K1)`` fp16/bf16 (fp32 on the portable target).
        weight1, weight2: ``(E, K1, N1)``, ``(E, K2, N2)`` in x's dtype.
        activation: as ``npu_ffn`` (GLU forms on the portable target only).
        expert_tokens: ``(E,)`` int64 rows per expert (cumulative ends with ``tokens_index_flag``),
            covering the first ``sum <= M`` rows in expert order.
        bias1, bias2: ``(E, N1)``, ``(E, N2)``; fp16 for fp16 x, fp32 otherwise.
        inner_precise: 0 high precision, 1 fp16 intermediate (fp16 only).
        tokens_index_flag: ``expert_tokens`` holds cumulative ends instead of counts.

    Returns:
        ``y`` ``(M, N2)`` in x's dtype; rows past the counted ones are zero.
    """
    return torch.ops.moe_fusion.npu_ffn_grouped(
        x, weight1, weight2, activation, expert_tokens=expert_tokens, bias1=bias1, bias2=bias2,
        inner_precise=inner_precise, tokens_index_flag=tokens_index_flag)


def npu_alltoall_allgather_bmm(x: Tensor, weight: Tensor, group_ep: str, group_ep_worldsize: int, group_tp: str,
                               group_tp_worldsize: int, *, bias: Optional[Tensor] = None, shard_type: int = 0,
                               act_type: Union[int, str] = 0, need_allgather_out: bool = False,
                               need_activation_feature: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """All-to-all over EP, all-gather over TP, then a batch matmul per local expert (+ bias, + activation)
    (SPEC §6, aclnnAlltoAllAllGatherBatchMatMul; MindSpeed's torch signature).

    ``y2 = gather(x)``; ``y3 = round(round(y2 @ weight) + bias)`` (fp32 math, rounded to x's dtype
    at each step); ``y1 = round(act(y3))``, or ``y3`` without an activation.

    Args:
        x: ``(E, C, H/tp)`` (shard_type 0) or ``(E, C/tp, H)`` (shard_type 1); fp16/bf16 (fp32 on the
            portable target). Chunk ``p`` of ``E/ep`` experts goes to EP rank ``p``.
        weight: ``(E/ep, H, M/tp)``, x's dtype. A transpose view of a contiguous ``(E/ep, M/tp, H)``
            tensor is aclnn's transposed weight: same meaning, nothing else to pass.
        group_ep, group_ep_worldsize: the EP process group's name (``ProcessGroup.group_name``) and size.
        group_tp, group_tp_worldsize: the TP group's name (not group_ep's) and size. A size-1
            group is never looked up. Sizes 2/4/8/16/32 on A3.
        bias: optional ``(E/ep, 1, M/tp)`` or ``(E/ep, M/tp)``; fp16 for fp16 x, fp32 for bf16/fp32 x.
        shard_type: 0 gathers H (``H = tp * x.size(2)``), 1 gathers C (rows of TP peers interleave
            per EP peer: row ``(p*tp + q)*C/tp + c``).
        act_type: 0/"None", 1/"GeLu" (erf form), 2/"SiLu", 3/"ReLu", 4/"FastGeLu"
            (``z / (1 + exp(-1.702 z))``); names are case-insensitive.
        need_allgather_out: return the gathered ``y2``.
        need_activation_feature: return the pre-activation ``y3`` (needs ``act_type != 0``).

    Returns:
        ``y1`` ``(E/ep, rows, M/tp)``, ``y2`` ``(E/ep, rows, H)`` and ``y3`` ``(E/ep, rows, M/tp)``,
        all in x's dtype, with ``rows = ep*C``; ``y2``/``y3`` are ``(0, 0, 0)`` unless requested.
    """
    return torch.ops.moe_fusion.npu_alltoall_allgather_bmm(
        x, weight, group_ep, group_ep_worldsize, group_tp, group_tp_worldsize, bias=bias, shard_type=shard_type,
        act_type=act_type_code(act_type), need_allgather_out=need_allgather_out,
        need_activation_feature=need_activation_feature)


def npu_bmm_reducescatter_alltoall(x: Tensor, weight: Tensor, group_ep: str, group_ep_worldsize: int, group_tp: str,
                                   group_tp_worldsize: int, *, bias: Optional[Tensor] = None,
                                   shard_type: int = 0) -> Tensor:
    """Batch matmul per local expert, reduce-scatter (sum) over TP, + bias, all-to-all over EP: the
    reverse and exact adjoint of ``npu_alltoall_allgather_bmm`` (SPEC §6).

    Args:
        x: ``(E/ep, ep*C, M/tp)`` fp16/bf16 (fp32 on the portable target); with shard_type 1,
            ``C % tp == 0``.
        weight: ``(E/ep, M/tp, H)``, x's dtype (a transpose view of a contiguous ``(E/ep, H, M/tp)``
            tensor is aclnn's transposed weight).
        group_ep, group_ep_worldsize, group_tp, group_tp_worldsize: as in ``npu_alltoall_allgather_bmm``.
        bias: optional ``(E/ep, 1, H/tp)``/``(E/ep, H/tp)`` (shard_type 0) or ``(E/ep, 1, H)``/``(E/ep, H)``
            (shard_type 1), added after the reduce-scatter; fp16 for fp16 x, fp32 for bf16/fp32 x.
        shard_type: 0 scatters H over TP, 1 scatters C.

    Returns:
        ``y`` ``(E, C, H/tp)`` (shard_type 0) or ``(E, C/tp, H)`` (shard_type 1), x's dtype; expert
        ``p*E/ep + e`` holds EP rank ``p``'s local expert ``e``.
    """
    return torch.ops.moe_fusion.npu_bmm_reducescatter_alltoall(
        x, weight, group_ep, group_ep_worldsize, group_tp, group_tp_worldsize, bias=bias, shard_type=shard_type)


def npu_moe_distribute_dispatch_v2(
        x: Tensor, expert_ids: Tensor, group_ep: str, ep_world_size: int, ep_rank_id: int, moe_expert_num: int, *,
        scales: Optional[Tensor] = None, x_active_mask: Optional[Tensor] = None,
        expert_scales: Optional[Tensor] = None, elastic_info: Optional[Tensor] = None,
        performance_info: Optional[Tensor] = None, group_tp: str = "", tp_world_size: int = 0, tp_rank_id: int = 0,
        expert_shard_type: int = 0, shared_expert_num: int = 1, shared_expert_rank_num: int = 0, quant_mode: int = 0,
        global_bs: int = 0, expert_token_nums_type: int = 1, comm_alg: str = "", zero_expert_num: int = 0,
        copy_expert_num: int = 0, const_expert_num: int = 0, y_dtype: Optional[int] = None,
        x_dtype: Optional[int] = None, scales_dtype: Optional[int] = None
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Send each token to its top-k experts' ranks over EP, then all-gather over TP (SPEC §3).

    ``W = ep_world_size``, ``S = shared_expert_rank_num``, ``M = moe_expert_num``; MoE expert
    ``e`` lives on rank ``S + e // L`` with ``L = M / (W - S)`` local experts per MoE rank; shared
    expert ``q`` on ranks ``[q*S/n_sh, (q+1)*S/n_sh)``. ``A`` is the receive capacity:
    ``global_bs_real * min(L, K)`` on a MoE rank, ``(global_bs_real / W) * ceil(W / (S / n_sh))`` on a
    shared rank, ``global_bs_real = global_bs or BS * W``.

    Args:
        x: ``(BS, H)`` bf16/fp16 (fp32 on the portable target) tokens.
        expert_ids: ``(BS, K)`` int32 top-k ids, unique per row, in ``[0, M + zero + copy + const)``;
            ids ``>= M`` (zero/copy/const experts) are not sent (combine computes them locally).
        group_ep: EP process group name (``ProcessGroup.group_name``); unused when ``W == 1``.
        ep_world_size, ep_rank_id: ``W`` and this rank in the EP group.
        moe_expert_num: ``M``.
        scales: ``(n_sh + M, H)`` fp32 smooth scales (``quant_mode`` 2 only); row ``n_sh + e`` for
            MoE expert ``e``, row ``q`` for shared expert ``q``.
        x_active_mask: ``(BS,)`` bool True-prefix (tokens) or ``(BS, K)`` bool (slots).
        expert_scales: ``(BS, K)`` fp32 top-k weights, forwarded into ``expand_scales``.
        elastic_info: ``(4 + 2W,)`` int32; scale-down (``elastic_info[0] != 0``) is not supported.
        performance_info: ``(W,)`` int64, left unchanged (no timings to report).
        group_tp, tp_world_size, tp_rank_id: TP group (``T == 2`` needs one local expert).
        expert_shard_type: 0 (shared-expert ranks first).
        shared_expert_num, shared_expert_rank_num: ``n_sh`` shared experts on ``S`` ranks.
        quant_mode: 0 (send as is) or 2 (dynamic int8 per copy).
        global_bs: 0 (same BS everywhere) or ``max BS * W``.
        expert_token_nums_type: 1 counts, 0 inclusive prefix sums.
        comm_alg: communication algorithm name (the layout is the same for every value).
        zero_expert_num, copy_expert_num, const_expert_num: special experts after the MoE ids.
        y_dtype, x_dtype, scales_dtype: None (fp8/fp4 variants are not supported).

    Returns:
        ``expand_x`` ``(max(T,1)*A, H)``, int8 with ``quant_mode`` 2 else the x dtype: received rows
        local-expert-major, source-rank-minor, token order kept; with TP the peer's rows follow ours.
        ``dynamic_scales`` fp32 ``(A,)`` (``(2A,)`` with TP): ``1 / ds`` per row (quant_mode 2).
        ``assist_info_for_combine`` int32 ``(max(BS*K, 128*A),)``: ``(source rank, token, slot)`` at
        ``[3*row, 3*row+3)`` for own rows (slot ``K + q`` for shared expert ``q``).
        ``expert_token_nums`` int64 ``(L,)``: rows per local expert (TP: own + peer).
        ``ep_recv_counts`` int32 ``(W*L*(2 if T == 2 else 1),)`` (Meta's longer length with
        ``expert_scales``): inclusive prefix sums over (local expert, source); the peer's at ``[W:2W]``.
        ``tp_recv_counts`` int32 ``(T,)``: rows of TP rank 0 and 1.
        ``expand_scales`` fp32 ``(A,)`` with ``expert_scales`` (the copy's weight; 0 for shared rows), else ``(0,)``.
        Every entry not described here (padding rows, buffer tails) is zero.
    """
    return torch.ops.moe_fusion.npu_moe_distribute_dispatch_v2(
        x, expert_ids, group_ep, ep_world_size, ep_rank_id, moe_expert_num, scales=scales,
        x_active_mask=x_active_mask, expert_scales=expert_scales, elastic_info=elastic_info,
        performance_info=performance_info, group_tp=group_tp, tp_world_size=tp_world_size, tp_rank_id=tp_rank_id,
        expert_shard_type=expert_shard_type, shared_expert_num=shared_expert_num,
        shared_expert_rank_num=shared_expert_rank_num, quant_mode=quant_mode, global_bs=global_bs,
        expert_token_nums_type=expert_token_nums_type, comm_alg=comm_alg, zero_expert_num=zero_expert_num,
        copy_expert_num=copy_expert_num, const_expert_num=const_expert_num, y_dtype=y_dtype, x_dtype=x_dtype,
        scales_dtype=scales_dtype)


def npu_moe_distribute_combine_v2(
        expand_x: Tensor, expert_ids: Tensor, assist_info_for_combine: Tensor, ep_send_counts: Tensor,
        expert_scales: Tensor, group_ep: str, ep_world_size: int, ep_rank_id: int, moe_expert_num: int, *,
        tp_send_counts: Optional[Tensor] = None, x_active_mask: Optional[Tensor] = None,
        expand_scales: Optional[Tensor] = None, shared_expert_x: Optional[Tensor] = None,
        elastic_info: Optional[Tensor] = None, ori_x: Optional[Tensor] = None,
        const_expert_alpha_1: Optional[Tensor] = None, const_expert_alpha_2: Optional[Tensor] = None,
        const_expert_v: Optional[Tensor] = None, performance_info: Optional[Tensor] = None, group_tp: str = "",
        tp_world_size: int = 0, tp_rank_id: int = 0, expert_shard_type: int = 0, shared_expert_num: int = 1,
        shared_expert_rank_num: int = 0, global_bs: int = 0, comm_quant_mode: int = 0, comm_alg: str = "",
        zero_expert_num: int = 0, copy_expert_num: int = 0, const_expert_num: int = 0) -> Tensor:
    """Return expert outputs to their tokens and sum them with the top-k weights (SPEC §4).

    ``out[i] = sum_j w[i,j] * E_j(x_i) + sum_q shared_q(x_i) + shared_expert_x[i]`` in fp32, rounded
    to the ``expand_x`` dtype, where ``E_j`` is the routed expert's row, 0 for a zero expert,
    ``ori_x[i]`` for a copy expert and ``ori_x[i] * alpha_1[c] + v[c] * alpha_2[c]`` for const
    expert ``c``; shared experts and ``shared_expert_x`` are unweighted.

    Args:
        expand_x: ``(max(T,1)*A, H)`` bf16/fp16 (fp32 on portable): dispatch's rows after the experts.
        expert_ids: ``(BS, K)`` int32, as given to dispatch.
        assist_info_for_combine, ep_send_counts: dispatch's ``assist_info_for_combine`` (int32
            1-D) and ``ep_recv_counts`` (int32 1-D).
        expert_scales: ``(BS, K)`` fp32 top-k weights.
        group_ep, ep_world_size, ep_rank_id, moe_expert_num: as for dispatch.
        tp_send_counts: dispatch's ``tp_recv_counts`` ``(T,)`` int32; required with ``T == 2``.
        x_active_mask: as for dispatch; masked-out slots contribute nothing, masked-out tokens give 0.
        expand_scales: dispatch's ``expand_scales`` (accepted; weights come from ``expert_scales``).
        shared_expert_x: ``(BS, H)`` or ``(a, b, H)`` with ``a*b = BS``, expand_x dtype.
        elastic_info: ``(4 + 2W,)`` int32 without scale-down.
        ori_x: ``(BS, H)`` expand_x dtype, the tokens before dispatch (copy/const experts).
        const_expert_alpha_1, const_expert_alpha_2: ``(Q,)`` or ``(Q, H)``; const_expert_v ``(Q, H)``.
        performance_info: ``(W,)`` int64, left unchanged.
        comm_quant_mode: 0, or 2 (int8 per 8 elements on the return route; ``T < 2``).
        other attrs: as for dispatch, identical to the paired dispatch.

    Returns:
        ``(BS, H)`` in the expand_x dtype; rows of unprocessed (masked-out) tokens are zero.
    """
    return torch.ops.moe_fusion.npu_moe_distribute_combine_v2(
        expand_x, expert_ids, assist_info_for_combine, ep_send_counts, expert_scales, group_ep, ep_world_size,
        ep_rank_id, moe_expert_num, tp_send_counts=tp_send_counts, x_active_mask=x_active_mask,
        expand_scales=expand_scales, shared_expert_x=shared_expert_x, elastic_info=elastic_info, ori_x=ori_x,
        const_expert_alpha_1=const_expert_alpha_1, const_expert_alpha_2=const_expert_alpha_2,
        const_expert_v=const_expert_v, performance_info=performance_info, group_tp=group_tp,
        tp_world_size=tp_world_size, tp_rank_id=tp_rank_id, expert_shard_type=expert_shard_type,
        shared_expert_num=shared_expert_num, shared_expert_rank_num=shared_expert_rank_num, global_bs=global_bs,
        comm_quant_mode=comm_quant_mode, comm_alg=comm_alg, zero_expert_num=zero_expert_num,
        copy_expert_num=copy_expert_num, const_expert_num=const_expert_num)


def npu_moe_distribute_combine_add_rms_norm(
        expand_x: Tensor, expert_ids: Tensor, expand_idx: Tensor, ep_send_counts: Tensor, expert_scales: Tensor,
        residual_x: Tensor, gamma: Tensor, group_ep: str, ep_world_size: int, ep_rank_id: int, moe_expert_num: int,
        *, tp_send_counts: Optional[Tensor] = None, x_active_mask: Optional[Tensor] = None,
        activation_scale: Optional[Tensor] = None, weight_scale: Optional[Tensor] = None,
        group_list: Optional[Tensor] = None, expand_scales: Optional[Tensor] = None,
        shared_expert_x: Optional[Tensor] = None, elastic_info: Optional[Tensor] = None,
        ori_x: Optional[Tensor] = None, const_expert_alpha_1: Optional[Tensor] = None,
        const_expert_alpha_2: Optional[Tensor] = None, const_expert_v: Optional[Tensor] = None, group_tp: str = "",
        tp_world_size: int = 0, tp_rank_id: int = 0, expert_shard_type: int = 0, shared_expert_num: int = 1,
        shared_expert_rank_num: int = 0, global_bs: int = 0, out_dtype: int = 0, comm_quant_mode: int = 0,
        group_list_type: int = 0, comm_alg: str = "", norm_eps: float = 1e-06, zero_expert_num: int = 0,
        copy_expert_num: int = 0, const_expert_num: int = 0) -> Tuple[Tensor, Tensor, Tensor]:
    """Combine (as ``npu_moe_distribute_combine_v2``), then residual add and RmsNorm (SPEC §4.3).

    ``x = combine + residual_x`` (the combine sum is not rounded before the add);
    ``rstd = 1 / sqrt(mean(x^2) + norm_eps)``; ``y = round(round(x * rstd) * gamma)``.
    A3 (and portable) only.

    Args:
        expand_x, expert_ids, ep_send_counts, expert_scales, ...: as for combine_v2; ``expand_x``
            bf16 on A3 (bf16/fp16/fp32 on portable).
        expand_idx: dispatch's ``assist_info_for_combine``.
        residual_x: ``(BS, 1, H)``, expand_x dtype.
        gamma: ``(H,)``, expand_x dtype.
        activation_scale, weight_scale, group_list: reserved, must be None.
        out_dtype, group_list_type: reserved, must be 0.
        norm_eps: RmsNorm epsilon.

    Returns:
        ``y`` ``(BS, 1, H)``, ``rstd`` ``(BS, 1, 1)`` fp32, ``x`` ``(BS, 1, H)`` (expand_x dtype);
        all zero for unprocessed (masked-out) tokens.
    """
    return torch.ops.moe_fusion.npu_moe_distribute_combine_add_rms_norm(
        expand_x, expert_ids, expand_idx, ep_send_counts, expert_scales, residual_x, gamma, group_ep,
        ep_world_size, ep_rank_id, moe_expert_num, tp_send_counts=tp_send_counts, x_active_mask=x_active_mask,
        activation_scale=activation_scale, weight_scale=weight_scale, group_list=group_list,
        expand_scales=expand_scales, shared_expert_x=shared_expert_x, elastic_info=elastic_info, ori_x=ori_x,
        const_expert_alpha_1=const_expert_alpha_1, const_expert_alpha_2=const_expert_alpha_2,
        const_expert_v=const_expert_v, group_tp=group_tp, tp_world_size=tp_world_size, tp_rank_id=tp_rank_id,
        expert_shard_type=expert_shard_type, shared_expert_num=shared_expert_num,
        shared_expert_rank_num=shared_expert_rank_num, global_bs=global_bs, out_dtype=out_dtype,
        comm_quant_mode=comm_quant_mode, group_list_type=group_list_type, comm_alg=comm_alg, norm_eps=norm_eps,
        zero_expert_num=zero_expert_num, copy_expert_num=copy_expert_num, const_expert_num=const_expert_num)
