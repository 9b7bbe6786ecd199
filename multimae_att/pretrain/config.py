"""The pretraining config schema (defaults = the continued MultiMAE-B recipe).

Sections: ``model``, ``data``, ``masking`` (with ``adaptive`` and ``cache``), ``loss`` (with
``attg``), ``optim``, ``schedule``, ``train``, ``init``, ``log``; plus top-level ``output_dir``.
Load with :func:`load_pretrain_config` (schema defaults <- YAML <- ``key=value``); every key and
value is checked before any work starts. See README "Pretraining" for the table of keys.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from multimae_att.config import ConfigError, load_config, setting
from multimae_att.modalities import MODEL_MODALITIES, OUTPUTS

__all__ = ["PretrainConfig", "load_pretrain_config", "MODEL_SIZES", "resume_config_changes", "RESUME_FREE_KEYS"]

MODEL_SIZES = ("tiny", "base", "large")


@dataclass
class ModelConfig:
    """Architecture (``multimae_att.model.create_pretrain_model``); decoder sizes None = size default."""

    size: Literal["tiny", "base", "large"] = "base"   # tiny: a CPU size for demos and tests
    # inputs the encoder sees, from the modality table (multimae_att.modalities)
    in_modalities: list[str] = field(default_factory=lambda: ["rgb", "depth", "semseg"])
    # reconstructed modalities (a decoder each); each must be an input too
    out_modalities: list[str] = field(default_factory=lambda: ["rgb", "depth", "semseg"])
    extra_norm_rgb: bool = True              # also decode rgb with normalised-pixel targets (norm_rgb)
    patch_size: int = setting(16, ge=1)      # px per token side (semseg: the same area at 1/4 resolution)
    num_global_tokens: int = setting(1, ge=1)   # learned tokens appended to the encoder input
    drop_path_rate: float = setting(0.0, ge=0, lt=1)   # stochastic depth of the encoder blocks
    semseg_num_classes: int = setting(133, ge=1)   # labels must lie in [0, classes): semseg is an input
    decoder_dim: int | None = setting(None, ge=1)     # null: the size's default
    decoder_depth: int | None = setting(None, ge=1)   # null: the size's default
    decoder_heads: int | None = setting(None, ge=1)   # null: the size's default

    def __post_init__(self) -> None:
        known = MODEL_MODALITIES
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

    root: str = setting("data/imagenet_multimae", nonempty=True)   # dataset folder or shard spec (README Data)
    split: str = setting("train", nonempty=True)  # split folder or shard set under data.root
    layout: Literal["auto", "folder", "shards"] = "auto"   # auto: by what data.root holds
    image_size: int = setting(224, ge=1, le=4096)   # px (the bound catches typos)
    batch_size: int = setting(256, ge=1)            # per process and micro-batch
    num_workers: int = setting(8, ge=0)             # DataLoader workers per process
    crop_scale: tuple[float, float] = setting((0.2, 1.0), gt=0, le=1)   # share of the area: (min, max)
    hflip: float = setting(0.5, ge=0, le=1)         # flip probability
    standardize_depth: bool = True   # robust per-sample standardisation (input and target)
    samples_per_epoch: int | None = setting(None, ge=1)  # shards: per rank; None = from the shard index
    # semseg labels that are background for the masking diagnostics (foreground = the others;
    # synthetic scenes: [0, 1] = wall, floor); None = no foreground diagnostics
    background_classes: list[int] | None = setting(None, ge=0)

    def __post_init__(self) -> None:
        if self.crop_scale[0] > self.crop_scale[1]:
            raise ValueError(f"data.crop_scale={list(self.crop_scale)}: need min <= max")


@dataclass
class AttentionCacheConfig:
    """The crop-aware attention cache (``multimae_att.scoring.cache``): scores of earlier
    passes, kept over the source image, instead of a scoring pass every step (defaults off)."""

    enabled: bool = False
    path: str = ""                   # cache folder ('': <output_dir>/attention_cache)
    # cells per side of the canonical source grid; memory R*M*G*G*bytes(dtype) + R*G*G*2 bytes
    # (ImageNet-1K at G=32, float16, 3 modalities: ~7.9 GB + 2.6 GB on disk, paged on demand)
    grid: int = setting(32, ge=1)
    dtype: Literal["float16", "float32"] = "float16"
    normalize: bool = True           # each written map divided by its mean over the crop's tokens
    refresh_every: int | None = setting(40, ge=1)   # all maps expire at multiples of this many epochs (null: never)
    max_age: int | None = setting(None, ge=1)       # a cell older than this many epochs is stale (null: never)
    # full: a full-image scoring pass over the training split at the start of each refresh window
    # (multimae_att.scoring.cache.refresh_cache), so every lookup hits and resume stays bit-exact;
    # crops: no such pass, each step's crop pass writes its misses back (fewer hits; a resumed run
    # may see writes made after its saved state, so it is not bit-exact)
    refresh: Literal["full", "crops"] = "full"


@dataclass
class AdaptiveConfig:
    """Loss-driven Dirichlet alphas (``multimae_att.masking.AdaptiveAlpha``)."""

    enabled: bool = False        # alphas follow the per-modality losses (a harder modality gets more hidden)
    momentum: float = setting(0.99, ge=0, lt=1)   # EMA of the per-modality losses
    strength: float = setting(1.0, ge=0)          # alpha = base * (loss / mean loss) ** -strength; 0: fixed
    min_alpha: float = setting(0.1, gt=0)         # clamp of the adapted alphas
    max_alpha: float = setting(10.0, gt=0)
    relative_to_initial: bool = True   # compare each loss to its own first value (losses differ in scale)

    def __post_init__(self) -> None:
        if self.min_alpha > self.max_alpha:
            raise ValueError(f"masking.adaptive.min_alpha={self.min_alpha} exceeds "
                             f"masking.adaptive.max_alpha={self.max_alpha}")


@dataclass
class LossPredictorConfig:
    """The loss-prediction head of ``masking.score_source=predicted_loss``
    (:class:`multimae_att.scoring.loss_prediction.LossPredictor`)."""

    hidden: int = setting(32, ge=0)                      # MLP width; 0: LayerNorm + linear
    cached_train_share: float = setting(0.0625, ge=0, le=1)  # with masking.cache: samples that train it


@dataclass
class MaskingConfig:
    """Budgets and strategy. ``params`` are the strategy's own parameters (checked by name)."""

    strategy: str = "high"       # a registered strategy (README Masking strategies)
    params: dict[str, Any] = field(default_factory=dict)   # e.g. {alpha: 0.5} for noisy
    num_encoded_tokens: int = setting(98, ge=1)     # visible tokens K, all modalities: < token count
    alphas: float | list[float] = setting(1.0, gt=0)   # Dirichlet concentration(s)
    sample_tasks_uniformly: bool = False
    score_source: Literal["attention", "predicted_loss"] = "attention"   # what the strategies rank tokens by
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

    enabled: bool = False                          # weight each hidden patch's loss by exp(M_norm / tau)
    tau0: float = setting(0.75, gt=0)
    tau_end: float = setting(1.5, gt=0)
    source: Literal["scores", "data"] = "scores"   # this step's scoring pass, or batch['att_map']
    normalize: bool = False   # weights divided by their mean over each sample's counted patches


