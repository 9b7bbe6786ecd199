"""Crop-aware attention cache: the crop of a cached map equals the map of the crop.

The reference is analytic: an attention pattern f(y, x) defined over the source image in
normalised coordinates, evaluated at each token's centre by an explicit per-sample loop.
"""
import multiprocessing as mp

import numpy as np
import pytest
import torch

from multimae_att.scoring.cache import MISSING, AttentionCache, crop_affine


def linear(y, x):
    return 0.3 + 0.5 * y - 0.8 * x


def blob(y, x):
    # Two smooth, asymmetric bumps (asymmetric so a wrong flip or transpose shows).
    return (np.exp(-((y - 0.3) ** 2 + (x - 0.65) ** 2) / (2 * 0.18**2))
            + 0.5 * np.exp(-((y - 0.7) ** 2 + (x - 0.25) ** 2) / (2 * 0.25**2)))


def token_map(f, box, flip, size, hw):
    """f at the token centres of an h x w grid over crop ``box`` (flipped after cropping): [h*w]."""
    top, left, height, width = box
    h, w = hw
    yc = (np.arange(h) + 0.5) / h
    xc = (np.arange(w) + 0.5) / w
    if flip:
        xc = 1 - xc  # token column j shows crop column w-1-j
    ys = (top + yc * height) / size[0]
    xs = (left + xc * width) / size[1]
    return f(ys[:, None], xs[None, :]).reshape(-1).astype(np.float32)


def make_batch(ids, boxes, flips, sizes):
    return {"sample_id": list(ids), "crop_box": torch.tensor(boxes, dtype=torch.float32),
            "flip": torch.tensor(flips), "source_size": torch.tensor(sizes, dtype=torch.int64)}


def scores_for(f, batch, grids):
    out = {}
    for m, hw in grids.items():
        rows = [token_map(f, b.tolist(), bool(fl), s.tolist(), hw)
                for b, fl, s in zip(batch["crop_box"], batch["flip"], batch["source_size"])]
        out[m] = torch.tensor(np.stack(rows))
    return out


def full_batch(ids, sizes):
    return make_batch(ids, [[0, 0, h, w] for h, w in sizes], [False] * len(ids), sizes)


def random_crops(rng, ids, sizes, inner=0.0, min_scale=0.2):
    """Random-resized-crop-like boxes (non-square aspect ratios) inside a margin of the source."""
    boxes, flips = [], []
    for h, w in sizes:
        lo_y, lo_x = inner * h, inner * w
        ch = rng.uniform(min_scale, 1 - 2 * inner) * h
        cw = rng.uniform(min_scale, 1 - 2 * inner) * w
        top = rng.uniform(lo_y, h - lo_y - ch)
        left = rng.uniform(lo_x, w - lo_x - cw)
        boxes.append([top, left, ch, cw])
        flips.append(bool(rng.integers(2)))
    return make_batch(ids, boxes, flips, sizes)


MODS = ["rgb", "depth", "semseg"]
SIZES = [(300, 400), (480, 360), (224, 224), (375, 500), (200, 640), (512, 512)]
IDS = [f"img_{i:03d}" for i in range(len(SIZES))]


@pytest.fixture
def cache(tmp_path):
    return AttentionCache.create(tmp_path / "cache", IDS + ["never_written"], MODS, grid=16,
                                 dtype="float32", normalize=False)


def test_lookup_is_exact_for_a_linear_pattern(cache):
    # A 16 x 16 full-image pass puts token centres on the cell centres: the written map is f exactly.
    grids = dict.fromkeys(MODS, (16, 16))
    full = full_batch(IDS, SIZES)
    assert cache.update(full, scores_for(linear, full, grids), epoch=0, token_grids=grids) == len(IDS)
    # Bilinear interpolation is exact for a linear f away from the border (inner margin >= 1 cell).
    rng = np.random.default_rng(0)
    grids = {"rgb": (14, 14), "depth": (7, 10), "semseg": (5, 3)}
    for _ in range(3):
        batch = random_crops(rng, IDS, SIZES, inner=1 / 16)
        got, valid = cache.lookup(batch, grids, epoch=0)
        assert valid.all()
        want = scores_for(linear, batch, grids)
        for m in grids:
            assert got[m].shape == (len(IDS), grids[m][0] * grids[m][1])
            torch.testing.assert_close(got[m], want[m], atol=1e-5, rtol=0)


