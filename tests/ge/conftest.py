"""GE graph tests: torchair's Python layer without CANN (``moe_fusion.ge_plugin.torchair_env``).

The session fixture prepares torchair once (the first run downloads the torch_npu wheel from
PyPI into ``.cache/torchair``) and registers the converters. When torchair cannot be prepared the
tests error out: they never skip.
"""
from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Iterator

import pytest
import torch.distributed as dist

_HERE = Path(__file__).parent


@pytest.fixture(scope="session")
def torchair() -> ModuleType:
    """torchair, imported (stubbed native module unless torch_npu is installed) with the moe_fusion
    converters registered."""
    from moe_fusion.ge_plugin import register_converters
    from moe_fusion.ge_plugin.torchair_env import import_torchair

    module = import_torchair()
    assert register_converters(), "torchair was imported but moe_fusion's converters were not registered"
    return module


@pytest.fixture(scope="module")
def fake_world() -> Iterator[tuple[dist.ProcessGroup, dist.ProcessGroup]]:
    """(ep_group, tp_group) of rank 0 in a fake world of 4 (EP=2 x TP=2, groups created as
    ``moe_fusion.demo.run.ep_tp_groups`` does). The default group is process-global: it lives for
    one test module."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from moe_fusion.demo.run import ep_tp_groups

    assert not dist.is_initialized(), "another test left a default process group"
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=4)
    try:
        yield ep_tp_groups(0, ep=2, tp=2)
    finally:
        dist.destroy_process_group()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the GE tests after every other test of the session.

    ``torchair.get_npu_backend()`` patches torch process-wide (Meta kernels and decompositions of
    dropout/batch_norm/upsample, ``aten.matmul_backward``, FakeTensor's decomposition filter) and
    nothing undoes it; tests that compile with stock torch must not run after it.
    """
    items.sort(key=lambda item: _HERE in Path(str(item.path)).parents)
