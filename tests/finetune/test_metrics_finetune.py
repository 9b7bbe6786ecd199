"""Finetuning metrics against hand-computed values; sums split over shards agree."""
import math

import pytest
import torch

from multimae_att.finetune.metrics import (
    ClassificationMetrics,
    DepthMetrics,
    SegmentationMetrics,
    classification_stats,
    segmentation_stats,
)


def test_topk_hand_values():
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.2, 0.3, 0.4],    # top1 = 1
                           [0.9, 0.1, 0.0, 0.2, 0.3, 0.4],    # order 0,5,4,3,1,2
                           [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]])   # order 5,4,3,2,1,0
    target = torch.tensor([1, 1, 0])
    m = ClassificationMetrics()
    m.update(m.stats(logits, target))
    out = m.compute()
    # sample 0: top1 hit; sample 1: rank 5 -> top5 hit; sample 2: rank 6 -> miss
    assert out["top1"] == pytest.approx(100 / 3)
    assert out["top5"] == pytest.approx(200 / 3)


def test_topk_clipped_to_num_classes():
    stats = classification_stats(torch.tensor([[0.0, 1.0]]), torch.tensor([0]), topk=(1, 5))
    assert stats.tolist() == [[1.0, 0.0, 1.0]]


def test_segmentation_hand_values_with_ignore_and_empty_classes():
    # 4 classes; class 3 appears nowhere (NaN, excluded); class 2 only predicted (IoU 0)
    target = torch.tensor([[[0, 0, 1, 255],
                            [1, 1, 0, 255]]])
    pred = torch.tensor([[[0, 1, 1, 3 - 3],   # last column ignored whatever is predicted
                          [1, 2, 0, 2]]])
    m = SegmentationMetrics(num_classes=4, ignore_index=255)
    m.update(m.stats(pred, target))
    out = m.compute()
    # labelled pixels: 6. class0: t at (0,0),(0,1),(1,2); p0 at (0,0),(1,2) -> tp2 fp0 fn1 -> 2/3
    # class1: t at (0,2),(1,0),(1,1); p1 at (0,1),(0,2),(1,0) -> tp2 fp1 fn1 -> 2/4
    # class2: t none; p2 at (1,1) -> tp0 fp1 -> 0; class3: absent -> NaN
    iou = out["per_class_iou"]
    assert iou[0] == pytest.approx(200 / 3) and iou[1] == pytest.approx(50.0)
    assert iou[2] == 0.0 and iou[3] is None
    assert out["miou"] == pytest.approx((200 / 3 + 50 + 0) / 3)
    assert out["pixel_acc"] == pytest.approx(100 * 4 / 6)
    assert out["macc"] == pytest.approx((200 / 3 + 200 / 3) / 2)   # classes present in GT


def test_segmentation_bad_label_is_an_error():
    with pytest.raises(ValueError, match="outside"):
        segmentation_stats(torch.zeros(1, 2, 2, dtype=torch.long),
                           torch.full((1, 2, 2), 7), num_classes=4, ignore_index=255)


def _brute_depth(p, t, valid):
    p, t = p[valid].double().clamp_min(1e-6), t[valid].double()
    ratio = torch.maximum(p / t, t / p)
    return {"delta1": 100 * (ratio < 1.25).double().mean().item(),
            "delta2": 100 * (ratio < 1.25 ** 2).double().mean().item(),
            "delta3": 100 * (ratio < 1.25 ** 3).double().mean().item(),
            "abs_rel": ((p - t).abs() / t).mean().item(),
            "rmse": (p - t).square().mean().sqrt().item(),
            "log10": (p.log10() - t.log10()).abs().mean().item()}


