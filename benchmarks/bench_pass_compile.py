"""The fusion passes' share of inductor's compile time on large MoE blocks (issue: the capacity
guards used to evaluate the block at full size, S^2*E, so a real batch could not compile).

    python benchmarks/bench_pass_compile.py [--repeats N] [--tokens 8192] [--experts 64] [--hidden 1024]

One process, PyTorch's fake process group (world 2, rank 1): the layer is compiled, never run (at
S=8192, E=64 its (S, E, C) mask alone would be 17 GB). For each repeat, a fresh inductor compile
(FX graph cache off) of the capacity all-to-all layer with ``moe_fusion.backend()``; the time in
the passes is measured inside the compile. Prints min/median/max of both, and the passes' median
share with its confidence interval and whether it met the target (<= 5 %).
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.fx as fx
from torch._inductor.compile_fx import compile_fx
from torch.testing._internal.distributed.fake_pg import FakeStore

from _timing import argument_parser
from moe_fusion.demo.moe_layers import CapacityAllToAllMoE
from moe_fusion.demo.timing import Comparison, spread
from moe_fusion.passes import MoeFusionGraphPass, run_fusion_passes

TARGET_SHARE = 0.05


class _Compiled(Exception):
    """Raised after the compile: the layer is not run."""


class TimedPass(MoeFusionGraphPass):
    """The pipeline, timing itself and recording what fused (the FX graph cache is off)."""

    seconds = 0.0
    fused: list[str] = []

    def __call__(self, graph: fx.Graph) -> None:
        start = time.perf_counter()
        report = run_fusion_passes(graph, target=self.target)
        TimedPass.seconds += time.perf_counter() - start
        TimedPass.fused += [e.pattern for e in report.fused()]


def compile_once(tokens: int, experts: int, hidden: int, ffn_hidden: int) -> tuple[float, float, list[str]]:
    """``(compile seconds, pass seconds, fused patterns)`` of one fresh compile."""
    layer = CapacityAllToAllMoE(hidden, ffn_hidden, experts, 2, ep_group=dist.group.WORLD, seed=5)
    TimedPass.seconds, TimedPass.fused = 0.0, []
    spent = {}

    def compile_only(gm: fx.GraphModule, example_inputs: list):
        start = time.perf_counter()
        compile_fx(gm, example_inputs, config_patches={"post_grad_custom_pre_pass": TimedPass()})
        spent["compile"] = time.perf_counter() - start
        raise _Compiled

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            torch.compile(layer, backend=compile_only, fullgraph=True, dynamic=False)(torch.randn(tokens, hidden))
    except Exception as error:  # dynamo wraps the backend's exception
        if "compile" not in spent:
            raise RuntimeError("the compile failed") from error
    return spent["compile"], TimedPass.seconds, TimedPass.fused


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=3, help="fresh compiles")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens (S)")
    parser.add_argument("--experts", type=int, default=64, help="experts (E)")
    parser.add_argument("--hidden", type=int, default=1024, help="model (hidden) size (H)")
    parser.add_argument("--ffn-hidden", type=int, default=256, help="expert FFN hidden size (F)")
    args = parser.parse_args()
    torch._inductor.config.fx_graph_cache = False
    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=2)
    runs = [compile_once(args.tokens, args.experts, args.hidden, args.ffn_hidden) for _ in range(args.repeats)]
    compile_s = tuple(r[0] for r in runs)
    pass_s = tuple(r[1] for r in runs)
    share = Comparison(pass_s, compile_s)     # its ratios: each compile's share spent in the passes
    print(f"capacity-a2a S={args.tokens} E={args.experts} H={args.hidden} F={args.ffn_hidden}, world 2, "
          f"{args.repeats} fresh inductor compiles")
    print(f"  fused: {sorted(set(runs[0][2]))}")
    print(f"  compile s  min/median/max: {spread(compile_s, scale=1.0)}")
    print(f"  passes s   min/median/max: {spread(pass_s, scale=1.0)}")
    print(f"  passes' share of compile time, median [{share.interval.coverage:.0%} interval]: "
          f"{share.ratio:.1%} [{share.interval.low:.1%}, {share.interval.high:.1%}]  target <= {TARGET_SHARE:.0%}: "
          f"{share.target_verdict(TARGET_SHARE)}")
    dist.destroy_process_group()

if __name__ == "__main__":
    main()
