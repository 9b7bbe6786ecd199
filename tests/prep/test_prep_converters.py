"""data_prep/prepare_ade20k.py and data_prep/imagenet_to_shards.py on tiny fake trees."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from multimae_att.data import DEPTH_SCALE, build_dataset
from multimae_att.pretrain.pictures import read_semseg_class_names

from helpers.prep import load_prep
from helpers.prep import write_tar as _tar


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _jpg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 28, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_ade20k_pairs_by_stem_and_keeps_labels(tmp_path, capsys):
    root = tmp_path / "ADEChallengeData2016"
    rng = np.random.default_rng(0)
    labels = {}
    for _split, folder in (("train", "training"), ("val", "validation")):
        (root / "images" / folder).mkdir(parents=True)
        (root / "annotations" / folder).mkdir(parents=True)
        for i in range(3):
            stem = f"ADE_{folder}_{i:08d}"
            (root / "images" / folder / f"{stem}.jpg").write_bytes(_jpg(i))
            labels[stem] = rng.integers(0, 151, (20, 28)).astype(np.uint8)
            (root / "annotations" / folder / f"{stem}.png").write_bytes(_png(labels[stem]))
    (root / "images/training/ADE_training_orphan.jpg").write_bytes(_jpg(9))
    load_prep("prepare_ade20k").main(["--root", str(root), "--out", str(tmp_path / "out")])
    assert "1 stems have no semseg file" in capsys.readouterr().out
    out = tmp_path / "out"
    assert sorted(p.stem for p in (out / "train/rgb/data").iterdir()) == [f"ADE_training_{i:08d}" for i in range(3)]
    for layout in ("folder", "shards"):
        ds = build_dataset(out, ["rgb", "semseg"], split="val", layout=layout, image_size=(20, 28), train=False,
                           eval_full_image=True, semseg_scale=1, reduce_zero_label=True)
        samples = list(ds) if layout == "shards" else [ds[i] for i in range(len(ds))]
        assert len(samples) == 3
        for s in samples:
            raw = torch.from_numpy(labels[s["sample_id"]]).long()
            assert torch.equal(s["semseg"], torch.where(raw == 0, 255, raw - 1))


def test_imagenet_to_shards_pairs_folders_and_tars(tmp_path, capsys):
    inet, pseudo = tmp_path / "imagenet", tmp_path / "pseudo"
    depths = {}
    for wnid in ("n01", "n02"):
        (inet / "train" / wnid).mkdir(parents=True)
        for i in range(3):
            stem = f"{wnid}_{i}"
            (inet / "train" / wnid / f"{stem}.JPEG").write_bytes(_jpg(i))
            depths[stem] = np.full((20, 28), 1000 * i + 12345, np.uint16)
    # n01: extracted folders; n02: per-class tars (one semseg label missing).
    for m in ("depth", "semseg"):
        (pseudo / m / "n01").mkdir(parents=True)
        for i in range(3):
            data = _png(depths[f"n01_{i}"]) if m == "depth" else _png(np.full((20, 28), 5, np.uint8))
            (pseudo / m / "n01" / f"n01_{i}.png").write_bytes(data)
    _tar(pseudo / "depth/n02.tar", {f"n02/n02_{i}.png": _png(depths[f"n02_{i}"]) for i in range(3)})
    _tar(pseudo / "semseg/n02.tar", {f"n02/n02_{i}.png": _png(np.full((20, 28), 7, np.uint8)) for i in (0, 2)})
    load_prep("imagenet_to_shards").main(["--imagenet", str(inet), "--pseudo-labels", str(pseudo),
                                        "--out", str(tmp_path / "out"), "--shard-size", "2"])
    assert "1 stems have no semseg file, e.g. ['n02_1']" in capsys.readouterr().out
    assert (tmp_path / "out/classes.txt").read_text().split() == ["n01", "n02"]
    names = read_semseg_class_names(tmp_path / "out")        # what the training pictures show
    assert len(names) == 133 and (names[0], names[79], names[80], names[132]) == (
        "person", "toothbrush", "banner", "rug-merged")
    ds = build_dataset(tmp_path / "out", ["rgb", "depth", "semseg", "cls"], layout="shards", image_size=(20, 28),
                       train=False, eval_full_image=True, semseg_scale=1)
    samples = {s["sample_id"]: s for s in ds}
    assert sorted(samples) == ["n01_0", "n01_1", "n01_2", "n02_0", "n02_2"]
    for stem, s in samples.items():
        assert int(s["cls"]) == (0 if stem.startswith("n01") else 1)
        assert torch.equal(s["depth"][0] * DEPTH_SCALE, torch.from_numpy(depths[stem].astype(np.float32)))
        assert int(s["semseg"].unique()) == (5 if stem.startswith("n01") else 7)


def test_imagenet_missing_pseudo_labels_is_an_error(tmp_path):
    (tmp_path / "inet/train/n01").mkdir(parents=True)
    (tmp_path / "inet/train/n01/a.JPEG").write_bytes(_jpg(0))
    with pytest.raises(FileNotFoundError, match="depth"):
        load_prep("imagenet_to_shards").main(["--imagenet", str(tmp_path / "inet"), "--pseudo-labels",
                                            str(tmp_path / "none"), "--out", str(tmp_path / "out")])
