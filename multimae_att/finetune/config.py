"""The finetuning config schema (defaults = MultiMAE-B ImageNet-1K classification recipe).

Sections: ``task``, ``model``, ``head``, ``data``, ``optim``, ``train``, ``init``, ``log``; plus
top-level ``output_dir``. Loaded by :func:`load_finetune_config` with the project's generic
machinery (:mod:`multimae_att.config`): schema defaults <- YAML <- ``key=value``, strict.
Key names follow the pretraining schema where the meaning is the same.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from multimae_att.config import ConfigError, load_config
from multimae_att.model import ENCODER_SIZES

__all__ = ["FinetuneConfig", "load_finetune_config", "ConfigError", "TASKS", "resume_config_changes",
           "check_resume_config"]

TASKS = ("cls", "semseg", "depth", "knn", "linear_probe")
MODALITIES = ("rgb", "depth", "semseg")


@dataclass
class TaskConfig:
    """What is learnt and measured. ``depth_unit_m``: metres per unit of the loaded depth tensor
    (stored 16-bit value / 2**16; millimetre PNGs -> 65.536)."""
    name: Literal["cls", "semseg", "depth", "knn", "linear_probe"] = "cls"
    num_classes: int = 1000
    ignore_index: int = 255
    reduce_zero_label: bool = False           # ADE20K / NYUv2: label 0 -> ignore, others - 1
    loss: Literal["ce", "berhu", "l1"] = "ce"
    label_smoothing: float = 0.1
    mixup: float = 0.8                        # cls: Mixup alpha (0 = off)
    cutmix: float = 1.0                       # cls: CutMix alpha (0 = off)
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    randaug: str = "rand-m9-mstd0.5-inc1"     # cls: timm RandAugment spec ('' = off)
    depth_unit_m: float = 65.536
    mask_valid: bool = True                   # depth: use batch['mask_valid'] when the data has it
    knn_k: int = 20
    knn_temperature: float = 0.07
    few_shot: list[int] = field(default_factory=lambda: [1, 5, 10, 20])
    few_shot_repeats: int = 3
    feature_pool: Literal["mean", "global"] = "mean"   # knn / linear_probe features


@dataclass
class ModelConfig:
    """Encoder (``MultiViT`` of a named size); ``in_modalities`` are the task's inputs."""
    size: Literal["tiny", "base", "large"] = "base"
    in_modalities: list[str] = field(default_factory=lambda: ["rgb"])
    patch_size: int = 16
    num_global_tokens: int = 1
    drop_path_rate: float = 0.1
    semseg_num_classes: int = 133             # semseg *input* adapter (pseudo labels)

    def __post_init__(self) -> None:
        bad = [m for m in self.in_modalities if m not in MODALITIES]
        if bad or not self.in_modalities:
            raise ValueError(f"model.in_modalities: need a non-empty subset of {list(MODALITIES)}, "
                             f"got {self.in_modalities}")


@dataclass
class HeadConfig:
    """Task head. semseg: ``kind`` convnext (default) or dpt; depth: dpt; cls: linear."""
    kind: Literal["auto", "linear", "convnext", "dpt"] = "auto"
    main_modalities: Optional[list[str]] = None        # tokens the head reads; None = all inputs
    embed_dim: int = 6144                               # convnext
    preds_per_patch: int = 16
    depth: int = 4
    hooks: list[int] = field(default_factory=lambda: [2, 5, 8, 11])          # dpt
    layer_dims: list[int] = field(default_factory=lambda: [96, 192, 384, 768])
    feature_dim: int = 256
    init_scale: float = 0.001                           # linear
    use_mean_pooling: bool = True


@dataclass
class DataConfig:
    """Data (``multimae_att.data.build_loader``); ``root`` holds ``train_split`` and ``val_split``."""
    root: str = "data/imagenet"
    train_split: str = "train"
    val_split: str = "val"
    layout: Literal["auto", "folder", "shards"] = "auto"
    image_size: int = 224
    batch_size: int = 128                     # per process and micro-batch
    eval_batch_size: Optional[int] = None     # None = batch_size
    num_workers: int = 8
    crop_scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    eval_crop_pct: float = 1.0                # center_crop mode: share of the largest centred box
    # Which recipe prepares semseg/depth data (docs/FINETUNE.md): ours, or MultiMAE's published
    # one (LSJ + letterbox for semseg, short-side crops for NYUv2 depth, nearest-resampled depth,
    # trimmed depth-input statistics over image pixels, best evaluation reported). cls: identical.
    protocol: Literal["ours", "multimae"] = "ours"
    # Training augmentation. rrc: random-resized crop (crop_scale) + flip (ours); lsj: MultiMAE's
    # semseg large-scale jitter; nyu: MultiMAE's NYUv2 depth crops + colour; auto: by protocol/task
    aug: Literal["auto", "rrc", "lsj", "nyu"] = "auto"
    # full: whole image resized to image_size x image_size, semseg/depth metrics at the stored
    # label resolution of each sample (prediction upsampled bilinearly); center_crop: centre crop
    # at image_size, targets resized with it (nearest); letterbox (multimae): longest side to
    # image_size + padding, scored at that size with the padding ignored; auto: by protocol/task
    eval_mode: Literal["auto", "full", "center_crop", "letterbox"] = "auto"
    max_eval_samples: Optional[int] = None    # evaluate on a seed-0 permutation's first N (folder layout)
    standardize_depth: bool = True            # depth *inputs*: robust per-sample standardisation