def test_crop_of_cached_map_equals_map_of_crop(tmp_path):
    cache = AttentionCache.create(tmp_path / "c", IDS, MODS, grid=32, dtype="float16", normalize=False)
    grids = dict.fromkeys(MODS, (14, 14))
    full = full_batch(IDS, SIZES)  # a full-image scoring pass at 224 px: 14 x 14 tokens
    cache.update(full, scores_for(blob, full, grids), epoch=0)
    rng = np.random.default_rng(1)
    batch = random_crops(rng, IDS, SIZES)
    got, valid = cache.lookup(batch, {"rgb": (14, 14), "depth": (14, 20)}, epoch=0)
    assert valid.all()
    want = scores_for(blob, batch, {"rgb": (14, 14), "depth": (14, 20)})
    # Two bilinear resamplings of a bump with sigma 0.18: |f''| <= 1/sigma^2 ~ 31, cell 1/14,
    # error <= 2 * |f''| h^2 / 8 ~ 0.04 in the interior, plus border clamping; f16 adds ~1e-3.
    err = max(float((got[m] - want[m]).abs().max()) for m in got)
    assert err < 0.06, err
    # The AMT-style reuse (ignore the crop, resize the full-image map) is far off: the test can fail.
    wrong = torch.nn.functional.interpolate(
        scores_for(blob, full, grids)["rgb"].reshape(-1, 1, 14, 14), size=(14, 14)).flatten(1)
    assert float((wrong - want["rgb"]).abs().max()) > 0.3


def test_flip_mirrors_the_lookup(cache):
    grids = dict.fromkeys(MODS, (16, 16))
    full = full_batch(IDS, SIZES)
    cache.update(full, scores_for(blob, full, grids), epoch=0)
    batch = random_crops(np.random.default_rng(2), IDS, SIZES)
    flipped = dict(batch, flip=~batch["flip"])
    a, _ = cache.lookup(batch, {"rgb": (6, 9)}, 0)
    b, _ = cache.lookup(flipped, {"rgb": (6, 9)}, 0)
    torch.testing.assert_close(a["rgb"].reshape(-1, 6, 9).flip(-1), b["rgb"].reshape(-1, 6, 9))


def test_update_from_a_crop_pass_covers_that_crop_only(tmp_path):
    cache = AttentionCache.create(tmp_path / "c", IDS, MODS, grid=32, normalize=False, dtype="float32")
    grids = dict.fromkeys(MODS, (14, 14))
    rng = np.random.default_rng(3)
    crop = random_crops(rng, IDS, SIZES, inner=0.15, min_scale=0.4)
    cache.update(crop, scores_for(blob, crop, grids), epoch=5)
    # Read back the same crop: valid and close to the pass that wrote it.
    got, valid = cache.lookup(crop, grids, epoch=5)
    assert valid.all()
    want = scores_for(blob, crop, grids)
    assert max(float((got[m] - want[m]).abs().max()) for m in MODS) < 0.06
    # A sub-crop (with the opposite flip) is covered too; the full image is not.
    box = crop["crop_box"].clone()
    sub = dict(crop, crop_box=torch.stack([box[:, 0] + box[:, 2] / 4, box[:, 1] + box[:, 3] / 3,
                                           box[:, 2] / 2, box[:, 3] / 2], 1), flip=~crop["flip"])
    got, valid = cache.lookup(sub, {"rgb": (10, 7)}, epoch=5)
    assert valid.all()
    want = scores_for(blob, sub, {"rgb": (10, 7)})
    assert float((got["rgb"] - want["rgb"]).abs().max()) < 0.06
    _, valid = cache.lookup(full_batch(IDS, SIZES), grids, epoch=5)
    assert not valid.any()


