"""The pretraining schema: required keys exist, defaults are the recipe, cross-field checks."""
import pytest

from multimae_att.config import ConfigError, config_keys
from multimae_att.pretrain.config import PretrainConfig, load_pretrain_config


def test_required_keys_and_recipe_defaults():
    keys = set(config_keys(PretrainConfig))
    assert {"output_dir", "masking.strategy", "train.max_steps", "init.checkpoint"} <= keys
    cfg = load_pretrain_config()
    assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.weight_decay == 0.05
    assert cfg.masking.num_encoded_tokens == 98 and cfg.model.size == "base"


@pytest.mark.parametrize("overrides, needle", [
    (["masking.num_encoded_tokens=600"], "exceeds the 588 tokens"),
    (["masking.alphas=[1.0, 2.0]"], "masking.alphas has 2 values for 3 input modalities"),
    (["masking.adaptive.enabled=true", "model.out_modalities=[rgb]"], "masking.adaptive needs"),
    (["masking.params.alpha=0.5"], "unknown parameter 'alpha' for masking strategy 'high'"),
    (["masking.strategy=noisy", "masking.params.alpha=0.5", "masking.params.beta=1"], "'beta'"),
    (["masking.prob=1.5"], "masking.prob must be in [0, 1]"),
    (["model.in_modalities=[rgb, normals]"], "unknown modality 'normals'"),
    (["model.out_modalities=[rgb, depth]", "model.in_modalities=[rgb]"], "need the same input"),
    (["data.image_size=200"], "not a multiple of model.patch_size"),
    (["loss.weights.rbg=1"], "unknown output modality 'rbg'"),
    (["loss.attg.tau_end=0"], "taus must be > 0"),
    (["schedule.warmup_epochs=2000"], "warmup_epochs < total_epochs"),
    (["train.mixed_precision=fp8"], "is not one of ['no', 'bf16', 'fp16']"),
    (["masking.strategy=heads", "masking.cache.enabled=true"], "needs per-head scores"),
    (["masking.score_source=loss"], "masking.score_source"),
    (["masking.loss_predictor.cached_train_share=2"], "cached_train_share must lie in [0, 1]"),
    (["loss.loss_prediction_weight=-1"], "loss.loss_prediction_weight must be >= 0"),
])
def test_cross_field_errors(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_pretrain_config(None, overrides)
    assert needle in str(e.value)


def test_list_and_scalar_alphas():
    assert load_pretrain_config(None, ["masking.alphas=[1, 2, 0.5]"]).masking.alphas == [1.0, 2.0, 0.5]
    assert load_pretrain_config(None, ["masking.alphas=0.5"]).masking.alphas == 0.5


def test_defaults_agree_with_the_code_they_configure():
    """One default per concept: the config's and the classes' (README documents these)."""
    import inspect

    from multimae_att.masking import AdaptiveAlpha
    from multimae_att.masking.hpm import hpm
    from multimae_att.pretrain.config import AdaptiveConfig, AttGConfig

    sig = inspect.signature(AdaptiveAlpha).parameters
    for key in ("momentum", "strength", "min_alpha", "max_alpha", "relative_to_initial"):
        assert getattr(AdaptiveConfig(), key) == sig[key].default, key
    assert AdaptiveConfig().relative_to_initial is True
    attg = AttGConfig()
    assert (attg.tau0, attg.tau_end, attg.normalize) == (0.75, 1.5, False)   # increasing, as the paper
    from multimae_att.pretrain.config import LossPredictorConfig
    from multimae_att.pretrain.step import MaskPlanner
    share = inspect.signature(MaskPlanner).parameters["cached_train_share"].default
    assert LossPredictorConfig().cached_train_share == share
    hp = inspect.signature(hpm).parameters
    from multimae_att.masking import STRATEGIES
    assert STRATEGIES["hpm"].defaults == {k: hp[k].default for k in ("share_start", "share_end")}
