"""The README's config-key tables are the schemas' (python -m multimae_att.config_reference)."""
import pytest

from multimae_att.config import config_keys
from multimae_att.config_reference import README, main, render
from multimae_att.finetune.config import FinetuneConfig
from multimae_att.pretrain.config import PretrainConfig


def test_readme_tables_match_the_schemas():
    text = README.read_text()
    assert render(text) == text, "README config tables drifted: run python -m multimae_att.config_reference"
    for schema in (PretrainConfig, FinetuneConfig):
        for key in config_keys(schema):
            assert f"`{key}`" in text


def test_check_fails_on_a_drifted_table_and_the_rewrite_repairs_it(tmp_path, capsys):
    readme = tmp_path / "README.md"
    drifted = README.read_text().replace("| `optim.blr` | `0.0001` |", "| `optim.blr` | `0.001` |", 1)
    assert drifted != README.read_text()
    readme.write_text(drifted)
    assert main([str(readme), "--check"]) == 1
    assert main([str(readme)]) == 0 and readme.read_text() == README.read_text()
    assert main([str(readme), "--check"]) == 0
    readme.write_text("# no tables\n")
    with pytest.raises(ValueError, match="config-reference:pretrain"):
        main([str(readme), "--check"])
