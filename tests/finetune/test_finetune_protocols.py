"""MultiMAE's finetuning protocol (``data.protocol: multimae``): each transform against a hand
computation on small arrays, depth-input statistics, the evaluation subset, best|last reporting,
the global-batch check, and the letterbox evaluation through the engine's loader."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import multimae_att
from multimae_att.data import IMAGENET_MEAN, IMAGENET_STD, build_dataset, build_loader
from multimae_att.finetune import protocols as P
from multimae_att.finetune.config import load_finetune_config
from multimae_att.finetune.report import (
    global_batch_line,
    protocol_line,
    reported_metrics,
)

from helpers import REPO
from helpers.finetune import synthetic_root

PAD_RGB_NORMALISED = [(128 / 255 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]


class StubRng:
    """Draws in a fixed order: ``random()`` from a list, ``uniform(a, b)`` = a + u (b - a)."""

    def __init__(self, randoms, u=0.5):
        self.randoms, self.u = list(randoms), u

    def random(self):
        return self.randoms.pop(0)

    def uniform(self, a, b):
        return a + self.u * (b - a)

    def permutation(self, n):
        return np.arange(n)


def _images(h, w, seed=0):
    """rgb, 16-bit depth, labels 0..4 and a validity mask of one (h, w) scene."""
    rng = np.random.default_rng(seed)
    return {"rgb": Image.fromarray(rng.integers(0, 256, (h, w, 3)).astype(np.uint8)),
            "depth": Image.fromarray(rng.integers(1, 60000, (h, w)).astype(np.uint16)),
            "semseg": Image.fromarray(rng.integers(0, 5, (h, w)).astype(np.uint8)),
            "mask_valid": Image.fromarray(((rng.random((h, w)) > 0.3) * 255).astype(np.uint8))}


# ------------------------------------------------------------------------------ geometry

def test_side_resize_sizes_round_half_to_even_like_albumentations():
    assert P.side_resize_size((2, 4), 8, longest=True) == (4, 8)
    assert P.side_resize_size((3, 4), 6, longest=True) == (4, 6)     # 4.5 -> 4 (half to even)
    assert P.side_resize_size((5, 4), 6, longest=True) == (6, 5)     # 4.8 -> 5
    assert P.side_resize_size((480, 640), 256, longest=False) == (256, 341)   # 341.33
    assert P.side_resize_size((3, 5), 4, longest=False) == (4, 7)    # 6.67 -> 7
    assert P.side_resize_size((512, 683), 512, longest=True) == (384, 512)   # 383.84 -> 384


def test_nearest_index_is_opencv_floor_rule():
    assert P.nearest_index(3, 7).tolist() == [0, 0, 0, 1, 1, 2, 2]      # floor(i * 3 / 7)
    assert P.nearest_index(5, 2).tolist() == [0, 2]                     # floor(i * 2.5)
    assert P.nearest_index(4, 8).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_nearest_resampling_copies_label_and_depth_values():
    depth = torch.tensor([[[1000, 2000, 3000], [4000, 5000, 6000]]], dtype=torch.int32)
    out = P.resize(depth, (4, 5), bilinear=False)
    # rows floor(i * 2/4) = 0,0,1,1; columns floor(j * 3/5) = 0,0,1,1,2
    expected = [[1000, 1000, 2000, 2000, 3000]] * 2 + [[4000, 4000, 5000, 5000, 6000]] * 2
    assert out[0].tolist() == expected and out.dtype == torch.int32


def test_letterbox_geometry_and_padding_values():
    """A 2 x 4 scene into 8 x 8: longest side x2 -> 4 x 8 (nearest for labels and depth), rows
    4..7 padding: RGB 128, labels ignored, depth 0 (invalid), mask_valid False."""
    labels = np.array([[0, 1, 2, 3], [4, 0, 1, 2]], dtype=np.uint8)
    depth = np.array([[100, 200, 300, 400], [500, 600, 700, 800]], dtype=np.uint16)
    valid = np.array([[255, 0, 255, 255], [255, 255, 0, 255]], dtype=np.uint8)
    rgb = np.zeros((2, 4, 3), dtype=np.uint8)
    rgb[...] = (10, 20, 30)
    images = {"rgb": Image.fromarray(rgb), "depth": Image.fromarray(depth),
              "semseg": Image.fromarray(labels), "mask_valid": Image.fromarray(valid)}
    out = P.MultiMAERecipe("letterbox", 8, ignore_index=255)(images, "s", 0)
    def up(a):
        return np.repeat(np.repeat(a, 2, 0), 2, 1)
    assert out["semseg"][:4].tolist() == up(labels).tolist()
    assert (out["semseg"][4:] == 255).all()
    np.testing.assert_allclose(out["depth"][0, :4].numpy(), up(depth) / 2 ** 16)
    assert (out["depth"][0, 4:] == 0).all()
    assert out["mask_valid"][0, :4].tolist() == (up(valid) > 0).tolist() and not out["mask_valid"][0, 4:].any()
    assert out["padding"][0, :4].sum() == 0 and out["padding"][0, 4:].all()
    for c in range(3):   # constant image stays constant under bilinear; padding is 128
        top = (rgb[0, 0, c] / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        torch.testing.assert_close(out["rgb"][c, :4], torch.full((4, 8), top))
        torch.testing.assert_close(out["rgb"][c, 4:], torch.full((4, 8), PAD_RGB_NORMALISED[c]))


def test_reduce_zero_label_and_padding_both_ignored():
    labels = np.array([[0, 1], [2, 3]], dtype=np.uint8)
    images = {"rgb": Image.fromarray(np.zeros((2, 2, 3), np.uint8)).resize((4, 2)),
              "semseg": Image.fromarray(labels).resize((4, 2), Image.NEAREST)}
    out = P.MultiMAERecipe("letterbox", 4, reduce_zero_label=True)(images, "s", 0)
    assert out["semseg"].tolist() == [[255, 255, 0, 0], [1, 1, 2, 2], [255] * 4, [255] * 4]


def test_lsj_geometry_with_stubbed_draws():
    """8 x 16 scene, image_size 16: no flip, longest side already 16, no jitter, s = 0.501 ->
    4 x 8, padded to 16 x 16, crop offsets int((16 - 16) u) = 0."""
    planes = P.to_planes(_images(8, 16))
    out = P.RECIPES["lsj"](planes, 16, StubRng([0.9, 0.9, 0.3, 0.7], u=(0.501 - 0.1) / 1.9))
    assert P.plane_size(out) == (16, 16)
    pad = out["padding"][0]
    assert not pad[:4, :8].any() and pad[4:].all() and pad[:, 8:].all()
    # labels: nearest x0.5 of the source = every other row and column
    assert out["semseg"][0, :4, :8].tolist() == planes["semseg"][0, ::2, ::2].tolist()
    assert (out["rgb"][:, 4:] == 128).all()


def test_lsj_upscale_crop_offsets_and_flip():
    """s -> 2: 8 x 16 becomes 16 x 32 (int(h s)); crop 16 x 16 at (int(0 u), int(16 u)); flip first."""
    planes = P.to_planes(_images(8, 16))
    out = P.RECIPES["lsj"](planes, 16, StubRng([0.1, 0.9, 0.5, 0.5], u=1.0))
    assert not out["padding"].any()
    flipped_up = P.resize(planes["semseg"].flip(-1), (16, 32), bilinear=False)
    assert out["semseg"].tolist() == flipped_up[:, :, 8:24].tolist()   # left = int(16 * 0.5) = 8


def test_lsj_scale_range_statistics():
    """s ~ U[0.1, 2]: a square scene is padded iff s < 1 (probability 0.9 / 1.9), and never shows
    less than int(0.1 S)^2 image pixels; deterministic per (seed, epoch, sample id)."""
    size, n = 20, 300
    images = {"rgb": Image.fromarray(np.full((size, size, 3), 50, np.uint8))}
    recipe = P.MultiMAERecipe("lsj", size, seed=3)
    image_pixels = np.array([int((~recipe(images, f"s{i}", 0)["padding"]).sum()) for i in range(n)])
    assert image_pixels.min() >= int(0.1 * size) ** 2
    assert abs(np.mean(image_pixels < size * size) - 0.9 / 1.9) < 0.1
    assert np.mean(image_pixels <= (size // 2) ** 2) == pytest.approx(0.4 / 1.9, abs=0.1)   # s < 0.5 (+ rounding)
    a, b = recipe(images, "s7", 1), recipe(images, "s7", 1)
    assert torch.equal(a["padding"], b["padding"])


def test_colour_jitter_touches_rgb_only():
    """Same geometry draws, jitter on vs off: depth, labels, validity and padding identical."""
    images = _images(12, 16)
    on = P.RECIPES["lsj"](P.to_planes(images), 16, StubRng([0.9, 0.1, 0.3, 0.6], u=0.9))
    off = P.RECIPES["lsj"](P.to_planes(images), 16, StubRng([0.9, 0.9, 0.3, 0.6], u=0.9))
    for m in ("depth", "semseg", "mask_valid", "padding"):
        assert torch.equal(on[m], off[m]), m
    assert not torch.equal(on["rgb"], off["rgb"])
    nyu_on = P.RECIPES["nyu"](P.to_planes(images), 8, StubRng([0.9, 0.1, 0.1, 0.2, 0.2], u=0.9))
    nyu_off = P.RECIPES["nyu"](P.to_planes(images), 8, StubRng([0.9, 0.9, 0.9, 0.2, 0.2], u=0.9))
    for m in ("depth", "semseg", "mask_valid"):
        assert torch.equal(nyu_on[m], nyu_off[m]), m
    assert not torch.equal(nyu_on["rgb"], nyu_off["rgb"])
    grey = nyu_on["rgb"]   # the greyscale draw (0.1 < 0.3) made all channels equal
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_colour_ops_hand_values():
    def px(*v):
        return torch.tensor(v, dtype=torch.float32).view(3, 1, 1)
    assert P.adjust_brightness(px(100, 3, 250), 1.25).flatten().tolist() == [125, 3, 255]   # 3.75 -> 3
    assert P.adjust_brightness(px(3, 0, 8), 0.8745).flatten().tolist() == [2, 0, 6]         # truncated
    flat = torch.full((3, 2, 2), 77.0)
    assert torch.equal(P.adjust_contrast(flat, 1.4), flat)       # a uniform image is its own mean
    assert torch.equal(P.adjust_saturation(flat, 0.5), flat)     # a grey image has no saturation
    assert P.to_gray(px(255, 0, 0)).flatten().tolist() == [76, 76, 76]   # OpenCV: 0.299 * 255
    green = P.adjust_hue(px(255, 0, 0), 1 / 3).flatten()         # red rotated by 120 degrees
    assert green[0] <= 1 and green[1] >= 254 and green[2] <= 1
    assert torch.equal(P.adjust_hue(px(10, 20, 30), 0.0), px(10, 20, 30))


def test_nyu_and_center_crop_geometry():
    planes = P.to_planes(_images(4, 6))
    cc = P.RECIPES["center_crop"](planes, 4, None)          # short side already 4: columns 1..4
    assert cc["semseg"].tolist() == planes["semseg"][:, :, 1:5].tolist()
    nyu = P.RECIPES["nyu"](planes, 4, StubRng([0.9, 0.9, 0.9, 0.0, 0.99]))   # no flip/jitter/grey
    assert nyu["semseg"].tolist() == planes["semseg"][:, :, 1:5].tolist()    # left = int(2 * 0.99)
    small = P.to_planes(_images(3, 5))                      # short side 3 -> 4: 4 x 7, centre 4 x 4
    out = P.RECIPES["center_crop"](small, 4, None)
    rows, cols = P.nearest_index(3, 4), P.nearest_index(5, 7)[1:5]
    assert out["depth"][0].tolist() == small["depth"][0][rows][:, cols].tolist()


# --------------------------------------------------------------------------- depth input

def _multimae_reference(img: np.ndarray, keep: np.ndarray, trunc=0.1) -> np.ndarray:
    """MultiMAE's formula written out: sorted kept values, slice, mean, unbiased var."""
    v = np.sort(img[keep].astype(np.float64))
    t = v[int(trunc * len(v)): int((1 - trunc) * len(v))]
    return (img - t.mean()) / np.sqrt(t.var(ddof=1) + 1e-6)


