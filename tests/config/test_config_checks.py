"""Every numeric config key of both runners declares its valid values next to the field."""
from __future__ import annotations

import dataclasses
import typing

import pytest

from multimae_att.config import config_from_dict, config_to_dict, field_check
from multimae_att.finetune.config import FinetuneConfig
from multimae_att.pretrain.config import PretrainConfig


def _numeric(tp) -> bool:
    """int / float anywhere in the annotation (Optional, Union, list, tuple, dict values)."""
    if tp in (int, float):
        return True
    return any(_numeric(a) for a in typing.get_args(tp) if a is not Ellipsis)


def _leaves(schema, prefix=""):
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from _leaves(tp, key + ".")
        else:
            yield key, tp, f


@pytest.mark.parametrize("schema", [PretrainConfig, FinetuneConfig])
def test_every_numeric_key_declares_its_check(schema):
    """A numeric key without a declared check (``setting(..., ge=...)`` or ``free=True``) is a
    key whose bad values nobody considered."""
    missing = [key for key, tp, f in _leaves(schema) if _numeric(tp) and field_check(f) is None]
    assert missing == []


@pytest.mark.parametrize("schema", [PretrainConfig, FinetuneConfig])
def test_defaults_pass_their_own_checks(schema):
    assert config_from_dict(schema, config_to_dict(schema())) == schema()

