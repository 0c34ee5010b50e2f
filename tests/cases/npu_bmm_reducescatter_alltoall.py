"""opcheck cases of ``npu_bmm_reducescatter_alltoall`` in a world of one rank (ep = tp = 1, no
communication): both shard types, bias 2-D/3-D, fp32/bf16/fp16, and a transposed weight."""
import torch


def opcheck_cases():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, generator=g)                # (E, C, M)
    w = torch.randn(3, 5, 8, generator=g)                # (E, M, H)
    groups = ("ep", 1, "tp", 1)
    return [
        ((x, w, *groups), {}),
        ((x, w, *groups), {"shard_type": 1, "bias": torch.randn(3, 1, 8, generator=g)}),
        ((x.bfloat16(), w.bfloat16(), *groups), {"bias": torch.randn(3, 8, generator=g)}),
        ((x.half(), w.half(), *groups), {"shard_type": 1, "bias": torch.randn(3, 8, generator=g).half()}),
        ((x, torch.randn(3, 8, 5, generator=g).transpose(1, 2), *groups), {}),
    ]
