"""Generic config machinery: defaults, YAML, includes, typed overrides, strict errors."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import pytest
import yaml

from multimae_att.config import (
    ConfigError,
    cli_args,
    cli_config,
    config_from_dict,
    config_help,
    config_to_dict,
    load_config,
    parse_overrides,
    save_config,
    setting,
)


@dataclass
class Optim:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    clip: float | None = None

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")


@dataclass
class Toy:
    output_dir: str = "runs/toy"
    steps: int = 10
    amp: bool = False
    mode: Literal["random", "high", "low"] = "high"
    mods: list[str] = field(default_factory=lambda: ["rgb", "depth"])
    weights: dict[str, float] = field(default_factory=lambda: {"rgb": 1.0})
    extra: Any = None
    optim: Optim = field(default_factory=Optim)


def test_defaults_and_roundtrip(tmp_path):
    cfg = load_config(Toy)
    assert cfg == Toy()
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(Toy, tmp_path / "c.yaml") == cfg
    assert config_from_dict(Toy, config_to_dict(cfg)) == cfg


def test_typed_overrides():
    cfg = load_config(Toy, None, ["steps=3", "amp=true", "optim.lr=1e-3", "optim.betas=[0.8, 0.9]",
                                  "optim.clip=none", "mods=[rgb]", "weights.depth=2",
                                  "mode=low", "output_dir=2024", "extra={a: 1}"])
    assert cfg.steps == 3 and cfg.amp is True and cfg.mode == "low"
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.8, 0.9) and cfg.optim.clip is None
    assert cfg.mods == ["rgb"] and cfg.weights == {"rgb": 1.0, "depth": 2.0}
    assert cfg.output_dir == "2024" and cfg.extra == {"a": 1}
    assert load_config(Toy, None, ["optim.clip=1"]).optim.clip == 1.0


def test_parse_overrides_values():
    assert parse_overrides(["a=1", "b=1.5", "c=true", "d=", "e=null", "f=[1, 2]", "g=x/y:z"]) == [
        ("a", 1), ("b", 1.5), ("c", True), ("d", None), ("e", None), ("f", [1, 2]), ("g", "x/y:z")]
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["novalue"])


@pytest.mark.parametrize("override, needle", [
    ("optim.lrr=1", "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"),
    ("stepss=1", "unknown config key 'stepss' (did you mean 'steps'?)"),
    ("optimm.lr=1", "did you mean 'optim'?"),
    ("mode=hihg", "did you mean 'high'?"),
    ("steps=1.5", "'steps' expects an integer"),
    ("amp=3", "'amp' expects true/false"),
    ("optim.betas=[1]", "'optim.betas' expects 2 values"),
    ("optim.lr=-1", "optim.lr must be > 0"),
    ("optim.lr=abc", "'optim.lr' expects a number"),
    ("optim=3", "'optim' is a section"),
    ("steps.x=3", "'steps' is a value, not a section"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(Toy, None, [override])
    assert needle in str(e.value)


def test_yaml_base_include_and_precedence(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(
        {"steps": 5, "mods": ["rgb", "depth", "semseg"], "optim": {"lr": 0.5, "clip": 1.0}}))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "abl.yaml").write_text("base: ../base.yaml\nmode: low\noptim:\n  lr: 0.25\n")
    cfg = load_config(Toy, tmp_path / "sub" / "abl.yaml", ["steps=7"])
    assert (cfg.steps, cfg.mode, cfg.optim.lr, cfg.optim.clip) == (7, "low", 0.25, 1.0)
    assert cfg.mods == ["rgb", "depth", "semseg"]
    (tmp_path / "typo.yaml").write_text("optim:\n  betass: [0.1, 0.2]\n")
    with pytest.raises(ConfigError, match="optim.betass.*optim.betas"):
        load_config(Toy, tmp_path / "typo.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(Toy, tmp_path / "missing.yaml")


def test_cli_config(capsys):
    cfg = cli_config(Toy, ["steps=2", "mode=random"])
    assert cfg.steps == 2 and cfg.mode == "random"
    with pytest.raises(SystemExit) as e:
        cli_config(Toy, ["modee=random"])
    assert e.value.code == 2 and "did you mean 'mode'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli_config(Toy, ["--print-config", "steps=4"])
    assert e.value.code == 0 and yaml.safe_load(capsys.readouterr().out)["steps"] == 4


@dataclass
class Checked:
    rate: float = setting(0.5, ge=0, le=1)
    count: int = setting(2, ge=1)
    lr: float | None = setting(None, gt=0)
    betas: tuple[float, float] = setting((0.9, 0.95), ge=0, lt=1)
    weights: dict[str, float] = setting(factory=lambda: {"a": 1.0}, ge=0)
    shots: list[int] = setting(factory=lambda: [1, 5], ge=1, nonempty=True)
    seed: int = setting(0, free=True)


@pytest.mark.parametrize("override, needle", [
    ("rate=1.5", "rate must be in [0, 1], got 1.5"),
    ("rate=-0.1", "rate must be in [0, 1], got -0.1"),
    ("count=0", "count must be >= 1, got 0"),
    ("lr=0", "lr must be > 0, got 0.0"),
    ("lr=.inf", "lr must be > 0, got inf"),               # bounded numbers are finite
    ("rate=.nan", "'rate' expects a number, got nan"),    # NaN is never a number
    ("betas=[0.9, 1.0]", "betas[1] must be in [0, 1), got 1.0"),
    ("weights.b=-2", "weights.b must be >= 0, got -2.0"),
    ("shots=[1, 0]", "shots[1] must be >= 1, got 0"),
    ("shots=[]", "shots must not be empty"),
])
def test_declared_checks_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(Checked, None, [override])
    assert str(e.value) == needle or needle in str(e.value)


def test_declared_checks_accept_bounds_none_and_free_values():
    cfg = load_config(Checked, None, ["rate=0", "count=1", "lr=none", "betas=[0, 0.5]", "seed=-7"])
    assert (cfg.rate, cfg.count, cfg.lr, cfg.betas, cfg.seed) == (0.0, 1, None, (0.0, 0.5), -7)
    assert load_config(Checked, None, ["rate=1"]).rate == 1.0
    # The check is declared on the field itself: the dataclass Field carries it.
    checks = {f.name: f.metadata["check"].describe() for f in dataclasses.fields(Checked)}
    assert checks == {"rate": "in [0, 1]", "count": ">= 1", "lr": "> 0", "betas": "in [0, 1)",
                      "weights": ">= 0", "shots": ">= 1, non-empty", "seed": ""}


def test_several_config_files_merge_in_order(tmp_path):
    (tmp_path / "a.yaml").write_text("steps: 5\nmode: low\noptim: {lr: 0.5, clip: 1.0}\n")
    (tmp_path / "b.yaml").write_text("steps: 7\noptim: {lr: 0.25}\n")
    cfg = load_config(Toy, [tmp_path / "a.yaml", tmp_path / "b.yaml"], ["optim.clip=2"])
    assert (cfg.steps, cfg.mode, cfg.optim.lr, cfg.optim.clip) == (7, "low", 0.25, 2.0)
    # From the command line: --config repeated, overrides before, between and after options.
    cfg = cli_config(Toy, ["amp=true", "--config", str(tmp_path / "a.yaml"), "mods=[rgb]",
                           "--config", str(tmp_path / "b.yaml"), "steps=9"])
    assert (cfg.steps, cfg.mode, cfg.optim.lr, cfg.amp, cfg.mods) == (9, "low", 0.25, True, ["rgb"])


def test_cli_options_add_overrides_and_help_lists_every_key(capsys):
    import argparse

    def runner_parser():   # a runner's own option that stands for an override
        parser = argparse.ArgumentParser()
        parser.add_argument("--fast", action="append_const", dest="config_overrides", const="steps=1")
        return parser

    cfg, args = cli_args(Toy, ["steps=3", "--fast", "mode=low"], parser=runner_parser())
    assert cfg.steps == 3 and cfg.mode == "low" and args.config_overrides == ["steps=1"]  # the line wins
    assert cli_args(Toy, ["--fast"], parser=runner_parser())[0].steps == 1
    with pytest.raises(SystemExit) as e:
        cli_config(Checked, ["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert "rate = 0.5  (float; in [0, 1])" in out and "lr = null  (float | null; > 0)" in out
    assert "betas = [0.9, 0.95]" in out and "seed = 0  (int)" in out
    assert [line.split(" = ")[0].strip() for line in config_help(Toy)] == [
        "output_dir", "steps", "amp", "mode", "mods", "weights", "extra", "optim.lr", "optim.betas",
        "optim.clip"]
