"""Communication operators on 4 gloo ranks vs the raw collectives / unfused chains they replace.

    python benchmarks/bench_comm_ops.py [--repeats N] [--backward] [--cpu] [--world 2]

``--backward`` times training instead: each op's forward + backward (its autograd formula, which
runs the fused ops themselves) vs the unfused chain it replaces written with the differentiable
functional collectives (``*_autograd``) and plain torch ops, forward + backward (fp32).

Times are the slowest rank's per step (every step starts at a barrier), kernel and baseline
alternating, so a ratio compares the same amount of synchronized work; the table gives each
side's spread, the median paired ratio with its interval, and whether each target was met.
``--cpu`` gives instead the CPU time per step summed over the ranks (``group_cpu_seconds``): the
work each side puts on the machine, which sets the wall time where ranks outnumber cores; time
spent waiting in a collective is not in it. The targets are wall-time targets: CPU rows have none.
``--world 2`` runs the dispatch/combine rows on 2 ranks (one core each here, where 4 ranks share
2 cores); the bmm pair needs EP 2 x TP 2, so 4 ranks.
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

import moe_fusion
from _timing import Row, argument_parser, compare, print_table
from moe_fusion.demo.timing import Timer, group_cpu_seconds, synced_seconds
from moe_fusion.launch import run_ranks

BMM_WORLD = 4          # the bmm pair's EP 2 x TP 2


def _dispatch_combine_rank(rank: int, world: int, repeats: int, timer: Timer) -> list:
    group = dist.group.WORLD.group_name
    bs, hidden, top_k, num_experts = 256, 4096, 8, 32
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        gen = torch.Generator().manual_seed(rank)
        x = torch.randn(bs, hidden, generator=gen).to(dtype)
        expert_ids = torch.rand(bs, num_experts, generator=gen).topk(top_k, dim=1).indices.to(torch.int32)
        weights = torch.rand(bs, top_k, generator=gen)
        send = x.repeat_interleave(top_k, dim=0)          # the same payload bytes: BS*K rows of H
        recv = torch.empty_like(send)

        def fused():
            expand_x, _, assist, _, ep_recv, tp_recv, _ = moe_fusion.npu_moe_distribute_dispatch_v2(
                x, expert_ids, group, world, rank, num_experts)
            return moe_fusion.npu_moe_distribute_combine_v2(
                expand_x, expert_ids, assist, ep_recv, weights, group, world, rank, num_experts, tp_send_counts=tp_recv)

        def raw():
            dist.all_to_all_single(recv, send)
            dist.all_to_all_single(send, recv)

        timing = compare(fused, raw, repeats, timer=timer)
        rows.append(Row(f"dispatch+combine BS={bs} H={hidden} K={top_k} E={num_experts} {str(dtype)[6:]} vs raw a2a x2",
                        timing, 1.5))
    return rows


def _ep_tp_groups(rank: int, ep: int, tp: int):
    """rank = p * tp + q; EP groups hold one q, TP groups one p (SPEC §6.3)."""
    ep_groups = [dist.new_group([p * tp + q for p in range(ep)]) for q in range(tp)]
    tp_groups = [dist.new_group([p * tp + q for q in range(tp)]) for p in range(ep)]
    return ep_groups[rank % tp], tp_groups[rank // tp]


def _bmm_pair_rank(rank: int, world: int, repeats: int, timer: Timer) -> list:
    ep, tp = 2, 2
    ep_group, tp_group = _ep_tp_groups(rank, ep, tp)
    experts, capacity, hidden, ffn_out = 8, 256, 1024, 2048
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(experts, capacity, hidden // tp, generator=gen)                   # x_shard_type 0
    weight = torch.randn(experts // ep, hidden, ffn_out // tp, generator=gen) / hidden ** 0.5
    a2a = torch.empty_like(x)
    gathered = torch.empty((tp * experts,) + x.shape[1:], dtype=x.dtype)            # gloo: concatenated on dim 0

    def fused_ag():
        return moe_fusion.npu_alltoall_allgather_bmm(x, weight, ep_group.group_name, ep, tp_group.group_name, tp,
                                                     act_type=1)[0]

    def unfused_ag():
        dist.all_to_all_single(a2a, x, group=ep_group)                                   # (ep, E/ep, C, H/tp)
        dist.all_gather_into_tensor(gathered, a2a, group=tp_group)                       # (tp*ep*E/ep, C, H/tp)
        y2 = gathered.reshape(tp, ep, experts // ep, capacity, hidden // tp).permute(2, 1, 3, 0, 4)
        y2 = y2.reshape(experts // ep, ep * capacity, hidden)
        return torch.nn.functional.gelu(torch.bmm(y2, weight))

    allgather = compare(fused_ag, unfused_ag, repeats, timer=timer)

    y = torch.randn(experts // ep, ep * capacity, ffn_out // tp, generator=gen)
    w2 = torch.randn(experts // ep, ffn_out // tp, hidden, generator=gen) / ffn_out ** 0.5
    scattered = torch.empty(experts // ep, ep * capacity, hidden // tp)
    out = torch.empty(experts, capacity, hidden // tp)

    def fused_rs():
        return moe_fusion.npu_bmm_reducescatter_alltoall(y, w2, ep_group.group_name, ep, tp_group.group_name, tp)

    def unfused_rs():
        t1 = torch.bmm(y, w2).reshape(experts // ep, ep * capacity, tp, hidden // tp).permute(2, 0, 1, 3).contiguous()
        dist.reduce_scatter_tensor(scattered, t1.flatten(0, 1), group=tp_group)          # (E/ep, ep*C, H/tp)
        send = scattered.reshape(experts // ep, ep, capacity, hidden // tp).transpose(0, 1).contiguous()
        dist.all_to_all_single(out, send, group=ep_group)
        return out

    reducescatter = compare(fused_rs, unfused_rs, repeats, timer=timer)
    shape = f"E={experts} C={capacity} H={hidden} M={ffn_out} ep={ep} tp={tp} fp32"
    return [Row(f"alltoall_allgather_bmm {shape} vs unfused chain", allgather, 1.10),
            Row(f"bmm_reducescatter_alltoall {shape} vs unfused chain", reducescatter, 1.10)]


def _token_chain(group: dist.ProcessGroup, ids: torch.Tensor, local: int):
    """The unfused dispatch people write: rows sorted by expert (so by destination rank), counts
    exchanged, one all_to_all with those splits. Returns ``(send(x) -> rows received, back(rows,
    weights) -> (BS, H))`` (``back``: the return all_to_all, the gate weights, a sum per token)."""
    world, k = dist.get_world_size(group), ids.size(1)
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    token = order // k
    send_counts = torch.bincount(flat // local, minlength=world)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    sent, received = send_counts.tolist(), recv_counts.tolist()

    def send(x: torch.Tensor) -> torch.Tensor:
        return funcol.all_to_all_single_autograd(x.index_select(0, token), received, sent, group)

    def back(rows: torch.Tensor, weights: torch.Tensor, bs: int) -> torch.Tensor:
        returned = funcol.all_to_all_single_autograd(rows, sent, received, group)
        scaled = returned * weights.reshape(-1)[order].unsqueeze(1)
        return scaled.new_zeros((bs, rows.size(1))).index_add(0, token, scaled)

    return send, back


def _backward_rank(rank: int, world: int, repeats: int, timer: Timer) -> list:
    """Forward + backward of each comm op vs its unfused autograd chain (fp32)."""
    group = dist.group.WORLD
    name = group.group_name
    bs, hidden, top_k, num_experts = 256, 1024, 8, 32
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(bs, hidden, generator=gen, requires_grad=True)
    ids = torch.rand(bs, num_experts, generator=gen).topk(top_k, dim=1).indices.to(torch.int32)
    weights = torch.rand(bs, top_k, generator=gen, requires_grad=True)
    residual = torch.randn(bs, 1, hidden, generator=gen, requires_grad=True)
    gamma = torch.rand(hidden, generator=gen, requires_grad=True)
    send, back = _token_chain(group, ids, num_experts // world)
    with torch.no_grad():
        expand_x, _, assist, _, ep_counts, tp_counts, _ = moe_fusion.npu_moe_distribute_dispatch_v2(
            x, ids, name, world, rank, num_experts)
        rows = send(x)
    expand_leaf, rows_leaf = expand_x.clone().requires_grad_(), rows.clone().requires_grad_()

    def backward(loss: torch.Tensor) -> None:
        loss.backward()
        for t in (x, weights, residual, gamma, expand_leaf, rows_leaf):
            t.grad = None

    def rms_norm(t: torch.Tensor) -> torch.Tensor:
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * gamma

    cases = {
        "dispatch_v2": (lambda: backward(moe_fusion.npu_moe_distribute_dispatch_v2(
                            x, ids, name, world, rank, num_experts)[0].sum()),
                        lambda: backward(send(x).sum())),
        "combine_v2": (lambda: backward(moe_fusion.npu_moe_distribute_combine_v2(
                           expand_leaf, ids, assist, ep_counts, weights, name, world, rank, num_experts,
                           tp_send_counts=tp_counts).sum()),
                       lambda: backward(back(rows_leaf, weights, bs).sum())),
        "combine_add_rms_norm": (lambda: backward(moe_fusion.npu_moe_distribute_combine_add_rms_norm(
                                     expand_leaf, ids, assist, ep_counts, weights, residual, gamma, name, world, rank,
                                     num_experts, tp_send_counts=tp_counts)[0].sum()),
                                 lambda: backward(rms_norm(back(rows_leaf, weights, bs) + residual.squeeze(1)).sum())),
    }
    shape = f"BS={bs} H={hidden} K={top_k} E={num_experts} fp32"
    rows_out = [Row(f"{op} fwd+bwd {shape} vs unfused autograd chain", compare(fused, chain, repeats,
                                                                                timer=timer), 1.5)
                for op, (fused, chain) in cases.items()]
    return rows_out + (_bmm_backward_rows(rank, repeats, timer) if world == BMM_WORLD else [])


def _bmm_backward_rows(rank: int, repeats: int, timer: Timer) -> list:
    ep, tp = 2, 2
    ep_group, tp_group = _ep_tp_groups(rank, ep, tp)
    experts, capacity, hidden, ffn_out = 8, 256, 1024, 2048
    local = experts // ep
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(experts, capacity, hidden // tp, generator=gen, requires_grad=True)
    weight = (torch.randn(local, hidden, ffn_out // tp, generator=gen) / hidden ** 0.5).requires_grad_()
    y = torch.randn(local, ep * capacity, ffn_out // tp, generator=gen, requires_grad=True)
    w2 = (torch.randn(local, ffn_out // tp, hidden, generator=gen) / ffn_out ** 0.5).requires_grad_()
    groups = (ep_group.group_name, ep, tp_group.group_name, tp)

    def backward(loss: torch.Tensor) -> None:
        loss.backward()
        for t in (x, weight, y, w2):
            t.grad = None

    def unfused_ag() -> torch.Tensor:
        a2a = funcol.all_to_all_single_autograd(x, None, None, ep_group)                  # (ep*E/ep, C, H/tp)
        gathered = funcol.all_gather_tensor_autograd(a2a, 0, tp_group)                     # (tp*E, C, H/tp)
        y2 = gathered.reshape(tp, ep, local, capacity, hidden // tp).permute(2, 1, 3, 0, 4)
        return torch.nn.functional.gelu(torch.bmm(y2.reshape(local, ep * capacity, hidden), weight))

    def unfused_rs() -> torch.Tensor:
        t1 = torch.bmm(y, w2).reshape(local, ep * capacity, tp, hidden // tp).permute(2, 0, 1, 3).contiguous()
        scattered = funcol.reduce_scatter_tensor_autograd(t1.flatten(0, 1), "sum", 0, tp_group)
        send = scattered.reshape(local, ep, capacity, hidden // tp).transpose(0, 1).contiguous()
        return funcol.all_to_all_single_autograd(send, None, None, ep_group)

    shape = f"E={experts} C={capacity} H={hidden} M={ffn_out} ep={ep} tp={tp} fp32"
    ag = compare(lambda: backward(moe_fusion.npu_alltoall_allgather_bmm(x, weight, *groups, act_type=1)[0].sum()),
                 lambda: backward(unfused_ag().sum()), repeats, timer=timer)
    rs = compare(lambda: backward(moe_fusion.npu_bmm_reducescatter_alltoall(y, w2, *groups).sum()),
                 lambda: backward(unfused_rs().sum()), repeats, timer=timer)
    return [Row(f"alltoall_allgather_bmm fwd+bwd {shape} vs unfused autograd chain", ag, 1.10),
            Row(f"bmm_reducescatter_alltoall fwd+bwd {shape} vs unfused autograd chain", rs, 1.10)]


def _rank_main(rank: int, world: int, repeats: int, train: bool, cpu: bool) -> list:
    # torch 2.13 deprecates the *_into_tensor collectives the unfused chains are written with.
    warnings.filterwarnings("ignore", message=".*is deprecated. Please use", category=FutureWarning)
    timer = group_cpu_seconds if cpu else synced_seconds
    if train:
        rows = _backward_rank(rank, world, repeats, timer)
    else:
        rows = _dispatch_combine_rank(rank, world, repeats, timer)
        rows += _bmm_pair_rank(rank, world, repeats, timer) if world == BMM_WORLD else []
    # The targets are wall-time targets: a CPU-time ratio is reported against none.
    return [row._replace(target=None) for row in rows] if cpu else rows


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=7, help="timed steps of each kernel and baseline")
    parser.add_argument("--backward", action="store_true", help="time forward + backward of each op vs its unfused "
                                                                 "autograd chain")
    parser.add_argument("--cpu", action="store_true", help="compare the CPU time per step summed over the ranks "
                                                            "instead of the slowest rank's wall time")
    parser.add_argument("--world", type=int, choices=(2, BMM_WORLD), default=BMM_WORLD,
                        help="ranks (2: the dispatch/combine rows only)")
    args = parser.parse_args()
    rows = run_ranks(args.world, _rank_main, args.repeats, args.backward, args.cpu, timeout=1800, pg_timeout=600)[0]
    print_table(rows, "CPU ms, all ranks" if args.cpu else "ms")


if __name__ == "__main__":
    main()
