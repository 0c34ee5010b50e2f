"""Local operators vs the plain torch code they replace; one table of ratios (kernel and
baseline timed alternately; spreads, medians and intervals over the repeats, each target marked
ok or MISSED).

    python benchmarks/bench_local_ops.py [--repeats N] [--quick]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import moe_fusion
from _timing import Row, argument_parser, compare, print_table


def bench_re_routing(repeats: int, num_tokens: int, hidden: int) -> list:
    rows = []
    num_ranks, num_experts = 16, 16
    gen = torch.Generator().manual_seed(0)
    counts = torch.multinomial(torch.ones(num_ranks * num_experts), num_tokens, replacement=True, generator=gen)
    counts = torch.bincount(counts, minlength=num_ranks * num_experts).reshape(num_ranks, num_experts).to(torch.int32)
    for dtype in (torch.bfloat16, torch.int8):
        tokens = (torch.randn(num_tokens, hidden) * 20).to(dtype)
        timing = compare(lambda: moe_fusion.npu_moe_re_routing(tokens, counts), lambda: tokens.clone(), repeats)
        rows.append(Row(f"re_routing A={num_tokens} H={hidden} {str(dtype)[6:]} vs clone", timing, 1.5))
    return rows


def bench_update_expert(repeats: int) -> list:
    bs, k, n_logical, world = 512, 8, 256, 32
    gen = torch.Generator().manual_seed(0)
    expert_ids = torch.randint(0, n_logical, (bs, k), dtype=torch.int32, generator=gen)
    table = torch.randint(0, 288, (n_logical, 5), dtype=torch.int32, generator=gen)
    table[:, 0] = torch.randint(1, 5, (n_logical,), generator=gen).to(torch.int32)
    flat_index = torch.randint(0, table.numel(), (bs * k,), generator=gen)
    flat_table = table.reshape(-1)

    def kernel():
        return moe_fusion.npu_moe_update_expert(expert_ids, table, local_rank_id=3, world_size=world)

    timing = compare(kernel, lambda: flat_table[flat_index], repeats * 50)
    return [Row(f"update_expert BS={bs} K={k} vs one eplb_table gather", timing, 2.0)]


def _bare_ffn(x, w1, w2):
    return F.gelu(x @ w1, approximate="tanh") @ w2


def bench_ffn(repeats: int, m: int, k1: int, n1: int) -> list:
    rows = []
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, k1, generator=gen)
    w1 = torch.randn(k1, n1, generator=gen) / k1 ** 0.5
    w2 = torch.randn(n1, k1, generator=gen) / n1 ** 0.5
    for dtype in (torch.float32, torch.bfloat16):
        xd, w1d, w2d = x.to(dtype), w1.to(dtype), w2.to(dtype)
        timing = compare(lambda: moe_fusion.npu_ffn(xd, w1d, w2d, "gelu"), lambda: _bare_ffn(x, w1, w2), repeats)
        rows.append(Row(f"ffn {str(dtype)[6:]} M={m} K1={k1} N1={n1} vs fp32 x@W1->gelu->@W2", timing, 1.10))
    return rows


def bench_ffn_experts(repeats: int, m: int, k1: int, n1: int, num_experts: int = 16) -> list:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, k1, generator=gen)
    w1 = torch.randn(num_experts, k1, n1, generator=gen) / k1 ** 0.5
    w2 = torch.randn(num_experts, n1, k1, generator=gen) / n1 ** 0.5
    weights = torch.rand(num_experts, generator=gen) + 0.2
    counts = (weights / weights.sum() * m).long()
    counts[-1] += m - counts.sum()
    counts = counts.tolist()

    def loop():
        out, start = [], 0
        for e, n in enumerate(counts):
            out.append(_bare_ffn(x[start:start + n], w1[e], w2[e]))
            start += n
        return torch.cat(out)

    timing = compare(lambda: moe_fusion.npu_ffn(x, w1, w2, "gelu", expert_tokens=counts), loop, repeats)
    return [Row(f"ffn {num_experts} experts fp32 M={m} K1={k1} N1={n1} vs per-expert loop", timing, 1.10)]


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=7, help="timed calls of each kernel and baseline (update_expert: 50x as many)")
    parser.add_argument("--quick", action="store_true", help="small shapes (a smoke run, not the issue's sizes)")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.quick:
        rows = (bench_re_routing(args.repeats, 2048, 1024) + bench_update_expert(args.repeats)
                + bench_ffn(args.repeats, 256, 256, 1024) + bench_ffn_experts(args.repeats, 512, 256, 512))
    else:
        rows = (bench_re_routing(args.repeats, 16384, 7168) + bench_update_expert(args.repeats)
                + bench_ffn(args.repeats, 2048, 2048, 8192) + bench_ffn_experts(args.repeats, 4096, 1024, 2048))
    print_table(rows)


if __name__ == "__main__":
    main()
