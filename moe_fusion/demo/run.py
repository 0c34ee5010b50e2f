"""The main job: an unfused expert-parallel MoE layer, compiled with the fusion passes on real
gloo ranks, checked against eager, and timed fused vs unfused.

``python -m moe_fusion demo --help`` lists the options. Each configuration spawns ``world`` CPU
ranks on 127.0.0.1; rank 0 prints the fusion report, the check and the timings: the unfused and
fused steps alternate, and the result gives each one's min/median/max, the median fused/unfused
ratio of the same repeat with its confidence interval, and whether the difference is outside the
noise (``moe_fusion.demo.timing`` says how).
"""
from __future__ import annotations

import argparse
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from ..launch import run_ranks
from ..passes import FusionReport, backend
from .timing import Comparison, compare, spread, synced_seconds

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class DemoConfig:
    layer: str
    world: int
    ep: int
    tp: int
    tokens: int
    hidden: int
    ffn_hidden: int
    experts: int
    dtype: str
    steps: int
    compiler: str
    top_k: int = 2                  # experts per token (the top-k layers)
    shared_expert: bool = False     # add a shared expert (the top-k layers)
    train: bool = False             # time and check training steps (forward + backward)

    @property
    def label(self) -> str:
        return f"{self.layer} EP={self.ep} x TP={self.tp}"


def _say(rank: int, message: str) -> None:
    if rank == 0:
        print(message, flush=True)


