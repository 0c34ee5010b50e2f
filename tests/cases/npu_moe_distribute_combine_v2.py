"""opcheck cases of ``npu_moe_distribute_combine_v2`` in a world of one rank, fed by a real
dispatch: plain, 2-D mask with comm_quant_mode 2 and a 3-D shared_expert_x, 1-D mask, and
zero/copy/const experts with (Q,) and (Q, H) alphas in fp32."""
import torch

from cases.npu_moe_distribute_dispatch_v2 import M, routed


def _case(seed, dtype=torch.bfloat16, k=2, total=M, dispatch=None, **combine):
    x, ids, (expand_x, _, assist, _, ep_counts, tp_counts, _) = routed(seed, dtype=dtype, k=k, total=total,
                                                                       **(dispatch or {}))
    w = torch.rand(ids.shape, generator=torch.Generator().manual_seed(seed))
    kwargs = {"tp_send_counts": tp_counts, **combine}
    if kwargs.get("ori_x") is True:      # the tokens before dispatch
        kwargs["ori_x"] = x
    return (expand_x, ids, assist, ep_counts, w, "ep", 1, 0, M), kwargs


def opcheck_cases():
    g = torch.Generator().manual_seed(1)
    mask2 = torch.rand(5, 2, generator=g) > 0.4
    mask1 = torch.tensor([True, True, False, False, False])
    specials = {"zero_expert_num": 1, "copy_expert_num": 1, "const_expert_num": 2}
    return [
        _case(0),
        _case(1, dtype=torch.float16, dispatch={"x_active_mask": mask2}, x_active_mask=mask2, comm_quant_mode=2,
              shared_expert_x=torch.randn(5, 1, 16, generator=g).half()),
        _case(2, dispatch={"x_active_mask": mask1}, x_active_mask=mask1),
        _case(3, dtype=torch.float32, k=3, total=M + 4, dispatch=specials, ori_x=True, **specials,
              const_expert_alpha_1=torch.rand(2, generator=g), const_expert_alpha_2=torch.rand(2, 16, generator=g),
              const_expert_v=torch.randn(2, 16, generator=g)),
    ]