def test_stale_and_missing_entries(tmp_path):
    path = tmp_path / "c"
    AttentionCache.create(path, IDS, MODS, grid=8)
    grids = dict.fromkeys(MODS, (8, 8))
    full = full_batch(IDS[:2], SIZES[:2])
    scores = scores_for(blob, full, grids)

    periodic = AttentionCache(path, refresh_every=3)
    periodic.update(full, scores, epoch=4)
    assert periodic.lookup(full, grids, 4)[1].all() and periodic.lookup(full, grids, 5)[1].all()
    assert not periodic.lookup(full, grids, 6)[1].any()  # new refresh period
    aged = AttentionCache(path, max_age=2)
    assert aged.lookup(full, grids, 5)[1].all() and not aged.lookup(full, grids, 6)[1].any()
    # Never written, and ids the cache does not know, are invalid; their rows are zeros.
    other = make_batch([IDS[2], "unknown"], [[0, 0, 10, 10]] * 2, [False, True], [[20, 20]] * 2)
    got, valid = aged.lookup(other, grids, 4)
    assert not valid.any() and all(float(v.abs().sum()) == 0 for v in got.values())
    assert aged.update(other, scores_for(blob, other, grids), epoch=4) == 1  # the unknown id is skipped
    assert aged.stats["unknown_ids"] == 2
    stamps = np.load(path / "stamps.npy")
    # Crop 10 x 10 of a 20 x 20 source, G = 8 (2.5-px cells): cells whose centre is within one
    # cell of the crop are written (centres 1.25 ... 11.25 px), the rest stay missing.
    assert (stamps[2, :5, :5] == 4).all() and (stamps[2, 5:] == MISSING).all()
    assert (stamps[2, :, 5:] == MISSING).all() and (stamps[3:] == MISSING).all()


def test_normalize_makes_writes_scale_free(tmp_path):
    cache = AttentionCache.create(tmp_path / "c", IDS, MODS, grid=14, normalize=True)
    grids = dict.fromkeys(MODS, (14, 14))
    full = full_batch(IDS, SIZES)
    s = scores_for(blob, full, grids)
    cache.update(full, {m: 1e-3 * v for m, v in s.items()}, epoch=0)
    a, _ = cache.lookup(full, grids, 0)
    cache.update(full, {m: 7.0 * v for m, v in s.items()}, epoch=0)
    b, _ = cache.lookup(full, grids, 0)
    torch.testing.assert_close(a["rgb"], b["rgb"], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(a["rgb"].mean(1), torch.ones(len(IDS)), atol=1e-2, rtol=0)


def test_fill_scores_only_the_invalid_samples(cache):
    grids = dict.fromkeys(MODS, (16, 16))
    full = full_batch(IDS, SIZES)
    everything = scores_for(linear, full, grids)
    cache.update(full_batch(IDS[:3], SIZES[:3]), {m: v[:3] for m, v in everything.items()}, epoch=0)
    scores, valid = cache.lookup(full, grids, 0)
    assert valid.tolist() == [True] * 3 + [False] * 3
    asked = []

    def score_fn(index):
        asked.append(index.tolist())
        return {m: v[index] for m, v in everything.items()}

    out = cache.fill(full, scores, valid, score_fn, epoch=0)
    assert asked == [[3, 4, 5]]
    for m in MODS:
        torch.testing.assert_close(out[m], everything[m], atol=1e-5, rtol=0)
    assert cache.lookup(full, grids, 0)[1].all()  # written back


def _write_rows(path, ids, sizes):
    cache = AttentionCache(path)
    full = full_batch(ids, sizes)
    cache.update(full, scores_for(linear, full, dict.fromkeys(MODS, (8, 8))), epoch=1)
    cache.flush()


def test_processes_write_their_own_rows(tmp_path):
    path = tmp_path / "c"
    cache = AttentionCache.create(path, IDS, MODS, grid=8, dtype="float32", normalize=False)
    cache.lookup(full_batch(IDS, SIZES), {"rgb": (8, 8)}, 1)  # parent maps the files before forking
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_write_rows, args=(path, IDS[r::2], SIZES[r::2])) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    got, valid = cache.lookup(full_batch(IDS, SIZES), {"rgb": (8, 8)}, 1)
    assert valid.all()
    want = scores_for(linear, full_batch(IDS, SIZES), {"rgb": (8, 8)})["rgb"]
    torch.testing.assert_close(got["rgb"], want, atol=1e-5, rtol=0)


