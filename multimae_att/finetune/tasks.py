"""Task specs: what each downstream task feeds the model, its head, loss and metrics.

One :class:`TaskSpec` subclass per task family; the engine (:mod:`multimae_att.finetune.engine`)
never branches on the task name. The model is :class:`FinetuneViT` (``MultiViT`` plus timm's
parameter-grouping hook for layer-wise LR decay) with the head under MultiMAE's output-adapter
name (``output_adapters.cls`` / ``.semseg`` / ``.depth``), so state dicts match MultiMAE's
finetuned checkpoints.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from multimae_att.data import robust_standardize_depth
from multimae_att.finetune.config import FinetuneConfig
from multimae_att.finetune.heads import ConvNeXtAdapter, DPTOutputAdapter, LinearOutputAdapter
from multimae_att.finetune.metrics import ClassificationMetrics, DepthMetrics, MetricSums, SegmentationMetrics
from multimae_att.finetune.native import NATIVE_SUFFIX, upsample_to_native
from multimae_att.finetune.protocols import multimae_depth_input
from multimae_att.model import ENCODER_SIZES, MultiViT, make_adapters
from multimae_att.model.compile import apply_speed_options
from multimae_att.seeds import step_seed

__all__ = ["FinetuneViT", "TaskSpec", "make_task", "masked_depth_loss", "depth_loss_map", "build_model"]


class FinetuneViT(MultiViT):
    """``MultiViT`` with ``group_matcher`` (timm's layer-decay hook) and pooled features.

    Layer ids for layer-wise LR decay: input adapters and global tokens = 0, encoder block i =
    i + 1, heads = depth + 1 (BEiT / MultiMAE convention; timm maps unmatched names last).
    """

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r"^(?:global_tokens|input_adapters)", blocks=[(r"^encoder\.(\d+)", None)])

    def encode(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """Encoder output ``[B, N + G, D]`` without any head (global tokens last)."""
        z, _ = self.process_input(x)
        return self.encoder(z)

    def features(self, x: dict[str, torch.Tensor], pool: str = "mean") -> torch.Tensor:
        """Frozen-feature readout ``[B, D]``: mean over all tokens, or the (first) global token."""
        z = self.encode(x)
        return z.mean(1) if pool == "mean" else z[:, -self.num_global_tokens]


def build_model(cfg: FinetuneConfig, head: nn.Module | None, output_name: str) -> FinetuneViT:
    """Encoder of ``cfg.model`` with ``head`` registered as ``output_adapters.<output_name>``."""
    m = cfg.model
    inputs, _ = make_adapters(m.in_modalities, (), extra_norm_rgb=False, patch_size=m.patch_size,
                              image_size=cfg.data.image_size, semseg_num_classes=m.semseg_num_classes)
    outputs = None if head is None else {output_name: head}
    model = FinetuneViT(input_adapters=inputs, output_adapters=outputs, **ENCODER_SIZES[m.size],
                        num_global_tokens=m.num_global_tokens, drop_path_rate=m.drop_path_rate)
    if head is not None and hasattr(head, "reset_parameters"):
        head.reset_parameters()   # MultiMAE's encoder init also visits the head's Linear layers
    return apply_speed_options(model, cfg.train.attention, cfg.train.compile)


def depth_loss_map(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
                   kind: str = "berhu") -> torch.Tensor:
    """Per-pixel L1 or berHu (reverse Huber) of ``pred - target``, 0 at invalid pixels.

    berHu: |d| where |d| <= c, (d^2 + c^2) / (2c) beyond, c = 0.2 * max |d| over the batch's
    valid pixels (Laina et al. 2016). Shapes ``[B, 1, H, W]``; ``valid`` bool.
    """
    diff = (pred - target).abs() * valid
    if kind == "l1":
        return diff
    if kind != "berhu":
        raise ValueError(f"unknown depth loss {kind!r}; expected 'berhu' or 'l1'")
    c = (0.2 * diff.detach().max()).clamp_min(1e-5)
    return torch.where(diff <= c, diff, (diff.square() + c * c) / (2 * c)) * valid


def masked_depth_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
                      kind: str = "berhu") -> torch.Tensor:
    """Mean over valid pixels of :func:`depth_loss_map`."""
    return depth_loss_map(pred, target, valid, kind).sum() / valid.sum().clamp_min(1)


class DepthLossMetrics(DepthMetrics):
    """:class:`DepthMetrics` plus ``loss``: the task loss over every valid pixel of the set (berHu's
    c per evaluation batch), the validation loss MultiMAE selects its depth checkpoint by."""

    names = DepthMetrics.names + ("loss_sum",)

    def compute(self) -> dict[str, float]:
        out = super().compute()
        n = float(self.sums[0])
        out["loss"] = float(self.sums[-1]) / n if n > 0 else float("nan")
        return out


class TaskSpec:
    """Base: inputs from a batch, head, loss, per-sample metric statistics.

    ``output``: the head's name in ``model.output_adapters``; ``trains``: False for k-NN (no
    optimisation, only feature extraction); ``frozen_encoder``: linear probing.
    """
    output = ""
    trains = True
    frozen_encoder = False
    return_all_layers = False

    def __init__(self, cfg: FinetuneConfig) -> None:
        self.cfg = cfg
        self.main = list(cfg.head.main_modalities or cfg.model.in_modalities)

    # data -----------------------------------------------------------------------------
    def target_modalities(self) -> list[str]:
        return []

    def native_targets(self) -> list[str]:
        """Target modalities scored at their stored resolution in ``eval_mode=full``."""
        return []

    def data_modalities(self) -> list[str]:
        """Modalities the loaders must deliver (inputs, then targets)."""
        mods = list(self.cfg.model.in_modalities)
        return mods + [t for t in self.target_modalities() if t not in mods]

    def model_inputs(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Model inputs from a batch; depth inputs standardised per sample when configured
        (protocol multimae: MultiMAE's trimmed statistics over the image's pixels, then padded
        and invalid pixels set to 0)."""
        x = {m: batch[m] for m in self.cfg.model.in_modalities}
        if "depth" in x and self.cfg.data.protocol == "multimae":
            x["depth"] = multimae_depth_input(x["depth"], batch.get("padding"), batch.get("mask_valid"),
                                              standardize=self.cfg.data.standardize_depth)
        elif "depth" in x and self.cfg.data.standardize_depth:
            x["depth"] = robust_standardize_depth(x["depth"], batch.get("mask_valid"))
        return x

    # model ----------------------------------------------------------------------------
    def build_head(self) -> nn.Module | None:
        raise NotImplementedError

    def build(self) -> FinetuneViT:
        model = build_model(self.cfg, self.build_head(), self.output)
        if self.frozen_encoder:
            for name, p in model.named_parameters():
                p.requires_grad_(name.startswith("output_adapters."))
        return model

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        out = model(self.model_inputs(batch), return_all_layers=self.return_all_layers)
        return out[self.output]

    # objectives -----------------------------------------------------------------------
    def loss(self, pred: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def make_metrics(self) -> MetricSums:
        raise NotImplementedError

    def eval_stats(self, metrics: MetricSums, pred: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def train_batch(self, batch: dict[str, Any], step: int, micro: int = 0, rank: int = 0) -> dict[str, Any]:
        """Batch-level training augmentation (Mixup/CutMix for cls) of micro-batch ``micro`` of
        ``step`` on process ``rank``; identity by default."""
        return batch

    def best_key(self) -> str:
        """The metric that selects the best checkpoint (higher is better unless listed in LOWER)."""
        raise NotImplementedError


LOWER_IS_BETTER = frozenset({"rmse", "abs_rel", "sq_rel", "log10", "loss"})


class ClassificationTask(TaskSpec):
    """Image classification (IN-1K): mean-pooled linear head, Mixup/CutMix + label smoothing."""
    output = "cls"

    def __init__(self, cfg: FinetuneConfig) -> None:
        super().__init__(cfg)
        t = cfg.task
        self.mixup = None
        if self.trains and not self.frozen_encoder and (t.mixup > 0 or t.cutmix > 0):
            from timm.data import Mixup
            self.mixup = Mixup(mixup_alpha=t.mixup, cutmix_alpha=t.cutmix, prob=t.mixup_prob,
                               switch_prob=t.mixup_switch_prob, mode="batch",
                               label_smoothing=t.label_smoothing, num_classes=t.num_classes)

    def target_modalities(self) -> list[str]:
        return ["cls"]

    def build_head(self) -> nn.Module:
        h = self.cfg.head
        return LinearOutputAdapter(self.cfg.task.num_classes, use_mean_pooling=h.use_mean_pooling,
                                   init_scale=h.init_scale)

    def train_batch(self, batch: dict[str, Any], step: int, micro: int = 0, rank: int = 0) -> dict[str, Any]:
        if self.mixup is None:
            return batch
        # timm's Mixup draws from numpy's global RNG: seed it per (step, micro-batch, process) so a
        # resumed run mixes alike, and the micro-batches and processes of one step do not all draw
        # the same mixing weight and CutMix box (one draw per batch in mode="batch").
        np.random.seed(step_seed(self.cfg.train.seed, step, micro, rank, "mixup") % (2 ** 32))
        rgb, soft = self.mixup(batch["rgb"], batch["cls"])
        return {**batch, "rgb": rgb, "soft_target": soft}

    def loss(self, pred: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        pred = pred.float()
        if "soft_target" in batch:   # Mixup already smoothed the targets
            return torch.sum(-batch["soft_target"] * F.log_softmax(pred, dim=-1), dim=-1).mean()
        smoothing = 0.0 if self.frozen_encoder else self.cfg.task.label_smoothing
        return F.cross_entropy(pred, batch["cls"], label_smoothing=smoothing)

    def make_metrics(self) -> MetricSums:
        return ClassificationMetrics((1, 5))

    def eval_stats(self, metrics: MetricSums, pred: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return metrics.stats(pred.float(), batch["cls"])

    def best_key(self) -> str:
        return "top1"

    def sample_transform(self):
        """Per-sample RGB augmentation for the training set (timm RandAugment), or None."""
        spec = self.cfg.task.randaug
        if not spec or self.frozen_encoder:
            return None
        from multimae_att.finetune.augment import RandAugmentRGB
        return RandAugmentRGB(spec, seed=self.cfg.train.seed)


class LinearProbeTask(ClassificationTask):
    """Linear probe: frozen encoder (eval-mode features), BatchNorm + linear head, plain CE."""
    frozen_encoder = True

    def build_head(self) -> nn.Module:
        return LinearOutputAdapter(self.cfg.task.num_classes, norm="batch", init_scale=1.0,
                                   use_mean_pooling=self.cfg.task.feature_pool == "mean")

    def build(self) -> FinetuneViT:
        model = super().build()
        for block in model.encoder:   # no stochastic depth in a frozen encoder
            block.drop_path1 = block.drop_path2 = nn.Identity()
        return model


class SegmentationTask(TaskSpec):
    """Semantic segmentation (ADE20K, NYUv2 from rgb / depth / rgb-d): ConvNeXt or DPT head,
    cross-entropy with ignore index; logits at label (= input) resolution."""
    output = "semseg"

    def __init__(self, cfg: FinetuneConfig) -> None:
        super().__init__(cfg)
        self.return_all_layers = cfg.head_kind() == "dpt"

    def target_modalities(self) -> list[str]:
        """semseg; plus mask_valid for a depth input under protocol multimae (MultiMAE's
        ``use_mask_valid``: invalid depth pixels are set to 0 after standardisation)."""
        c = self.cfg
        if c.data.protocol == "multimae" and c.task.mask_valid and "depth" in c.model.in_modalities:
            return ["semseg", "mask_valid"]
        return ["semseg"]

    def native_targets(self) -> list[str]:
        return ["semseg"]

    def build_head(self) -> nn.Module:
        h, c = self.cfg.head, self.cfg.task.num_classes
        if self.cfg.head_kind() == "dpt":
            return DPTOutputAdapter(c, patch_size=self.cfg.model.patch_size, main_tasks=self.main,
                                    hooks=h.hooks, layer_dims=h.layer_dims, feature_dim=h.feature_dim,
                                    head_type="semseg")
        return ConvNeXtAdapter(c, embed_dim=h.embed_dim, preds_per_patch=h.preds_per_patch,
                               main_tasks=self.main, patch_size=self.cfg.model.patch_size, depth=h.depth)

    def loss(self, pred: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return F.cross_entropy(pred.float(), batch["semseg"], ignore_index=self.cfg.task.ignore_index)

    def make_metrics(self) -> MetricSums:
        return SegmentationMetrics(self.cfg.task.num_classes, self.cfg.task.ignore_index)

    def eval_stats(self, metrics: MetricSums, pred: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """Confusion rows; at label resolution when the batch has ``semseg_native`` (logits
        upsampled bilinearly per sample before the argmax; padding is ``ignore_index``)."""
        if "semseg_native" in batch:
            target = batch["semseg_native"]
            pred = upsample_to_native(pred, batch["native_size"], target.shape[-2:])
            return metrics.stats(pred.argmax(1), target)
        return metrics.stats(pred.argmax(1), batch["semseg"])

    def best_key(self) -> str:
        return "miou"


class DepthTask(TaskSpec):
    """Depth estimation (NYUv2): DPT regression head predicting metres, berHu or L1 over valid
    pixels (``mask_valid`` when the data has it, and target > 0)."""
    output = "depth"

    def __init__(self, cfg: FinetuneConfig) -> None:
        super().__init__(cfg)
        self.return_all_layers = cfg.head_kind() == "dpt"

    def target_modalities(self) -> list[str]:
        return ["depth", "mask_valid"] if self.cfg.task.mask_valid else ["depth"]

    def native_targets(self) -> list[str]:
        return self.target_modalities()

    def model_inputs(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {m: batch[m] for m in self.cfg.model.in_modalities}

    def build_head(self) -> nn.Module:
        h = self.cfg.head
        if self.cfg.head_kind() == "convnext":
            return ConvNeXtAdapter(1, embed_dim=h.embed_dim, preds_per_patch=h.preds_per_patch,
                                   main_tasks=self.main, patch_size=self.cfg.model.patch_size, depth=h.depth)
        return DPTOutputAdapter(1, patch_size=self.cfg.model.patch_size, main_tasks=self.main,
                                hooks=h.hooks, layer_dims=h.layer_dims, feature_dim=h.feature_dim,
                                head_type="regression")

    def target(self, batch: dict[str, Any], suffix: str = ""):
        """(depth in metres ``[B, 1, H, W]``, valid bool ``[B, 1, H, W]``) from ``depth<suffix>``
        and ``mask_valid<suffix>`` (suffix ``_native``: the padded label-resolution targets)."""
        depth = batch["depth" + suffix].float() * self.cfg.task.depth_unit_m
        valid = depth > 0
        if "mask_valid" + suffix in batch:
            valid = valid & batch["mask_valid" + suffix].bool()
        return depth, valid

    def loss(self, pred: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        depth, valid = self.target(batch)
        return masked_depth_loss(pred.float(), depth, valid, self.cfg.task.loss)

    def make_metrics(self) -> MetricSums:
        return DepthLossMetrics()

    def eval_stats(self, metrics: MetricSums, pred: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """Depth sums; at label resolution when the batch has ``depth_native`` (prediction
        upsampled bilinearly per sample; padding has depth 0, i.e. invalid). The loss column is
        the training loss's per-sample sum at input resolution."""
        depth, valid = self.target(batch)
        loss = depth_loss_map(pred.float(), depth, valid, self.cfg.task.loss).flatten(1).sum(1)
        if "depth_native" in batch:
            depth, valid = self.target(batch, NATIVE_SUFFIX)
            pred = upsample_to_native(pred, batch["native_size"], depth.shape[-2:])
        stats = metrics.stats(pred.float(), depth, valid)
        return torch.cat([stats, loss.to(stats.dtype)[:, None]], dim=1)

    def best_key(self) -> str:
        """Protocol multimae: lowest validation loss (MultiMAE's choice); ours: RMSE."""
        return "loss" if self.cfg.data.protocol == "multimae" else "rmse"


class KnnTask(TaskSpec):
    """Frozen-feature k-NN (full and few-shot): no head, no optimisation."""
    trains = False
    frozen_encoder = True

    def target_modalities(self) -> list[str]:
        return ["cls"]

    def build_head(self) -> None:
        return None

    def features(self, model: FinetuneViT, batch: dict[str, Any]) -> torch.Tensor:
        return model.features(self.model_inputs(batch), self.cfg.task.feature_pool)

    def best_key(self) -> str:
        return "knn_top1"


TASK_SPECS = {"cls": ClassificationTask, "linear_probe": LinearProbeTask,
              "semseg": SegmentationTask, "depth": DepthTask, "knn": KnnTask}


def make_task(cfg: FinetuneConfig) -> TaskSpec:
    return TASK_SPECS[cfg.task.name](cfg)