def test_trimmed_standardize_depth_hand_values():
    d = torch.arange(1, 11, dtype=torch.float32).view(1, 1, 2, 5)     # 1..10
    out = P.trimmed_standardize_depth(d)
    # positions 1..8 of 10 sorted values: 2..9, mean 5.5, unbiased variance 6
    torch.testing.assert_close(out, (d - 5.5) / np.sqrt(6 + 1e-6))
    rng = np.random.default_rng(0)
    depth = rng.uniform(0.5, 5, (2, 1, 6, 7)).astype(np.float32)
    keep = rng.random((2, 1, 6, 7)) > 0.25
    depth[~keep] = 1e6   # padded pixels must not move the statistics
    out = P.trimmed_standardize_depth(torch.from_numpy(depth), torch.from_numpy(keep))
    for b in range(2):
        np.testing.assert_allclose(out[b, 0].numpy()[keep[b, 0]],
                                   _multimae_reference(depth[b, 0], keep[b, 0])[keep[b, 0]], rtol=1e-4)


def test_multimae_depth_input_zeroes_padding_and_invalid_after_standardising():
    depth = torch.tensor([[[[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 99.0, 99.0]]]])
    padding = torch.tensor([[[[False] * 4, [False, False, True, True]]]])
    valid = torch.tensor([[[[True, False, True, True], [True, True, True, True]]]])
    out = P.multimae_depth_input(depth, padding, valid)
    # statistics over the 6 image pixels (the invalid 2.0 included): positions 0..4 -> 1..5
    ref = (depth - 3.0) / np.sqrt(2.5 + 1e-6)
    expected = torch.where(padding | ~valid, torch.zeros_like(ref), ref)
    torch.testing.assert_close(out, expected)