@dataclass
class LossConfig:
    """Masked reconstruction losses (``multimae_att.pretrain.losses``; one per output, the modality table's
    loss spec)."""

    # weight of each output's loss in the total: rgb, norm_rgb, depth, semseg
    weights: dict[str, float] = setting(
        factory=lambda: {"rgb": 1.0, "norm_rgb": 1.0, "depth": 1.0, "semseg": 1.0}, ge=0)
    semseg_ignore_index: int = setting(-100, free=True)   # semseg target label that is not scored
    attg: AttGConfig = field(default_factory=AttGConfig)
    loss_prediction_weight: float = setting(1.0, ge=0)   # the loss predictor's ranking loss


@dataclass
class OptimConfig:
    """AdamW. lr = ``lr`` if set, else ``blr * global_batch / 256``; times ``lr_scale``."""

    blr: float = setting(1e-4, gt=0)             # lr per 256 samples of global batch
    lr: float | None = setting(None, gt=0)     # absolute lr; null: from blr
    lr_scale: float = setting(1.0, gt=0)          # multiplies the lr
    min_lr: float = setting(0.0, ge=0)            # end of the cosine
    weight_decay: float = setting(0.05, ge=0)     # not on biases, norms and no_weight_decay() names
    betas: tuple[float, float] = setting((0.9, 0.95), ge=0, lt=1)   # AdamW
    eps: float = setting(1e-8, gt=0)              # AdamW
    clip_grad: float | None = setting(None, gt=0)   # max gradient norm; null: no clipping
    # micro-batches per optimizer step: global batch = data.batch_size x processes x accum_steps
    accum_steps: int = setting(1, ge=1)


@dataclass
class ScheduleConfig:
    """Warm-up + cosine in epochs of a reference schedule; step 0 sits at ``start_epoch``.

    Default = the tail of the original 1700-epoch run (epochs 1600 -> 1700, 40 warm-up).
    Restart: ``total_epochs=100, warmup_epochs=20, start_epoch=0``.
    """

    warmup_epochs: float = setting(40.0, ge=0)     # linear warm-up, epochs of the reference schedule
    total_epochs: float = setting(1700.0, gt=0)    # length of the reference schedule
    start_epoch: float = setting(1600.0, ge=0)     # where this run's step 0 sits on it

    def __post_init__(self) -> None:
        if self.warmup_epochs >= self.total_epochs:
            raise ValueError(f"schedule.warmup_epochs={self.warmup_epochs} must be below "
                             f"schedule.total_epochs={self.total_epochs}")


