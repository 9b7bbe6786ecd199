"""The original MultiMAE code (EPFL-VILAB/MultiMAE), imported from the checkout ``MULTIMAE_SRC``
points to; nothing from it is vendored here. Tests that need it skip when the variable is unset."""
import importlib
import os
import sys
import types
import warnings

import pytest

SRC = os.environ.get("MULTIMAE_SRC", "")


@pytest.fixture(scope="module")
def up():
    """Import upstream's ``multimae`` package. Shim: a bare ``utils`` package object, so that
    ``from utils.registry import register_model`` loads only that file instead of running
    upstream's ``utils/__init__`` (which imports code that no longer works with modern timm)."""
    saved = {k: v for k, v in sys.modules.items() if k == "utils" or k.startswith(("utils.", "multimae."))
             or k == "multimae"}
    shim = types.ModuleType("utils")
    shim.__path__ = [os.path.join(SRC, "utils")]
    sys.modules["utils"] = shim
    sys.path.insert(0, SRC)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = importlib.import_module("multimae")
    finally:
        sys.path.remove(SRC)
        for k in [k for k in sys.modules if k == "utils" or k.startswith(("utils.", "multimae.")) or k == "multimae"]:
            del sys.modules[k]
        sys.modules.update(saved)
    return module
