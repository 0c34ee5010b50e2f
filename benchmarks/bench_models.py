"""MoE blocks of the libraries people run, fused vs plain inductor, per step.

    python benchmarks/bench_models.py [--repeats N]

HF transformers (the ``integration`` extra): Mixtral, Qwen3-MoE and DeepSeek-V3 sparse blocks with
``grouped_mm``, ``batched_mm`` and ``eager`` experts, single process, fp32: ``moe_fusion.compile(block)`` (the
``eager`` experts through its module route) vs ``torch.compile(block)`` (plain inductor, the block
as it is); inference steps (no autograd) and training steps (forward + backward of a fixed loss).
The variants alternate; the table gives spreads, the median paired ratio with its interval, and
the verdict against the target (<= 1.0: fusing must not slow the block down).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from _timing import Row, argument_parser, print_table
from moe_fusion.demo.timing import Comparison, interleave, wall_seconds
import moe_fusion
from moe_fusion.passes import FusionReport

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))
from test_hf_transformers import BLOCKS, make_block  # noqa: E402  (the blocks the integration tests fuse)

HIDDEN, INNER, TARGET = 1024, 1408, 1.0
# implementation -> tokens per step. batched_mm gathers every token-slot's expert weights
# (T*K*3*I*H floats: 4.4 GB at T=512), so HF uses it for small batches: a decode-sized step.
TOKENS = {"grouped_mm": 512, "batched_mm": 8, "eager": 512}


def _measure(name: str, implementation: str, train: bool, repeats: int) -> tuple[Comparison, int]:
    block = make_block(name, implementation, HIDDEN, INNER)
    x = torch.randn(TOKENS[implementation], 1, HIDDEN, requires_grad=train)
    weights = torch.linspace(-1, 1, x.numel()).view(x.shape)

    def step(run) -> None:
        with torch.set_grad_enabled(train):
            out = run(x)
            y = out[0] if isinstance(out, tuple) else out
            if train:
                (y * weights).sum().backward()
                block.zero_grad(set_to_none=True)

    report = FusionReport()
    torch._dynamo.reset()
    fused = moe_fusion.compile(block, report=report)
    plain = torch.compile(block, backend="inductor")
    step(fused), step(plain)          # compile outside the timing
    timed_fused, timed_plain = interleave((lambda: step(fused), lambda: step(plain)), repeats, timer=wall_seconds)
    return Comparison(timed_fused, timed_plain), len(report.fused())


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=15, help="timed steps of each variant")
    args = parser.parse_args()
    rows = []
    for name in BLOCKS:
        for implementation in TOKENS:
            for train in (False, True):
                timing, fusions = _measure(name, implementation, train, args.repeats)
                rows.append(Row(f"hf {name} {implementation} {'train' if train else 'infer'} T={TOKENS[implementation]} H={HIDDEN} "
                                f"I={INNER}: fused vs plain inductor ({fusions} fusions)", timing, TARGET))
    print_table(rows)


if __name__ == "__main__":
    main()
