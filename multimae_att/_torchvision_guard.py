"""Make ``import torchvision`` (and therefore ``import timm``) work on CPU-only torch.

The registry's ``torchvision==0.28.0`` is a CUDA build. On a CPU-only torch its compiled
extension ``_C.so`` cannot be loaded, so ``torchvision/_meta_registrations.py`` fails with
``RuntimeError: operator torchvision::nms does not exist`` and takes ``import timm`` down
with it (timm imports ``torchvision.ops.misc``). Registering the schemas of the two
operators it looks up (``torchvision::nms`` and ``torchvision::qnms``) before torchvision is
first imported lets every pure-Python part import and run; only the compiled ops (nms,
roi_align, ...) stay unavailable, and calling them fails with torch's "no kernel" error.

Where torchvision's extension loads normally this does nothing but load that same library
early (exactly what ``torchvision.extension`` does on import). ``import multimae_att`` arms it
(:func:`install_before_torchvision`), so every process that imports the package (DataLoader
workers and ``accelerate launch`` children included) is covered; ``python -m
multimae_att.launch`` covers the ``accelerate`` command-line tool itself, which imports timm.
Arming imports nothing: torch-free parts of the package (the config schemas, run-folder tools)
stay torch-free.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

_LIBRARY = None  # the torch.library.Library holding our schemas; must stay alive
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def _extension_loads(package_dir: str) -> bool:
    import torch

    candidates = [f for f in os.listdir(package_dir) if f.startswith("_C.") and f.endswith((".so", ".pyd"))]
    if not candidates:
        return False
    try:
        torch.ops.load_library(os.path.join(package_dir, candidates[0]))
        return True
    except (OSError, ImportError):
        return False


def install() -> bool:
    """Register the missing torchvision operator schemas if (and only if) needed.

    Returns True when the schemas were registered by this call.
    """
    global _LIBRARY
    if _LIBRARY is not None or "torchvision" in sys.modules:
        return False
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return False
    if _extension_loads(os.path.dirname(spec.origin)):
        return False
    import torch

    lib = torch.library.Library("torchvision", "FRAGMENT")
    for name, schema in _SCHEMAS.items():
        if not _op_exists(name):
            lib.define(schema)
    _LIBRARY = lib
    return True


def _op_exists(name: str) -> bool:
    import torch

    try:
        getattr(torch.ops.torchvision, name)
        return True
    except (AttributeError, RuntimeError):
        return False


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Runs :func:`install` when ``torchvision`` is first looked up, then steps aside (it finds
    nothing itself: the normal finders import torchvision afterwards)."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            _disarm()
            install()
        return None


_HOOK = _BeforeTorchvision()


def _disarm() -> None:
    while _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


def install_before_torchvision() -> None:
    """:func:`install` now when torch or torchvision is already imported, else just before the
    first ``import torchvision`` (a ``sys.meta_path`` hook; importing this module imports nothing)."""
    if "torch" in sys.modules or "torchvision" in sys.modules:
        install()
    elif _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)
