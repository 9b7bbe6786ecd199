"""The finetuning config schema (defaults = MultiMAE-B ImageNet-1K classification recipe).

Sections: ``task``, ``model``, ``head``, ``data``, ``optim``, ``train``, ``init``, ``log``; plus
top-level ``output_dir``. Loaded by :func:`load_finetune_config` with the project's generic
machinery (:mod:`multimae_att.config`): schema defaults <- YAML <- ``key=value``, strict.
Key names follow the pretraining schema where the meaning is the same.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from multimae_att.config import ConfigError, load_config, setting
from multimae_att.modalities import MODEL_MODALITIES
from multimae_att.model import ENCODER_SIZES

__all__ = ["FinetuneConfig", "load_finetune_config", "ConfigError", "TASKS", "TASK_FACTS", "TaskFacts",
           "resume_config_changes"]

MODALITIES = MODEL_MODALITIES   # the modality table's model modalities (rgb, depth, semseg)


@dataclass(frozen=True)
class TaskFacts:
    """What the config checks know about a task (its model side, inputs, head, loss and metrics,
    is its ``TaskSpec`` in :mod:`multimae_att.finetune.tasks`).

    ``heads``: the ``head.kind`` values that fit, the first is ``auto``'s. ``predicts``: the
    modality a dense task predicts (it cannot also be an input); None: an image-level task, which
    reads rgb and a class label per sample. ``losses``: the ``task.loss`` values that fit (None:
    the task does not read it). ``augments``: RandAugment, Mixup / CutMix and label smoothing
    apply (``task.randaug``, ``task.mixup``, ...). ``multimae``: ``(data.aug, data.eval_mode)``
    of ``auto`` under ``data.protocol=multimae`` (dense tasks; None: the task has one recipe).
    """

    heads: tuple[str, ...]
    predicts: str | None = None
    losses: tuple[str, ...] | None = None
    augments: bool = False
    multimae: tuple[str, str] | None = None

    @property
    def dense(self) -> bool:
        return self.predicts is not None


TASK_FACTS: dict[str, TaskFacts] = {
    "cls": TaskFacts(heads=("linear",), augments=True),
    "semseg": TaskFacts(heads=("convnext", "dpt"), predicts="semseg", multimae=("lsj", "letterbox")),
    "depth": TaskFacts(heads=("dpt", "convnext"), predicts="depth", losses=("berhu", "l1"),
                       multimae=("nyu", "center_crop")),
    "knn": TaskFacts(heads=("none",)),
    "linear_probe": TaskFacts(heads=("linear",)),
}
TASKS = tuple(TASK_FACTS)   # the Literal of task.name lists the same names (a test checks)


@dataclass
class TaskConfig:
    """What is learnt and measured. ``depth_unit_m``: metres per unit of the loaded depth tensor
    (stored 16-bit value / 2**16; millimetre PNGs -> 65.536)."""
    name: Literal["cls", "semseg", "depth", "knn", "linear_probe"] = "cls"
    num_classes: int = setting(1000, ge=1)             # cls / semseg classes (labels in [0, num_classes))
    ignore_index: int = setting(255, free=True)         # semseg label that is never counted
    reduce_zero_label: bool = False           # ADE20K / NYUv2: label 0 -> ignore, others - 1
    loss: Literal["ce", "berhu", "l1"] = "ce"          # ce for cls / semseg; berhu or l1 for depth
    label_smoothing: float = setting(0.1, ge=0, lt=1)   # cls
    mixup: float = setting(0.8, ge=0)                   # cls: Mixup alpha (0 = off)
    cutmix: float = setting(1.0, ge=0)                  # cls: CutMix alpha (0 = off)
    mixup_prob: float = setting(1.0, ge=0, le=1)        # cls: share of batches mixed
    mixup_switch_prob: float = setting(0.5, ge=0, le=1)  # cls: CutMix instead of Mixup when both are on
    randaug: str = "rand-m9-mstd0.5-inc1"     # cls: timm RandAugment spec ('' = off)
    depth_unit_m: float = setting(65.536, gt=0)         # depth: metres per unit of the loaded tensor
    mask_valid: bool = True                   # depth: use batch['mask_valid'] when the data has it
    knn_k: int = setting(20, ge=1)                      # knn: neighbours voting
    knn_temperature: float = setting(0.07, gt=0)        # knn: votes weighted exp(similarity / T)
    few_shot: list[int] = setting(factory=lambda: [1, 5, 10, 20], ge=1)   # knn: labelled images per class
    few_shot_repeats: int = setting(3, ge=1)            # knn: few-shot draws averaged
    feature_pool: Literal["mean", "global"] = "mean"   # knn / linear_probe features

    def __post_init__(self) -> None:
        if self.reduce_zero_label and self.ignore_index != 255:   # the loaders map label 0 to 255
            raise ValueError(f"task.reduce_zero_label=true marks label 0 as 255: it needs "
                             f"task.ignore_index=255, got {self.ignore_index}")


@dataclass
class ModelConfig:
    """Encoder (``MultiViT`` of a named size); ``in_modalities`` are the task's inputs."""
    size: Literal["tiny", "base", "large"] = "base"    # must match init.checkpoint's encoder
    in_modalities: list[str] = field(default_factory=lambda: ["rgb"])   # of the modality table's rgb, depth, semseg
    patch_size: int = setting(16, ge=1)
    num_global_tokens: int = setting(1, ge=1)
    drop_path_rate: float = setting(0.1, ge=0, lt=1)   # stochastic depth of the encoder blocks
    semseg_num_classes: int = setting(133, ge=1)        # semseg *input* adapter (pseudo labels)

    def __post_init__(self) -> None:
        bad = [m for m in self.in_modalities if m not in MODALITIES]
        if bad or not self.in_modalities:
            raise ValueError(f"model.in_modalities: need a non-empty subset of {list(MODALITIES)}, "
                             f"got {self.in_modalities}")


