"""data_prep/export_attention_maps.py: one map per sample, read back by the loader equal to the
model's full-image attention scores (brute-force reference), folders and shards; AttG pretraining
with ``loss.attg.source=data`` runs on the exported maps."""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from multimae_att.checkpoint import export_weights
from multimae_att.data import build_loader, robust_standardize_depth
from multimae_att.model import create_pretrain_model

from helpers import REPO

SCRIPT = REPO / "data_prep" / "export_attention_maps.py"
MODS = ["rgb", "depth", "semseg"]
SIZE = 64          # source and model resolution: a 4 x 4 token grid with 16-px patches
STEP = 1 / 65535   # 16-bit quantisation of the stored map


def _run(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *argv], check=True, capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Synthetic data (folders + shards), a tiny model and its export."""
    tmp = tmp_path_factory.mktemp("attmaps")
    _run(str(REPO / "data_prep" / "make_synthetic.py"), "--out", str(tmp / "data"), "--num-train", "8",
         "--num-val", "4", "--size", str(SIZE), "--format", "both")
    torch.manual_seed(1)
    model = create_pretrain_model("tiny", image_size=SIZE, semseg_num_classes=10).eval()
    export_weights(model, tmp / "ck.pth")
    return tmp, model


def reference_maps(model, root, layout: str) -> dict[str, torch.Tensor]:
    """sample id -> [4, 4] map: mean over modalities of attention_scores on the full image,
    min-max normalised, token i at (row i // 4, col i % 4) — computed here, not by the script."""
    loader = build_loader(root, MODS, batch_size=3, split="train", image_size=SIZE, train=False,
                          eval_full_image=True, drop_last=False, layout=layout, att_map_stride=16)
    loader.set_epoch(0)
    out = {}
    with torch.no_grad():
        for batch in loader:
            x = {"rgb": batch["rgb"], "depth": robust_standardize_depth(batch["depth"]),
                 "semseg": batch["semseg"]}
            scores = model.attention_scores(x, layer=-1, query="global")
            mean = sum(scores[m] for m in MODS) / len(MODS)                  # [B, 16]
            for sid, row in zip(batch["sample_id"], mean):
                grid = torch.zeros(4, 4)
                for i in range(16):                                          # brute force, no reshape
                    grid[i // 4, i % 4] = row[i]
                out[sid] = (grid - grid.min()) / (grid.max() - grid.min())
    return out


def delivered_maps(root, layout: str, train: bool = False, image_size: int = SIZE) -> dict[str, torch.Tensor]:
    loader = build_loader(root, MODS + ["att_map"], batch_size=3, split="train", image_size=image_size,
                          train=train, eval_full_image=not train, drop_last=False, layout=layout,
                          att_map_stride=16)
    loader.set_epoch(0)
    return {sid: m for batch in loader for sid, m in zip(batch["sample_id"], batch["att_map"])}


def check_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want) and len(got) == 8               # one map per sample id
    for sid, ref in want.items():
        assert got[sid].shape == (4, 4)
        assert torch.allclose(got[sid], ref, atol=STEP, rtol=0), sid
    # The comparison can fail: transposed maps or maps of another sample are far off.
    ids = sorted(want)
    assert any((got[s] - want[s].T).abs().max() > 0.05 for s in ids)
    assert any((got[a] - want[b]).abs().max() > 0.05 for a, b in zip(ids, ids[1:] + ids[:1]))


def test_folder_maps_equal_attention_scores(setup):
    tmp, model = setup
    root = tmp / "data"
    out = _run(str(SCRIPT), "--data", str(root), "--checkpoint", str(tmp / "ck.pth"),
               "--image-size", str(SIZE), "--batch-size", "3", "--format", "folder")
    assert "wrote 8 attention maps" in out.stdout
    files = sorted((root / "train" / "att_map").glob("*/*.png"))
    assert len(files) == 8
    for f in files:   # same class folder as the rgb file of that stem (pairing by stem)
        assert (root / "train" / "rgb" / f.parent.name / f.name).is_file()
    check_equal(delivered_maps(root, "folder"), reference_maps(model, root, "folder"))
    # Training loads crop/flip the map with the sample: every sample still gets one, in [0, 1].
    train = delivered_maps(root, "folder", train=True, image_size=96)
    assert len(train) == 8 and all(m.shape == (6, 6) and 0 <= m.min() <= m.max() <= 1 for m in train.values())


def test_shard_maps_equal_attention_scores(setup):
    tmp, model = setup
    out = tmp / "with_maps"
    _run(str(SCRIPT), "--data", str(tmp / "data"), "--checkpoint", str(tmp / "ck.pth"),
         "--image-size", str(SIZE), "--format", "shards", "--out", str(out), "--model-size", "tiny")
    assert (out / "shards" / "train.json").is_file() and (out / "shards" / "train.keys.txt").is_file()
    want = reference_maps(model, tmp / "data", "shards")
    check_equal(delivered_maps(out, "shards"), want)
    # A re-run in place (default --out = the data) replaces the maps instead of adding copies.
    _run(str(SCRIPT), "--data", str(out), "--checkpoint", str(tmp / "ck.pth"), "--image-size", str(SIZE))
    names = []
    for path in (out / "shards").glob("*.tar"):
        with tarfile.open(path) as tar:
            names += tar.getnames()
    assert sum(n.endswith(".att_map.png") for n in names) == 8
    check_equal(delivered_maps(out, "shards"), want)


def test_pretrain_runs_on_exported_maps(setup, tmp_path):
    tmp, _ = setup
    root = tmp / "data"
    if not (root / "train" / "att_map").is_dir():   # the folder test normally wrote them already
        _run(str(SCRIPT), "--data", str(root), "--checkpoint", str(tmp / "ck.pth"), "--image-size", str(SIZE))
    run = tmp_path / "run"
    _run(str(REPO / "run_pretrain.py"), "--config", str(REPO / "configs" / "pretrain" / "demo.yaml"),
         f"data.root={root}", "data.batch_size=4", "data.layout=folder", "loss.attg.enabled=true",
         "loss.attg.source=data", "train.max_steps=2", f"output_dir={run}", "log.progress=false",
         "log.pictures_every=0", "log.every=1")
    assert (run / "final.pth").is_file() and (run / "metrics.jsonl").is_file()
    # Our export stores its config: model options and the image size (96 -> 6 x 6 maps) come from it.
    _run(str(SCRIPT), "--data", str(root), "--checkpoint", str(run / "final.pth"), "--out", str(tmp_path / "m"))
    files = sorted((tmp_path / "m" / "train" / "att_map").glob("*/*.png"))
    assert len(files) == 8 and all(Image.open(f).size == (6, 6) and Image.open(f).mode.startswith("I;16")
                                   for f in files)


def test_tokencut_maps_from_our_and_timm_checkpoints(setup, tmp_path):
    """--method tokencut writes, per sample, the map of tokencut_map on the whole image (the
    normalized cut itself is checked against SciPy in test_tokencut); a timm-layout ViT file
    (RGB only) works with --modalities rgb."""
    import importlib.util

    tmp, model = setup
    spec = importlib.util.spec_from_file_location("export_attention_maps", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.infer_model_options({"global_tokens": torch.zeros(1, 1, 384)}, {})["size"] == "small"  # DINO ViT-S
    out = tmp_path / "tc"
    log = _run(str(SCRIPT), "--data", str(tmp / "data"), "--checkpoint", str(tmp / "ck.pth"), "--image-size",
               str(SIZE), "--method", "tokencut", "--tokencut-tau", "0.5", "--out", str(out))
    assert "wrote 8 tokencut maps" in log.stdout
    loader = build_loader(tmp / "data", MODS, batch_size=3, split="train", image_size=SIZE, train=False,
                          eval_full_image=True, drop_last=False, layout="folder")
    loader.set_epoch(0)
    for batch in loader:
        x = {"rgb": batch["rgb"], "depth": robust_standardize_depth(batch["depth"]), "semseg": batch["semseg"]}
        want = script.tokencut_map(model, x, (4, 4), tau=0.5)
        for sid, ref in zip(batch["sample_id"], want):
            (file,) = (out / "train" / "att_map").glob(f"*/{sid}.png")
            got = torch.from_numpy(np.array(Image.open(file), dtype=np.float32)) / 65535
            assert torch.allclose(got, ref, atol=STEP, rtol=0), sid
    # a timm ViT file (our tiny model's RGB adapter + encoder in timm layout), binary object masks
    export_weights(model, tmp_path / "vit.pth", "timm")
    _run(str(SCRIPT), "--data", str(tmp / "data"), "--checkpoint", str(tmp_path / "vit.pth"), "--image-size",
         str(SIZE), "--method", "tokencut", "--modalities", "rgb", "--model-size", "tiny",
         "--tokencut-map", "component", "--out", str(tmp_path / "timm"))
    files = sorted((tmp_path / "timm" / "train" / "att_map").glob("*/*.png"))
    assert len(files) == 8
    for f in files:
        values = set(np.unique(np.array(Image.open(f))).tolist())
        assert values <= {0, 65535} and 65535 in values        # a binary mask holding the seed
