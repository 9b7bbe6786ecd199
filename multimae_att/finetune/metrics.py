"""Evaluation metrics accumulated over a whole evaluation set.

Every metric family is split in two pure parts:

* a *per-sample statistics* function (``classification_stats``, ``segmentation_stats``,
  ``depth_stats``) that turns one batch into a float64 tensor ``[B, S]`` of additive sums;
* a :class:`MetricSums` accumulator that adds those rows up and turns the totals into the
  final numbers (``compute()``).

Because everything is a sum, the order of batches and the split of the set over processes do
not matter: ``accelerator.gather_for_metrics(stats)`` (which also drops the samples Accelerate
duplicates to even out the last batch) followed by ``update`` on every process, or per-process
``update`` followed by :meth:`MetricSums.reduce`, give the same totals as one process seeing the
whole set. Means are taken over *pixels / samples of the whole set*, never as means of
per-batch means.

Conventions
-----------
* Classification: top-k is correct when the target is among the k highest logits (k is
  clipped to the number of classes); reported in percent.
* Segmentation: a confusion matrix ``conf[t, p]`` over pixels whose target is not
  ``ignore_index``. IoU_c = TP / (TP + FP + FN). A class that appears neither in the ground
  truth nor in the prediction of the whole set has an undefined IoU (NaN) and is left out of
  the mean (``nanmean``), as in mmseg and MultiMAE; a class predicted but absent from the
  ground truth has IoU 0 and counts. ``pixel_acc`` = correct / labelled pixels; ``macc`` =
  mean over classes present in the ground truth of per-class recall. Percentages.
* Depth: over pixels with ``mask_valid`` and a finite target > 0; predictions are clamped to
  ``>= eps`` before ratios and logs. ``delta{1,2,3}`` = share of pixels with
  max(p/t, t/p) < 1.25**k (percent); ``abs_rel`` = mean |p - t| / t; ``sq_rel`` =
  mean (p - t)^2 / t; ``rmse`` = sqrt(mean (p - t)^2) in the unit of the inputs (metres);
  ``log10`` = mean |log10 p - log10 t| (the usual definition; MultiMAE's script reports an
  RMSE of natural-log differences under that name).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "MetricSums",
    "classification_stats",
    "segmentation_stats",
    "depth_stats",
    "ClassificationMetrics",
    "SegmentationMetrics",
    "DepthMetrics",
]


class MetricSums:
    """Additive accumulator of per-sample statistics ``[B, S]`` (float64 sums ``[S]``).

    Subclasses set ``names`` (one per column) and implement :meth:`compute`.
    """

    names: Sequence[str] = ()

    def __init__(self, num_stats: int | None = None) -> None:
        self.sums = torch.zeros(num_stats if num_stats is not None else len(self.names),
                                dtype=torch.float64)

    def update(self, stats: torch.Tensor) -> None:
        """Add per-sample rows ``[B, S]`` (or one summed row ``[S]``)."""
        stats = stats.detach().to("cpu", torch.float64)
        if stats.ndim == 2:
            stats = stats.sum(0)
        if stats.shape != self.sums.shape:
            raise ValueError(f"{type(self).__name__}: statistics of shape {tuple(stats.shape)} "
                             f"do not match accumulator shape {tuple(self.sums.shape)}")
        self.sums += stats

    def merge(self, other: MetricSums) -> MetricSums:
        """Add another accumulator of the same kind (e.g. another shard's) in place."""
        if type(other) is not type(self) or other.sums.shape != self.sums.shape:
            raise ValueError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        self.sums += other.sums
        return self

    def reduce(self, accelerator) -> MetricSums:
        """Sum the accumulators of all processes (in place); no-op with one process.

        Use only when every process updated with *disjoint* samples (not after
        ``gather_for_metrics``, which already hands every process the full set).
        """
        if getattr(accelerator, "num_processes", 1) > 1:
            summed = accelerator.reduce(self.sums.to(accelerator.device), reduction="sum")
            self.sums = summed.to("cpu", torch.float64)
        return self

    def reset(self) -> None:
        self.sums.zero_()

    def compute(self) -> dict[str, float]:
        raise NotImplementedError


def _div(num: torch.Tensor, den: torch.Tensor) -> float:
    return float(num / den) if float(den) > 0 else float("nan")


# ----------------------------------------------------------------------------- classification

@torch.no_grad()
def classification_stats(logits: torch.Tensor, target: torch.Tensor,
                         topk: Sequence[int] = (1, 5)) -> torch.Tensor:
    """Per-sample ``[B, 1 + len(topk)]``: (1, correct@k for each k).

    logits: ``[B, C]``; target: int64 ``[B]`` class indices (hard labels).
    """
    if logits.ndim != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"classification_stats: logits {tuple(logits.shape)} and target "
                         f"{tuple(target.shape)} must be [B, C] and [B]")
    kmax = min(max(topk), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices                      # [B, kmax]
    hit = top.eq(target[:, None])                               # [B, kmax], at most one True
    cols = [torch.ones_like(target, dtype=torch.float64)]
    cols += [hit[:, :min(k, kmax)].any(1).double() for k in topk]
    return torch.stack(cols, dim=1)


class ClassificationMetrics(MetricSums):
    """Top-k accuracy (percent) over the whole set; keys ``top1``, ``top5``, ... ."""

    def __init__(self, topk: Sequence[int] = (1, 5)) -> None:
        self.topk = tuple(topk)
        self.names = ("count",) + tuple(f"top{k}" for k in self.topk)
        super().__init__()

    def stats(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return classification_stats(logits, target, self.topk)

    def compute(self) -> dict[str, float]:
        n = self.sums[0]
        return {name: 100.0 * _div(self.sums[i], n) for i, name in enumerate(self.names) if i}


# ------------------------------------------------------------------------------- segmentation

@torch.no_grad()
def segmentation_stats(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                       ignore_index: int = 255) -> torch.Tensor:
    """Per-sample flattened confusion matrices ``[B, C * C]`` (row = target, column = prediction).

    pred, target: int ``[B, H, W]`` label maps at the same (label) resolution; target pixels
    equal to ``ignore_index`` are skipped; any other target outside ``[0, C)`` is an error.
    """
    if pred.shape != target.shape:
        raise ValueError(f"segmentation_stats: prediction {tuple(pred.shape)} and target "
                         f"{tuple(target.shape)} differ; upsample logits to label resolution first")
    b = target.shape[0]
    pred = pred.reshape(b, -1).long()
    target = target.reshape(b, -1).long()
    keep = target != ignore_index
    bad = keep & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        raise ValueError(f"segmentation_stats: target labels {target[bad].unique()[:8].tolist()} "
                         f"outside [0, {num_classes}) and not ignore_index={ignore_index}")
    if bool(((pred < 0) | (pred >= num_classes)).any()):
        raise ValueError(f"segmentation_stats: predicted labels outside [0, {num_classes})")
    cc = num_classes * num_classes
    # one bincount for the whole batch: sample offset + target row + predicted column
    idx = torch.arange(b, device=target.device)[:, None] * cc + target * num_classes + pred
    counts = torch.bincount(idx[keep], minlength=b * cc)
    return counts.view(b, cc).double()


class SegmentationMetrics(MetricSums):
    """Confusion-matrix mIoU, pixel accuracy, mean accuracy and per-class IoU (percent)."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        super().__init__(num_classes * num_classes)

    def stats(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return segmentation_stats(pred, target, self.num_classes, self.ignore_index)

    @property
    def confusion(self) -> torch.Tensor:
        """float64 ``[C, C]``, rows = target class, columns = predicted class."""
        return self.sums.view(self.num_classes, self.num_classes)

    def per_class_iou(self) -> torch.Tensor:
        """float64 ``[C]`` IoU in percent; NaN for classes absent from target and prediction."""
        conf = self.confusion
        tp = conf.diagonal()
        union = conf.sum(0) + conf.sum(1) - tp
        iou = torch.full_like(tp, float("nan"))
        present = union > 0
        iou[present] = 100.0 * tp[present] / union[present]
        return iou

    def compute(self) -> dict[str, object]:
        conf = self.confusion
        tp = conf.diagonal()
        gt = conf.sum(1)
        iou = self.per_class_iou()
        acc = torch.where(gt > 0, 100.0 * tp / gt.clamp_min(1), torch.full_like(gt, math.nan))
        return {
            "miou": _nanmean(iou),
            "pixel_acc": 100.0 * _div(tp.sum(), conf.sum()),
            "macc": _nanmean(acc),
            "per_class_iou": [None if math.isnan(v) else v for v in iou.tolist()],
        }


def _nanmean(x: torch.Tensor) -> float:
    finite = ~torch.isnan(x)
    return float(x[finite].mean()) if bool(finite.any()) else float("nan")


# -------------------------------------------------------------------------------------- depth

DEPTH_STAT_NAMES = ("count", "delta1", "delta2", "delta3", "abs_rel", "sq_rel", "sq_err", "log10")


@torch.no_grad()
def depth_stats(pred: torch.Tensor, target: torch.Tensor,
                mask_valid: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """Per-sample sums over valid pixels ``[B, 8]`` in the order of ``DEPTH_STAT_NAMES``.

    pred, target: ``[B, 1, H, W]`` (or ``[B, H, W]``) depth in metres; mask_valid: bool of the
    same shape (optional). Valid = mask_valid & isfinite(target) & target > 0.
    """
    if pred.shape != target.shape:
        raise ValueError(f"depth_stats: prediction {tuple(pred.shape)} and target "
                         f"{tuple(target.shape)} differ")
    b = pred.shape[0]
    pred = pred.reshape(b, -1).double()
    target = target.reshape(b, -1).double()
    valid = torch.isfinite(target) & (target > 0)
    if mask_valid is not None:
        valid &= mask_valid.reshape(b, -1).bool()
    t = torch.where(valid, target, torch.ones_like(target))     # dummy 1 where invalid
    p = torch.where(valid, pred.clamp_min(eps), torch.ones_like(pred))
    ratio = torch.maximum(p / t, t / p)
    err = p - t
    v = valid.double()

    def vsum(x: torch.Tensor) -> torch.Tensor:
        return (x * v).sum(1)

    cols = [v.sum(1)]
    cols += [vsum((ratio < 1.25 ** k).double()) for k in (1, 2, 3)]
    cols += [vsum(err.abs() / t), vsum(err.square() / t), vsum(err.square()),
             vsum((torch.log10(p) - torch.log10(t)).abs())]
    return torch.stack(cols, dim=1)


class DepthMetrics(MetricSums):
    """δ1/δ2/δ3 (percent), abs-rel, sq-rel, RMSE and log10 over all valid pixels of the set."""

    names = DEPTH_STAT_NAMES

    def stats(self, pred: torch.Tensor, target: torch.Tensor,
              mask_valid: torch.Tensor | None = None) -> torch.Tensor:
        return depth_stats(pred, target, mask_valid)

    def compute(self) -> dict[str, float]:
        s = dict(zip(self.names, self.sums))
        n = s["count"]
        out = {f"delta{k}": 100.0 * _div(s[f"delta{k}"], n) for k in (1, 2, 3)}
        out.update(abs_rel=_div(s["abs_rel"], n), sq_rel=_div(s["sq_rel"], n),
                   rmse=math.sqrt(_div(s["sq_err"], n)) if float(n) > 0 else float("nan"),
                   log10=_div(s["log10"], n))
        return out
