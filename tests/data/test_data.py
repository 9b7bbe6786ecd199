"""multimae_att.data: pairing, layouts, one geometry for all modalities, 16-bit depth, skips."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from multimae_att.data import (
    DEPTH_SCALE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    FolderDataset,
    build_dataset,
    build_loader,
    robust_standardize_depth,
)
from multimae_att.data.transforms import AugmentConfig

from helpers.prep import load_prep, write_tar


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("syn")
    load_prep("make_synthetic").main(["--out", str(out), "--num-train", "12", "--num-val", "4",
                                       "--size", "48", "--shard-size", "5"])
    return out


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _coordinate_dataset(root: Path, n: int = 4, h: int = 40, w: int = 56) -> None:
    """Sources whose pixel values encode their own coordinates, in all three modalities.

    rgb: R = 4x + 10, G = 4y + 10 (linear, so bicubic/bilinear resampling keeps it linear);
    depth: 300x + 7y + 1000 (16-bit, linear); semseg: the source column index x (nearest only).
    """
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        rgb = np.stack([4 * xx + 10, 4 * yy + 10, np.full_like(xx, 50 * i)], -1).astype(np.uint8)
        _save(root / "train/rgb/c0" / f"s{i}.png", rgb)
        _save(root / "train/depth/c0" / f"s{i}.png", (300 * xx + 7 * yy + 1000).astype(np.uint16))
        _save(root / "train/semseg/c0" / f"s{i}.png", xx.astype(np.uint8))


def test_synthetic_is_deterministic_and_consistent(synthetic, tmp_path):
    ms = load_prep("make_synthetic")
    assert (synthetic / ".complete").is_file()
    rgb_a, depth_a, _sem_a, cls_a = ms.make_scene(0, "train", 3, 48)
    rgb_b, depth_b, _sem_b, cls_b = ms.make_scene(0, "train", 3, 48)
    assert np.array_equal(rgb_a, rgb_b) and np.array_equal(depth_a, depth_b) and cls_a == cls_b
    assert not np.array_equal(rgb_a, ms.make_scene(1, "train", 3, 48)[0])
    for index in range(12):
        _rgb, depth, sem, cls = ms.make_scene(0, "train", index, 48)
        assert depth.dtype == np.uint16 and sem.max() < 133
        objects = sem >= ms.FIRST_OBJECT_LABEL
        counts = np.bincount(sem[objects] - ms.FIRST_OBJECT_LABEL, minlength=8)
        assert objects.sum() == 0 or counts.argmax() == cls  # class = dominant object
        if objects.any():  # objects are nearer than the wall
            assert depth[objects].max() < depth[sem == ms.WALL].min()
        stored = np.array(Image.open(next((synthetic / "train/depth").glob(f"*/train_{index:06d}.png"))))
        assert stored.dtype == np.uint16 and np.array_equal(stored, depth)


def test_pairing_by_stem_reports_offending_stems(tmp_path):
    _coordinate_dataset(tmp_path, n=9)
    (tmp_path / "train/depth/c0/s3.png").unlink()
    for extra in ("x1", "x2"):
        _save(tmp_path / "train/semseg/c0" / f"{extra}.png", np.zeros((40, 56), np.uint8))
    with pytest.raises(ValueError) as err:
        FolderDataset(tmp_path, "train", ["rgb", "depth", "semseg"], AugmentConfig(image_size=(32, 32)))
    msg = str(err.value)
    assert "depth: 3 missing" in msg and "'s3'" in msg and "'x1'" in msg
    assert "rgb: 2 missing" in msg and "semseg" not in msg.split("\n", 1)[1]
    (tmp_path / "train/semseg/c0/x1.png").unlink()
    (tmp_path / "train/semseg/c0/x2.png").unlink()
    ds = FolderDataset(tmp_path, "train", ["rgb", "semseg"], AugmentConfig(image_size=(32, 32)))
    assert ds.sample_ids() == [f"s{i}" for i in range(9)]


def test_same_geometry_in_every_modality(tmp_path):
    _coordinate_dataset(tmp_path, n=6)
    size, scale = 32, 4
    ds = build_dataset(tmp_path, ["rgb", "depth", "semseg"], image_size=size, train=True, seed=3)
    flips = set()
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            s = ds[i]
            top, left, h, w = s["crop_box"].tolist()
            flip = bool(s["flip"])
            flips.add(flip)
            assert s["source_size"].tolist() == [40, 56]
            # Expected source coordinates at output pixel centres (flip mirrors output columns).
            cols = left + (torch.arange(size) + 0.5) * w / size - 0.5
            rows = top + (torch.arange(size) + 0.5) * h / size - 0.5
            cols = cols.flip(0) if flip else cols
            depth = s["depth"][0] * DEPTH_SCALE  # = 300 x + 7 y + 1000
            # Interior only (filters clamp at the border); tolerance << 1 px, so any crop/flip
            # mismatch between modalities (>= 1 px) fails. Pillow's fixed-point filters give ~0.1 px.
            inner = slice(3, -3)
            x_from_depth = (depth - 7 * rows[:, None] - 1000) / 300
            assert torch.allclose(x_from_depth[inner, inner], cols[None].expand(size, size)[inner, inner], atol=0.2)
            red = s["rgb"][0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
            x_from_rgb = (red * 255 - 10) / 4
            assert torch.allclose(x_from_rgb[inner, inner], cols[None].expand(size, size)[inner, inner], atol=0.4)
            y_from_rgb = ((s["rgb"][1] * IMAGENET_STD[1] + IMAGENET_MEAN[1]) * 255 - 10) / 4
            assert torch.allclose(y_from_rgb[inner, inner], rows[:, None].expand(size, size)[inner, inner], atol=0.4)
            # Labels: nearest source column of each 1/4-resolution cell, flipped the same way.
            n = size // scale
            lab_cols = torch.floor(left + (torch.arange(n) + 0.5) * w / n)
            lab_cols = lab_cols.flip(0) if flip else lab_cols
            assert s["semseg"].shape == (n, n)
            assert (s["semseg"] == lab_cols[None].long()).float().mean() > 0.97
    assert flips == {True, False}


@pytest.mark.parametrize("bits", [8, 16])
def test_labels_never_interpolated(tmp_path, bits):
    rng = np.random.default_rng(0)
    values = np.array([0, 7, 150] if bits == 8 else [0, 1000, 40000], dtype=np.uint8 if bits == 8 else np.uint16)
    for i in range(3):
        _save(tmp_path / "train/rgb/c" / f"s{i}.png", rng.integers(0, 255, (30, 44, 3), dtype=np.uint8))
        _save(tmp_path / "train/semseg/c" / f"s{i}.png", values[rng.integers(0, 3, (30, 44))])
    for semseg_scale in (1, 4):
        ds = build_dataset(tmp_path, ["rgb", "semseg"], image_size=64, semseg_scale=semseg_scale, seed=1)
        seen = set()
        for epoch in range(4):
            ds.set_epoch(epoch)
            for i in range(len(ds)):
                seen |= set(ds[i]["semseg"].unique().tolist())
        assert seen <= set(values.tolist()) and len(seen) == 3


def test_reduce_zero_label(tmp_path):
    labels = np.array([[0, 1, 2, 150, 255]], dtype=np.uint8).repeat(5, 0)
    _save(tmp_path / "train/semseg/c/a.png", labels)
    ds = build_dataset(tmp_path, ["semseg"], image_size=(5, 5), train=False, semseg_scale=1,
                       eval_full_image=True, reduce_zero_label=True)
    assert ds[0]["semseg"][0].tolist() == [255, 0, 1, 149, 255]


def test_depth_16bit_preserved_in_both_layouts(tmp_path):
    ss = load_prep("shard_writer")
    rng = np.random.default_rng(1)
    depth = rng.integers(256, 65535, (24, 24)).astype(np.uint16)  # needs all 16 bits
    _save(tmp_path / "train/depth/c/a.png", depth)
    with ss.ShardSink(tmp_path, "train") as sink:
        sink.write("a", {"depth.png": ss.encode_png(depth)})
    for layout in ("folder", "shards"):
        ds = build_dataset(tmp_path, ["depth"], layout=layout, image_size=24, train=False, eval_full_image=True)
        out = next(iter(ds)) if layout == "shards" else ds[0]
        assert torch.equal(out["depth"][0] * DEPTH_SCALE, torch.from_numpy(depth.astype(np.float32)))


@pytest.mark.parametrize("train", [False, True])
def test_shards_round_trip_identical_to_folders(synthetic, train):
    mods = ["rgb", "depth", "semseg", "cls"]
    kw = dict(image_size=32, train=train, seed=5, split="train")
    folder = build_dataset(synthetic, mods, layout="folder", **kw)
    shards = build_dataset(synthetic, mods, layout="shards", **kw)
    for ds in (folder, shards):
        ds.set_epoch(2)
    by_id = {s["sample_id"]: s for s in shards}
    assert sorted(by_id) == folder.sample_ids() == sorted(shards.sample_ids())
    for i in range(len(folder)):
        a = folder[i]
        b = by_id[a["sample_id"]]
        for key in a:
            assert (a[key] == b[key]) if key == "sample_id" else torch.equal(a[key], b[key]), key


def test_loader_batches_epochs_ranks_and_resume(synthetic):
    kw = dict(batch_size=3, image_size=32, seed=0, layout="folder")
    loader = build_loader(synthetic, ["rgb", "depth", "semseg", "cls"], **kw)
    loader.set_epoch(1)
    batches = list(loader)
    assert len(batches) == len(loader) == 4
    b = batches[0]
    assert b["rgb"].dtype == torch.float32 and b["rgb"].shape == (3, 3, 32, 32)
    assert b["depth"].shape == (3, 1, 32, 32) and b["semseg"].shape == (3, 8, 8) and b["semseg"].dtype == torch.int64
    assert b["cls"].dtype == torch.int64 and b["crop_box"].dtype == torch.float32 and b["flip"].dtype == torch.bool
    assert b["source_size"].tolist() == [[48, 48]] * 3 and isinstance(b["sample_id"], list)
    loader.set_epoch(1, start_batch=2)  # resume: exactly the rest of the same epoch
    rest = list(loader)
    assert [r["sample_id"] for r in rest] == [r["sample_id"] for r in batches[2:]]
    assert torch.equal(rest[0]["rgb"], batches[2]["rgb"])
    loader.set_epoch(2)
    assert [x["sample_id"] for x in loader] != [x["sample_id"] for x in batches]
    ids = []
    for rank in range(2):  # ranks: disjoint, equal batch counts
        r = build_loader(synthetic, ["rgb"], rank=rank, world_size=2, **kw)
        ids.append([s for batch in r for s in batch["sample_id"]])
    assert len(ids[0]) == len(ids[1]) == 6 and not set(ids[0]) & set(ids[1])
    ids = []
    for rank in range(5):  # evaluation: every sample on exactly one rank, no padding duplicates
        r = build_loader(synthetic, ["rgb"], rank=rank, world_size=5, train=False, **kw)
        ids += [s for batch in r for s in batch["sample_id"]]
    assert sorted(ids) == [f"train_{i:06d}" for i in range(12)]


def test_shard_specs_resampling_and_workers(synthetic):
    shard_dir = synthetic / "shards"
    tars = sorted(str(p) for p in shard_dir.glob("train-*.tar"))
    assert len(tars) == 3
    (shard_dir / "list.txt").write_text("\n".join(tars) + "\n")
    pattern = str(shard_dir / "train-{000000..000002}.tar")
    piped = [f"pipe:cat {t}" for t in tars]
    for spec in (pattern, str(shard_dir / "list.txt"), piped):
        ds = build_dataset(spec, ["rgb", "cls"], image_size=16, train=False)
        assert sorted(s["sample_id"] for s in ds) == [f"train_{i:06d}" for i in range(12)]
    train = build_loader(synthetic, ["rgb"], layout="shards", batch_size=2, image_size=16, shuffle_buffer=6)
    train.set_epoch(3)
    full = [b["sample_id"] for b in train]
    train.set_epoch(3, start_batch=2)  # resume: the rest of the same shuffled epoch
    assert [b["sample_id"] for b in train] == full[2:] and len(full) == 6
    train.set_epoch(4)
    assert [b["sample_id"] for b in train] != full
    evaluation = build_loader(synthetic, ["rgb"], layout="shards", batch_size=5, image_size=16, train=False)
    assert [len(b["sample_id"]) for b in evaluation] == [5, 5, 2] and len(evaluation) == 3  # full set
    counts = []
    for rank in range(2):  # resampled: every rank yields the same number of batches
        loader = build_loader(synthetic, ["rgb"], layout="shards", batch_size=2, image_size=16,
                              rank=rank, world_size=2, num_workers=1)
        assert len(loader) == 3
        counts.append(sum(1 for _ in loader))
    assert counts == [3, 3]


def test_corrupt_samples_skipped_and_counted(synthetic, tmp_path):
    ss = load_prep("shard_writer")
    rgb = ss.encode_png(np.zeros((16, 16, 3), np.uint8))
    depth = ss.encode_png(np.full((16, 16), 3000, np.uint16))
    members = {}
    for key in ("k0", "k1", "k2", "k3"):
        members[f"{key}.rgb.png"] = rgb
        members[f"{key}.depth.png"] = depth
    members["k1.rgb.png"] = b"not a png"   # corrupt
    del members["k2.depth.png"]             # incomplete
    write_tar(tmp_path / "s.tar", members)
    loader = build_loader([str(tmp_path / "s.tar")], ["rgb", "depth"], batch_size=1, image_size=16,
                          train=False, num_workers=1)
    assert sorted(b["sample_id"][0] for b in loader) == ["k0", "k3"]
    assert loader.skipped.value == 2  # counted in the worker, visible in the main process
    (tmp_path / "bad.tar").write_bytes(b"garbage" * 100)
    with pytest.raises(RuntimeError, match="no readable sample"):
        list(build_dataset([str(tmp_path / "bad.tar")], ["rgb"], image_size=16, train=False))
    # Folder layout: the corrupt file is replaced by the next sample, the batch count is unchanged.
    root = tmp_path / "folder"
    _coordinate_dataset(root, n=4)
    (root / "train/rgb/c0/s1.png").write_bytes(b"\x89PNG truncated")
    loader = build_loader(root, ["rgb", "semseg"], batch_size=2, image_size=16, train=False, num_workers=1)
    ids = [s for batch in loader for s in batch["sample_id"]]
    assert ids == ["s0", "s2", "s2", "s3"] and loader.skipped.value == 1
    for name in ("s0", "s2", "s3"):
        (root / f"train/rgb/c0/{name}.png").write_bytes(b"")
    with pytest.raises(RuntimeError, match="no readable sample"):
        build_dataset(root, ["rgb"], image_size=16, train=False)[0]


def _multimae_depth_standardisation(x: np.ndarray) -> np.ndarray:
    """MultiMAE's truncated standardisation of one sample's values (sort, slice, mean, var)."""
    v = np.sort(x.reshape(-1).astype(np.float64))
    kept = v[int(0.1 * len(v)): int(0.9 * len(v))]
    return (x - kept.mean()) / np.sqrt(kept.var(ddof=1) + 1e-6)


@pytest.mark.parametrize("kind", ["continuous", "ties", "constant", "outliers"])
def test_robust_standardize_depth_is_multimaes_trimming(kind):
    g = torch.Generator().manual_seed(0)
    depth = torch.rand(4, 1, 11, 13, generator=g) * 5
    if kind == "ties":  # quantised depth: many equal values at both ends of the kept range
        depth = torch.randint(0, 6, (4, 1, 11, 13), generator=g).float()
    elif kind == "constant":
        depth[1] = 2.5
    elif kind == "outliers":
        depth[:, 0, 0, :5] = 100.0
        depth[:, 0, 1, :5] = -50.0
    out = robust_standardize_depth(depth)
    for b in range(4):
        ref = _multimae_depth_standardisation(depth[b].numpy())
        np.testing.assert_allclose(out[b].numpy(), ref, atol=2e-5, rtol=1e-5)
    # the sorting path (taken with a mask) agrees when every pixel is valid
    torch.testing.assert_close(robust_standardize_depth(depth, torch.ones_like(depth, dtype=torch.bool)), out,
                               atol=2e-5, rtol=1e-5)


def test_robust_standardize_depth_with_a_mask_trims_the_valid_values():
    g = torch.Generator().manual_seed(1)
    depth = torch.rand(3, 1, 6, 7, generator=g) * 5
    depth[1, 0, 0, :3] = 100.0  # outliers must not move the statistics
    mask = torch.rand(3, 1, 6, 7, generator=g) > 0.3
    depth[~mask] = -1e3  # invalid values must not enter the statistics either
    out = robust_standardize_depth(depth, mask)
    for b in range(3):
        v = np.sort(depth[b][mask[b]].numpy().astype(np.float64))
        kept = v[int(0.1 * len(v)): int(0.9 * len(v))]
        ref = (depth[b].numpy() - kept.mean()) / np.sqrt(kept.var(ddof=1) + 1e-6)
        np.testing.assert_allclose(out[b].numpy(), ref, rtol=1e-5, atol=1e-3)


def test_plain_imagefolder_split_for_rgb_and_cls(tmp_path):
    for wnid, n in (("n02", 2), ("n01", 3)):
        for i in range(n):
            _save(tmp_path / "val" / wnid / f"{wnid}_{i}.JPEG", np.full((10, 12, 3), 9, np.uint8))
    loader = build_loader(tmp_path, ["rgb", "cls"], split="val", batch_size=5, image_size=8, train=False)
    batch = next(iter(loader))
    assert batch["sample_id"] == ["n01_0", "n01_1", "n01_2", "n02_0", "n02_1"]
    assert batch["cls"].tolist() == [0, 0, 0, 1, 1]


def test_att_map_follows_the_crop_and_flip(tmp_path):
    """A low-resolution map (8 x 12 for a 32 x 48 image) whose value encodes its own column."""
    _yy, xx = np.mgrid[0:8, 0:12]
    for i in range(3):
        _save(tmp_path / "train/rgb/c" / f"s{i}.png", np.zeros((32, 48, 3), np.uint8))
        _save(tmp_path / "train/att_map/c" / f"s{i}.png", (20 * xx + 10).astype(np.uint8))
    ds = build_dataset(tmp_path, ["rgb", "att_map"], image_size=64, att_map_stride=8, seed=2)
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            s = ds[i]
            _top, left, _h, w = s["crop_box"].tolist()
            assert s["att_map"].shape == (8, 8) and s["att_map"].dtype == torch.float32
            # map column of each output cell centre (map pixel = 4 source pixels)
            u = (left + (torch.arange(8) + 0.5) * w / 8) / 4 - 0.5
            u = u.flip(0) if bool(s["flip"]) else u
            expected = (20 * u.clamp(0, 11) + 10) / 255
            assert torch.allclose(s["att_map"][2:-2, 2:-2], expected[None, 2:-2].expand(4, 4), atol=0.02)