# ------------------------------------------------------------------------ evaluation set

def test_eval_sample_indices_are_numpy_seed_zero_permutation():
    np.random.seed(0)
    assert P.eval_sample_indices(654, 100) == np.random.permutation(654)[:100].tolist()
    assert P.eval_sample_indices(5, None) == [0, 1, 2, 3, 4]


def _write_folder(root: Path, split: str, stems, shape=(6, 8)):
    rng = np.random.default_rng(1)
    for stem in stems:
        for m, arr in (("rgb", rng.integers(0, 256, (*shape, 3)).astype(np.uint8)),
                       ("semseg", rng.integers(1, 5, shape).astype(np.uint8))):
            folder = root / split / m / "data"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(folder / f"{stem}.png")


def test_select_eval_samples_takes_permutation_of_sorted_stems(tmp_path):
    stems = [f"{i:04d}" for i in (7, 3, 12, 0, 9, 5, 1)]
    _write_folder(tmp_path, "test", stems)
    loader = build_loader(tmp_path, ["rgb"], split="test", train=False, batch_size=2, image_size=16,
                          eval_full_image=True)
    chosen = P.select_eval_samples(loader, 4)
    np.random.seed(0)
    order = np.random.permutation(len(stems))[:4]
    expected = [sorted(stems)[i] for i in order]
    assert chosen.sample_ids() == expected
    assert [s for b in chosen for s in b["sample_id"]] == expected
    assert P.select_eval_samples(loader, None) is loader


