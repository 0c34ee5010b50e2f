"""opcheck cases of ``npu_moe_re_routing``: every token dtype, both count dtypes, with and
without ``per_token_scales``, zero-count blocks, no tokens at all, and a non-contiguous input."""
import torch


def _counts(rows, dtype):
    return torch.tensor(rows, dtype=dtype)


def opcheck_cases():
    g = torch.Generator().manual_seed(0)
    c_small = _counts([[1, 2, 0], [3, 0, 2]], torch.int32)        # N=2, E=3, A=8, with zero blocks
    c_wide = _counts([[2, 1], [0, 0], [1, 3]], torch.int64)       # a rank that sent nothing
    return [
        ((torch.randn(8, 16, generator=g, dtype=torch.float16), c_small), {}),
        ((torch.randn(7, 8, generator=g).to(torch.bfloat16), c_wide),
         {"per_token_scales": torch.rand(7, generator=g)}),
        ((torch.randint(-128, 128, (8, 32), generator=g, dtype=torch.int8), c_small),
         {"per_token_scales": torch.rand(8, generator=g), "expert_token_num_type": 1, "idx_type": 0}),
        ((torch.randn(7, 4, generator=g), c_wide), {}),
        ((torch.randn(0, 4, generator=g, dtype=torch.float16), _counts([[0, 0], [0, 0]], torch.int32)),
         {"per_token_scales": torch.zeros(0)}),
        ((torch.randn(16, 8, generator=g).t(), _counts([[3, 0], [0, 5]], torch.int64)), {}),  # (8, 16) transposed
    ]
