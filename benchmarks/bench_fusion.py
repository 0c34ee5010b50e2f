"""Fusion passes: compile-time overhead, and per-step time of the demo layers fused vs unfused.

    python benchmarks/bench_fusion.py [--repeats N] [--layers a,b]

On 4 gloo ranks (fp32), for each demo layer: inductor compile time with the moe_fusion passes vs
plain inductor (fresh compiles, FX graph cache off, median of repeats; target: passes add
<= 5 %), and the median per-step time of the fused layer vs the same layer compiled without
the passes (and vs eager). Per-step times are the slowest rank's, every step from a barrier.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from moe_fusion.demo.run import LAYERS, DemoConfig
from moe_fusion.launch import run_ranks
from moe_fusion.passes import FusionReport, backend

# layer -> (EP, TP, demo shapes) at which it is measured.
SHAPES = {
    "deepspeed-bmm": (2, 2, dict(tokens=512, hidden=1024, ffn_hidden=2048, experts=8)),
    "allgather-ep": (4, 1, dict(tokens=128, hidden=2048, ffn_hidden=1024, experts=16)),
    "capacity-a2a": (4, 1, dict(tokens=128, hidden=2048, ffn_hidden=1024, experts=16)),
}


def _max_over_ranks(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _compile_seconds(layer: torch.nn.Module, x: torch.Tensor, compiler_backend) -> float:
    torch._dynamo.reset()
    dist.barrier()
    start = time.perf_counter()
    torch.compile(layer, backend=compiler_backend, dynamic=False)(x)
    return _max_over_ranks(time.perf_counter() - start)


def _step_seconds(fn, x: torch.Tensor, steps: int) -> float:
    times = []
    for _ in range(steps):
        dist.barrier()
        start = time.perf_counter()
        fn(x)
        times.append(_max_over_ranks(time.perf_counter() - start))
    return statistics.median(times)


def _rank_main(rank: int, world: int, cfg: DemoConfig, repeats: int) -> dict:
    torch.manual_seed(rank)
    torch._inductor.config.fx_graph_cache = False    # measure real compiles, every repeat
    layer = LAYERS[cfg.layer](cfg, rank)
    x = torch.randn(cfg.tokens, cfg.hidden)
    with torch.no_grad():
        compile_fused, compile_plain = [], []
        for _ in range(repeats):
            compile_plain.append(_compile_seconds(layer, x, "inductor"))
            compile_fused.append(_compile_seconds(layer, x, backend()))
        torch._dynamo.reset()
        report = FusionReport()
        fused = torch.compile(layer, backend=backend(report=report), dynamic=False)
        plain = torch.compile(layer, backend="inductor", dynamic=False)
        fused(x), plain(x)
        steps = max(5, repeats * 3)
        return {"compile_fused": statistics.median(compile_fused), "compile_plain": statistics.median(compile_plain),
                "step_fused": _step_seconds(fused, x, steps), "step_plain": _step_seconds(plain, x, steps),
                "step_eager": _step_seconds(layer, x, steps), "fusions": len(report.fused())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", default=",".join(SHAPES), help="comma-separated demo layers")
    args = parser.parse_args()
    rows = []
    for name in args.layers.split(","):
        ep, tp, shapes = SHAPES[name]
        cfg = DemoConfig(layer=name, world=ep * tp, ep=ep, tp=tp, dtype="fp32", steps=0, compiler="inductor", **shapes)
        r = run_ranks(cfg.world, _rank_main, cfg, args.repeats, timeout=3600, pg_timeout=1200)[0]
        rows.append((cfg, r))
    print(f"{'layer':16s} {'EPxTP':6s} {'shapes':44s} {'fusions':>7s} {'compile +passes/plain':>22s} "
          f"{'step fused ms':>14s} {'plain ms':>9s} {'eager ms':>9s} {'fused/plain':>11s}")
    for cfg, r in rows:
        shapes = f"T={cfg.tokens} H={cfg.hidden} F={cfg.ffn_hidden} E={cfg.experts}"
        print(f"{cfg.layer:16s} {cfg.ep}x{cfg.tp:<4d} {shapes:44s} {r['fusions']:7d} "
              f"{r['compile_fused']:8.2f}/{r['compile_plain']:.2f}s={r['compile_fused'] / r['compile_plain']:.3f} "
              f"{r['step_fused'] * 1e3:14.2f} {r['step_plain'] * 1e3:9.2f} {r['step_eager'] * 1e3:9.2f} "
              f"{r['step_fused'] / r['step_plain']:11.3f}")


if __name__ == "__main__":
    main()
