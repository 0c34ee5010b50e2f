"""opcheck cases of ``npu_moe_update_expert``: both balance modes, both id dtypes, pruning with
fp32/fp16/bf16 scales, both threshold shapes, with and without ``active_mask``."""
import torch

# 4 logical experts; replica counts 2, 1, 3, 2 (F = 4).
TABLE = torch.tensor([[2, 10, 11, 0], [1, 12, 0, 0], [3, 13, 14, 15], [2, 16, 17, 0]], dtype=torch.int32)


def opcheck_cases():
    g = torch.Generator().manual_seed(0)
    ids64 = torch.randint(0, 4, (5, 3), generator=g)
    ids32 = torch.randint(0, 4, (6, 2), generator=g, dtype=torch.int32)
    scales = torch.rand(5, 3, generator=g)
    return [
        ((ids64, TABLE), {"local_rank_id": 3, "world_size": 4, "balance_mode": 0}),
        ((ids32, TABLE), {"balance_mode": 1}),
        ((ids64, TABLE), {"expert_scales": scales, "pruning_threshold": torch.full((3,), 0.2),
                          "local_rank_id": 1, "world_size": 4}),
        ((ids32, TABLE), {"expert_scales": torch.rand(6, 2, generator=g).half(),
                          "pruning_threshold": torch.tensor([[0.3, 0.4]]), "balance_mode": 1}),
        ((ids64, TABLE), {"expert_scales": scales.bfloat16(), "pruning_threshold": torch.tensor([0.5, 0.1, 0.1]),
                          "active_mask": torch.tensor([True, True, False, True, False]), "balance_mode": 1}),
        ((ids64.t().contiguous().t(), TABLE), {"expert_scales": scales.t().contiguous().t(),
                                               "pruning_threshold": torch.full((1, 3), 0.3),
                                               "active_mask": torch.ones(5, dtype=torch.bool),
                                               "local_rank_id": 0, "world_size": 2}),
    ]
