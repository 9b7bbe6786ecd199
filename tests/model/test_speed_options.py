"""train.attention / train.compile reach the models both runners build; compiling keeps the model's
function and names."""
import pytest
import torch

from multimae_att.config import ConfigError
from multimae_att.model import create_pretrain_model
from multimae_att.model.compile import compile_model


def test_pretrain_config_sets_the_attention_mode_of_the_built_model():
    from multimae_att.pretrain.config import load_pretrain_config
    from multimae_att.pretrain.setup import build_model

    tiny = ["model.size=tiny", "data.image_size=32", "masking.num_encoded_tokens=6"]
    cfg = load_pretrain_config(None, tiny + ["train.attention=explicit"])
    assert build_model(cfg).attention == "explicit"
    assert build_model(load_pretrain_config(None, tiny)).attention == "auto"
    with pytest.raises(ConfigError, match="train.attention"):
        load_pretrain_config(None, ["train.attention=flash"])


def test_finetune_config_sets_the_attention_mode_of_the_built_model():
    from multimae_att.finetune.config import load_finetune_config
    from multimae_att.finetune.tasks import build_model

    cfg = load_finetune_config(None, ["model.size=tiny", "data.image_size=32", "train.attention=fused"])
    assert build_model(cfg, None, "cls").attention == "fused"


def test_compiled_blocks_keep_names_and_outputs():
    torch.manual_seed(0)
    model = create_pretrain_model("tiny", image_size=32, patch_size=8).eval()
    x = {"rgb": torch.randn(2, 3, 32, 32), "depth": torch.randn(2, 1, 32, 32),
         "semseg": torch.randint(0, 133, (2, 8, 8))}
    hidden = {m: torch.arange(16).expand(2, 16) >= 3 for m in x}
    keys = list(model.state_dict())
    with torch.no_grad():
        eager, _ = model(x, task_masks=hidden)
        compile_model(model, backend="eager")  # dynamo's tracing without code generation: fast
        compiled, _ = model(x, task_masks=hidden)
    assert list(model.state_dict()) == keys
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in model.encoder)
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k])
