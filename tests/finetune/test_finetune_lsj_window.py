"""LSJ resamples only the crop window (``protocols.resized_crop``); brute-force references kept here:
the whole image resized, padded and cropped, and the LSJ recipe as it was written before the
window. Labels, depth, validity and padding must match exactly; RGB within 1 grey level (torch's
bilinear kernel fuses some multiply-adds, so a value within a float32 bit of a half may round the
other way), on a small share of the values."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from multimae_att.finetune import protocols as P

MAX_RGB_DIFF = 1.0          # grey levels
MAX_RGB_DIFF_SHARE = 1e-3   # of the RGB values compared (measured: ~4e-5)


def full_resized_crop(planes, size, top, left, target):
    """Reference: resize everything, pad bottom/right, crop (what LSJ did before the window)."""
    return P.crop(P.pad_to(P.resize_planes(planes, size), target), top, left, target, target)


def old_lsj(planes, size, rng):
    """The LSJ recipe before the window: the whole rescaled image is resampled, then cropped."""
    if rng.random() < 0.5:
        planes = P.hflip(planes)
    planes = P.resize_planes(planes, P.side_resize_size(P.plane_size(planes), size, longest=True))
    planes = P._maybe_jitter(planes, P.SEMSEG_JITTER, rng)
    s = rng.uniform(*P.LSJ_SCALE)
    h, w = P.plane_size(planes)
    planes = P.resize_planes(planes, (max(int(h * s), 1), max(int(w * s), 1)))
    return P.random_crop(P.pad_to(planes, size), size, rng)


def _planes(h, w, rng):
    return {"rgb": torch.from_numpy(rng.integers(0, 256, (3, h, w)).astype(np.float32)),
            "semseg": torch.from_numpy(rng.integers(0, 150, (1, h, w)).astype(np.uint8)),
            "depth": torch.from_numpy(rng.integers(1, 65536, (1, h, w)).astype(np.int32)),
            "mask_valid": torch.from_numpy((rng.random((1, h, w)) > 0.3).astype(np.uint8)),
            "padding": torch.zeros((1, h, w), dtype=torch.bool)}


class RgbDiff:
    """Running max and count of RGB differences over many comparisons."""

    def __init__(self):
        self.max, self.differ, self.total = 0.0, 0, 0

    def add(self, a, b):
        d = (a - b).abs()
        self.max = max(self.max, float(d.max()))
        self.differ += int((d > 0).sum())
        self.total += d.numel()

    def check(self):
        assert self.max <= MAX_RGB_DIFF, self.max
        assert self.differ <= MAX_RGB_DIFF_SHARE * self.total, (self.differ, self.total)


def _assert_same_except_rgb(new, ref, where, diff):
    assert new.keys() == ref.keys(), where
    for m in ref:
        assert new[m].dtype == ref[m].dtype and new[m].shape == ref[m].shape, (m, where)
        if m == "rgb":
            diff.add(new[m], ref[m])
        else:
            assert torch.equal(new[m], ref[m]), (m, where)


def _cases(rng, n):
    """(h, w, scaled size, top, left, target): odd and even sizes, s in LSJ's range plus the
    corners (identity size, 1-px images, crops far past the image), offsets as RandomCrop's."""
    for i in range(n):
        h, w = (int(v) for v in rng.integers(1, 72, 2))
        target = int(rng.integers(3, 49))
        s = [rng.uniform(*P.LSJ_SCALE), 1.0, 2.0, 0.1][i % 8] if i % 8 < 4 else rng.uniform(1.0, 2.0)
        size = (max(int(h * s), 1), max(int(w * s), 1))
        top = int((max(size[0], target) - target) * rng.random())
        left = int((max(size[1], target) - target) * rng.random())
        yield h, w, size, top, left, target


def test_resized_crop_matches_resize_pad_crop():
    """Seeded random sizes, scales and crops, flipped or not: labels, depth, validity and padding
    bit-exact, the padding filled as pad_to fills it (RGB 128, labels/depth 0, padding True)."""
    rng = np.random.default_rng(0)
    diff, padded = RgbDiff(), 0
    for h, w, size, top, left, target in _cases(rng, 120):
        planes = _planes(h, w, rng)
        if rng.random() < 0.5:
            planes = P.hflip(planes)
        ref = full_resized_crop(planes, size, top, left, target)
        new = P.resized_crop(planes, size, top, left, target)
        _assert_same_except_rgb(new, ref, (h, w, size, top, left, target), diff)
        padded += bool(ref["padding"].any())
    diff.check()
    assert 20 < padded < 100   # both kinds of crop were exercised


