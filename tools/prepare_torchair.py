#!/usr/bin/env python
"""Prepare torchair's Python layer for the GE graph tests (``tests/ge``) on a machine without CANN.

Downloads the torch_npu wheel matching the installed torch from PyPI (``pip download --no-deps``,
never installed) and extracts only ``torch_npu/dynamo/torchair/`` into the cache directory
(default ``.cache/torchair`` in the checkout, or ``$MOE_FUSION_TORCHAIR_CACHE``), then imports it
with the stubbed native module and registers the moe_fusion converters to prove it works.
``pytest`` does the same on its own (``tests/ge/conftest.py``); this script is for CI warm-up and
for developers.

Usage: python tools/prepare_torchair.py [--cache-dir DIR]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=None, help="where to keep the wheel and the extracted tree")
    options = parser.parse_args(argv)

    from moe_fusion.ge_plugin import register_converters
    from moe_fusion.ge_plugin.torchair_env import TorchairUnavailable, import_torchair, prepare_torchair

    try:
        root = prepare_torchair(options.cache_dir)
        import_torchair(options.cache_dir)
    except TorchairUnavailable as exc:
        print(f"prepare_torchair: {exc}", file=sys.stderr)
        return 1
    if not register_converters():
        print("prepare_torchair: torchair imported but the converters did not register", file=sys.stderr)
        return 1
    print(f"torchair ready: {root / 'torchair'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
