"""Generic config machinery: defaults, YAML, includes, typed overrides, strict errors."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import pytest
import yaml

from multimae_att.config import (ConfigError, cli_config, config_from_dict, config_to_dict,
                                 load_config, parse_overrides, save_config)


@dataclass
class Optim:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    clip: Optional[float] = None

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
