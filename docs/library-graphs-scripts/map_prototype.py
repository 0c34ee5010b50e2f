"""Check, by hand, the mapping a pass would emit: the library's own routing (expert ids, keep mask,
gate weights) -> npu_moe_distribute_dispatch_v2 -> npu_ffn_grouped -> npu_moe_distribute_combine_v2,
compared with the unmodified layer's eager output, on 2 gloo ranks (fp32, portable target).

    MOE_FUSION_ROOT=/work/research/main_snapshot timeout 600 /work/main/.venv/bin/python \
        /work/research/scripts/map_prototype.py

Dropping configs use dispatch/combine's 2-D ``x_active_mask`` (BS, K): a route the library drops
is not sent, not computed, and contributes nothing (A3 and portable accept 2-D masks; A2 does not).
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import run_libs  # noqa: E402  (sets sys.path, the layer builders, the shims)
from run_libs import E, WORLD, build_deepspeed, build_fairscale  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from moe_fusion.launch import run_ranks  # noqa: E402


def fill_ids(ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Dropped slots (keep False) get the smallest ids not already in their row (unique per row, as
    dispatch requires; masked, so never sent)."""
    ids = ids.clone()
    for s in range(ids.shape[0]):
        used = set(ids[s][keep[s]].tolist())
        free = iter(e for e in range(E) if e not in used)
        for j in range(ids.shape[1]):
            if not keep[s, j]:
                ids[s, j] = next(free)
    return ids


def stacked_ffn(experts):
    w1 = torch.stack([m.fc1.weight.t() for m in experts])      # (L, H, FF)
    b1 = torch.stack([m.fc1.bias for m in experts])             # (L, FF)
    w2 = torch.stack([m.fc2.weight.t() for m in experts])      # (L, FF, H)
    b2 = torch.stack([m.fc2.bias for m in experts])             # (L, H)
    return w1, b1, w2, b2


def fused(x2d, ids, keep, weights, experts, group, rank, mask_needed):
    import moe_fusion

    name = group.group_name
    mask = keep if mask_needed else None
    expand_x, _, assist, token_nums, recv_counts, _, _ = moe_fusion.npu_moe_distribute_dispatch_v2(
        x2d, ids.to(torch.int32).contiguous(), name, WORLD, rank, E, x_active_mask=mask)
    w1, b1, w2, b2 = stacked_ffn(experts)
    act = "relu" if isinstance(experts[0].act, torch.nn.ReLU) else "gelu"
    y = moe_fusion.npu_ffn_grouped(expand_x, w1, w2, act, expert_tokens=token_nums, bias1=b1, bias2=b2)
    return moe_fusion.npu_moe_distribute_combine_v2(
        y, ids.to(torch.int32).contiguous(), assist, recv_counts, weights.float().contiguous(), name, WORLD, rank,
        E, x_active_mask=mask)


def case_deepspeed(rank, world, k, drop, sampling=True):
    from deepspeed.utils import groups

    layer, x = build_deepspeed(rank, world, k, drop_tokens=drop, act="relu", sampling=sampling)
    layer.eval()
    moe = layer.deepspeed_moe
    x2d = x.reshape(-1, x.shape[-1])
    with torch.no_grad():
        torch.manual_seed(7)
        ref = layer(x)[0].reshape(-1, x.shape[-1])
        torch.manual_seed(7)   # the same random draws (RTS uniform for k=1, Gumbel for k=2)
        _, cap, _, idx, loc, gates, counts = moe.gate(x2d, None, True, False)
        # idx (K, S) int32, -1 where the capacity dropped the route; gates (K, S) fp32 (0 when dropped)
        keep = (idx >= 0).t()
        ids = fill_ids(idx.t().long(), keep)
        group = groups._get_expert_parallel_group(moe.ep_group_name)
        out = fused(x2d, ids, keep, gates.t(), list(moe.experts.deepspeed_experts), group, dist.get_rank(group),
                    mask_needed=drop)
    return dict(dropped_routes=int((~keep).sum()), capacity=int(cap),
                max_abs_diff=float((out - ref).abs().max()), match=bool(torch.allclose(out, ref, atol=1e-5)))


def case_fairscale(rank, world):
    layer, x = build_fairscale(rank, world, "relu")
    layer.eval()
    x2d = x.reshape(-1, x.shape[-1])
    with torch.no_grad():
        torch.manual_seed(7)
        ref = layer(x).reshape(-1, x.shape[-1])
        torch.manual_seed(7)
        _, combine, _ = layer.gate(x2d)                 # (S, E, C)
        w_se = combine.sum(-1)                           # (S, E): a kept route's weight, 0 otherwise
        kept = w_se > 0
        S = x2d.shape[0]
        ids = torch.zeros(S, 2, dtype=torch.long)
        keep = torch.zeros(S, 2, dtype=torch.bool)
        for s in range(S):
            es = kept[s].nonzero().flatten().tolist()
            for j, e in enumerate(es):
                ids[s, j], keep[s, j] = e, True
        ids = fill_ids(ids, keep)
        weights = torch.where(keep, w_se.gather(1, ids), torch.zeros(()))
        out = fused(x2d, ids, keep, weights, list(layer.experts), dist.group.WORLD, rank, mask_needed=True)
    return dict(dropped_routes=int(2 * S - keep.sum()), capacity=int(combine.shape[2]),
                max_abs_diff=float((out - ref).abs().max()), match=bool(torch.allclose(out, ref, atol=1e-5)))


def rank_fn(rank, world):
    os.environ["DS_ACCELERATOR"] = "cpu"
    sys.path[:0] = ["/work/libsite", run_libs.MOE_ROOT, os.path.dirname(__file__)]
    results = {"fs_top2": case_fairscale(rank, world)}
    for name, k, drop, sampling in (("ds_k1", 1, False, True), ("ds_k2", 2, False, True),
                                    ("ds_k2_nosample", 2, False, False), ("ds_k1_drop", 1, True, True),
                                    ("ds_k2_drop", 2, True, True)):
        results[name] = case_deepspeed(rank, world, k, drop, sampling)
    return results


if __name__ == "__main__":
    t0 = time.perf_counter()
    res = run_ranks(WORLD, rank_fn, timeout=600, pg_timeout=60)
    for name in res[0]:
        print(name, "rank0", res[0][name], "| rank1", res[1][name])
    print(f"total {time.perf_counter() - t0:.1f}s")
