"""The pretraining config schema (defaults = the continued MultiMAE-B recipe).

Sections: ``model``, ``data``, ``masking`` (with ``adaptive`` and ``cache``), ``loss`` (with
``attg``), ``optim``, ``schedule``, ``train``, ``init``, ``log``; plus top-level ``output_dir``.
Load with :func:`load_pretrain_config` (schema defaults <- YAML <- ``key=value``); every key and
value is checked before any work starts. See README "Pretraining" for the table of keys.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from multimae_att.attention_cache import AttentionCacheConfig
from multimae_att.config import ConfigError, load_config, setting

__all__ = ["PretrainConfig", "load_pretrain_config", "MODEL_SIZES", "resume_config_changes", "RESUME_FREE_KEYS"]

MODEL_SIZES = ("tiny", "base", "large")


@dataclass
class ModelConfig:
    """Architecture (``multimae_att.model.create_pretrain_model``); decoder sizes None = size default."""

    size: Literal["tiny", "base", "large"] = "base"
    in_modalities: list[str] = field(default_factory=lambda: ["rgb", "depth", "semseg"])
    out_modalities: list[str] = field(default_factory=lambda: ["rgb", "depth", "semseg"])
    extra_norm_rgb: bool = True
    patch_size: int = setting(16, ge=1)
    num_global_tokens: int = setting(1, ge=1)
    drop_path_rate: float = setting(0.0, ge=0, lt=1)
    semseg_num_classes: int = setting(133, ge=1)   # labels must lie in [0, classes): semseg is an input
    decoder_dim: Optional[int] = setting(None, ge=1)
    decoder_depth: Optional[int] = setting(None, ge=1)
    decoder_heads: Optional[int] = setting(None, ge=1)

    def __post_init__(self) -> None:
        known = ("rgb", "depth", "semseg")
        for key in ("in_modalities", "out_modalities"):
            bad = [m for m in getattr(self, key) if m not in known]
            if bad:
                raise ValueError(f"model.{key}: unknown modality {bad[0]!r}; known: {list(known)}")
        if not self.in_modalities:
            raise ValueError("model.in_modalities must not be empty")
        missing = [m for m in self.out_modalities if m not in self.in_modalities]
        if missing:  # masks of an output come from the input of the same name
            raise ValueError(f"model.out_modalities {missing} need the same modality in "
                             f"model.in_modalities {self.in_modalities}")
        if self.decoder_dim is not None and self.decoder_heads is not None \
                and self.decoder_dim % self.decoder_heads:
            raise ValueError(f"model.decoder_dim={self.decoder_dim} must be a multiple of "
                             f"model.decoder_heads={self.decoder_heads}")

    def num_tokens(self, image_size: int) -> int:
        """All input tokens at ``image_size`` (every modality has one token per patch)."""
        return len(self.in_modalities) * (image_size // self.patch_size) ** 2


@dataclass
class DataConfig:
    """Where the data is and how it is cropped (``multimae_att.data.build_loader``)."""

    root: str = setting("data/imagenet_multimae", nonempty=True)
    split: str = setting("train", nonempty=True)
    layout: Literal["auto", "folder", "shards"] = "auto"
    image_size: int = setting(224, ge=1, le=4096)   # px (the bound catches typos)
    batch_size: int = setting(256, ge=1)            # per process and micro-batch
    num_workers: int = setting(8, ge=0)
    crop_scale: tuple[float, float] = setting((0.2, 1.0), gt=0, le=1)   # share of the area: (min, max)
    hflip: float = setting(0.5, ge=0, le=1)         # flip probability
    standardize_depth: bool = True   # robust per-sample standardisation before the model
    samples_per_epoch: Optional[int] = setting(None, ge=1)  # shards: per rank; None = from the shard index
    # semseg labels that are background for the masking diagnostics (foreground = the others;
    # synthetic scenes: [0, 1] = wall, floor); None = no foreground diagnostics
    background_classes: Optional[list[int]] = setting(None, ge=0)

    def __post_init__(self) -> None:
        if self.crop_scale[0] > self.crop_scale[1]:
            raise ValueError(f"data.crop_scale={list(self.crop_scale)}: need min <= max")


@dataclass
class AdaptiveConfig:
    """Loss-driven Dirichlet alphas (``multimae_att.masking.AdaptiveAlpha``)."""

    enabled: bool = False
    momentum: float = setting(0.99, ge=0, lt=1)
    strength: float = setting(1.0, ge=0)
    min_alpha: float = setting(0.1, gt=0)
    max_alpha: float = setting(10.0, gt=0)
    relative_to_initial: bool = True

    def __post_init__(self) -> None:
        if self.min_alpha > self.max_alpha:
            raise ValueError(f"masking.adaptive.min_alpha={self.min_alpha} exceeds "
                             f"masking.adaptive.max_alpha={self.max_alpha}")


@dataclass
class LossPredictorConfig:
    """The loss-prediction head of ``masking.score_source=predicted_loss``
    (:class:`multimae_att.loss_prediction.LossPredictor`)."""

    hidden: int = setting(32, ge=0)                      # MLP width; 0: LayerNorm + linear
    cached_train_share: float = setting(0.0625, ge=0, le=1)  # with masking.cache: samples that train it


@dataclass
class MaskingConfig:
    """Budgets and strategy. ``params`` are the strategy's own parameters (checked by name)."""

    strategy: str = "high"
    params: dict[str, Any] = field(default_factory=dict)
    num_encoded_tokens: int = setting(98, ge=1)     # visible tokens K, all modalities: < token count
    alphas: Union[float, list[float]] = setting(1.0, gt=0)   # Dirichlet concentration(s)
    sample_tasks_uniformly: bool = False
    score_source: Literal["attention", "predicted_loss"] = "attention"
    score_norm: Literal["none", "head_minmax"] = "none"   # attention: AMT's per-head min-max
    score_layer: int = setting(-1, free=True)      # encoder block; checked against model.size
    score_query: Literal["global", "mean"] = "global"
    loss_predictor: LossPredictorConfig = field(default_factory=LossPredictorConfig)
    warmup_epochs: float = setting(0.0, ge=0)      # random masking before this epoch (of this run)
    prob: float = setting(1.0, ge=0, le=1)         # per sample: guided with this probability, else random
    adaptive: AdaptiveConfig = field(default_factory=AdaptiveConfig)
    cache: AttentionCacheConfig = field(default_factory=AttentionCacheConfig)

    def __post_init__(self) -> None:
        from multimae_att.masking import STRATEGIES, check_params, get_strategy

        try:
            get_strategy(self.strategy)  # ValueError naming the nearest registered strategy
        except ValueError as e:
            raise ValueError(f"masking.strategy: {e}") from None
        try:
            check_params(self.strategy, self.params)
        except ValueError as e:
            raise ValueError(f"masking.params: {e}") from None
        if self.cache.enabled and STRATEGIES[self.strategy].per_head:
            raise ValueError(f"masking.cache stores head-averaged scores; strategy "
                             f"{self.strategy!r} needs per-head scores")
        if self.score_source == "predicted_loss":
            if STRATEGIES[self.strategy].per_head:
                raise ValueError(f"masking.strategy={self.strategy!r} needs per-head attention "
                                 "scores; masking.score_source=predicted_loss has no heads")
            if self.score_norm != "none":
                raise ValueError(f"masking.score_norm={self.score_norm!r} normalises attention "
                                 "heads; use 'none' with masking.score_source=predicted_loss")


