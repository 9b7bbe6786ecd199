"""The former module homes still re-export the same objects, and say where they live now."""
import importlib
import pathlib
import sys

import pytest

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
    root = pathlib.Path(__file__).resolve().parents[1] / "multimae_att"
    for path in root.rglob("*.py"):
        text = path.read_text()
        for name in FORMER:
            assert f"from {name} import" not in text and f"import {name}\n" not in text, (path, name)
