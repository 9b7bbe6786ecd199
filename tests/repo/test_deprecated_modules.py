"""The former module homes still re-export the same objects, and say where they live now."""
import importlib
import re
import sys

import pytest

from helpers import REPO

FORMER = {"multimae_att.runstate": ("multimae_att.atomic", "save_atomic"),
          "multimae_att.attention_cache": ("multimae_att.scoring.cache", "AttentionCache"),
          "multimae_att.losses": ("multimae_att.pretrain.losses", "multimodal_loss")}


@pytest.mark.parametrize("name", sorted(FORMER))
def test_former_home_warns_and_re_exports(name):
    home, attr = FORMER[name]
    sys.modules.pop(name, None)
    with pytest.warns(DeprecationWarning, match=f"{name} is deprecated: import from {home}"):
        module = importlib.import_module(name)
    assert getattr(module, attr) is getattr(importlib.import_module(home), attr)
    assert all(hasattr(module, n) for n in module.__all__)


def test_the_package_itself_imports_no_former_home():
    root = REPO / "multimae_att"
    for name in FORMER:
        package, module = name.rsplit(".", 1)
        pattern = re.compile(rf"^\s*(from {re.escape(name)} import|import {re.escape(name)}\b"
                             rf"|from {re.escape(package)} import .*\b{module}\b)", re.M)
        for path in root.rglob("*.py"):
            if path.stem != module or path.parent != root:     # the former home itself aside
                assert not pattern.search(path.read_text()), (path, name)
