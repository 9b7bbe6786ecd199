"""Fuzz: random single-key mutations of the demo config (wrong type, out of range, valid value,
unknown key, missing file). Each either passes every check made before work (the runner's
:func:`~multimae_att.preflight.check_pretrain`, in-process) or fails with ``config error:``
naming the key: never a traceback. A few of the passing ones run one step from the CLI. The
finetuning configs get the same mutations, checked in-process."""
from __future__ import annotations

import dataclasses
import random
import types
import typing
from pathlib import Path

import pytest

from multimae_att.config import ConfigError, field_check, load_config
from multimae_att.finetune.config import FinetuneConfig
from multimae_att.preflight import check_finetune, check_pretrain
from multimae_att.pretrain.config import PretrainConfig

from helpers import REPO
from helpers.prep import data
from helpers.pretrain import _fresh_accelerate_state, _importable_entry_point, run_cli

MUTATIONS, RUNS, SEED = 200, 3, 12
PATH_KEYS = ("data.root", "init.checkpoint")
# Valid values of these keys can make a one-step run slow (model shape, worker processes, run
# length, the cache's refresh pass): checked in-process like every other key, not run.
COSTLY = ("model.", "data.image_size", "data.num_workers", "masking.cache.", "train.max_steps",
          "train.epochs")


def _leaves(schema, prefix=""):
    """(key, annotation, check, default) of every leaf key."""
    hints, default = typing.get_type_hints(schema), schema()
    for f in dataclasses.fields(schema):
        key, tp = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _leaves(tp, key + ".")
        else:
            yield key, tp, field_check(f), getattr(default, f.name)


