"""Validation runs once per call, for every op of the registry.

An eager call (``moe_fusion.<op>`` -> ``torch.ops.moe_fusion.<op>`` -> reference kernel) runs the
proto's ``validate`` exactly once, and every validation helper of ``op_protos`` exactly as often
as the fake (trace-time) call of the same arguments does, which also runs ``validate`` once: so no
kernel, wrapper or ``infer_shape`` validates a second time, by any route. The value rules (tensor
contents) run once in eager mode and never at trace time.

Calls are counted by code object with ``sys.setprofile``, so a helper reached by any route
(``proto.check``, a module-level import in a kernel, ``infer_shape``) is counted.
"""
import importlib
import os
import sys
from collections import Counter
from contextlib import contextmanager

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_map_only

import moe_fusion
from moe_fusion import op_protos
from moe_fusion.op_protos import PROTOS, ffn_grouped, moe_distribute_common, moe_re_routing, moe_update_expert

PROTOS_DIR = os.path.dirname(op_protos.__file__)
# Every value rule (they read tensor contents), and the ones each op runs.
VALUE_RULES = {
    moe_re_routing.validate_values.__code__: "re_routing.validate_values",
    moe_update_expert.validate_values.__code__: "update_expert.validate_values",
    ffn_grouped.validate_values.__code__: "ffn_grouped.validate_values",
    moe_distribute_common.validate_id_values.__code__: "validate_id_values",
    moe_distribute_common.validate_mask_values.__code__: "validate_mask_values",
}
_DIST_RULES = {"validate_id_values", "validate_mask_values"}
OWN_VALUE_RULES = {
    "npu_moe_re_routing": {"re_routing.validate_values"},
    "npu_moe_update_expert": {"update_expert.validate_values"},
    "npu_ffn_grouped": {"ffn_grouped.validate_values"},
    "npu_moe_distribute_dispatch_v2": _DIST_RULES,
    "npu_moe_distribute_combine_v2": _DIST_RULES,
    "npu_moe_distribute_combine_add_rms_norm": _DIST_RULES,
}


def _cases(name):
    return importlib.import_module(f"cases.{name}").opcheck_cases()


@contextmanager
def protos_calls():
    """``Counter`` of calls of the module-level functions of ``op_protos`` (by code object); calls made
    by a value rule count for the rule alone (the helpers it uses are not structural validation)."""
    counts = Counter()
    in_rule = [0]

    def profile(frame, event, _arg):
        code = frame.f_code
        if code in VALUE_RULES:
            if event == "call":
                counts[code] += 1
            in_rule[0] += {"call": 1, "return": -1}.get(event, 0)
        elif (event == "call" and not in_rule[0] and "." not in code.co_qualname
              and os.path.dirname(code.co_filename) == PROTOS_DIR):
            counts[code] += 1

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        yield counts
    finally:
        sys.setprofile(previous)


def _split(counts, name):
    """``(validate calls, infer_shape calls, {value rule: calls}, {other helper: calls})``."""
    proto = PROTOS[name]
    rules = {label: counts[code] for code, label in VALUE_RULES.items()}
    helpers = {code: n for code, n in counts.items()
               if code not in VALUE_RULES and code is not proto.infer_shape.__code__}
    return counts[proto.validate.__code__], counts[proto.infer_shape.__code__], rules, helpers


def _names(helpers):
    return {f"{os.path.basename(code.co_filename)}:{code.co_name}": n for code, n in helpers.items()}


@pytest.mark.parametrize("name", sorted(PROTOS))
def test_every_call_validates_once(name):
    public = getattr(moe_fusion, name)
    own_rules = OWN_VALUE_RULES.get(name, set())
    for args, kwargs in _cases(name):
        with protos_calls() as eager:
            public(*args, **kwargs)
        with FakeTensorMode() as mode:
            fake_args, fake_kwargs = tree_map_only(torch.Tensor, mode.from_tensor, (args, kwargs))
            with protos_calls() as fake:
                public(*fake_args, **fake_kwargs)
        validates, infer_shapes, rules, helpers = _split(eager, name)
        fake_validates, fake_infer_shapes, fake_rules, fake_helpers = _split(fake, name)
        assert validates == 1 and fake_validates == 1, (name, kwargs, validates, fake_validates)
        assert fake_infer_shapes == 1 and infer_shapes <= 1, (name, kwargs)   # dispatch allocates with it
        assert _names(helpers) == _names(fake_helpers), (name, kwargs)       # no helper runs twice in eager
        assert rules == {rule: int(rule in own_rules) for rule in rules}, (name, kwargs, rules)
        assert not any(fake_rules.values()), (name, kwargs, fake_rules)


def test_counting_sees_every_route():
    """A validator called directly (not through the proto) is counted too."""
    args, kwargs = _cases("npu_moe_update_expert")[0]
    with protos_calls() as counts:
        moe_update_expert.validate(*args, **kwargs)
        PROTOS["npu_moe_update_expert"].check(*args, **kwargs)
    assert counts[moe_update_expert.validate.__code__] == 2