def test_depth_hand_values_with_invalid_pixels():
    target = torch.tensor([[[[1.0, 2.0, 3.0], [4.0, 0.0, 5.0]]]])   # 0 = no measurement
    pred = torch.tensor([[[[1.1, 2 / 1.5, 1.8], [4.0, 9.0, 12.5]]]])
    mask = torch.tensor([[[[True, True, True], [False, True, True]]]])  # (1,0) masked out
    m = DepthMetrics()
    m.update(m.stats(pred, target, mask))
    out = m.compute()
    # valid pixels: ratios 1.1, 1.5, 1.8/3 -> 3/1.8 = 1.667, 2.5
    # 1.25 = 1.25, 1.25^2 = 1.5625, 1.25^3 = 1.953
    assert out["delta1"] == pytest.approx(25.0)
    assert out["delta2"] == pytest.approx(50.0) and out["delta3"] == pytest.approx(75.0)
    errs = [(0.1, 1.0), (2 / 1.5 - 2, 2.0), (1.8 - 3, 3.0), (12.5 - 5, 5.0)]
    assert out["abs_rel"] == pytest.approx(sum(abs(e) / t for e, t in errs) / 4)
    assert out["rmse"] == pytest.approx(math.sqrt(sum(e * e for e, _ in errs) / 4))
    assert out["log10"] == pytest.approx(
        (math.log10(1.1) + math.log10(1.5) + math.log10(3 / 1.8) + math.log10(2.5)) / 4)


def test_depth_is_over_pixels_of_the_whole_set_not_batch_means():
    g = torch.Generator().manual_seed(0)
    t = torch.rand(5, 1, 6, 7, generator=g) * 5
    p = t * (1 + 0.4 * torch.randn(5, 1, 6, 7, generator=g)).clamp_min(0.05)
    valid = torch.rand(5, 1, 6, 7, generator=g) > 0.3
    t[0, 0, 0, :3] = 0.0                                          # invalid targets
    m = DepthMetrics()
    for sl in (slice(0, 1), slice(1, 5)):                          # unequal batches
        m.update(m.stats(p[sl], t[sl], valid[sl]))
    ref = _brute_depth(p, t, valid & (t > 0))
    out = m.compute()
    for k, v in ref.items():
        assert out[k] == pytest.approx(v, rel=1e-9), k


def _all_metrics(batches):
    cls, seg, dep = ClassificationMetrics(), SegmentationMetrics(5, 255), DepthMetrics()
    for b in batches:
        cls.update(cls.stats(b["logits"], b["label"]))
        seg.update(seg.stats(b["seg_pred"], b["seg_gt"]))
        dep.update(dep.stats(b["d_pred"], b["d_gt"], b["valid"]))
    return cls, seg, dep


def _make_set(n=6):
    g = torch.Generator().manual_seed(1)
    seg_gt = torch.randint(0, 4, (n, 8, 8), generator=g)          # class 4 never in GT
    seg_gt[torch.rand(n, 8, 8, generator=g) < 0.2] = 255
    return [{"logits": torch.randn(1, 10, generator=g), "label": torch.randint(0, 10, (1,), generator=g),
             "seg_pred": torch.randint(0, 5, (1, 8, 8), generator=g), "seg_gt": seg_gt[i:i + 1],
             "d_pred": torch.rand(1, 1, 4, 4, generator=g) + 0.5,
             "d_gt": torch.rand(1, 1, 4, 4, generator=g) + 0.5,
             "valid": torch.rand(1, 1, 4, 4, generator=g) > 0.25} for i in range(n)]


def test_two_shards_summed_equal_one_pass():
    """The "1 or 2 processes" check: disjoint shards, merged sums, identical metrics."""
    samples = _make_set()
    whole = _all_metrics(samples)
    shard_a = _all_metrics(samples[0::2])
    shard_b = _all_metrics(samples[1::2])
    for w, a, b in zip(whole, shard_a, shard_b):
        merged = a.merge(b)
        torch.testing.assert_close(merged.sums, w.sums, rtol=1e-12, atol=0)
        for k, v in w.compute().items():
            assert merged.compute()[k] == pytest.approx(v, rel=1e-12, nan_ok=True), k


def test_reduce_is_noop_on_one_process():
    class _One:
        num_processes = 1
    m = DepthMetrics()
    m.update(torch.arange(8.0))
    assert torch.equal(m.reduce(_One()).sums, torch.arange(8.0, dtype=torch.float64))