@dataclass
class AttGConfig:
    """Attention-guided loss weights exp(M_norm / tau), tau: half-cosine tau0 -> tau_end.

    The AttG paper lets tau *increase* from 0.75 (guidance softens during training); it gives no
    end value: 1.5 halves the log-range of the weights (largest / smallest weight e^(4/3) ~ 3.8
    at the start, e^(2/3) ~ 1.9 at the end) without switching the guidance off. ``normalize``:
    divide the weights by their mean over each sample's counted patches (loss scale of the
    unweighted loss); false is the paper's ``L_rec * M_scaled``.
    """

    enabled: bool = False
    tau0: float = setting(0.75, gt=0)
    tau_end: float = setting(1.5, gt=0)
    source: Literal["scores", "data"] = "scores"   # this step's scoring pass, or batch['att_map']
    normalize: bool = False


@dataclass
class LossConfig:
    weights: dict[str, float] = setting(
        factory=lambda: {"rgb": 1.0, "norm_rgb": 1.0, "depth": 1.0, "semseg": 1.0}, ge=0)
    semseg_ignore_index: int = setting(-100, free=True)
    attg: AttGConfig = field(default_factory=AttGConfig)
    loss_prediction_weight: float = setting(1.0, ge=0)   # the loss predictor's ranking loss