@dataclass
class OptimConfig:
    """AdamW with layer-wise LR decay. lr = ``lr`` if set, else ``blr * global_batch / 256``."""
    blr: float = 5e-4
    lr: Optional[float] = None
    min_lr: float = 1e-6
    warmup_epochs: float = 5.0
    weight_decay: float = 0.05
    layer_decay: float = 0.65
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: Optional[float] = None
    accum_steps: int = 1
    recipe_global_batch: Optional[int] = None   # processes x batch x accum the recipe is for (warns if not)


@dataclass
class TrainConfig:
    epochs: float = 100.0
    max_steps: Optional[int] = None           # stop after this many optimizer steps
    eval_every: int = 1                       # epochs between evaluations (and the last one)
    max_eval_batches: Optional[int] = None    # smoke tests only: evaluate on a prefix
    seed: int = 0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    cpu: bool = False
    find_unused_parameters: Optional[bool] = None       # None = True for DPT heads
    save_every: int = 0                       # optimizer steps between training states (0 = epoch ends)
    keep_last: int = 2
    # metrics.json holds the best evaluation (task metric; depth under protocol multimae: lowest
    # validation loss) or the last one; auto: best for protocol multimae, else last
    report: Literal["auto", "best", "last"] = "auto"


@dataclass
class InitConfig:
    checkpoint: Optional[str] = None          # ours or MultiMAE's, MultiMAE or timm layout
    resume: bool = True                       # continue from output_dir's latest training state
    allow_config_change: bool = False         # resume even if result-changing keys differ (see below)


@dataclass
class LogConfig:
    every: int = 10
    progress: bool = True