@dataclass
class TrainConfig:
    """Run length, seed, precision and training states (Accelerate)."""

    epochs: float = setting(100.0, gt=0)         # run length, epochs of the training split
    max_steps: int | None = setting(None, ge=0)   # stop after this many optimizer steps (0: export the init)
    seed: int = setting(0, ge=0)                 # every random draw is a function of (seed, position)
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"   # autocast (bf16 also on CPU)
    cpu: bool = False                            # run on the CPU even where a GPU is
    find_unused_parameters: bool = False         # DDP's setting
    fp32_output_adapters: list[str] = field(default_factory=list)   # decoders kept in float32 under autocast
    save_every: int = setting(1000, ge=1)    # optimizer steps between training states
    keep_last: int = setting(2, ge=1)        # training states kept
    final_export: bool = True                # write output_dir/final.pth (MultiMAE layout)
    export_loss_predictor: bool = False      # also store the loss predictor in final.pth
    # attention kernel: fused (SDPA) or explicit (softmax of the logits); auto: explicit only for
    # bf16/fp16 training on a CPU, where the flash-attention backward is slow (docs/BENCHMARKS.md)
    attention: Literal["auto", "fused", "explicit"] = "auto"
    compile: bool = False                    # torch.compile the encoder blocks and decoders
    # on a CPU: keep the memory a step frees for the next one (glibc malloc; no page faults per
    # step, 5-17 % faster small-preset steps, the process keeps its peak heap) or glibc's default
    cpu_malloc: Literal["keep", "default"] = "keep"


@dataclass
class InitConfig:
    """Where the weights start, and what a used run folder means (README Resume)."""

    # a published name (multimae-b, README From the public checkpoint), a URL or a path to a
    # MultiMAE or exported checkpoint; null: random initialisation
    checkpoint: str | None = None
    load_optimizer: bool = True              # when the file has a compatible optimizer state
    resume: bool = True                      # continue from output_dir's latest training state
    allow_config_change: bool = False        # resume even if result-changing keys differ (README Resume)
    overwrite: bool = False                  # start over in a used output_dir (old contents -> previous-<time>/)


@dataclass
class LogConfig:
    """``metrics.jsonl``, trackers, pictures and the console."""

    every: int = setting(10, ge=1)               # steps per metrics.jsonl record (means over them)
    pictures_every: int = setting(500, ge=0)     # steps between training pictures; 0 = never
    pictures_samples: int = setting(2, ge=1)     # samples (rows) per picture
    # held-out check of the loss predictor (masking.score_source=predicted_loss): lossp/spearman in
    # each record, on the first log.heldout_samples images of this split of data.root; null: off
    heldout_split: str | None = setting(None, nonempty=True)
    heldout_samples: int = setting(32, ge=1)     # images of log.heldout_split (whole, fixed masks)
    # trackers through Accelerate (metrics.jsonl is always written): tensorboard, wandb, mlflow, aim
    trackers: list[Literal["tensorboard", "wandb", "mlflow", "aim"]] = setting(factory=lambda: ["tensorboard"])
    tensorboard: bool = True                 # deprecated: false drops tensorboard from log.trackers
    progress: bool = True                    # progress bar; false: one printed line per log.every


@dataclass
class PretrainConfig:
    output_dir: str = setting("runs/pretrain", nonempty=True)   # run folder: config, states, metrics, final.pth
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
        bad = [k for k in self.loss.weights if k not in OUTPUTS]
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
                    "train.attention", "train.compile", "train.cpu_malloc")
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
    from multimae_att.config import config_to_dict
    from multimae_att.config import resume_config_changes as changes
    from multimae_att.masking import STRATEGIES

    sections = tuple(f"{s}*" for s in RESUME_FREE_SECTIONS)
    by_length = cfg.loss.attg.enabled or STRATEGIES[cfg.masking.strategy].uses_progress
    return changes(saved, config_to_dict(cfg), harmless=RESUME_FREE_KEYS + sections,
                   blocking=RESUME_LENGTH_KEYS if by_length else (),
                   quiet_missing=sections, whole=_RESUME_WHOLE)


def load_pretrain_config(path: str | None = None, overrides: tuple[str, ...] | list[str] = ()
                         ) -> PretrainConfig:
    """Schema defaults <- YAML ``path`` <- ``overrides``; raises :class:`ConfigError`."""
    return load_config(PretrainConfig, path, overrides)


__all__ += ["ConfigError"]
