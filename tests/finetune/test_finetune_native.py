"""Evaluation at label resolution (``data.eval_mode=full``): per-sample upsampling, padded batches,
and whole-set metrics equal to a brute-force per-image computation on labels of other sizes."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import multimae_att
from multimae_att.data import build_loader
from multimae_att.finetune.config import load_finetune_config
from multimae_att.finetune.engine import build_eval_loader, evaluate, make_accelerator
from multimae_att.finetune.native import native_collate, upsample_to_native
from multimae_att.finetune.tasks import make_task

# (height, width) of the stored files: two non-square shapes, neither the input size (32 x 32)
SIZES = [(40, 56), (27, 45), (40, 56), (27, 45), (27, 45)]
NUM_CLASSES = 5


def test_upsample_to_native_matches_interpolate_per_sample():
    torch.manual_seed(0)
    pred = torch.randn(3, 4, 8, 8)
    sizes = torch.tensor([[13, 21], [8, 8], [5, 30]])   # up, same, mixed down/up
    out = upsample_to_native(pred, sizes, (13, 30))
    assert out.shape == (3, 4, 13, 30)
    for i, (h, w) in enumerate(sizes.tolist()):
        ref = F.interpolate(pred[i:i + 1], size=(h, w), mode="bilinear", align_corners=False)
        torch.testing.assert_close(out[i:i + 1, :, :h, :w], ref, atol=1e-5, rtol=1e-5)


def test_native_collate_pads_with_values_that_never_count():
    samples = [{"rgb": torch.zeros(3, 4, 4), "sample_id": f"s{i}",
                "semseg_native": torch.full((h, w), i, dtype=torch.int64),
                "depth_native": torch.full((1, h, w), 0.5), "mask_valid_native": torch.ones(1, h, w, dtype=torch.bool)}
               for i, (h, w) in enumerate([(2, 5), (4, 3)])]
    batch = native_collate(samples, ignore_index=99)
    assert batch["native_size"].tolist() == [[2, 5], [4, 3]]
    assert batch["semseg_native"].shape == (2, 4, 5) and batch["depth_native"].shape == (2, 1, 4, 5)
    assert (batch["semseg_native"] != 99).sum().item() == 2 * 5 + 4 * 3
    assert batch["semseg_native"][1, :, 3:].eq(99).all() and batch["semseg_native"][0, 2:].eq(99).all()
    assert batch["depth_native"].gt(0).sum().item() == 22 and batch["mask_valid_native"].sum().item() == 22
    assert batch["rgb"].shape == (2, 3, 4, 4) and batch["sample_id"] == ["s0", "s1"]


def _write_dataset(root: Path) -> None:
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(SIZES):
        stem = f"{i:03d}"
        labels = rng.integers(0, NUM_CLASSES, (h, w)).astype(np.uint8)
        labels[rng.random((h, w)) < 0.2] = 255                      # ignored pixels
        depth = rng.integers(500, 6000, (h, w)).astype(np.uint16)   # millimetres
        depth[rng.random((h, w)) < 0.1] = 0                          # invalid (no reading)
        valid = (rng.random((h, w)) > 0.1).astype(np.uint8) * 255
        rgb = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
        images = {"rgb": Image.fromarray(rgb), "semseg": Image.fromarray(labels),
                  "depth": Image.fromarray(depth), "mask_valid": Image.fromarray(valid)}
        for modality, image in images.items():
            folder = root / "val" / modality / "data"
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{stem}.png")


@pytest.fixture(scope="module")
def mixed_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("native")
    _write_dataset(root)
    return root


def _setup(root: Path, task: str):
    torch.manual_seed(0)
    over = [f"task.name={task}", "model.size=tiny", "data.image_size=32", f"data.root={root}",
            "data.batch_size=3", "data.num_workers=0", "train.cpu=true", "head.kind=convnext",
            "head.embed_dim=32", "head.depth=1", "model.drop_path_rate=0.0"]
    over += [f"task.num_classes={NUM_CLASSES}"] if task == "semseg" else ["task.loss=l1"]
    cfg = load_finetune_config(None, over)
    spec = make_task(cfg)
    model = spec.build().eval()
    with torch.no_grad():   # a non-trivial head output (fresh heads start near zero)
        for p in model.output_adapters.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return cfg, spec, model, make_accelerator(cfg, spec)


def _per_image_predictions(cfg, spec, model, root: Path):
    """(stored label files, prediction upsampled with F.interpolate to each file's size)."""
    loader = build_loader(root, ["rgb"], split="val", train=False, batch_size=1, image_size=32,
                          eval_full_image=True, semseg_scale=1)
    out = []
    with torch.no_grad():
        for batch in loader:
            stem = batch["sample_id"][0]
            files = {m: np.array(Image.open(root / "val" / m / "data" / f"{stem}.png"))
                     for m in ("semseg", "depth", "mask_valid")}
            pred = spec.forward(model, batch).float()
            pred = F.interpolate(pred, size=files["semseg"].shape, mode="bilinear", align_corners=False)
            out.append((files, pred[0]))
    return out


def test_semseg_full_mode_equals_brute_force_at_label_resolution(mixed_root):
    cfg, spec, model, acc = _setup(mixed_root, "semseg")
    assert cfg.eval_mode() == "full"
    loader = build_eval_loader(cfg, spec, "val", acc)
    batches = list(loader)
    assert next(b["native_size"].tolist() for b in batches) == [list(s) for s in SIZES[:3]]
    metrics = spec.make_metrics()
    with torch.no_grad():
        for batch in batches:
            metrics.update(spec.eval_stats(metrics, spec.forward(model, batch), batch))
    conf = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    for files, pred in _per_image_predictions(cfg, spec, model, mixed_root):
        t, p = files["semseg"].astype(np.int64).ravel(), pred.argmax(0).numpy().ravel()
        keep = t != 255
        conf += np.bincount(t[keep] * NUM_CLASSES + p[keep], minlength=NUM_CLASSES ** 2).reshape(
            NUM_CLASSES, NUM_CLASSES)
    assert conf.sum() == sum(int((np.array(Image.open(f)) != 255).sum())
                             for f in sorted((mixed_root / "val" / "semseg" / "data").iterdir()))
    np.testing.assert_array_equal(metrics.confusion.numpy().astype(np.int64), conf)
    # the engine's evaluate reports the same numbers
    tp = np.diag(conf).astype(float)
    union = conf.sum(0) + conf.sum(1) - tp
    iou = np.where(union > 0, 100 * tp / np.maximum(union, 1), np.nan)
    result = evaluate(model, loader, spec, acc)
    assert result["miou"] == pytest.approx(np.nanmean(iou))
    assert result["pixel_acc"] == pytest.approx(100 * tp.sum() / conf.sum())


def test_depth_full_mode_equals_brute_force_over_valid_pixels(mixed_root):
    cfg, spec, model, acc = _setup(mixed_root, "depth")
    result = evaluate(model, build_eval_loader(cfg, spec, "val", acc), spec, acc)
    p_all, t_all = [], []
    for files, pred in _per_image_predictions(cfg, spec, model, mixed_root):
        t = files["depth"].astype(np.float64) / 1000.0           # mm -> m (65.536 / 2**16 = 1 / 1000)
        valid = (t > 0) & (files["mask_valid"] > 0)
        p_all.append(np.clip(pred[0].double().numpy()[valid], 1e-6, None))
        t_all.append(t[valid])
    p, t = np.concatenate(p_all), np.concatenate(t_all)
    ratio = np.maximum(p / t, t / p)
    assert result["delta1"] == pytest.approx(100 * np.mean(ratio < 1.25), abs=1e-6)
    assert result["abs_rel"] == pytest.approx(np.mean(np.abs(p - t) / t), rel=1e-5)
    assert result["rmse"] == pytest.approx(np.sqrt(np.mean((p - t) ** 2)), rel=1e-5)
    assert result["log10"] == pytest.approx(np.mean(np.abs(np.log10(p) - np.log10(t))), rel=1e-5)


def test_padding_never_counts(mixed_root):
    """A padded batch of two sizes gives the sums of the two samples scored alone."""
    for task in ("semseg", "depth"):
        cfg, spec, model, acc = _setup(mixed_root, task)
        batch = next(iter(build_eval_loader(cfg, spec, "val", acc)))   # sizes 40x56, 27x45, 40x56
        assert batch["native_size"][1].tolist() == [27, 45]
        metrics = spec.make_metrics()
        with torch.no_grad():
            pred = spec.forward(model, batch)
            together = spec.eval_stats(metrics, pred, batch)
            h, w = batch["native_size"][1].tolist()
            alone = {k: (v[1:2, ..., :h, :w] if k.endswith("_native") else v[1:2])
                     for k, v in batch.items() if torch.is_tensor(v)}
            single = spec.eval_stats(metrics, pred[1:2], alone)
        torch.testing.assert_close(together[1:2], single)
        if task == "semseg":   # every unpadded, non-ignored pixel counted once, padding never
            assert together[1].sum().item() == (alone["semseg_native"] != 255).sum().item()
        else:
            d = alone["depth_native"]
            assert together[1, 0].item() == ((d > 0) & alone["mask_valid_native"]).sum().item()


def test_center_crop_mode_keeps_input_resolution_targets(mixed_root):
    cfg, spec, _model, acc = _setup(mixed_root, "semseg")
    cfg.data.eval_mode = "center_crop"
    batch = next(iter(build_eval_loader(cfg, spec, "val", acc)))
    assert "semseg_native" not in batch and batch["semseg"].shape == (3, 32, 32)
    assert make_task(load_finetune_config(None, ["task.name=cls"])).cfg.eval_mode() == "center_crop"