def test_max_eval_samples_limits_the_evaluation_split_only(tmp_path):
    """k-NN reads its training bank through the evaluation loader too: that split stays whole."""
    from multimae_att.finetune.engine import build_eval_loader, make_accelerator
    from multimae_att.finetune.tasks import make_task
    _write_folder(tmp_path, "train", [f"t{i}" for i in range(5)])
    _write_folder(tmp_path, "val", [f"v{i}" for i in range(6)])
    cfg = load_finetune_config(None, ["task.name=knn", f"data.root={tmp_path}", "data.image_size=16",
                                      "data.max_eval_samples=2", "data.num_workers=0", "train.cpu=true"])
    spec = make_task(cfg)
    acc = make_accelerator(cfg, spec)
    assert len(build_eval_loader(cfg, spec, "train", acc).dataset) == 5
    assert len(build_eval_loader(cfg, spec, "val", acc).dataset) == 2


def test_recipe_through_the_data_package(tmp_path):
    """``build_dataset(recipe=...)``: the recipe's tensors plus sample_id (and cls) per sample."""
    _write_folder(tmp_path, "val", ["a", "b"], shape=(6, 8))
    ds = build_dataset(tmp_path, ["rgb", "semseg", "cls"], split="val", train=False, image_size=16,
                       recipe=P.MultiMAERecipe("letterbox", 16))
    s = ds[0]
    assert s["rgb"].shape == (3, 16, 16) and s["semseg"].shape == (16, 16) and s["sample_id"] == "a"
    assert s["cls"].item() == 0 and s["padding"][0, 12:].all() and not s["padding"][0, :12].any()


