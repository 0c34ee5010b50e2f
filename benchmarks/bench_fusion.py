"""Fusion passes: compile-time overhead, and per-step time of the demo layers fused vs unfused.

    python benchmarks/bench_fusion.py [--repeats N] [--layers a,b] [--train]

On 4 gloo ranks (fp32), for each demo layer: inductor compile time with the moe_fusion passes vs
plain inductor (fresh compiles, FX graph cache off, the two alternating; target: passes add
<= 5 %), and the per-step time of the fused layer vs the same layer compiled without the passes
and vs eager (the three alternating). Times are the slowest rank's, every compile and step from a
barrier; the table gives spreads, median paired ratios with their intervals, and verdicts.

``--train`` times training steps instead (forward + backward of a fixed loss, the demo layers'
trainable forms), fused vs plain inductor; targets: the DeepSpeed-style layer <= 1.0 (the BMM pair
must not cost more than the chain it replaces), AllGather-EP <= 0.5 (its unfused form runs every
local expert on every gathered token).
"""
from __future__ import annotations

import torch

from _timing import Row, argument_parser, print_table
from moe_fusion.demo.run import LAYERS, DemoConfig
from moe_fusion.demo.timing import Comparison, interleave, synced_seconds
from moe_fusion.launch import run_ranks
from moe_fusion.passes import FusionReport, backend

COMPILE_TARGET = 1.05   # compile time with the passes / without
TRAIN_TARGETS = {"deepspeed-bmm": 1.0, "allgather-ep": 0.5, "capacity-a2a": None}   # train step, fused / inductor

# layer -> (EP, TP, demo shapes) at which it is measured.
SHAPES = {
    "deepspeed-bmm": (2, 2, dict(tokens=512, hidden=1024, ffn_hidden=2048, experts=8)),
    "allgather-ep": (4, 1, dict(tokens=128, hidden=2048, ffn_hidden=1024, experts=16)),
    "capacity-a2a": (4, 1, dict(tokens=128, hidden=2048, ffn_hidden=1024, experts=16)),
}


def _compile(layer: torch.nn.Module, x: torch.Tensor, compiler_backend) -> None:
    """A fresh compile of ``layer`` and its first call."""
    torch._dynamo.reset()
    torch.compile(layer, backend=compiler_backend, dynamic=False)(x)


def _train_main(rank: int, world: int, cfg: DemoConfig, repeats: int) -> dict:
    """Training steps of the fused layer vs the same layer under plain inductor (and eager)."""
    torch.manual_seed(rank)
    layer = LAYERS[cfg.layer](cfg, rank)
    x = torch.randn(cfg.tokens, cfg.hidden, requires_grad=True)
    weights = torch.linspace(-1, 1, cfg.tokens * cfg.hidden).reshape(cfg.tokens, cfg.hidden)

    def step(run) -> None:
        (run(x) * weights).sum().backward()
        layer.zero_grad(set_to_none=True)

    report = FusionReport()
    torch._dynamo.reset()
    fused = torch.compile(layer, backend=backend(report=report), dynamic=False)
    plain = torch.compile(layer, backend="inductor", dynamic=False)
    step(fused), step(plain)   # compile outside the timing
    step_fused, step_plain, step_eager = interleave((lambda: step(fused), lambda: step(plain), lambda: step(layer)),
                                                    max(5, repeats * 3), timer=synced_seconds)
    return {"plain": Comparison(step_fused, step_plain), "eager": Comparison(step_fused, step_eager),
            "fusions": len(report.fused())}


def _rank_main(rank: int, world: int, cfg: DemoConfig, repeats: int) -> dict:
    torch.manual_seed(rank)
    torch._inductor.config.fx_graph_cache = False    # measure real compiles, every repeat
    layer = LAYERS[cfg.layer](cfg, rank)
    x = torch.randn(cfg.tokens, cfg.hidden)
    with torch.no_grad():
        compile_fused, compile_plain = interleave((lambda: _compile(layer, x, backend()),
                                                   lambda: _compile(layer, x, "inductor")), repeats,
                                                  timer=synced_seconds)
        torch._dynamo.reset()
        report = FusionReport()
        fused = torch.compile(layer, backend=backend(report=report), dynamic=False)
        plain = torch.compile(layer, backend="inductor", dynamic=False)
        step_fused, step_plain, step_eager = interleave((lambda: fused(x), lambda: plain(x), lambda: layer(x)),
                                                        max(5, repeats * 3), timer=synced_seconds)
        return {"compile": Comparison(compile_fused, compile_plain), "plain": Comparison(step_fused, step_plain),
                "eager": Comparison(step_fused, step_eager), "fusions": len(report.fused())}


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed compiles of each variant (per-step timings: 3x as many, at least 5)")
    parser.add_argument("--layers", default=None, help="comma-separated demo layers (default: all)")
    parser.add_argument("--train", action="store_true", help="time training steps (forward + backward)")
    args = parser.parse_args()
    rows = []
    names = args.layers.split(",") if args.layers else list(TRAIN_TARGETS if args.train else SHAPES)
    for name in names:
        ep, tp, shapes = SHAPES[name]
        cfg = DemoConfig(layer=name, world=ep * tp, ep=ep, tp=tp, dtype="fp32", steps=0, compiler="inductor",
                         train=args.train, **shapes)
        r = run_ranks(cfg.world, _train_main if args.train else _rank_main, cfg, args.repeats, timeout=3600,
                      pg_timeout=1200)[0]
        label = f"{name} {ep}x{tp} T={cfg.tokens} H={cfg.hidden} F={cfg.ffn_hidden} E={cfg.experts}"
        print(f"{label}: {r['fusions']} fusion(s)")
        if args.train:
            rows += [Row(f"{name} {ep}x{tp} train step: fused vs plain inductor", r["plain"], TRAIN_TARGETS[name]),
                     Row(f"{name} {ep}x{tp} train step: fused vs eager", r["eager"], None)]
            continue
        rows += [Row(f"{name} {ep}x{tp} compile: +passes vs plain inductor", r["compile"], COMPILE_TARGET),
                 Row(f"{name} {ep}x{tp} step: fused vs plain inductor", r["plain"], None),
                 Row(f"{name} {ep}x{tp} step: fused vs eager", r["eager"], None)]
    print_table(rows)


if __name__ == "__main__":
    main()