@dataclass
class HeadConfig:
    """Task head. semseg: ``kind`` convnext (default) or dpt; depth: dpt; cls: linear."""
    kind: Literal["auto", "linear", "convnext", "dpt"] = "auto"   # auto: by task
    main_modalities: list[str] | None = None        # tokens the head reads; None = all inputs
    embed_dim: int = setting(6144, ge=1)                # convnext
    preds_per_patch: int = setting(16, ge=1)            # convnext: a square dividing embed_dim
    depth: int = setting(4, ge=1)                       # convnext: blocks
    hooks: list[int] = setting(factory=lambda: [2, 5, 8, 11], ge=0)          # dpt: encoder blocks read
    layer_dims: list[int] = setting(factory=lambda: [96, 192, 384, 768], ge=1)   # dpt: reassemble widths
    feature_dim: int = setting(256, ge=2)               # dpt: fusion width
    init_scale: float = setting(0.001, gt=0)            # linear
    use_mean_pooling: bool = True                       # linear: mean of all tokens, else the global token


@dataclass
class DataConfig:
    """Data (``multimae_att.data.build_loader``); ``root`` holds ``train_split`` and ``val_split``."""
    root: str = setting("data/imagenet", nonempty=True)     # dataset folder or shard spec (README Data)
    train_split: str = setting("train", nonempty=True)
    val_split: str = setting("val", nonempty=True)          # the evaluation split
    layout: Literal["auto", "folder", "shards"] = "auto"    # auto: by what data.root holds
    image_size: int = setting(224, ge=1, le=4096)   # px (the bound catches typos)
    batch_size: int = setting(128, ge=1)      # per process and micro-batch
    eval_batch_size: int | None = setting(None, ge=1)     # None = batch_size
    num_workers: int = setting(8, ge=0)                     # DataLoader workers per process
    crop_scale: tuple[float, float] = setting((0.08, 1.0), gt=0, le=1)   # rrc: share of the area (min, max)
    hflip: float = setting(0.5, ge=0, le=1)                 # flip probability
    eval_crop_pct: float = setting(1.0, gt=0, le=1)          # center_crop mode: share of the largest centred box
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
    max_eval_samples: int | None = setting(None, ge=1)   # evaluate on a seed-0 permutation's first N (folder layout)
    standardize_depth: bool = True            # depth *inputs*: robust per-sample standardisation
    # A corrupt evaluation sample (unreadable file, label outside [0, task.num_classes)): error =
    # stop naming the file; skip = leave it out of the metrics, list it in metrics.json
    # (skipped_eval_samples) and exit non-zero after writing them; skip_ok = the same, exit 0.
    eval_on_corrupt: Literal["error", "skip", "skip_ok"] = "error"
    # low-data training: a stratified, seeded (train.seed) subset of this share of each class
    train_fraction: float = setting(1.0, gt=0, le=1)

    def __post_init__(self) -> None:
        if self.crop_scale[0] > self.crop_scale[1]:
            raise ValueError(f"data.crop_scale={list(self.crop_scale)}: need min <= max")


