"""Reads tests/data/fidelity/torch_npu_meta_shapes.jsonl: torch_npu's own Meta outputs on a grid
(a copy of the project's shared fidelity data, carried by the repository so a clone tests alone).

``cases(op)`` yields ``(case_id, args, kwargs, expected)`` with tensors built on the meta device
and ``expected`` either a list of ``(shape, dtype)`` or the string ``"error"``.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any, Iterator

import torch

FIDELITY_FILE = pathlib.Path(__file__).resolve().parent / "data" / "fidelity" / "torch_npu_meta_shapes.jsonl"


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _value(v: Any) -> Any:
    if isinstance(v, dict) and set(v) == {"shape", "dtype"}:
        return torch.empty(v["shape"], dtype=_dtype(v["dtype"]), device="meta")
    return v


def cases(op: str) -> Iterator[tuple[str, list, dict, Any]]:
    with FIDELITY_FILE.open() as f:
        next(f)  # format description
        for line in f:
            case = json.loads(line)
            if case["op"] != op:
                continue
            expected = "error" if "error" in case else [(tuple(s), _dtype(d)) for s, d in case["outputs"]]
            yield case["case"], [_value(a) for a in case["args"]], {k: _value(v) for k, v in case["kwargs"].items()}, expected