def _base(tp):
    """The annotation without Optional: (type, allows None); a union of several types stays whole."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else tp), True
    return tp, False


def _number(check, rng: random.Random, is_int: bool, valid: bool) -> str:
    lo = check.ge if check.ge is not None else check.gt
    hi = check.le if check.le is not None else check.lt
    if not valid:
        options = [".nan", ".inf"] if not is_int else []
        if lo is not None:
            options.append(str(int(lo) - 1 if is_int else lo - 0.5))
            if check.gt is not None:
                options.append(str(int(check.gt) if is_int else float(check.gt)))
        if hi is not None:
            options.append(str(int(hi) + 1 if is_int else hi + 0.5))
        return rng.choice(options or ["-1"])
    low = lo if lo is not None else -3
    high = hi if hi is not None else low + 4
    if is_int:
        first = int(low) + (check.gt is not None)
        return str(rng.randint(first, max(first, min(int(high) - (check.lt is not None), first + 4))))
    return repr(round(rng.uniform(low, high if hi is not None else low + 3), 4) or high)


def _mutation(key, tp, check, default, rng: random.Random, tmp: Path) -> tuple[str, str]:
    """(override, the key its error must name)."""
    base, optional = _base(tp)
    origin = typing.get_origin(base)
    kind = rng.choice(["type", "range", "valid", "unknown"] + (["missing"] * 3 if key in PATH_KEYS else []))
    if kind == "unknown":
        wrong = rng.choice([f"{key}x", f"{key.rsplit('.', 1)[0]}.no_such_key" if "." in key else "no_such_key"])
        return f"{wrong}=1", wrong
    if kind == "missing":
        return f"{key}={tmp / 'missing' / 'file.pth'}", key
    if origin is typing.Literal:
        choices = typing.get_args(base)
        value = {"type": "[1, 2]", "range": f"{choices[0]}x", "valid": str(rng.choice(choices))}[kind]
        return f"{key}={value}", key
    if base is bool:
        return f"{key}={ {'type': '[true]', 'range': 'maybe', 'valid': str(not default).lower()}[kind]}", key
    if base in (int, float) and check is not None:
        if kind == "type":
            return f"{key}={rng.choice(['abc', '[1, 2]', '{a: 1}', 'true'])}", key
        if kind == "valid" and optional and rng.random() < 0.3:
            return f"{key}=null", key
        return f"{key}={_number(check, rng, base is int, valid=kind == 'valid')}", key
    if origin in (list, tuple) and default:
        items = list(default)
        i = rng.randrange(len(items))
        item_tp = typing.get_args(base)[0]
        if kind == "type":
            return f"{key}={rng.choice(['5', 'abc', '{a: 1}'])}", key
        if item_tp in (int, float) and check is not None:
            items[i] = _number(check, rng, item_tp is int, valid=kind == "valid")
        elif kind == "range":
            items = items[:-1] if len(items) > 1 else items + items
        return f"{key}=[{', '.join(str(v) for v in items)}]", key
    if origin is dict and default:
        sub = rng.choice(sorted(default))
        if kind == "type":
            return f"{key}.{sub}=[abc]", key
        value = _number(check, rng, False, valid=kind == "valid") if check is not None else "1"
        return f"{key}.{sub}={value}", key
    value = {"type": rng.choice(["[1, 2]", "{a: 1}"]), "range": "''", "valid": "x1"}[kind]
    return f"{key}={value}", key


@pytest.fixture
def configs(tmp_path, data):
    base = tmp_path / "base.yaml"   # the demo on the test data: one 16-sample batch, one step
    base.write_text(f"data: {{root: {data}}}\ntrain: {{max_steps: 1}}\n"
                    "log: {pictures_every: 0, progress: false}\n")
    return [REPO / "configs/pretrain/demo.yaml", base]


def test_random_single_key_mutations_never_give_a_traceback(tmp_path, configs, monkeypatch):
    monkeypatch.chdir(tmp_path)     # a mutated output_dir stays in the test folder
    rng = random.Random(SEED)
    leaves = list(_leaves(PretrainConfig))
    passed, problems = [], []
    for i in range(MUTATIONS):
        override, named = _mutation(*rng.choice(leaves), rng, tmp_path)
        try:
            cfg = load_config(PretrainConfig, configs, [override, f"output_dir=runs/{i}"])
            check_pretrain(cfg, print_fn=lambda *_: None)
            passed.append((override, named))
        except ConfigError as e:
            if named not in str(e):
                problems.append(f"{override}: the message does not name {named!r}: {e}")
        except Exception as e:  # noqa: BLE001  (the point of the test: list every traceback)
            problems.append(f"{override}: {type(e).__name__}: {e}")
    assert problems == []
    assert 0 < len(passed) < MUTATIONS      # the mix holds both kinds
    cheap = [(o, n) for o, n in passed if not o.startswith(COSTLY)]
    for override, named in rng.sample(cheap, min(RUNS, len(cheap))):
        out = tmp_path / "run" / str(abs(hash(override)))
        try:
            run_cli(*[a for c in configs for a in ("--config", str(c))], override, f"output_dir={out}")
        except SystemExit as e:   # a config error found while assembling the run (e.g. fp16 on CPU)
            assert str(e.code).startswith("config error:") and named in str(e.code), (override, e.code)
        finally:
            from accelerate.state import AcceleratorState
            AcceleratorState._reset_state(True)


@pytest.mark.parametrize("task", ["cls", "semseg", "depth", "knn"])
def test_random_single_key_mutations_of_finetune_configs(tmp_path, data, task):
    base = tmp_path / "base.yaml"
    base.write_text(f"data: {{root: {data}}}\n")
    configs = [REPO / f"configs/finetune/synthetic_{task}.yaml", base]
    rng = random.Random(SEED)
    leaves = list(_leaves(FinetuneConfig))
    problems = []
    for _ in range(MUTATIONS // 4):
        override, named = _mutation(*rng.choice(leaves), rng, tmp_path)
        try:
            check_finetune(load_config(FinetuneConfig, configs, [override]))
        except ConfigError as e:
            if named not in str(e):
                problems.append(f"{override}: the message does not name {named!r}: {e}")
        except Exception as e:  # noqa: BLE001
            problems.append(f"{override}: {type(e).__name__}: {e}")
    assert problems == []
