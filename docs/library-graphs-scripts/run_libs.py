"""Compile fairscale's and DeepSpeed's MoE layers, unmodified, with moe_fusion on 2 gloo ranks.

Usage (from anywhere):
    PYTHONPATH=/work/libsite:/work/main timeout 900 /work/main/.venv/bin/python \
        /work/research/scripts/run_libs.py [case ...] [--grad]

Cases: fs_top2, ds_k1, ds_k2, ds_k2_nosample, ds_k1_drop, ds_k2_drop (default: all).
Per case and rank 0: eager vs compiled outputs, dynamo graph count / graph breaks, the fusion
report, and the ATen graphs the passes saw (written to /work/research/graphs/<case>_<n>.txt) plus
dynamo's own graphs (<case>_dynamo_<n>.txt).
"""
from __future__ import annotations

import json
import os
import sys
import time

# /work/main's tree moved under us while this ran: MOE_FUSION_ROOT pins a snapshot (git archive of one commit).
MOE_ROOT = os.environ.get("MOE_FUSION_ROOT", "/work/main")
sys.path[:0] = ["/work/libsite", MOE_ROOT]
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch

from moe_fusion.launch import run_ranks

GRAPH_DIR = "/work/research/graphs"
H, FF, E, WORLD = 16, 32, 4, 2        # hidden, expert FFN size, experts (2 per rank), EP ranks
TOKENS = 16                           # tokens per rank (per call)


class Mlp(torch.nn.Module):
    """The expert: Linear -> act -> Linear."""

    def __init__(self, act: str = "relu") -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(H, FF), torch.nn.Linear(FF, H)
        self.act = torch.nn.ReLU() if act == "relu" else torch.nn.GELU()

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _install_dumps(case: str, rank: int):
    """Shim (script side only): dump the ATen graph every MoeFusionGraphPass call receives, before
    and after the passes."""
    from moe_fusion.passes import pipeline

    orig = pipeline.MoeFusionGraphPass.__call__
    seen = {"n": 0}

    def dumping_call(self, graph):
        n = seen["n"]
        seen["n"] += 1
        if rank == 0:
            os.makedirs(GRAPH_DIR, exist_ok=True)
            with open(f"{GRAPH_DIR}/{case}_aten_{n}_before.txt", "w") as f:
                f.write(str(graph))
        out = orig(self, graph)
        if rank == 0:
            with open(f"{GRAPH_DIR}/{case}_aten_{n}_after.txt", "w") as f:
                f.write(str(graph))
        return out

    pipeline.MoeFusionGraphPass.__call__ = dumping_call
    return lambda: setattr(pipeline.MoeFusionGraphPass, "__call__", orig)


def _dynamo_dump_backend(case: str, rank: int, inner):
    """Wrap a backend: write dynamo's graph (torch IR) to a file first."""
    seen = {"n": 0}

    def backend(gm, example_inputs):
        n = seen["n"]
        seen["n"] += 1
        if rank == 0:
            os.makedirs(GRAPH_DIR, exist_ok=True)
            with open(f"{GRAPH_DIR}/{case}_dynamo_{n}.txt", "w") as f:
                f.write(gm.print_readable(print_output=False, include_stride=False, include_device=False))
        return inner(gm, example_inputs)

    return backend


# ---------------------------------------------------------------------------------------------
# layers
# ---------------------------------------------------------------------------------------------