@dataclass
class OptimConfig:
    """AdamW with layer-wise LR decay. lr = ``lr`` if set, else ``blr * global_batch / 256``."""
    blr: float = setting(5e-4, gt=0)                 # lr per 256 samples of global batch
    lr: float | None = setting(None, gt=0)         # absolute lr; null: from blr
    min_lr: float = setting(1e-6, ge=0)               # end of the cosine
    warmup_epochs: float = setting(5.0, ge=0)         # linear warm-up
    weight_decay: float = setting(0.05, ge=0)         # not on 1-d parameters and no_weight_decay() names
    layer_decay: float = setting(0.65, gt=0, le=1)    # lr x layer_decay ** (layers above), head last
    betas: tuple[float, float] = setting((0.9, 0.999), ge=0, lt=1)   # AdamW
    eps: float = setting(1e-8, gt=0)                  # AdamW
    clip_grad: float | None = setting(None, gt=0)  # max gradient norm; null: no clipping
    accum_steps: int = setting(1, ge=1)               # micro-batches per optimizer step
    recipe_global_batch: int | None = setting(None, ge=1)   # processes x batch x accum the recipe is for (warns if not)


@dataclass
class TrainConfig:
    """Run length, evaluation, seed, precision and training states (Accelerate)."""

    epochs: float = setting(100.0, ge=0)                    # 0: evaluate only
    max_steps: int | None = setting(None, ge=0)   # stop after this many optimizer steps (0: evaluate only)
    eval_every: int = setting(1, ge=1)                      # epochs between evaluations (and the last one)
    max_eval_batches: int | None = setting(None, ge=1)   # smoke tests only: evaluate on a prefix
    seed: int = setting(0, ge=0)                 # every random draw is a function of (seed, position)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"   # autocast
    cpu: bool = False                            # run on the CPU even where a GPU is
    find_unused_parameters: bool | None = None       # None = True for DPT heads
    save_every: int = setting(0, ge=0)        # optimizer steps between training states (0 = epoch ends)
    keep_last: int = setting(2, ge=1)
    # attention kernel: fused (SDPA) or explicit (softmax of the logits); auto: explicit only for
    # bf16/fp16 training on a CPU, where the flash-attention backward is slow (docs/BENCHMARKS.md)
    attention: Literal["auto", "fused", "explicit"] = "auto"
    compile: bool = False                     # torch.compile the encoder blocks and decoders
    # on a CPU: keep the memory a step frees for the next one (glibc malloc; no page faults per
    # step, 5-17 % faster small-preset steps, the process keeps its peak heap) or glibc's default
    cpu_malloc: Literal["keep", "default"] = "keep"
    # metrics.json holds the best evaluation (task metric; depth under protocol multimae: lowest
    # validation loss) or the last one; auto: best for protocol multimae, else last
    report: Literal["auto", "best", "last"] = "auto"


