"""opcheck cases of ``npu_moe_distribute_dispatch_v2`` in a world of one rank (no process group):
bf16/fp16/fp32, quant modes 0 and 2 (with smooth scales), 1-D and 2-D masks, global_bs larger
than BS, prefix-sum token counts, special experts with expert_scales, a non-contiguous x.
``routed(...)`` also serves the combine cases: it returns a dispatch call's inputs and outputs."""
import torch

M = 4          # MoE experts, all on the one rank


def _ids(g, bs, k, total=M):
    return torch.stack([torch.randperm(total, generator=g)[:k] for _ in range(bs)]).int()


def routed(seed=0, bs=5, h=16, k=2, dtype=torch.bfloat16, total=M, **kwargs):
    """``(x, expert_ids, dispatch outputs)`` of a world-of-one dispatch with ``kwargs``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(bs, h, generator=g).to(dtype)
    ids = _ids(g, bs, k, total)
    outs = torch.ops.moe_fusion.npu_moe_distribute_dispatch_v2(x, ids, "ep", 1, 0, M, **kwargs)
    return x, ids, outs


def opcheck_cases():
    g = torch.Generator().manual_seed(0)
    x16 = torch.randn(6, 32, generator=g, dtype=torch.float16)
    ids6 = _ids(g, 6, 3)
    return [
        ((torch.randn(5, 16, generator=g).to(torch.bfloat16), _ids(g, 5, 2), "ep", 1, 0, M), {}),
        ((x16, ids6, "ep", 1, 0, M),
         {"quant_mode": 2, "scales": torch.rand(M, 32, generator=g) + 0.5,
          "x_active_mask": torch.rand(6, 3, generator=g) > 0.3}),
        ((torch.randn(5, 8, generator=g), _ids(g, 5, 2), "", 1, 0, M),
         {"x_active_mask": torch.tensor([True, True, True, False, False]), "global_bs": 7,
          "expert_token_nums_type": 0, "quant_mode": 2}),
        ((torch.randn(4, 16, generator=g).to(torch.bfloat16), _ids(g, 4, 3, total=M + 3), "ep", 1, 0, M),
         {"zero_expert_num": 1, "copy_expert_num": 1, "const_expert_num": 1,
          "expert_scales": torch.rand(4, 3, generator=g)}),
        ((torch.randn(16, 6, generator=g, dtype=torch.float16).t(), _ids(g, 6, 2), "ep", 1, 0, M),
         {"tp_world_size": 1}),                                  # (6, 16) transposed
    ]
