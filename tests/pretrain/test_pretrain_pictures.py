"""Training pictures: titled panels per case (scores / thrown / semseg), the pixels of the mask
and reconstruction panels, files, and what a run draws and sends to the trackers."""
import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image

from multimae_att.pretrain import pictures
from multimae_att.pretrain.pictures import (
    PictureInfo,
    build_figure,
    read_semseg_class_names,
    render_modality,
    save_pictures,
    semseg_palette,
)

from helpers.pretrain import _fresh_accelerate_state, _importable_entry_point, data_root, run_cli, tiny_config

GRID, SIZE = (2, 2), (8, 8)
INFO = PictureInfo(strategy="amt", score_source="attention (test source)", class_names={0: "wall", 3: "cup"})


def _case(modality="depth", n=2, scores=True, thrown=True):
    g = torch.Generator().manual_seed(0)
    if modality == "semseg":
        x, pred = torch.randint(0, 5, (n, 2, 2), generator=g), torch.randn(n, 5, 2, 2, generator=g)
    else:
        c = 3 if modality == "rgb" else 1
        x, pred = torch.randn(n, c, *SIZE, generator=g), torch.randn(n, c, *SIZE, generator=g)
    hidden = torch.tensor([[True, False, False, False]]).repeat(n, 1)   # top-left hidden
    thr = torch.tensor([[False, True, False, False]]).repeat(n, 1) if thrown else None  # top-right thrown
    s = torch.rand(n, 4, generator=g) if scores else None
    return x, pred, hidden, thr, s


def _image_axes(fig):
    """The picture panels (not colour bars, not legend columns), row by row."""
    return [ax for ax in fig.axes if ax.get_title() and ax.get_label() != "<colorbar>"]


@pytest.mark.parametrize("modality", ["rgb", "depth", "semseg"])
@pytest.mark.parametrize("scores", [True, False])
@pytest.mark.parametrize("thrown", [True, False])
def test_panels_are_titled_per_case(modality, scores, thrown):
    x, pred, hidden, thr, s = _case(modality, scores=scores, thrown=thrown)
    fig = build_figure(modality, x, pred, hidden, thr, s, GRID, SIZE, step=42, info=INFO,
                       guided=torch.tensor([True, False]))
    panels = _image_axes(fig)
    per_row = 4 if scores else 3                                 # the score panel only with scores
    assert len(panels) == 2 * per_row
    heads = [ax.get_title().split("\n")[0] for ax in panels[:per_row]]
    assert heads == (["input", "scores", "mask", "reconstruction"] if scores
                     else ["input", "mask", "reconstruction"])
    mask_title = panels[heads.index("mask")].get_title()
    assert mask_title.endswith("2 visible · 1 hidden · 1 thrown" if thrown else "3 visible · 1 hidden")
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == (2 if scores else 0)
    assert all(bar.get_ylabel() == INFO.score_source for bar in bars)
    header = fig.get_suptitle()
    assert "step 42" in header and "strategy: amt" in header and f"modality: {modality}" in header
    legend = [t.get_text().split(":")[0] for t in fig.legends[0].get_texts()]
    assert legend == (["visible", "hidden", "thrown"] if thrown else ["visible", "hidden"])
    assert [ax.get_ylabel() for ax in panels[::per_row]] == ["sample 0\nmasked by the strategy",
                                                             "sample 1\nrandom mask"]
    class_legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    if modality == "semseg":
        names = {t.get_text() for t in class_legends[0].get_texts()}
        present = set(torch.cat([x[0].flatten(), pred[0].argmax(0).flatten()]).tolist())
        assert names == {INFO.class_names.get(c, f"class {c}") for c in present}
    else:
        assert class_legends == []