def ep_tp_groups(rank: int, ep: int, tp: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """rank = p * tp + q: EP groups hold the ranks of one TP index q, TP groups one EP index p.
    Every rank creates every group, in the same order, as torch.distributed requires."""
    ep_groups = [dist.new_group([p * tp + q for p in range(ep)]) for q in range(tp)]
    tp_groups = [dist.new_group([p * tp + q for q in range(tp)]) for p in range(ep)]
    return ep_groups[rank % tp], tp_groups[rank // tp]


def _build_deepspeed(cfg: DemoConfig, rank: int) -> torch.nn.Module:
    """The DeepSpeed-style layer; its ``Trainable`` form (differentiable collectives) for ``--train``."""
    from .deepspeed_layer import DeepSpeedMoE, TrainableDeepSpeedMoE

    ep_group, tp_group = ep_tp_groups(rank, cfg.ep, cfg.tp)
    layer_type = TrainableDeepSpeedMoE if cfg.train else DeepSpeedMoE
    return layer_type(cfg.hidden, cfg.ffn_hidden, cfg.experts, ep_group=ep_group, tp_group=tp_group,
                      dtype=DTYPES[cfg.dtype])


def _build_top_k(class_name: str) -> Callable[[DemoConfig, int], torch.nn.Module]:
    """Builder of a ``moe_layers`` class: experts over the EP group (TP ranks hold replicas); its
    ``Trainable`` form (differentiable collectives) for ``--train``."""
    def build(cfg: DemoConfig, rank: int) -> torch.nn.Module:
        from . import moe_layers

        ep_group, _ = ep_tp_groups(rank, cfg.ep, cfg.tp)
        layer_type = getattr(moe_layers, ("Trainable" if cfg.train else "") + class_name)
        return layer_type(cfg.hidden, cfg.ffn_hidden, cfg.experts, cfg.top_k, ep_group=ep_group,
                          shared_expert=cfg.shared_expert, dtype=DTYPES[cfg.dtype])
    return build


# --layer name -> builder(cfg, rank) of the unfused layer.
LAYERS: dict[str, Callable[[DemoConfig, int], torch.nn.Module]] = {"deepspeed-bmm": _build_deepspeed}
LAYERS.update({"allgather-ep": _build_top_k("AllGatherEPMoE"), "capacity-a2a": _build_top_k("CapacityAllToAllMoE")})


def _train_step(layer: torch.nn.Module, run: Callable[[torch.Tensor], torch.Tensor],
                x: torch.Tensor) -> list[torch.Tensor]:
    """``run(x)`` (``layer`` or its compiled form), a fixed loss and its backward: the output, the
    input gradient and every parameter gradient (then cleared)."""
    x = x.detach().requires_grad_()
    out = run(x)
    (out.float() * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    grads = [out.detach(), x.grad] + [p.grad.clone() for p in layer.parameters() if p.grad is not None]
    layer.zero_grad(set_to_none=True)
    return grads


def _rank_main(rank: int, world: int, cfg: DemoConfig) -> dict:
    # torch 2.13 deprecates dist.all_gather_into_tensor, which the unfused layers use as people write them.
    warnings.filterwarnings("ignore", message=".*is deprecated. Please use", category=FutureWarning)
    torch.manual_seed(1234 + rank)
    _say(rank, f"[{cfg.label}] building the unfused layer on {world} gloo ranks")
    layer = LAYERS[cfg.layer](cfg, rank)
    x = torch.randn(cfg.tokens, cfg.hidden, dtype=DTYPES[cfg.dtype])
    report = FusionReport()
    fused = torch.compile(layer, backend=backend(report=report, compiler=cfg.compiler), dynamic=False)
    # Inference steps run without autograd; training steps are forward + backward of a fixed loss.
    step: Callable[[Callable[[torch.Tensor], torch.Tensor]], list[torch.Tensor]] = (
        (lambda run: _train_step(layer, run, x)) if cfg.train else (lambda run: [run(x)]))
    with torch.set_grad_enabled(cfg.train):
        expected = step(layer)
        _say(rank, f"[{cfg.label}] compiling with moe_fusion.backend(compiler={cfg.compiler!r})"
                   f"{' for training' if cfg.train else ''}")
        start = time.perf_counter()
        got = step(fused)
        compile_s = time.perf_counter() - start
        _say(rank, report.format())
        max_err = max((g.float() - e.float()).abs().max().item() for g, e in zip(got, expected))
        scale = max(e.float().abs().max().item() for e in expected)
        what = "output and gradients" if cfg.train else "output"
        _say(rank, f"[{cfg.label}] fused vs eager unfused {what}: max abs error {max_err:.3g} (max {scale:.3g})")
        _say(rank, f"[{cfg.label}] timing {cfg.steps} steps of each, unfused and fused alternating")
        timing = compare(lambda: step(fused), lambda: step(layer), cfg.steps, timer=synced_seconds)
    _say(rank, f"[{cfg.label}] per step, ms min/median/max: unfused {spread(timing.baseline)}, "
               f"fused {spread(timing.kernel)} (compile {compile_s:.1f} s)")
    _say(rank, f"[{cfg.label}] {_timing_summary(timing)}")
    return {"fused": len(report.fused()), "refused": len(report.refused()), "max_err": max_err, "scale": scale,
            "timing": timing}


def _timing_summary(timing: Comparison) -> str:
    """``fused/unfused <ratio> [interval] (<coverage> interval): <verdict>``."""
    return (f"fused/unfused {timing.format_ratio()} ({timing.interval.coverage:.0%} interval): "
            f"{timing.noise_verdict('fused')}")


def configs(args: argparse.Namespace) -> list[DemoConfig]:
    layouts = [(2, 2), (4, 1)] if args.layout == "all" else [tuple(int(v) for v in args.layout.split("x"))]
    return [DemoConfig(args.layer, ep * tp, ep, tp, args.tokens, args.hidden, args.ffn_hidden, args.experts,
                       args.dtype, args.steps, args.compiler, train=args.train) for ep, tp in layouts]


def _layout(text: str) -> str:
    """``--layout``: ``all`` or ``EPxTP`` with positive ints."""
    ep, sep, tp = text.partition("x")
    if text != "all" and not (sep and ep.isdigit() and tp.isdigit() and int(ep) > 0 and int(tp) > 0):
        raise argparse.ArgumentTypeError(f"give EPxTP such as 2x2 or 4x1, or 'all'; got {text!r}")
    return text


def _positive(text: str) -> int:
    """A positive int argument."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"give a positive integer, got {text!r}")
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options (every one has a default)."""
    parser.add_argument("--layer", choices=sorted(LAYERS), default="deepspeed-bmm", help="the unfused MoE layer")
    parser.add_argument("--layout", type=_layout, default="all", help="EPxTP, e.g. 2x2 or 4x1; 'all' runs 2x2 and 4x1")
    parser.add_argument("--tokens", type=_positive, default=256, help="tokens per rank")
    parser.add_argument("--hidden", type=_positive, default=512, help="model (hidden) size")
    parser.add_argument("--ffn-hidden", type=_positive, default=1024, help="hidden size of each expert's FFN")
    parser.add_argument("--experts", type=_positive, default=8, help="number of experts")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of inputs and weights")
    parser.add_argument("--steps", type=_positive, default=20,
                        help="timed steps of each variant, unfused and fused alternating")
    parser.add_argument("--compiler", choices=["inductor", "eager"], default="inductor",
                        help="inductor code generation, or the fused ATen graph run as is")
    parser.add_argument("--train", action="store_true",
                        help="time and check training steps (forward + backward) instead of inference")


def main(args: argparse.Namespace) -> int:
    """Run every configuration of ``args``; 0 when each fused and matched eager, else 1."""
    failures = 0
    for cfg in configs(args):
        print(f"== {cfg.label}: spawning {cfg.world} ranks", flush=True)
        result = run_ranks(cfg.world, _rank_main, cfg, timeout=1200, pg_timeout=600)[0]
        # bf16 outputs differ by the rounding of the fused op's fp32 intermediates; fp32 by accumulation order.
        tolerance = (2e-2 if cfg.dtype == "bf16" else 1e-4) * max(result["scale"], 1.0)
        ok = result["fused"] > 0 and result["max_err"] <= tolerance
        print(f"== {cfg.label}: {'OK' if ok else 'FAILED'} ({result['fused']} fusions, max error "
              f"{result['max_err']:.3g} <= {tolerance:.3g}; {_timing_summary(result['timing'])})", flush=True)
        failures += not ok
    return 1 if failures else 0
