"""Fake kernels of dispatch_v2 / combine_v2 / combine_add_rms_norm against torch_npu 2.13.0's own Meta
functions (``tests/data/fidelity/torch_npu_meta_shapes.jsonl``, a copy of the shared project folder's, DESIGN.md).

Every case runs the registered fake on meta tensors under ``moe_fusion.target("A3")`` (the grid was
run with the SoC treated as A2/A3): an ``outputs`` case must give the same shapes and dtypes, an
``error`` case must raise ``OpValidationError``.

Exceptions: torch_npu's Meta checks only a few attributes, while the device tiling (SPEC §3.5,
§4.4) rejects more. Where our A3 validation applies such a tiling rule, an ``outputs`` case may be
rejected instead, if and only if it breaks one of the rules in ``EXCEPTIONS`` (and the error names
that rule). The corrected call (the portable target for a hardware limit, or the missing argument
supplied) must then give Meta's shapes, so every ``outputs`` case checks shapes.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import moe_fusion
from moe_fusion import OpValidationError

from fidelity import FIDELITY_FILE

OPS = ("npu_moe_distribute_dispatch_v2", "npu_moe_distribute_combine_v2", "npu_moe_distribute_combine_add_rms_norm")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "int8": torch.int8,
          "int32": torch.int32, "int64": torch.int64, "bool": torch.bool}


def _attrs(case: dict) -> dict:
    """Positional args by name (dispatch and both combines share the trailing four) and kwargs."""
    args = case["args"]
    named = dict(zip(("group_ep", "ep_world_size", "ep_rank_id", "moe_expert_num"), args[-4:]))
    named["bs"], named["k"] = args[1]["shape"]
    if case["op"] != OPS[0]:
        named["expand_rows"] = args[0]["shape"][0]
    return {**named, **case["kwargs"]}


def _capacity(a: dict) -> int:
    """A of the combine cases (MoE rank, no shared experts in that grid)."""
    w = a["ep_world_size"]
    gbs = a.get("global_bs", 0) or a["bs"] * w
    return gbs * min(a["moe_expert_num"] // w, a["k"])


@dataclass(frozen=True)
class MetaDeparture:
    """A tiling rule our A3 validation applies and torch_npu's Meta does not check."""

    name: str
    applies: Callable[[dict], bool]
    message: str                       # regex the OpValidationError must match
    retry_target: str                  # the corrected call must then give Meta's shapes ...
    retry_kwargs: dict                 # ... on this target with these kwargs added
    why: str


EXCEPTIONS = (
    MetaDeparture("TP without a TP group name",
                  lambda a: a.get("tp_world_size", 0) == 2 and not a.get("group_tp", ""),
                  r"group_tp length must be in \[1, 127\]", "A3", {"group_tp": "tp"},
                  "SPEC §3.5: with tp_world_size > 1 group_tp is 1..127 characters and differs from group_ep; "
                  "the grid leaves group_tp at its default ''. Meta never reads group names."),
    MetaDeparture("combine expand_x shorter than max(T,1)*A",
                  lambda a: "expand_rows" in a and a["expand_rows"] < _capacity(a),
                  r"expand_x must have at least max\(T, 1\) \* A", "portable", {},
                  "SPEC §4.4 / §9 #23: the A3 combine tiling requires expand_x.dim0 >= A; Meta only reads "
                  "expand_x.size(1). The grid pairs combine shapes independently of a dispatch."),
)


def _load() -> list[dict]:
    with FIDELITY_FILE.open() as f:
        rows = [json.loads(line) for line in f.read().splitlines()[1:] if line]
    return [r for r in rows if r["op"] in OPS]


def _meta(spec):
    if isinstance(spec, dict) and "shape" in spec:
        return torch.empty(spec["shape"], dtype=DTYPES[spec["dtype"]], device="meta")
    return spec


def _run(case: dict):
    op = getattr(torch.ops.moe_fusion, case["op"]).default
    args = [_meta(a) for a in case["args"]]
    kwargs = {k: _meta(v) for k, v in case["kwargs"].items()}
    outs = op(*args, **kwargs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    return [[list(o.shape), str(o.dtype).replace("torch.", "")] for o in outs]


def _outcome(case: dict, target: str):
    with moe_fusion.target(target):
        try:
            return _run(case), None
        except OpValidationError as error:
            return None, str(error)


@pytest.fixture(scope="module")
def cases() -> list[dict]:
    return _load()


def test_grid_is_present(cases):
    counts = Counter((c["op"], "error" in c) for c in cases)
    assert all(counts[(op, False)] > 0 for op in OPS), counts
    assert counts[(OPS[0], True)] > 0, counts


def test_outputs_cases_match_or_are_listed_exceptions(cases):
    mismatches, unexplained, used = [], [], Counter()
    for case in (c for c in cases if "outputs" in c):
        got, error = _outcome(case, "A3")
        attrs = _attrs(case)
        rules = [e for e in EXCEPTIONS if e.applies(attrs)]
        if error is None:
            if got != case["outputs"]:
                mismatches.append((case["case"], got, case["outputs"]))
            continue
        rule = next((e for e in rules if re.search(e.message, error)), None)
        if rule is None:
            unexplained.append((case["op"], case["case"], error))
            continue
        used[rule.name] += 1
        # The corrected call (portable target for a hardware limit, or the missing argument) must match.
        retry = {**case, "kwargs": {**case["kwargs"], **rule.retry_kwargs}}
        got, error = _outcome(retry, rule.retry_target)
        if error is not None or got != case["outputs"]:
            mismatches.append((case["case"], got or error, case["outputs"]))
    assert not mismatches, f"{len(mismatches)} shape mismatches, e.g. {mismatches[:3]}"
    assert not unexplained, f"{len(unexplained)} rejected outputs cases not covered by EXCEPTIONS: {unexplained[:3]}"
    assert set(used) == {e.name for e in EXCEPTIONS}, f"unused exception entries (remove them): {used}"


def test_error_cases_are_rejected(cases):
    accepted = []
    for case in (c for c in cases if "error" in c):
        got, error = _outcome(case, "A3")
        if error is None:
            accepted.append((case["case"], got))
    assert not accepted, f"{len(accepted)} cases torch_npu's Meta rejects were accepted: {accepted[:3]}"
