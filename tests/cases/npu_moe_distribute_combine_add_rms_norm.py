"""opcheck cases of ``npu_moe_distribute_combine_add_rms_norm`` in a world of one rank, fed by a
real dispatch: bf16 plain, 2-D mask, and copy/const experts with a shared_expert_x."""
import torch

from cases.npu_moe_distribute_dispatch_v2 import M, routed


def _case(seed, k=2, total=M, dispatch=None, **combine):
    x, ids, (expand_x, _, assist, _, ep_counts, tp_counts, _) = routed(seed, k=k, total=total, **(dispatch or {}))
    g = torch.Generator().manual_seed(seed)
    bs, h = x.shape
    w = torch.rand(ids.shape, generator=g)
    residual = torch.randn(bs, 1, h, generator=g).to(x.dtype)
    gamma = torch.rand(h, generator=g).to(x.dtype)
    if combine.get("ori_x") is True:
        combine["ori_x"] = x
    return (expand_x, ids, assist, ep_counts, w, residual, gamma, "ep", 1, 0, M), {"tp_send_counts": tp_counts,
                                                                                   **combine}


def opcheck_cases():
    g = torch.Generator().manual_seed(2)
    mask2 = torch.rand(5, 2, generator=g) > 0.4
    specials = {"copy_expert_num": 1, "const_expert_num": 1}
    return [
        _case(0),
        _case(1, dispatch={"x_active_mask": mask2}, x_active_mask=mask2, norm_eps=1e-5),
        _case(2, k=3, total=M + 2, dispatch=specials, ori_x=True, **specials,
              const_expert_alpha_1=torch.rand(1, generator=g).bfloat16(),
              const_expert_alpha_2=torch.rand(1, generator=g).bfloat16(),
              const_expert_v=torch.randn(1, 16, generator=g).bfloat16(),
              shared_expert_x=torch.randn(5, 16, generator=g).bfloat16()),
    ]
