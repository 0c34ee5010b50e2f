"""DeepSpeed top1gating with drop_tokens=False is dropless only if no Random-Token-Selection draw
is exactly 0.0 (torch.rand returns multiples of 2**-24, so P = 2**-24 per route): a routed token whose
uniform draw is 0 ties with the unrouted tokens' zeros in topk(mask1 * uniform, k=capacity, dim=0)
and can lose its slot. Single process, no process group (ep_group=None).

    timeout 120 /work/main/.venv/bin/python /work/research/scripts/rts_zero_draw.py
"""
import os
import sys

sys.path[:0] = ["/work/libsite"]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
import torch  # noqa: E402
from deepspeed.moe import sharded_moe  # noqa: E402

S, E = 16, 4
torch.manual_seed(0)
logits = torch.randn(S, E)
expert = logits.softmax(1).argmax(1)
counts = torch.bincount(expert, minlength=E)
e_max = int(counts.argmax())                      # the fullest expert: capacity == its count
victim = int((expert == e_max).nonzero()[0])      # one of its tokens draws exactly 0.0


def uniform_with_a_zero(shape):
    u = torch.rand(shape).clamp_min(1e-3)
    u[victim, e_max] = 0.0
    return u


for name, sampler in (("ordinary draws", lambda shape: torch.rand(shape).clamp_min(1e-3)),
                      ("one draw == 0.0", uniform_with_a_zero)):
    sharded_moe.exp_selection_uniform_map[logits.device] = sampler
    out = sharded_moe.top1gating(logits.clone(), 1.0, 0, drop_tokens=False, use_rts=True, sparse_routes=True)
    _, capacity, _, idx, loc, gates, exp_counts = out
    dropped = (idx < 0).nonzero()[:, 1].tolist()
    print(f"{name}: capacity={int(capacity)} counts={exp_counts.tolist()} dropped tokens={dropped}")