# ------------------------------------------------------------------- config and reporting

def test_protocol_presets_resolve_per_task_and_reject_mismatches():
    def cfg(*over):
        return load_finetune_config(None, list(over))
    s = cfg("task.name=semseg", "data.protocol=multimae")
    assert (s.aug(), s.eval_mode(), s.report()) == ("lsj", "letterbox", "best")
    d = cfg("task.name=depth", "data.protocol=multimae", "task.loss=berhu")
    assert (d.aug(), d.eval_mode(), d.report()) == ("nyu", "center_crop", "best")
    o = cfg("task.name=semseg")
    assert (o.aug(), o.eval_mode(), o.report()) == ("rrc", "full", "last")
    c = cfg("data.protocol=multimae")
    assert (c.aug(), c.eval_mode()) == ("rrc", "center_crop")
    with pytest.raises(Exception, match="data.eval_mode='letterbox'"):
        cfg("task.name=semseg", "data.eval_mode=letterbox")
    with pytest.raises(Exception, match="data.aug='rrc'"):
        cfg("task.name=semseg", "data.protocol=multimae", "data.aug=rrc")
    with pytest.raises(Exception, match="data.aug='lsj'"):
        cfg("data.aug=lsj")


def test_global_batch_line_and_warning():
    cfg = load_finetune_config(None, ["task.name=semseg", "data.batch_size=4", "optim.accum_steps=4",
                                      "optim.recipe_global_batch=16", "optim.lr=1e-4"])
    line, warning = global_batch_line(cfg, 1)
    assert line == "global batch 16 = 1 process x 4 per process x 4 accumulation steps (the recipe's)"
    assert warning is None
    line, warning = global_batch_line(cfg, 2)
    assert line.startswith("global batch 32 = 2 processes x 4")
    assert "32 (2 x 4 x 4)" in warning and "recipe_global_batch=16" in warning
    assert "optim.accum_steps=2" in warning
    cfg.optim.recipe_global_batch = None
    assert global_batch_line(cfg, 3)[1] is None


def test_reported_metrics_best_or_last():
    best = {"epoch": 2, "step": 6, "metrics": {"miou": 30.0}}
    last = {"epoch": 3, "step": 9, "metrics": {"miou": 20.0}}
    cfg = load_finetune_config(None, ["task.name=semseg", "data.protocol=multimae"])
    assert reported_metrics(cfg, last, best) == {"miou": 30.0, "report": "best", "report_epoch": 2,
                                                 "report_step": 6}
    cfg.train.report = "last"
    assert reported_metrics(cfg, last, best)["miou"] == 20.0
    assert "report best (by miou)" in protocol_line(load_finetune_config(
        None, ["task.name=semseg", "data.protocol=multimae"]), "miou")


# --------------------------------------------------------------------- through the engine

@pytest.fixture(scope="module")
def letterbox_root(tmp_path_factory) -> Path:
    """Non-square scenes (40 x 56 and 27 x 45) with every pixel labelled 1..4."""
    root = tmp_path_factory.mktemp("letterbox")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(40, 56), (27, 45), (40, 56)]):
        for m, arr in (("rgb", rng.integers(0, 256, (h, w, 3)).astype(np.uint8)),
                       ("semseg", rng.integers(1, 5, (h, w)).astype(np.uint8))):
            folder = root / "val" / m / "data"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(folder / f"{i:03d}.png")
    return root