@dataclass
class InitConfig:
    """Where the encoder starts, and what a used run folder means (README Finetuning, Resume)."""

    # a published name (multimae-b), a URL or a path: ours or MultiMAE's, MultiMAE or timm layout
    checkpoint: str | None = None
    resume: bool = True                       # continue from output_dir's latest training state
    allow_config_change: bool = False         # resume even if result-changing keys differ (README Resume)
    overwrite: bool = False                   # start over in a used output_dir (old contents -> previous-<time>/)


@dataclass
class LogConfig:
    """``metrics.jsonl``, trackers and the console."""

    every: int = setting(10, ge=1)            # steps per metrics.jsonl record (means over them)
    # trackers through Accelerate (metrics.jsonl is always written): tensorboard, wandb, mlflow, aim
    trackers: list[Literal["tensorboard", "wandb", "mlflow", "aim"]] = setting(factory=lambda: ["tensorboard"])
    progress: bool = True                     # progress bar; false: one printed line per log.every


@dataclass
class FinetuneConfig:
    output_dir: str = setting("runs/finetune", nonempty=True)   # run folder: config, states, metrics, checkpoints
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
        facts, name = self.task_facts(), self.task.name
        if not facts.dense and "rgb" not in self.model.in_modalities:
            raise ValueError(f"task.name={name!r} reads RGB: add 'rgb' to model.in_modalities")
        if facts.losses is not None and self.task.loss not in facts.losses:
            raise ValueError(f"task.loss={self.task.loss!r} does not fit task.name={name!r}: use "
                             + " or ".join(repr(x) for x in facts.losses))
        if facts.dense and facts.predicts in self.model.in_modalities:
            raise ValueError(f"task.name={name!r} predicts {facts.predicts}: it cannot also be "
                             f"an input (model.in_modalities={self.model.in_modalities})")
        allowed = facts.heads
        if self.head_kind() not in allowed:
            raise ValueError(f"head.kind={self.head.kind!r} does not fit task.name={self.task.name!r}; "
                             f"choose one of {['auto', *allowed]}")
        depth = ENCODER_SIZES[self.model.size]["depth"]
        if self.head_kind() == "dpt" and (len(self.head.hooks) != 4 or max(self.head.hooks) >= depth):
            raise ValueError(f"head.hooks {self.head.hooks}: need 4 block indices < {depth}, the "
                             f"encoder depth of model.size={self.model.size!r}")
        if self.head_kind() == "dpt" and len(self.head.layer_dims) != 4:
            raise ValueError(f"head.layer_dims {self.head.layer_dims}: need 4 widths (one per hook)")
        side = math.isqrt(self.head.preds_per_patch)
        if self.head_kind() == "convnext" and (side * side != self.head.preds_per_patch
                                               or self.head.embed_dim % self.head.preds_per_patch):
            raise ValueError(f"head.preds_per_patch={self.head.preds_per_patch} must be a square "
                             f"number dividing head.embed_dim={self.head.embed_dim}")
        if facts.augments and (self.task.mixup > 0 or self.task.cutmix > 0) and self.data.batch_size % 2:
            raise ValueError(f"data.batch_size={self.data.batch_size} must be even for Mixup/CutMix")
        self._check_protocol()

    def _check_protocol(self) -> None:
        """``data.aug`` / ``data.eval_mode`` must be ones the task and ``data.protocol`` implement."""
        dense = self.task_facts().dense
        if dense and self.data.protocol == "multimae":
            augs, evals = ("lsj", "nyu"), ("letterbox", "center_crop")
        elif dense:
            augs, evals = ("rrc",), ("full", "center_crop")
        else:   # image-level tasks: one recipe (MultiMAE's cls protocol is ours)
            augs, evals = ("rrc",), ("center_crop", "full")
        where = f"task.name={self.task.name!r} with data.protocol={self.data.protocol!r}"
        if self.aug() not in augs:
            raise ValueError(f"data.aug={self.data.aug!r} is not available for {where}; "
                             f"choose one of {['auto', *augs]}")
        if self.eval_mode() not in evals:
            raise ValueError(f"data.eval_mode={self.data.eval_mode!r} is not available for {where}; "
                             f"choose one of {['auto', *evals]}")

    def task_facts(self) -> TaskFacts:
        """The table entry of ``task.name`` (:data:`TASK_FACTS`)."""
        return TASK_FACTS[self.task.name]

    def eval_mode(self) -> str:
        """The evaluation mode actually used (see ``data.eval_mode``)."""
        if self.data.eval_mode != "auto":
            return self.data.eval_mode
        facts = self.task_facts()
        if not facts.dense:
            return "center_crop"
        if self.data.protocol == "ours" or facts.multimae is None:
            return "full"
        return facts.multimae[1]

    def aug(self) -> str:
        """The training augmentation actually used (see ``data.aug``)."""
        if self.data.aug != "auto":
            return self.data.aug
        facts = self.task_facts()
        if self.data.protocol == "ours" or facts.multimae is None:
            return "rrc"
        return facts.multimae[0]

    def report(self) -> str:
        """'best' or 'last': which evaluation ``metrics.json`` reports (see ``train.report``)."""
        if self.train.report != "auto":
            return self.train.report
        return "best" if self.data.protocol == "multimae" else "last"

    def label_ranges(self) -> dict[str, tuple[int, int | None]]:
        """``{modality: (classes, ignore index or None)}`` the loaders check every sample against:
        semseg targets in ``[0, task.num_classes)`` or ``task.ignore_index``; semseg inputs in
        ``[0, model.semseg_num_classes)``; class labels in ``[0, task.num_classes)``."""
        ranges: dict[str, tuple[int, int | None]] = {}
        facts = self.task_facts()
        if "semseg" in self.model.in_modalities:
            ranges["semseg"] = (self.model.semseg_num_classes, None)
        elif facts.predicts == "semseg":
            ranges["semseg"] = (self.task.num_classes, self.task.ignore_index)
        if not facts.dense:
            ranges["cls"] = (self.task.num_classes, None)
        return ranges

    def head_kind(self) -> str:
        """The head actually built ('linear', 'convnext', 'dpt' or 'none' for knn)."""
        return self.task_facts().heads[0] if self.head.kind == "auto" else self.head.kind


