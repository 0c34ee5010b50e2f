"""opcheck cases of ``npu_alltoall_allgather_bmm`` in a world of one rank (ep = tp = 1, no
communication): both shard types, every act_type, bias 2-D/3-D, y2/y3 requested or not,
fp32/bf16/fp16, and a transposed weight."""
import torch


def opcheck_cases():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, generator=g)                # E=3, C=4, H=8
    w = torch.randn(3, 8, 5, generator=g)                # (E, H, M)
    groups = ("ep", 1, "tp", 1)
    return [
        ((x, w, *groups), {}),
        ((x, w, *groups), {"shard_type": 1, "act_type": 1, "need_allgather_out": True, "need_activation_feature": True,
                           "bias": torch.randn(3, 1, 5, generator=g)}),
        ((x.bfloat16(), w.bfloat16(), *groups), {"act_type": 2, "bias": torch.randn(3, 5, generator=g),
                                                 "need_activation_feature": True}),
        ((x.half(), w.half(), *groups), {"act_type": 3, "bias": torch.randn(3, 5, generator=g).half(),
                                         "need_allgather_out": True}),
        ((x, torch.randn(3, 5, 8, generator=g).transpose(1, 2), *groups), {"act_type": 4, "shard_type": 1}),
    ]
