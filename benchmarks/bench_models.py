"""MoE blocks of the libraries people run, fused vs plain inductor, per step.

    python benchmarks/bench_models.py [--repeats N]

HF transformers (the ``integration`` extra): Mixtral, Qwen3-MoE and DeepSeek-V3 sparse blocks with
``grouped_mm``, ``batched_mm`` and ``eager`` experts, single process, fp32 (``--hf-dtype bfloat16``
for bf16 blocks): ``moe_fusion.compile(block)`` (the
``eager`` experts through its module route) vs ``torch.compile(block)`` (plain inductor, the block
as it is); inference steps (no autograd) and training steps (forward + backward of a fixed loss).
The variants alternate; the table gives spreads, the median paired ratio with its interval, and
the verdict against the target (<= 1.0: fusing must not slow the block down).

Expert-parallel layers on 4 gloo ranks (``--only ep``): DeepSpeed 0.19.8 ``MoE`` (k=2 dropless, k=1
with capacity factors 1 and 2: the first left unfused by the cost gate), fairscale 0.4.13
``MOELayer`` + ``Top2Gate`` and Megatron-core 0.16.1 ``MoELayer`` (alltoall, SwiGLU, SequentialMLP;
and GroupedMLP, which Megatron runs in bf16 only, on the integration tests' CPU ``gmm``; the cost
gate leaves both unfused here: the all-to-all dispatcher off Ascend, bf16 experts on CPUs with
native bf16 matmuls; ``--no-cost-gate`` fuses them) and
torchtitan 0.3.0 ``MoE`` (its own expert-parallel ``parallelize``, all-to-all token dispatcher,
bf16 grouped SwiGLU experts), fp32 (tokens in the layer's dtype), 2 experts per rank:
``moe_fusion.compile`` vs plain ``torch.compile`` of an identical layer, each step timed on the
slowest rank (``--cpu``: the CPU time of the step summed over the ranks, the work it puts on the
machine, which sets the wall time where ranks outnumber cores).
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

from _timing import Row, argument_parser, print_table
from moe_fusion.demo.timing import Comparison, interleave, wall_seconds
from moe_fusion.launch import run_ranks
import moe_fusion
from moe_fusion.passes import FusionReport

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "tests" / "integration"),
                str(Path(__file__).resolve().parents[1] / "tests")]
from test_hf_transformers import BLOCKS, make_block  # noqa: E402  (the blocks the integration tests fuse)

HIDDEN, INNER, TARGET = 1024, 1408, 1.0
# implementation -> tokens per step. batched_mm gathers every token-slot's expert weights
# (T*K*3*I*H floats: 4.4 GB at T=512), so HF uses it for small batches: a decode-sized step.
TOKENS = {"grouped_mm": 512, "batched_mm": 8, "eager": 512}


def _step(run, layer: torch.nn.Module, x: torch.Tensor, train: bool) -> None:
    """One step of ``run`` (``layer`` or a compiled form of it): with ``train``, forward and backward of
    a fixed loss, ``layer``'s gradients cleared after."""
    with torch.set_grad_enabled(train):
        out = run(x)
        y = out[0] if isinstance(out, tuple) else out
        if train:
            (y * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
            layer.zero_grad(set_to_none=True)


def _measure(name: str, implementation: str, train: bool, repeats: int, dtype: torch.dtype,
             cost_gate: bool) -> tuple[Comparison, int]:
    block = make_block(name, implementation, HIDDEN, INNER).to(dtype)
    x = torch.randn(TOKENS[implementation], 1, HIDDEN, dtype=dtype, requires_grad=train)

    def step(run) -> None:
        _step(run, block, x, train)

    report = FusionReport()
    torch._dynamo.reset()
    fused = moe_fusion.compile(block, report=report, cost_gate=cost_gate)
    plain = torch.compile(block, backend="inductor")
    step(fused), step(plain)          # compile outside the timing
    timed_fused, timed_plain = interleave((lambda: step(fused), lambda: step(plain)), repeats, timer=wall_seconds)
    return Comparison(timed_fused, timed_plain), len(report.fused())


EP_WORLD, EP_TOKENS, EP_LOCAL = 4, 512, 2      # ranks, tokens per rank, experts per rank


def _expert_mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(HIDDEN, INNER), torch.nn.ReLU(), torch.nn.Linear(INNER, HIDDEN))


def _deepspeed(rank: int, world: int, **options) -> torch.nn.Module:
    from deepspeed_shims import deepspeed_moe, init_deepspeed

    init_deepspeed()
    return deepspeed_moe(_expert_mlp(), HIDDEN, world * EP_LOCAL, world, seed=0, rank=rank, min_capacity=4, **options)


def _fairscale(rank: int, world: int) -> torch.nn.Module:
    from fairscale.nn.moe import MOELayer, Top2Gate

    torch.manual_seed(0)
    gate = Top2Gate(HIDDEN, world * EP_LOCAL)
    torch.manual_seed(1 + rank)
    return MOELayer(gate, torch.nn.ModuleList([_expert_mlp() for _ in range(EP_LOCAL)]))


@functools.lru_cache(maxsize=1)
def _torchtitan_dims(world: int):
    from test_torchtitan import expert_parallel_dims

    return expert_parallel_dims(world)


def _torchtitan(rank: int, world: int) -> torch.nn.Module:
    from test_torchtitan import make_ep_moe

    return make_ep_moe(_torchtitan_dims(world), world * EP_LOCAL, False, HIDDEN, INNER)


def _megatron(rank: int, world: int, **overrides) -> torch.nn.Module:
    import megatron_shims
    from test_megatron import make_layer

    megatron_shims.install()
    megatron_shims.init_parallel(world)
    return make_layer(overrides, False, hidden=HIDDEN, ffn=INNER, experts=world * EP_LOCAL, world=world)