# Keys a resumed run may change freely (a note is printed): where things are, how much data the
# loaders hold at once, how often to log, evaluate or save, where to stop (train.max_steps only
# truncates; train.epochs sets the LR cosine, so it blocks). init.* is read only on a fresh start.
# Everything else (task.*, model.*, head.*, optim.*, the rest of data.* -- splits, sizes, batch,
# augmentation, evaluation mode --, train.seed, train.mixed_precision, train.cpu,
# train.max_eval_batches) changes the results and blocks the resume.
RESUME_FREE_KEYS = ("output_dir", "data.root", "data.layout", "data.num_workers", "data.eval_batch_size",
                    "train.max_steps", "train.eval_every", "train.save_every", "train.keep_last",
                    "train.find_unused_parameters", "train.attention", "train.compile", "train.cpu_malloc", "init.*",
                    "log.*")


def resume_config_changes(saved: dict, cfg: FinetuneConfig) -> tuple[list[str], list[str]]:
    """``(blocking, notes)`` for a finetune resume from a state saved with config dict ``saved``
    (see :func:`multimae_att.run.resume.resume_config_changes`)."""
    from multimae_att.config import config_to_dict
    from multimae_att.config import resume_config_changes as changes

    return changes(saved, config_to_dict(cfg), harmless=RESUME_FREE_KEYS, quiet_missing=("init.*", "log.*"))


def load_finetune_config(path: str | None = None, overrides: tuple[str, ...] | list[str] = ()
                         ) -> FinetuneConfig:
    """Schema defaults <- YAML ``path`` <- ``overrides``; raises :class:`ConfigError`."""
    return load_config(FinetuneConfig, path, overrides)
