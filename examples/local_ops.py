"""A small tour of the three local operators: re-routing, expert load balancing, FFN."""
import torch

import moe_fusion

torch.manual_seed(0)

# Two source ranks x two local experts; rows arrive rank-major and leave expert-major.
tokens = torch.arange(12, dtype=torch.float32).reshape(6, 2)
counts = torch.tensor([[1, 2], [3, 0]], dtype=torch.int32)
permuted, _, gather_idx, per_expert = moe_fusion.npu_moe_re_routing(tokens, counts)
print("npu_moe_re_routing")
print("  tokens (rank-major):   ", tokens[:, 0].tolist())
print("  permuted (expert-major):", permuted[:, 0].tolist())
print("  gather index:           ", gather_idx.tolist(), " rows per expert:", per_expert.tolist())

# Logical expert 1 has two replicas (physical 6 and 7); rank 1 of 2 uses the second one.
expert_ids = torch.tensor([[0, 1], [1, 0]], dtype=torch.int32)
eplb_table = torch.tensor([[1, 5, 0], [2, 6, 7]], dtype=torch.int32)
scales = torch.tensor([[0.9, 0.1], [0.6, 0.4]])
threshold = torch.tensor([0.2, 0.2])
ids, keep = moe_fusion.npu_moe_update_expert(expert_ids, eplb_table, expert_scales=scales,
                                             pruning_threshold=threshold, local_rank_id=1, world_size=2)
print("npu_moe_update_expert")
print("  physical ids:", ids.tolist(), " kept slots:", keep.tolist())

# Two experts over contiguous row segments (3 rows, then 5), a GELU (tanh) FFN.
x = torch.randn(8, 16)
w1, w2 = torch.randn(2, 16, 32) / 4, torch.randn(2, 32, 16) / 6
y = moe_fusion.npu_ffn(x, w1, w2, "gelu", expert_tokens=[3, 5])
print("npu_ffn")
print("  y shape:", tuple(y.shape), " y[0, :4]:", [round(v, 4) for v in y[0, :4].tolist()])