@dataclass
class OptimConfig:
    """AdamW. lr = ``lr`` if set, else ``blr * global_batch / 256``; times ``lr_scale``."""

    blr: float = setting(1e-4, gt=0)
    lr: Optional[float] = setting(None, gt=0)
    lr_scale: float = setting(1.0, gt=0)
    min_lr: float = setting(0.0, ge=0)
    weight_decay: float = setting(0.05, ge=0)
    betas: tuple[float, float] = setting((0.9, 0.95), ge=0, lt=1)
    eps: float = setting(1e-8, gt=0)
    clip_grad: Optional[float] = setting(None, gt=0)
    accum_steps: int = setting(1, ge=1)


@dataclass
class ScheduleConfig:
    """Warm-up + cosine in epochs of a reference schedule; step 0 sits at ``start_epoch``.

    Default = the tail of the original 1700-epoch run (epochs 1600 -> 1700, 40 warm-up).
    Restart: ``total_epochs=100, warmup_epochs=20, start_epoch=0``.
    """

    warmup_epochs: float = setting(40.0, ge=0)
    total_epochs: float = setting(1700.0, gt=0)
    start_epoch: float = setting(1600.0, ge=0)

    def __post_init__(self) -> None:
        if self.warmup_epochs >= self.total_epochs:
            raise ValueError(f"schedule.warmup_epochs={self.warmup_epochs} must be below "
                             f"schedule.total_epochs={self.total_epochs}")


