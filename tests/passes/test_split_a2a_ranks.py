"""The variable-split all-to-all MoE (``split_a2a``), written by hand the way torchtitan writes it
(split sizes exchanged with an all-to-all and read with ``.tolist()``, rank-major rows permuted to
expert-major ones, grouped SwiGLU experts over ``offs``, a weighted ``index_add`` back to the
tokens), on 2 gloo ranks, and look-alikes that must not fuse: scores taken in token order instead
of the rows' expert order (each row weighted by another route's score), rows left rank-major for
the experts (a row reaches the wrong expert whenever both ranks send to one rank), and routes sorted
by descending expert while the split sizes count ascending ranks (rows reach the wrong rank); a
second batch size (dynamo's dynamic recompile) is refused with the reason, not simulated. Each
compiled layer equals the eager one within bf16 rounding (the experts compute in bf16, as
torchtitan's)."""
from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

import moe_fusion
from moe_fusion.launch import run_ranks
from moe_fusion.passes import FusionReport

HIDDEN, FFN, EXPERTS, TOP_K, TOKENS, WORLD = 16, 32, 4, 2, 12, 2
LOCAL = EXPERTS // WORLD
VARIANTS = {  # name -> refusal expected, None when it fuses
    "torchtitan-like": None,
    "scores-in-token-order": "is not the score-weighted sum",
    "rank-major-experts": "is not the score-weighted sum",
    "descending-routes": "is not the score-weighted sum",
    "dynamic-batch": "has a dynamic size",   # the torchtitan-like layer called with a second batch size
}


class SplitMoE(torch.nn.Module):
    """Softmax top-2 routing, rows to the expert's rank over a variable-split all-to-all, grouped
    SwiGLU experts, weighted sum back."""

    def __init__(self, variant: str, rank: int) -> None:
        super().__init__()
        self.variant = variant
        torch.manual_seed(0)
        self.gate = torch.nn.Linear(HIDDEN, EXPERTS, bias=False)
        torch.manual_seed(1 + rank)
        self.w1 = torch.nn.Parameter(torch.randn(LOCAL, FFN, HIDDEN) * 0.2)
        self.w3 = torch.nn.Parameter(torch.randn(LOCAL, FFN, HIDDEN) * 0.2)
        self.w2 = torch.nn.Parameter(torch.randn(LOCAL, HIDDEN, FFN) * 0.2)

    def experts(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        a = rows.bfloat16()
        h = F.silu(torch._grouped_mm(a, self.w1.bfloat16().transpose(-2, -1), offs=offs))
        h = h * torch._grouped_mm(a, self.w3.bfloat16().transpose(-2, -1), offs=offs)
        return torch._grouped_mm(h, self.w2.bfloat16().transpose(-2, -1), offs=offs).type_as(rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = dist.group.WORLD
        scores, ids = torch.topk(F.softmax(self.gate(x), dim=-1), TOP_K, dim=-1)
        counts = F.one_hot(ids, EXPERTS).sum((0, 1))
        order = torch.argsort(ids.view(-1), stable=True, descending=self.variant == "descending-routes")
        token = order // TOP_K
        recv_counts = funcol.all_to_all_single(counts, None, None, group)
        send = counts.view(WORLD, LOCAL).sum(1).tolist()
        recv = recv_counts.view(WORLD, LOCAL).sum(1).tolist()
        received = funcol.all_to_all_single(x[token], recv, send, group)
        # rank-major (r, e) segments -> expert-major (e, r), as torchtitan's _permute
        lens = recv_counts.view(WORLD, LOCAL).t().reshape(-1)
        starts = (recv_counts.cumsum(0) - recv_counts).view(WORLD, LOCAL).t().reshape(-1)
        seg = torch.arange(lens.shape[0]).repeat_interleave(lens, output_size=received.shape[0])
        perm = starts[seg] + torch.arange(seg.shape[0]) - (lens.cumsum(0) - lens)[seg]
        if self.variant == "rank-major-experts":
            perm = torch.arange(received.shape[0])
        out = self.experts(received[perm], recv_counts.view(WORLD, LOCAL).sum(0))
        back = out.new_empty(received.shape)
        back[perm] = out
        returned = funcol.all_to_all_single(back, send, recv, group)
        weights = scores.view(-1) if self.variant == "scores-in-token-order" else scores.view(-1)[order]
        return torch.zeros_like(x).index_add(0, token, returned * weights.unsqueeze(1))


def _split_events(events: list) -> list[tuple[str, bool, str]]:
    return [(e.pattern, e.fused, e.detail) for e in events if e.pattern == "moe_split_a2a"]


def _run(rank: int, world: int) -> dict[str, Any]:
    results = {}
    for name in [v for v in VARIANTS if v != "dynamic-batch"]:
        layer = SplitMoE(name, rank)
        x = torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(50 + rank))
        report = FusionReport()
        torch._dynamo.reset()
        with torch.no_grad():
            eager = layer(x)
            compiled = moe_fusion.compile(layer, report=report, compiler="eager")
            results[name] = {"eager": eager, "fused": compiled(x), "events": _split_events(report.events)}
            if name == "torchtitan-like":   # a second batch size: dynamo recompiles with a dynamic one
                seen = len(report.events)
                bigger = torch.randn(TOKENS + 4, HIDDEN, generator=torch.Generator().manual_seed(60 + rank))
                results["dynamic-batch"] = {"eager": layer(bigger), "fused": compiled(bigger),
                                            "events": _split_events(report.events[seen:])}
    return results


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    return run_ranks(WORLD, _run, timeout=300)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_split_block_fuses_only_when_exact(ranks, name):
    refusal = VARIANTS[name]
    for rank, result in enumerate(ranks):
        case = result[name]
        assert len(case["events"]) == 1, case["events"]
        _, fused, detail = case["events"][0]
        assert fused if refusal is None else (not fused and refusal in detail), detail
        scale = case["eager"].abs().max().item()
        assert (case["fused"] - case["eager"]).abs().max().item() <= 1e-2 * scale + 1e-3, rank