def test_clear_errors(tmp_path, cache):
    with pytest.raises(FileExistsError):
        AttentionCache.create(cache.path, IDS, MODS)
    with pytest.raises(FileNotFoundError, match="no attention cache"):
        AttentionCache(tmp_path / "nowhere")
    full = full_batch(IDS, SIZES)
    with pytest.raises(KeyError, match="crop_box"):
        cache.lookup({k: v for k, v in full.items() if k != "crop_box"}, {"rgb": (4, 4)}, 0)
    with pytest.raises(KeyError, match="normals"):
        cache.lookup(full, {"normals": (4, 4)}, 0)
    with pytest.raises(KeyError, match="semseg"):
        cache.update(full, {"rgb": torch.ones(6, 16), "depth": torch.ones(6, 16)}, 0)
    with pytest.raises(ValueError, match="not a"):
        cache.update(full, {m: torch.ones(6, 15) for m in MODS}, 0)
    with pytest.raises(ValueError, match="duplicates"):
        AttentionCache.create(tmp_path / "d", ["a", "a"], MODS)


def test_crop_affine_maps_corners():
    batch = make_batch(["a", "b"], [[10, 20, 100, 50], [0, 0, 200, 400]], [False, True],
                       [[200, 400], [200, 400]])
    theta = crop_affine(batch)
    corners = torch.tensor([[-1.0, -1.0, 1.0], [1.0, 1.0, 1.0]])  # (x, y, 1) of crop corners
    src = torch.einsum("bij,kj->bki", theta, corners)
    # Sample a: top-left of the crop at source (x=20, y=10), bottom-right at (70, 110).
    torch.testing.assert_close(src[0], torch.tensor([[20 / 200 - 1, 10 / 100 - 1], [70 / 200 - 1, 110 / 100 - 1]]))
    # Sample b is flipped: the crop's left edge is the source's right edge.
    torch.testing.assert_close(src[1], torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))


class _PatternModel(torch.nn.Module):
    """Stands in for MultiMAE: ``attention_scores`` returns the blob pattern of each crop."""

    def __init__(self, batch_geometry, hw):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.geometry, self.hw = batch_geometry, hw

    def attention_scores(self, inputs, layer=-1):
        assert set(inputs) == set(MODS) and layer == -1
        return scores_for(blob, self.geometry, dict.fromkeys(MODS, self.hw))


def test_refresh_from_full_image_batches_fills_every_map(tmp_path):
    cache = AttentionCache.create(tmp_path / "c", IDS, MODS, grid=16, refresh_every=10)
    full = full_batch(IDS, SIZES)
    full.update({m: torch.zeros(len(IDS), 1) for m in MODS})
    model = _PatternModel(full, (14, 14))
    from multimae_att.scoring.cache import refresh_cache

    assert refresh_cache(cache, model, [full], epoch=20, layer=-1) == len(IDS)
    crops = random_crops(np.random.default_rng(5), IDS, SIZES)
    got, valid = cache.lookup(crops, {"rgb": (14, 14)}, epoch=21)
    assert valid.all()
    want = scores_for(blob, crops, {"rgb": (14, 14)})["rgb"]
    # normalize=True: compare the shapes of the maps (each crop's map over its mean).
    ratio = got["rgb"] / want
    assert float((ratio / ratio.mean(1, keepdim=True) - 1).abs().max()) < 0.15
    assert not cache.lookup(crops, {"rgb": (14, 14)}, epoch=30)[1].any()  # next refresh period