@dataclass
class TrainConfig:
    epochs: float = setting(100.0, gt=0)
    max_steps: Optional[int] = setting(None, ge=0)   # stop after this many optimizer steps (0: export the init)
    seed: int = setting(0, ge=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    cpu: bool = False
    find_unused_parameters: bool = False
    fp32_output_adapters: list[str] = field(default_factory=list)
    save_every: int = setting(1000, ge=1)    # optimizer steps between training states
    keep_last: int = setting(2, ge=1)
    final_export: bool = True                # write output_dir/final.pth (MultiMAE layout)
    export_loss_predictor: bool = False      # also store the loss predictor in final.pth
    attention: Literal["auto", "fused", "explicit"] = "auto"  # attention kernel; auto: chosen per pass
    compile: bool = False                    # torch.compile the encoder blocks and decoders


@dataclass
class InitConfig:
    checkpoint: Optional[str] = None         # public or exported MultiMAE checkpoint
    load_optimizer: bool = True              # when the file has a compatible optimizer state
    resume: bool = True                      # continue from output_dir's latest training state
    allow_config_change: bool = False        # resume even if result-changing keys differ (see below)
    overwrite: bool = False                  # start over in a used output_dir (old contents -> previous-<time>/)


@dataclass
class LogConfig:
    every: int = setting(10, ge=1)
    pictures_every: int = setting(500, ge=0)     # 0 = never
    pictures_samples: int = setting(2, ge=1)
    # trackers through Accelerate (metrics.jsonl is always written): tensorboard, wandb, mlflow, aim
    trackers: list[Literal["tensorboard", "wandb", "mlflow", "aim"]] = setting(factory=lambda: ["tensorboard"])
    tensorboard: bool = True                 # deprecated: false drops tensorboard from log.trackers
    progress: bool = True                    # progress bar; false: one printed line per log.every


@dataclass
class PretrainConfig:
    output_dir: str = setting("runs/pretrain", nonempty=True)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    init: InitConfig = field(default_factory=InitConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        outputs = list(self.model.out_modalities) + (["norm_rgb"] if self.model.extra_norm_rgb else [])
        bad = [k for k in self.loss.weights if k not in ("rgb", "norm_rgb", "depth", "semseg")]
        if bad:
            raise ValueError(f"loss.weights: unknown output modality {bad[0]!r}; outputs: {outputs}")
        bad = [k for k in self.train.fp32_output_adapters if k not in outputs]
        if bad:
            raise ValueError(f"train.fp32_output_adapters: {bad[0]!r} is not an output; outputs: {outputs}")
        total = self.model.num_tokens(self.data.image_size)
        if self.masking.num_encoded_tokens >= total:  # nothing hidden: nothing to reconstruct
            raise ValueError(
                f"masking.num_encoded_tokens={self.masking.num_encoded_tokens} must be below the "
                f"{total} tokens of model.in_modalities={self.model.in_modalities} at "
                f"data.image_size={self.data.image_size} (model.patch_size={self.model.patch_size})")
        if self.data.image_size % self.model.patch_size:
            raise ValueError(f"data.image_size {self.data.image_size} is not a multiple of "
                             f"model.patch_size {self.model.patch_size}")
        if self.masking.adaptive.enabled and not set(self.model.in_modalities) <= set(self.model.out_modalities):
            raise ValueError("masking.adaptive needs a reconstruction loss for every input modality "
                             f"(model.out_modalities must include {self.model.in_modalities})")
        if (self.masking.score_source == "predicted_loss"
                and not set(self.model.in_modalities) <= set(self.model.out_modalities)):
            raise ValueError("masking.score_source=predicted_loss predicts each input modality's "
                             "reconstruction loss: model.out_modalities must include "
                             f"{self.model.in_modalities}")
        if isinstance(self.masking.alphas, list) and len(self.masking.alphas) != len(self.model.in_modalities):
            raise ValueError(f"masking.alphas has {len(self.masking.alphas)} values for the "
                             f"{len(self.model.in_modalities)} model.in_modalities")


# Keys a resumed run may change freely (a note is printed): where things are, how often to log or
# save, how long to run. Everything else (model.*, the rest of data.*, masking.*, loss.*, optim.*,
# schedule.*, train.seed, train.mixed_precision, train.cpu, ...) changes the results.
RESUME_FREE_KEYS = ("output_dir", "data.root", "data.layout", "data.num_workers", "data.background_classes",
                    "masking.cache.path",
                    "train.max_steps", "train.epochs", "train.save_every", "train.keep_last",
                    "train.final_export", "train.export_loss_predictor", "train.find_unused_parameters",
                    "train.attention", "train.compile")
RESUME_FREE_SECTIONS = ("init.", "log.")
# The run length sets AttG's tau schedule (a half cosine over the run's steps) and the share of a
# curriculum strategy (hpm).
RESUME_LENGTH_KEYS = ("train.max_steps", "train.epochs")
# Strategy params and loss weights compare as a whole.
_RESUME_WHOLE = ("masking.params", "loss.weights")


def resume_config_changes(saved: dict, cfg: PretrainConfig) -> tuple[list[str], list[str]]:
    """Compare a training state's config with the resolved ``cfg`` of the resuming run.

    Returns ``(blocking, notes)``: lines ``key: old -> new`` for keys that change the results,
    and for keys that may change freely (``RESUME_FREE_KEYS``, ``init.*``, ``log.*``; the run
    length only without AttG and curriculum strategies) or that exist on one side only (an older
    or newer schema). Built on :func:`multimae_att.config.resume_config_changes`.
    """
    from multimae_att.config import config_to_dict, resume_config_changes as changes
    from multimae_att.masking import STRATEGIES

    sections = tuple(f"{s}*" for s in RESUME_FREE_SECTIONS)
    by_length = cfg.loss.attg.enabled or STRATEGIES[cfg.masking.strategy].uses_progress
    return changes(saved, config_to_dict(cfg), harmless=RESUME_FREE_KEYS + sections,
                   blocking=RESUME_LENGTH_KEYS if by_length else (),
                   quiet_missing=sections, whole=_RESUME_WHOLE)


def load_pretrain_config(path: Optional[str] = None, overrides: tuple[str, ...] | list[str] = ()
                         ) -> PretrainConfig:
    """Schema defaults <- YAML ``path`` <- ``overrides``; raises :class:`ConfigError`."""
    return load_config(PretrainConfig, path, overrides)


__all__ += ["ConfigError"]
