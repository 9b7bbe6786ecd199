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
    (["masking.num_encoded_tokens=600"], "must be below the 588 tokens"),
    (["masking.num_encoded_tokens=588"], "masking.num_encoded_tokens=588 must be below the 588 tokens"),
    (["masking.num_encoded_tokens=0"], "masking.num_encoded_tokens must be >= 1, got 0"),
    (["masking.alphas=[1.0, 2.0]"], "masking.alphas has 2 values for the 3 model.in_modalities"),
    (["masking.adaptive.enabled=true", "model.out_modalities=[rgb]"], "masking.adaptive needs"),
    (["masking.params.alpha=0.5"], "unknown parameter 'alpha' for masking strategy 'high'"),
    (["masking.strategy=noisy", "masking.params.alpha=0.5", "masking.params.beta=1"], "'beta'"),
    (["masking.prob=1.5"], "masking.prob must be in [0, 1], got 1.5"),
    (["model.in_modalities=[rgb, normals]"], "unknown modality 'normals'"),
    (["model.out_modalities=[rgb, depth]", "model.in_modalities=[rgb]"],
     "need the same modality in model.in_modalities"),
    (["data.image_size=200"], "not a multiple of model.patch_size"),
    (["loss.weights.rbg=1"], "unknown output modality 'rbg'"),
    (["loss.attg.tau_end=0"], "loss.attg.tau_end must be > 0, got 0.0"),
    (["schedule.warmup_epochs=2000"], "schedule.warmup_epochs=2000.0 must be below schedule.total_epochs"),
    (["optim.lr=-1"], "optim.lr must be > 0, got -1.0"),
    (["train.max_steps=-1"], "train.max_steps must be >= 0, got -1"),
    (["data.batch_size=-4"], "data.batch_size must be >= 1, got -4"),
    (["optim.betas=[0.9, 1.5]"], "optim.betas[1] must be in [0, 1), got 1.5"),
    (["loss.weights.depth=-1"], "loss.weights.depth must be >= 0, got -1.0"),
    (["optim.blr=.nan"], "'optim.blr' expects a number, got nan"),
    (["optim.lr=.inf"], "optim.lr must be > 0, got inf"),
    (["data.crop_scale=[0.9, 0.5]"], "data.crop_scale=[0.9, 0.5]: need min <= max"),
    (["masking.strategy=hihg"], "masking.strategy: unknown masking strategy 'hihg'"),
    (["model.decoder_dim=100", "model.decoder_heads=3"], "model.decoder_dim=100 must be a multiple"),
    (["masking.adaptive.min_alpha=5", "masking.adaptive.max_alpha=1"], "masking.adaptive.min_alpha=5.0 exceeds"),
    (["train.mixed_precision=fp8"], "is not one of ['no', 'bf16', 'fp16']"),
    (["masking.strategy=heads", "masking.cache.enabled=true"], "needs per-head scores"),
    (["masking.score_source=loss"], "masking.score_source"),
    (["masking.loss_predictor.cached_train_share=2"], "cached_train_share must be in [0, 1]"),
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
    from multimae_att.masking.planner import MaskPlanner
    from multimae_att.pretrain.config import LossPredictorConfig
    share = inspect.signature(MaskPlanner).parameters["cached_train_share"].default
    assert LossPredictorConfig().cached_train_share == share
    from multimae_att.scoring.loss_prediction import LossPredictor
    assert LossPredictorConfig().hidden == inspect.signature(LossPredictor).parameters["hidden"].default
    hp = inspect.signature(hpm).parameters
    from multimae_att.masking import STRATEGIES
    assert STRATEGIES["hpm"].defaults == {k: hp[k].default for k in ("share_start", "share_end")}
