"""torchair without CANN: its Python layer from the torch_npu wheel, with the native module stubbed.

torchair (``torch_npu/dynamo/torchair``) converts FX graphs to GE graphs in Python and only hands
the finished graph to CANN through its native module ``torchair.core._torchair``. On a machine
without CANN this module prepares the Python layer so that ``torch.compile`` with
``torchair.get_npu_backend()`` runs up to the GE graph (and its dump):

1. ``prepare_torchair()`` downloads the ``torch_npu`` wheel matching the installed torch
   (``pip download --no-deps``) and extracts only ``torch_npu/dynamo/torchair/`` (no native
   libraries) into a cache directory, compiled to bytecode once (its sources trigger invalid
   escape warnings on every compile). torch_npu itself is never installed: it would break
   ``import torch`` without CANN.
2. ``import_torchair()`` puts that directory on ``sys.path``, installs the stub native module
   (``_torchair_stub``) and imports ``torchair``, undoing the process-wide side effects of that
   import which the rest of a test session must not see (see ``_preserve_process_state``).

Not undone: ``torchair.get_npu_backend()`` patches torch for the whole process (Meta kernels and
decompositions of dropout/batch_norm/upsample, ``aten.matmul_backward``, FakeTensor's
decomposition filter); run code that must see stock torch before it, or in another process.

On a machine with torch_npu and CANN none of this is needed: ``import torchair`` works as is.
"""
from __future__ import annotations

import compileall
import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Iterator, Optional

import torch

WHEEL_PACKAGE = "torch_npu"
TORCHAIR_IN_WHEEL = "torch_npu/dynamo/torchair/"
CACHE_ENV = "MOE_FUSION_TORCHAIR_CACHE"


class TorchairUnavailable(RuntimeError):
    """The torchair Python layer could not be prepared (no wheel, no network, bad archive)."""


def torch_npu_version() -> str:
    """The torch_npu release matching the installed torch (``2.13.0+cpu`` -> ``2.13.0``)."""
    return torch.__version__.split("+")[0]


def default_cache_dir() -> Path:
    """``$MOE_FUSION_TORCHAIR_CACHE``, else ``.cache/torchair`` in the source checkout (git-ignored),
    else ``~/.cache/moe_fusion/torchair`` for a non-editable install."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    repo = Path(__file__).resolve().parents[2]
    if (repo / "setup.py").is_file():
        return repo / ".cache" / "torchair"
    return Path.home() / ".cache" / "moe_fusion" / "torchair"


def prepare_torchair(cache_dir: Optional[Path] = None, version: Optional[str] = None) -> Path:
    """Make sure torchair's Python layer is extracted; return the directory to put on ``sys.path``
    (it contains the ``torchair`` package). Downloads the wheel only on the first call."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    version = version or torch_npu_version()
    root = cache_dir / f"{WHEEL_PACKAGE}-{version}"
    if (root / "torchair" / "__init__.py").is_file():
        return root
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheel = _download_wheel(version, cache_dir / "wheels")
    # Extract next to the final place, then rename: concurrent preparers never see half a tree.
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=cache_dir))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide the tree from other users of a shared cache
    try:
        _extract_torchair(wheel, staging)
        with warnings.catch_warnings():  # torchair's invalid escape sequences, once per source file
            warnings.simplefilter("ignore")
            compileall.compile_dir(str(staging), quiet=2)
        try:
            os.replace(staging, root)
        except OSError:
            if not (root / "torchair" / "__init__.py").is_file():  # not a concurrent preparer's win
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def _download_wheel(version: str, dest: Path) -> Path:
    pattern = f"{WHEEL_PACKAGE}-{version}-*.whl"
    found = sorted(dest.glob(pattern))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", f"{WHEEL_PACKAGE}=={version}", "-d", str(dest)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(dest.glob(pattern))
        if proc.returncode != 0 or not found:
            raise TorchairUnavailable(f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return found[-1]


def _extract_torchair(wheel: Path, dest: Path) -> None:
    """Copy ``torch_npu/dynamo/torchair/**`` to ``dest/torchair/**``, leaving out native libraries
    (nothing may load them: they need CANN)."""
    strip = len(TORCHAIR_IN_WHEEL) - len("torchair/")
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.infolist() if m.filename.startswith(TORCHAIR_IN_WHEEL)
                       and not m.is_dir() and not m.filename.endswith(".so")]
            if not members:
                raise TorchairUnavailable(f"{wheel.name} holds no {TORCHAIR_IN_WHEEL}")
            for member in members:
                target = dest / member.filename[strip:]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(member))
    except zipfile.BadZipFile as exc:
        raise TorchairUnavailable(f"{wheel} is not a wheel: {exc}") from exc


@contextlib.contextmanager
def _preserve_process_state() -> Iterator[None]:
    """Undo what ``import torchair`` changes beyond its own modules.

    * It installs SIGINT/SIGTERM handlers that finalize GE and re-kill the process.
    * It rewrites ``torch.distributed._functional_collectives.traceable_collective_remaps`` so that
      dynamo traces legacy collectives (``dist.all_to_all``, ``broadcast``, ``send``...) into
      torchair's NPU functions; other compile tests in the same process must trace stock torch.
    """
    from torch.distributed import _functional_collectives as fc

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    remaps = dict(fc.traceable_collective_remaps)
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        fc.traceable_collective_remaps.clear()
        fc.traceable_collective_remaps.update(remaps)


def import_torchair(cache_dir: Optional[Path] = None) -> ModuleType:
    """Import torchair, from torch_npu if it is installed, else from the extracted wheel with the
    native module stubbed (see ``_torchair_stub``). Idempotent."""
    if "torchair" in sys.modules:
        return sys.modules["torchair"]
    if importlib.util.find_spec("torch_npu") is not None:  # a real NPU install: torchair comes with it
        import torch_npu  # noqa: F401
        import torchair
        return torchair
    try:
        import google.protobuf  # noqa: F401  (torchair's GE graph is a protobuf message)
    except ImportError as exc:
        raise TorchairUnavailable("torchair needs protobuf: pip install -e '.[test]'") from exc
    root = str(prepare_torchair(cache_dir))
    if root not in sys.path:
        sys.path.insert(0, root)
    from . import _torchair_stub

    sys.modules[_torchair_stub.MODULE_NAME] = _torchair_stub.make_module()
    with _preserve_process_state(), warnings.catch_warnings():
        # torchair's sources have invalid escape sequences and use torch.jit.script_method: noise
        # about a third-party tree that nothing here can fix.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", SyntaxWarning)
        import torchair
    return torchair

