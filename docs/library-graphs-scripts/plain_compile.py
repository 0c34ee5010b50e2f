"""For comparison: the same layers under plain ``torch.compile(layer, backend="eager")`` (dynamo's
defaults: no capture_scalar_outputs / capture_dynamic_output_shape_ops), graph and break counts.

    MOE_FUSION_ROOT=/work/research/main_snapshot timeout 600 /work/main/.venv/bin/python \
        /work/research/scripts/plain_compile.py
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import run_libs  # noqa: E402
from run_libs import ALL, WORLD, build_deepspeed, build_fairscale  # noqa: E402

import torch  # noqa: E402

from moe_fusion.launch import run_ranks  # noqa: E402


def one(rank, world, case):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    if case == "fs_top2":
        layer, x = build_fairscale(rank, world, "relu")
    else:
        layer, x = build_deepspeed(rank, world, 1 if "k1" in case else 2, case.endswith("_drop"), "relu",
                                   "nosample" not in case)
    layer.eval()
    with torch.no_grad():
        torch.manual_seed(7)
        ref = layer(x)
        ref = ref[0] if isinstance(ref, tuple) else ref
        compiled = torch.compile(layer, backend="eager")
        torch.manual_seed(7)
        got = compiled(x)
        got = got[0] if isinstance(got, tuple) else got
    return dict(case=case, match=bool(torch.allclose(got, ref, atol=1e-5)),
                unique_graphs=counters["stats"].get("unique_graphs", 0),
                graph_breaks={k: v for k, v in counters["graph_break"].items()})


def rank_fn(rank, world):
    os.environ["DS_ACCELERATOR"] = "cpu"
    sys.path[:0] = ["/work/libsite", run_libs.MOE_ROOT, os.path.dirname(__file__)]
    return [one(rank, world, c) for c in ALL]


if __name__ == "__main__":
    for r in run_ranks(WORLD, rank_fn, timeout=600, pg_timeout=60)[0]:
        print(r)