def test_letterbox_evaluation_ignores_padding(letterbox_root):
    """Scored at 32 x 32: 40 x 56 -> 23 x 32 and 27 x 45 -> 19 x 32 image rows, the rest ignored;
    a prediction that copies the labels and is garbage on the padding scores 100 mIoU."""
    from multimae_att.finetune.engine import build_eval_loader, make_accelerator
    from multimae_att.finetune.tasks import make_task
    cfg = load_finetune_config(None, ["task.name=semseg", "task.num_classes=4", "task.reduce_zero_label=true",
                                      "data.protocol=multimae", f"data.root={letterbox_root}",
                                      "data.image_size=32", "data.batch_size=3", "data.num_workers=0",
                                      "model.size=tiny", "train.cpu=true", "head.embed_dim=32"])
    spec = make_task(cfg)
    batch = next(iter(build_eval_loader(cfg, spec, "val", make_accelerator(cfg, spec))))
    rows = (~batch["padding"][:, 0]).all(-1).sum(-1).tolist()
    assert rows == [23, 19, 23] and batch["semseg"].shape == (3, 32, 32)
    assert (batch["semseg"][batch["padding"][:, 0]] == 255).all()
    assert (batch["semseg"][~batch["padding"][:, 0]] < 4).all()
    logits = torch.nn.functional.one_hot(batch["semseg"].clamp(max=3), 4).permute(0, 3, 1, 2).float()
    logits[batch["padding"].expand_as(logits)] = torch.rand(int(batch["padding"].sum()) * 4)
    metrics = spec.make_metrics()
    metrics.update(spec.eval_stats(metrics, logits, batch))
    assert metrics.confusion.sum().item() == 32 * (23 + 19 + 23)
    assert metrics.compute()["miou"] == pytest.approx(100.0)


def test_report_best_picks_the_best_evaluation(synthetic_root, tmp_path, monkeypatch):
    """Scripted evaluations after epochs 1, 2, 3 (mIoU 10, 30, 20): metrics.json and
    checkpoint-best.pth hold the second, checkpoint-last.pth the third."""
    from multimae_att.finetune import engine
    scripted = iter([{"miou": 10.0}, {"miou": 30.0}, {"miou": 20.0}])
    monkeypatch.setattr(engine, "evaluate", lambda *a, **k: dict(next(scripted)))
    over = [f"data.root={synthetic_root}", f"output_dir={tmp_path}", "data.image_size=32", "data.batch_size=8",
            "train.epochs=3", "train.eval_every=1", "log.progress=false", "data.protocol=multimae"]
    result = engine.run(load_finetune_config(str(REPO / "configs/finetune/synthetic_semseg.yaml"), over))
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written == result
    assert (written["report"], written["report_epoch"], written["miou"]) == ("best", 2, 30.0)
    best = torch.load(tmp_path / "checkpoint-best.pth", map_location="cpu", weights_only=False)
    last = torch.load(tmp_path / "checkpoint-last.pth", map_location="cpu", weights_only=False)
    assert (best["epoch"], best["step"], best["metrics"]["miou"]) == (2, written["report_step"], 30.0)
    assert (last["epoch"], last["metrics"]["miou"]) == (3, 20.0)


def test_depth_validation_loss_selects_under_multimae():
    """Depth: the best checkpoint is the lowest validation loss under protocol multimae (RMSE
    under ours); the loss is the task's berHu summed over valid pixels of the set / their count."""
    from multimae_att.finetune.engine import _better
    from multimae_att.finetune.tasks import make_task
    base = ["task.name=depth", "task.loss=berhu", "task.mask_valid=false"]
    spec = make_task(load_finetune_config(None, base + ["data.protocol=multimae"]))
    assert spec.best_key() == "loss" and _better("loss", 3.0, 5.0) and not _better("loss", 4.0, 3.0)
    assert make_task(load_finetune_config(None, base)).best_key() == "rmse"
    target = torch.tensor([[[[1.0, 2.0], [4.0, 0.0]]]])            # depth_unit_m 65.536 below
    pred = torch.tensor([[[[1.5, 2.0], [1.0, 9.0]]]])
    batch = {"depth": target / spec.cfg.task.depth_unit_m}
    metrics = spec.make_metrics()
    metrics.update(spec.eval_stats(metrics, pred, batch))
    # |d| over valid (target > 0) pixels: 0.5, 0, 3 ; c = 0.6 ; berHu: 0.5, 0, (9 + 0.36) / 1.2
    assert metrics.compute()["loss"] == pytest.approx((0.5 + 0 + 9.36 / 1.2) / 3)
