"""data_prep/prepare_nyuv2.py on synthetic .mat files with NYU's key names and MATLAB axis order."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from multimae_att.data import DEPTH_SCALE, build_dataset

from helpers import REPO
from helpers.prep import load_prep


def _write_inputs(tmp: Path, n: int, h: int, w: int, train: list[int], test: list[int]):
    """Fake NYU files. Returns the HWC ground truth: rgb, depth (m), raw depth, labels (894)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([np.stack([xx % 256, yy % 256, np.full_like(xx, 10 * i)], -1) for i in range(n)]).astype(np.uint8)
    depth = np.stack([(yy * w + xx) * 1e-3 + i for i in range(n)]).astype(np.float32)
    raw = np.where(rng.random((n, h, w)) < 0.2, 0.0, depth).astype(np.float32)
    labels = rng.integers(0, 895, (n, h, w)).astype(np.uint16)
    with h5py.File(tmp / "nyu.mat", "w") as f:  # MATLAB v7.3 layout: transposed axes
        f["images"] = rgb.transpose(0, 3, 2, 1)      # [N, 3, W, H]
        f["depths"] = depth.transpose(0, 2, 1)       # [N, W, H]
        f["rawDepths"] = raw.transpose(0, 2, 1)
        f["labels"] = labels.transpose(0, 2, 1)
    scipy.io.savemat(tmp / "splits.mat", {"trainNdxs": np.array(train, float)[:, None] + 1,
                                          "testNdxs": np.array(test, float)[:, None] + 1})
    mapping = rng.integers(1, 41, (1, 894)).astype(float)
    scipy.io.savemat(tmp / "map.mat", {"mapClass": mapping})
    return rgb, depth, raw, labels, np.concatenate([[0], mapping.ravel()]).astype(np.uint8)


def _args(tmp: Path, *extra: str) -> list[str]:
    return ["--mat", str(tmp / "nyu.mat"), "--splits", str(tmp / "splits.mat"),
            "--mapping", str(tmp / "map.mat"), "--out", str(tmp / "out"), *extra]


def _run(tmp: Path, *extra: str) -> None:
    """In-process (a subprocess would re-import torch); the command line is tested once below."""
    load_prep("prepare_nyuv2").main(_args(tmp, *extra))


def test_orientation_values_and_layouts(tmp_path):
    rgb, depth, raw, labels, lut = _write_inputs(tmp_path, 5, 12, 20, train=[0, 2, 3], test=[1, 4])
    _run(tmp_path)
    out = tmp_path / "out"
    assert sorted(p.stem for p in (out / "train/rgb/data").iterdir()) == ["0000", "0002", "0003"]
    assert sorted(p.stem for p in (out / "test/depth/data").iterdir()) == ["0001", "0004"]
    for split, i in (("train", 2), ("test", 4)):
        read = {m: np.array(Image.open(out / split / m / "data" / f"{i:04d}.png"))
                for m in ("rgb", "depth", "semseg", "mask_valid")}
        assert read["rgb"].shape == (12, 20, 3) and np.array_equal(read["rgb"], rgb[i])
        assert read["depth"].dtype == np.uint16
        assert np.array_equal(read["depth"], np.round(depth[i] * 1000).astype(np.uint16))  # millimetres
        assert np.array_equal(read["semseg"], lut[labels[i]]) and read["semseg"].max() <= 40
        assert np.array_equal(read["mask_valid"] > 0, raw[i] > 0)
    # The shards hold the same samples; the loader reads them (mask_valid as bool).
    for layout in ("folder", "shards"):
        ds = build_dataset(out, ["rgb", "depth", "semseg", "mask_valid"], split="test", layout=layout,
                           image_size=(12, 20), train=False, eval_full_image=True, semseg_scale=1)
        samples = {s["sample_id"]: s for s in (ds if layout == "shards" else [ds[0], ds[1]])}
        assert sorted(samples) == ["0001", "0004"]
        s = samples["0004"]
        assert torch.equal(s["depth"][0] * DEPTH_SCALE, torch.from_numpy(np.round(depth[4] * 1000)).float())
        assert torch.equal(s["mask_valid"][0], torch.from_numpy(raw[4] > 0))
        assert torch.equal(s["semseg"], torch.from_numpy(lut[labels[4]]).long())


def test_nyu_sized_input_gives_480_rows_640_columns(tmp_path):
    _write_inputs(tmp_path, 1, 480, 640, train=[0], test=[])
    subprocess.run([sys.executable, str(REPO / "data_prep/prepare_nyuv2.py"), *_args(tmp_path, "--format", "folder")],
                   check=True, capture_output=True)
    for m in ("rgb", "depth", "semseg", "mask_valid"):
        assert Image.open(tmp_path / "out/train" / m / "data/0000.png").size == (640, 480)  # (W, H)


def test_bad_mapping_is_reported(tmp_path):
    _write_inputs(tmp_path, 2, 4, 6, train=[0], test=[1])
    scipy.io.savemat(tmp_path / "map.mat", {"wrongKey": np.ones((1, 894))})
    with pytest.raises(KeyError, match="mapClass"):
        _run(tmp_path)