def build_fairscale(rank: int, world: int, act: str):
    from fairscale.nn.moe import MOELayer, Top2Gate

    torch.manual_seed(0)                      # same gate on every rank
    gate = Top2Gate(H, E)
    torch.manual_seed(100 + rank)             # this rank's experts
    experts = torch.nn.ModuleList([Mlp(act) for _ in range(E // world)])
    layer = MOELayer(gate, experts)           # group=None -> WORLD
    x = torch.randn(2, TOKENS // 2, H, generator=torch.Generator().manual_seed(1000 + rank))
    return layer, x


_DS_READY = {}


def build_deepspeed(rank: int, world: int, k: int, drop_tokens: bool, act: str, sampling: bool = True):
    import deepspeed
    from deepspeed.moe.layer import MoE

    if not _DS_READY:
        # Shim: on the CPU accelerator, deepspeed.comm's TorchBackend JIT-builds its shared-memory
        # all-reduce op (ninja + c++, minutes, and a lock the other rank waits on). Not what an
        # accelerator user runs, and opaque to dynamo: skip it, so all_reduce is torch.distributed's.
        import deepspeed.comm.torch  # noqa: F401  (``import a.b.torch as m`` would bind the torch package)
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
        # Shim: deepspeed.comm must wrap the gloo group run_ranks created (it detects it).
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
        _DS_READY["ok"] = True
    torch.manual_seed(0)
    layer = MoE(H, Mlp(act), num_experts=E, ep_size=world, k=k, drop_tokens=drop_tokens, min_capacity=4,
                top2_2nd_expert_sampling=sampling)
    torch.manual_seed(100 + rank)             # this rank's experts differ
    for p in layer.deepspeed_moe.experts.parameters():
        torch.nn.init.normal_(p, std=0.2)
    layer.set_deepspeed_parallelism()         # builds the ep_size_2 group with dist.new_group
    x = torch.randn(2, TOKENS // 2, H, generator=torch.Generator().manual_seed(1000 + rank))
    return layer, x


FUNCOL_A2A = "--funcol-a2a" in sys.argv


def _use_funcol_a2a():
    """Experiment (--funcol-a2a): what the recommended training rewrite would give. The libraries'
    ``_AllToAll.apply(group, x)`` (an autograd.Function around an in-place all_to_all_single) is
    replaced by torch's differentiable functional collective, as a pre-functionalization graph
    rewrite of ``autograd_function_apply`` would do."""
    import torch.distributed._functional_collectives as funcol

    def funcol_apply(group, x):
        return funcol.all_to_all_single_autograd(x.contiguous(), None, None, group)

    class FuncolAllToAll:   # a plain class: dynamo special-cases ``apply`` of autograd.Function subclasses
        apply = staticmethod(funcol_apply)

    import fairscale.nn.moe.moe_layer as fs
    fs._AllToAll = FuncolAllToAll
    try:
        import deepspeed.moe.sharded_moe as ds
        ds._AllToAll = FuncolAllToAll
    except ImportError:
        pass


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def run_case(rank: int, world: int, case: str, grad: bool):
    import moe_fusion
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    act = "gelu" if case.endswith("_gelu") else "relu"
    base = case.removesuffix("_gelu")
    if base == "fs_top2":
        layer, x = build_fairscale(rank, world, act)
    else:
        k = 1 if "k1" in base else 2
        layer, x = build_deepspeed(rank, world, k, drop_tokens=base.endswith("_drop"), act=act,
                                   sampling="nosample" not in base)
    layer.eval()
    if FUNCOL_A2A:
        _use_funcol_a2a()
    if grad:
        layer.train()
        for p in layer.parameters():
            p.requires_grad_(True)

    ctx = torch.enable_grad() if grad else torch.no_grad()
    with ctx:
        torch.manual_seed(7)
        t0 = time.perf_counter()
        eager = _first(layer(x))
        t_eager = time.perf_counter() - t0
        if grad:
            loss_w = torch.randn(eager.shape, generator=torch.Generator().manual_seed(99))
            layer.zero_grad()
            (eager * loss_w).sum().backward()
            grads_eager = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
        eager = eager.detach()

    report = moe_fusion.FusionReport()
    undo = _install_dumps(case + ("_grad" if grad else "") + ("_funcol" if FUNCOL_A2A else ""), rank)
    # Script-side shim: dynamo's graphs go to files on their way into moe_fusion's backend.
    from moe_fusion.passes import entry
    orig_backend = entry.backend
    entry.backend = lambda *a, **k: _dynamo_dump_backend(case + ("_grad" if grad else "") + ("_funcol" if FUNCOL_A2A else ""), rank, orig_backend(*a, **k))
    result = {"case": case, "grad": grad}
    try:
        compiled = moe_fusion.compile(layer, report=report, compiler="eager")
        with ctx:
            torch.manual_seed(7)
            t0 = time.perf_counter()
            got = _first(compiled(x))
            t_first = time.perf_counter() - t0
            if grad:
                layer.zero_grad()
                (got * loss_w).sum().backward()
                grads = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
                result["grad_params_compared"] = len(grads_eager)
                result["grad_max_abs_diff"] = max(float((grads[n] - g).abs().max()) for n, g in grads_eager.items())
                result["grads_match"] = set(grads) == set(grads_eager) and all(
                    torch.allclose(grads[n], g, rtol=1e-5, atol=1e-5) for n, g in grads_eager.items())
            got = got.detach()
            torch.manual_seed(7)
            got2 = _first(compiled(x))
            # A different batch (different routing, so a different data-dependent capacity): recompile?
            x_other = torch.randn(x.shape, generator=torch.Generator().manual_seed(5000 + rank)) * 3
            torch.manual_seed(11)
            eager_other = _first(layer(x_other))
            graphs_before = counters["stats"].get("unique_graphs", 0)
            torch.manual_seed(11)
            got_other = _first(compiled(x_other))
        result.update(
            runs=True,
            max_abs_diff=float((got - eager).abs().max()),
            max_abs_diff_2nd_call=float((got2 - eager).abs().max()),
            match=bool(torch.allclose(got, eager, rtol=1e-5, atol=1e-5)),
            other_batch_match=bool(torch.allclose(got_other, eager_other, rtol=1e-5, atol=1e-5)),
            other_batch_new_graphs=counters["stats"].get("unique_graphs", 0) - graphs_before,
            t_eager=t_eager, t_first_compiled=t_first)
    except Exception as e:  # noqa: BLE001
        import traceback
        result.update(runs=False, error=f"{type(e).__name__}: {e}"[:3000], tb=traceback.format_exc()[-6000:])
    finally:
        undo()
        entry.backend = orig_backend
    stats = dict(counters["stats"])
    result["unique_graphs"] = stats.get("unique_graphs", 0)
    result["stats"] = stats
    result["graph_breaks"] = {k: v for k, v in counters["graph_break"].items()}
    result["moe_fusion_counters"] = dict(counters["moe_fusion"])
    result["report"] = report.format()
    return result


def rank_fn(rank: int, world: int, cases: list[str], grad: bool):
    os.environ["DS_ACCELERATOR"] = "cpu"
    sys.path[:0] = ["/work/libsite", MOE_ROOT]
    return [run_case(rank, world, c, grad) for c in cases]


ALL = ["fs_top2", "ds_k1", "ds_k2", "ds_k2_nosample", "ds_k1_drop", "ds_k2_drop"]

if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    grad = "--grad" in sys.argv
    cases = args or ALL
    t0 = time.perf_counter()
    results = run_ranks(WORLD, rank_fn, cases, grad, timeout=600, pg_timeout=60)
    for r0, r1 in zip(*results):
        print("=" * 100)
        print(f"CASE {r0['case']} grad={grad}")
        for key in ("runs", "match", "grads_match", "grad_max_abs_diff", "grad_params_compared",
                    "other_batch_match", "other_batch_new_graphs", "max_abs_diff", "max_abs_diff_2nd_call", "unique_graphs", "stats",
                    "graph_breaks", "moe_fusion_counters", "error"):
            if key in r0:
                print(f"  {key}: {r0[key]}")
        print(f"  rank1 runs={r1.get('runs')} match={r1.get('match')} diff={r1.get('max_abs_diff')}")
        if "tb" in r0:
            print(r0["tb"])
        print(r0["report"])
    print(f"total {time.perf_counter() - t0:.1f}s; moe_fusion from {MOE_ROOT}")
    os.makedirs("/work/research/results", exist_ok=True)
    tag = ('_grad' if grad else '') + ('_funcol' if FUNCOL_A2A else '')
    with open(f"/work/research/results/run_{'_'.join(cases)}{tag}.json", "w") as f:
        json.dump(results, f, indent=1, default=str)