def test_bilinear_window_matches_whole_resize_for_any_window():
    """The RGB window path on its own (resized_crop uses torch's kernel when the window holds
    most of the image): arbitrary windows of up- and downscales, odd sizes, 1-px sides."""
    rng = np.random.default_rng(1)
    diff = RgbDiff()
    for _ in range(120):
        h, w = (int(v) for v in rng.integers(1, 60, 2))
        size = tuple(int(v) for v in rng.integers(1, 120, 2))
        top, left = (int(rng.integers(0, n)) for n in size)
        height, width = (int(rng.integers(1, n - o + 1)) for n, o in zip(size, (top, left)))
        x = torch.from_numpy(rng.integers(0, 256, (3, h, w)).astype(np.float32))
        new = P.resize_window(x, size, top, left, height, width, bilinear=True)
        ref = P.resize(x, size, bilinear=True)[:, top:top + height, left:left + width]
        assert new.shape == ref.shape
        diff.add(new, ref)
        labels = torch.from_numpy(rng.integers(0, 255, (1, h, w)).astype(np.uint8))
        assert torch.equal(P.resize_window(labels, size, top, left, height, width, bilinear=False),
                           P.resize(labels, size, bilinear=False)[:, top:top + height, left:left + width])
    diff.check()
    assert diff.max <= 1


def test_bilinear_taps_are_torchs_weights():
    """The taps and weights equal the ones torch's kernel applies (read off by resizing one-hot
    rows), for up- and downscales and the same-size shortcut."""
    rng = np.random.default_rng(2)
    for n_in, n_out in [(5, 5), (1, 7), (7, 1), (3, 8), (8, 3)] + [tuple(rng.integers(1, 90, 2)) for _ in range(20)]:
        n_in, n_out = int(n_in), int(n_out)
        eye = torch.eye(n_in).reshape(n_in, 1, 1, n_in)
        kernel = F.interpolate(eye, size=(1, n_out), mode="bilinear", align_corners=False)[:, 0, 0].T
        i0, i1, w0, w1 = P.bilinear_taps(n_in, n_out, 0, n_out)
        ours = torch.zeros(n_out, n_in)
        ours[torch.arange(n_out), i0] += w0
        ours[torch.arange(n_out), i1] += w1
        assert float((ours - kernel).abs().max()) <= 1e-6, (n_in, n_out)   # ~ a float32 bit
        start = int(rng.integers(0, n_out))
        assert all(torch.equal(a[start:], b) for a, b in
                   zip((i0, i1, w0, w1), P.bilinear_taps(n_in, n_out, start, n_out)))


def test_lsj_recipe_matches_the_whole_image_recipe():
    """The recipe end to end (flips, colour jitter, scale, crop) against the old one on the same
    draws: every modality but RGB bit-exact, RGB within the bound."""
    rng = np.random.default_rng(3)
    diff = RgbDiff()
    for i in range(32):
        h, w = (int(v) for v in rng.integers(9, 64, 2))
        images = {"rgb": Image.fromarray(rng.integers(0, 256, (h, w, 3)).astype(np.uint8)),
                  "depth": Image.fromarray(rng.integers(1, 65536, (h, w)).astype(np.uint16)),
                  "semseg": Image.fromarray(rng.integers(0, 150, (h, w)).astype(np.uint8)),
                  "mask_valid": Image.fromarray(((rng.random((h, w)) > 0.3) * 255).astype(np.uint8))}
        size = int(rng.integers(8, 40))
        new = P.RECIPES["lsj"](P.to_planes(images), size, P.sample_rng(5, 0, f"s{i}"))
        ref = old_lsj(P.to_planes(images), size, P.sample_rng(5, 0, f"s{i}"))
        _assert_same_except_rgb(new, ref, (i, h, w, size), diff)
    diff.check()


def test_resized_crop_refuses_a_crop_outside_the_padded_image():
    planes = _planes(10, 10, np.random.default_rng(4))
    with pytest.raises(ValueError, match="does not start inside"):
        P.resized_crop(planes, (6, 6), 1, 0, 8)      # a short image is padded, so top must be 0
    with pytest.raises(ValueError, match="does not start inside"):
        P.resized_crop(planes, (12, 12), 0, 5, 8)    # 5 + 8 > 12