def test_mask_and_reconstruction_pixels_follow_the_masks():
    x, pred, hidden, thr, _ = _case("depth", n=1, scores=False)
    fig = build_figure("depth", x, pred, hidden, thr, None, GRID, SIZE, info=INFO)
    inp, mask, rec = (ax.images[0].get_array() for ax in _image_axes(fig))
    inp, mask, rec = (np.asarray(a, dtype=float)[..., :3] for a in (inp, mask, rec))
    assert np.allclose(mask[4:], inp[4:]) and np.allclose(rec[4:], inp[4:])       # visible: the input
    assert np.allclose(mask[:4, :4], mask[:4, :4, :1])                            # hidden: grey
    assert (mask[:4, :4].max() < inp[:4, :4].max(-1).max())                       # ... and dimmer
    pred_rgb = pictures._to_rgb("depth", pred[0], SIZE, (float(x.min()), float(x.max())))
    assert np.allclose(rec[:4, :4], pred_rgb[:4, :4])                             # hidden: the prediction
    red, white = np.asarray(pictures.THROWN_RGB), np.ones(3)
    for panel in (mask, rec):                                                     # thrown: red / white stripes
        block = panel[:4, 4:].reshape(-1, 3)
        is_red, is_white = np.all(np.isclose(block, red), 1), np.all(np.isclose(block, white), 1)
        assert np.all(is_red | is_white) and is_red.any() and is_white.any()


def test_semseg_palette_is_fixed_and_distinct():
    pal = semseg_palette()
    assert pal.shape == (256, 3) and np.array_equal(pal, semseg_palette())
    assert (np.abs(pal[1:] - pal[:-1]).sum(1) > 0.2).all()                        # neighbours differ


def test_save_pictures_writes_and_returns_one_picture_per_modality(tmp_path):
    B, size = 3, 16
    inputs = {"rgb": torch.randn(B, 3, size, size), "semseg": torch.randint(0, 5, (B, 4, 4))}
    preds = {"rgb": torch.randn(B, 3, size, size), "semseg": torch.randn(B, 5, 4, 4)}
    hidden = {m: torch.rand(B, 4) > 0.5 for m in inputs}
    out = save_pictures(tmp_path, 7, inputs, preds, hidden, None, None,
                        {"rgb": (2, 2), "semseg": (2, 2)}, num_samples=2, info=INFO)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000007_rgb.png", "step_00000007_semseg.png"]
    for m, img in out.items():
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"step_00000007_{m}.png")), img)
    assert render_modality("rgb", inputs["rgb"][:1], None, hidden["rgb"][:1], None, None, (2, 2),
                           (size, size)).shape[2] == 3                            # no decoder: still drawn


def test_semseg_class_names_from_the_dataset_folder(tmp_path):
    assert read_semseg_class_names(tmp_path) is None
    (tmp_path / "semseg_classes.json").write_text(json.dumps({"0": "wall", "2": "disk"}))
    assert read_semseg_class_names(tmp_path) == {0: "wall", 2: "disk"}
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "train.json").write_text("{}")
    assert read_semseg_class_names(tmp_path / "shards" / "train.json") == {0: "wall", 2: "disk"}
    (tmp_path / "semseg_classes.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="semseg_classes.json"):
        read_semseg_class_names(tmp_path)


@pytest.mark.parametrize("strategy", ["random", "high"])
def test_a_run_draws_score_panels_only_when_masks_came_from_scores(tmp_path, data_root, monkeypatch, strategy):
    seen = []
    draw = pictures.render_modality

    def spy(modality, inputs, preds, hidden, thrown, scores, grid, size, step=0, info=None, guided=None):
        seen.append((modality, scores is not None, info, None if guided is None else guided.tolist()))
        return draw(modality, inputs, preds, hidden, thrown, scores, grid, size, step, info, guided)

    monkeypatch.setattr(pictures, "render_modality", spy)
    cfg = tiny_config(tmp_path / "c.yaml", data_root, log={"pictures_every": 1}, train={"max_steps": 1})
    run_cli("--config", str(cfg), f"output_dir={tmp_path / 'run'}", f"masking.strategy={strategy}")
    assert sorted(m for m, *_ in seen) == ["depth", "rgb", "semseg"]
    if strategy == "high" and importlib.util.find_spec("tensorboard") is not None:  # sent to the tracker too
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        events = EventAccumulator(str(tmp_path / "run" / "tb")).Reload()
        assert sorted(events.Tags()["images"]) == ["pictures/depth", "pictures/rgb", "pictures/semseg"]
    for _, has_scores, info, guided in seen:
        assert has_scores == (strategy == "high")                   # random: no scoring pass, no panel
        assert info.strategy == strategy and info.class_names[0] == "wall"   # names from data.root
        assert info.score_source == "attention (global token's query, layer -1)"
        assert guided == [strategy == "high"] * 2