EP_LAYERS = {  # name -> builder(rank, world): the layer, built alike on every call
    "deepspeed k=2 dropless": lambda rank, world: _deepspeed(rank, world, k=2, drop_tokens=False),
    "deepspeed k=1 capacity 1.0": lambda rank, world: _deepspeed(rank, world, k=1, drop_tokens=True,
                                                                 capacity_factor=1.0),
    "deepspeed k=1 capacity 2.0": lambda rank, world: _deepspeed(rank, world, k=1, drop_tokens=True,
                                                                 capacity_factor=2.0),
    "fairscale top2": _fairscale,
    "megatron alltoall top2": _megatron,
    "megatron alltoall top2 GroupedMLP bf16": lambda rank, world: _megatron(
        rank, world, moe_grouped_gemm=True, bf16=True, params_dtype=torch.bfloat16),
    "torchtitan alltoall top2": _torchtitan,
}
EP_TOKEN_DTYPES = {"megatron alltoall top2 GroupedMLP bf16": torch.bfloat16}   # the others take fp32 tokens


def _measure_ep(rank: int, world: int, names: list[str], train: bool, repeats: int, cpu: bool,
                cost_gate: bool) -> dict:
    """Per layer: fused vs plain inductor step times (slowest rank; with ``cpu``, the CPU time of
    all ranks), and the fusions of rank 0."""
    from moe_fusion.demo.timing import group_cpu_seconds, synced_seconds

    out = {}
    tokens = torch.randn(EP_TOKENS, 1, HIDDEN, generator=torch.Generator().manual_seed(rank))
    for name in names:
        fused_layer, plain_layer = EP_LAYERS[name](rank, world), EP_LAYERS[name](rank, world)
        x = tokens.to(EP_TOKEN_DTYPES.get(name, torch.float32)).requires_grad_(train)
        report = FusionReport()
        torch._dynamo.reset()
        fused = moe_fusion.compile(fused_layer, report=report, cost_gate=cost_gate)
        plain = torch.compile(plain_layer, backend="inductor")

        def step(run, layer: torch.nn.Module) -> None:
            _step(run, layer, x, train)

        # fairscale's and DeepSpeed's gates build their noise distributions on their first call (a
        # dict cache dynamo cannot replay: the first compile would break the graph there); an eager
        # step builds them, as a training script's first steps would.
        step(fused_layer, fused_layer), step(plain_layer, plain_layer)
        step(fused, fused_layer), step(plain, plain_layer)      # compile outside the timing
        timed = interleave((lambda: step(fused, fused_layer), lambda: step(plain, plain_layer)), repeats,
                           timer=group_cpu_seconds if cpu else synced_seconds)
        out[name] = (Comparison(*timed), sorted(e.pattern for e in report.fused()))
    return out


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=15, help="timed steps of each variant")
    parser.add_argument("--only", choices=("hf", "ep"), default=None, help="one part of the table (default: both)")
    parser.add_argument("--inference-only", action="store_true", help="skip the training steps")
    parser.add_argument("--hf-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the HF blocks' dtype (bf16 matmuls run natively on CPUs with AMX)")
    parser.add_argument("--hf-block", action="append", choices=list(BLOCKS), default=None,
                        help="an HF block to measure (repeatable; default: all)")
    parser.add_argument("--ep-layer", action="append", choices=list(EP_LAYERS), default=None,
                        help="an expert-parallel layer to measure (repeatable; default: all)")
    parser.add_argument("--ep-world", type=int, default=EP_WORLD,
                        help="expert-parallel ranks (more ranks than cores charges every collective round a "
                             "scheduling delay)")
    parser.add_argument("--cpu", action="store_true",
                        help="with --only ep: compare the CPU time per step summed over the ranks (the work each "
                             "variant puts on the machine) instead of the slowest rank's wall time")
    parser.add_argument("--no-cost-gate", dest="cost_gate", action="store_false",
                        help="fuse what the cost gate would leave unfused (to measure why it does)")
    args = parser.parse_args()
    if args.cpu and args.only != "ep":
        parser.error("--cpu needs --only ep (the HF blocks run in one process, whose wall time is its CPU time)")
    modes = (False,) if args.inference_only else (False, True)
    rows = []
    if args.only in (None, "hf"):
        for name in args.hf_block or BLOCKS:
            for implementation in TOKENS:
                for train in modes:
                    timing, fusions = _measure(name, implementation, train, args.repeats, getattr(torch, args.hf_dtype),
                                               args.cost_gate)
                    rows.append(Row(f"hf {name} {implementation} {args.hf_dtype} {'train' if train else 'infer'} "
                                    f"T={TOKENS[implementation]} H={HIDDEN} I={INNER}: fused vs plain inductor "
                                    f"({fusions} fusions)", timing, TARGET))
    if args.only in (None, "ep"):
        for train in modes:
            results = run_ranks(args.ep_world, _measure_ep, args.ep_layer or list(EP_LAYERS), train, args.repeats,
                                args.cpu, args.cost_gate, timeout=3600, pg_timeout=1200)[0]
            for name, (timing, fused) in results.items():
                rows.append(Row(f"{name} {'train' if train else 'infer'} EP={args.ep_world} T={EP_TOKENS}/rank "
                                f"H={HIDDEN} I={INNER} E={args.ep_world * EP_LOCAL}: fused vs plain inductor "
                                f"({', '.join(fused)})",
                                timing, None if args.cpu else TARGET))   # the target is a wall-time one
    print_table(rows, "CPU ms, all ranks" if args.cpu else "ms")


if __name__ == "__main__":
    main()