@dataclass
class FinetuneConfig:
    output_dir: str = "runs/finetune"
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    init: InitConfig = field(default_factory=InitConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        if self.data.image_size % self.model.patch_size:
            raise ValueError(f"data.image_size {self.data.image_size} is not a multiple of "
                             f"model.patch_size {self.model.patch_size}")
        main = self.head.main_modalities or []
        bad = [m for m in main if m not in self.model.in_modalities]
        if bad:
            raise ValueError(f"head.main_modalities {bad} are not in model.in_modalities "
                             f"{self.model.in_modalities}")
        if self.task.name in ("cls", "knn", "linear_probe") and "rgb" not in self.model.in_modalities:
            raise ValueError(f"task {self.task.name!r} reads RGB: add 'rgb' to model.in_modalities")
        if self.task.name == "depth" and self.task.loss == "ce":
            raise ValueError("task.loss: depth needs 'berhu' or 'l1', not 'ce'")
        if self.task.name in ("semseg", "depth") and self.task.name in self.model.in_modalities:
            raise ValueError(f"task {self.task.name!r} predicts {self.task.name}: it cannot also be "
                             f"an input (model.in_modalities={self.model.in_modalities})")
        allowed = {"cls": ("linear",), "linear_probe": ("linear",), "semseg": ("convnext", "dpt"),
                   "depth": ("dpt", "convnext"), "knn": ("none",)}[self.task.name]
        if self.head_kind() not in allowed:
            raise ValueError(f"head.kind={self.head.kind!r} does not fit task {self.task.name!r}; "
                             f"choose one of {['auto', *allowed]}")
        depth = ENCODER_SIZES[self.model.size]["depth"]
        if self.head_kind() == "dpt" and (len(self.head.hooks) != 4 or max(self.head.hooks) >= depth):
            raise ValueError(f"head.hooks {self.head.hooks}: need 4 block indices < {depth}, the "
                             f"encoder depth of model.size={self.model.size!r}")
        if self.task.name == "cls" and (self.task.mixup > 0 or self.task.cutmix > 0) \
                and self.data.batch_size % 2:
            raise ValueError(f"data.batch_size={self.data.batch_size} must be even for Mixup/CutMix")
        self._check_protocol()

    def _check_protocol(self) -> None:
        """``data.aug`` / ``data.eval_mode`` must be ones the task and ``data.protocol`` implement."""
        dense = self.task.name in ("semseg", "depth")
        if dense and self.data.protocol == "multimae":
            augs, evals = ("lsj", "nyu"), ("letterbox", "center_crop")
        elif dense:
            augs, evals = ("rrc",), ("full", "center_crop")
        else:   # image-level tasks: one recipe (MultiMAE's cls protocol is ours)
            augs, evals = ("rrc",), ("center_crop", "full")
        where = f"task {self.task.name!r} with data.protocol={self.data.protocol!r}"
        if self.aug() not in augs:
            raise ValueError(f"data.aug={self.data.aug!r} is not available for {where}; "
                             f"choose one of {['auto', *augs]}")
        if self.eval_mode() not in evals:
            raise ValueError(f"data.eval_mode={self.data.eval_mode!r} is not available for {where}; "
                             f"choose one of {['auto', *evals]}")
        if self.data.max_eval_samples is not None and self.data.max_eval_samples < 1:
            raise ValueError(f"data.max_eval_samples={self.data.max_eval_samples}: need >= 1 (or null = all)")
        if self.optim.recipe_global_batch is not None and self.optim.recipe_global_batch < 1:
            raise ValueError(f"optim.recipe_global_batch={self.optim.recipe_global_batch}: need >= 1 (or null)")

    def eval_mode(self) -> str:
        """The evaluation mode actually used (see ``data.eval_mode``)."""
        if self.data.eval_mode != "auto":
            return self.data.eval_mode
        if self.task.name not in ("semseg", "depth"):
            return "center_crop"
        if self.data.protocol == "ours":
            return "full"
        return "letterbox" if self.task.name == "semseg" else "center_crop"

    def aug(self) -> str:
        """The training augmentation actually used (see ``data.aug``)."""
        if self.data.aug != "auto":
            return self.data.aug
        if self.data.protocol == "ours" or self.task.name not in ("semseg", "depth"):
            return "rrc"
        return "lsj" if self.task.name == "semseg" else "nyu"

    def report(self) -> str:
        """'best' or 'last': which evaluation ``metrics.json`` reports (see ``train.report``)."""
        if self.train.report != "auto":
            return self.train.report
        return "best" if self.data.protocol == "multimae" else "last"

    def head_kind(self) -> str:
        """The head actually built ('linear', 'convnext', 'dpt' or 'none' for knn)."""
        if self.task.name == "knn":
            return "none" if self.head.kind == "auto" else self.head.kind
        if self.head.kind != "auto":
            return self.head.kind
        return {"cls": "linear", "linear_probe": "linear", "semseg": "convnext", "depth": "dpt"}[self.task.name]


# Keys a resumed run may change freely (a note is printed): where things are, how much data the
# loaders hold at once, how often to log, evaluate or save, where to stop (train.max_steps only
# truncates; train.epochs sets the LR cosine, so it blocks). init.* is read only on a fresh start.
# Everything else (task.*, model.*, head.*, optim.*, the rest of data.* -- splits, sizes, batch,
# augmentation, evaluation mode --, train.seed, train.mixed_precision, train.cpu,
# train.max_eval_batches) changes the results and blocks the resume.
RESUME_FREE_KEYS = ("output_dir", "data.root", "data.layout", "data.num_workers", "data.eval_batch_size",
                    "train.max_steps", "train.eval_every", "train.save_every", "train.keep_last",
                    "train.find_unused_parameters", "init.*", "log.*")


def resume_config_changes(saved: dict, cfg: FinetuneConfig) -> tuple[list[str], list[str]]:
    """``(blocking, notes)`` for a finetune resume from a state saved with config dict ``saved``
    (see :func:`multimae_att.config.resume_config_changes`)."""
    from multimae_att.config import config_to_dict, resume_config_changes as changes

    return changes(saved, config_to_dict(cfg), harmless=RESUME_FREE_KEYS, quiet_missing=("init.*", "log.*"))


def check_resume_config(saved: dict, cfg: FinetuneConfig, state_file: str, print_fn=print) -> None:
    """Stop a resume whose config changes the results (unless ``init.allow_config_change``)."""
    from multimae_att.config import check_resume_config as check

    check(resume_config_changes(saved, cfg), state_file, cfg.output_dir, cfg.init.allow_config_change,
          print_fn)


def load_finetune_config(path: Optional[str] = None, overrides: tuple[str, ...] | list[str] = ()
                         ) -> FinetuneConfig:
    """Schema defaults <- YAML ``path`` <- ``overrides``; raises :class:`ConfigError`."""
    return load_config(FinetuneConfig, path, overrides)
