"""Training pictures: panel layout and the mask / reconstruction conventions."""
import numpy as np
import torch
from PIL import Image

from multimae_att.pretrain.pictures import render_modality, save_pictures

GAP = 2


def _panels(img: np.ndarray, size: int) -> list[np.ndarray]:
    return [img[:size, k * (size + GAP):k * (size + GAP) + size] for k in range(4)]


def test_depth_panels_follow_the_masks():
    size, grid = 8, (2, 2)
    depth = torch.linspace(0, 1, size * size).reshape(1, 1, size, size)
    pred = torch.full_like(depth, 0.5)
    hidden = torch.tensor([[True, False, False, False]])      # top-left patch hidden
    thrown = torch.tensor([[False, True, False, False]])      # top-right patch thrown
    img = render_modality("depth", depth, pred, hidden, thrown, torch.tensor([[0.0, 1, 2, 3]]),
                          grid, (size, size))
    assert img.shape == (size, 4 * size + 3 * GAP, 3) and img.dtype == np.uint8
    inp, att, mask, rec = (p.astype(int) for p in _panels(img, size))
    assert np.array_equal(rec[4:, :], inp[4:, :])               # visible: the input
    assert np.all(rec[:4, :4] == 128)                           # hidden: the prediction (0.5)
    assert np.all(mask[:4, :4] <= inp[:4, :4] // 3 + 1)         # hidden: darkened
    assert np.all(mask[:4, 4:] == [204, 26, 26])                # thrown: red
    assert att[0, 0].sum() == 0 and att[7, 7].sum() == 3 * 255  # min-max heat map, black -> white


def test_save_pictures_writes_one_png_per_modality(tmp_path):
    B, size = 3, 16
    inputs = {"rgb": torch.randn(B, 3, size, size), "semseg": torch.randint(0, 5, (B, 4, 4))}
    preds = {"rgb": torch.randn(B, 3, size, size), "semseg": torch.randn(B, 5, 4, 4)}
    hidden = {m: torch.rand(B, 4) > 0.5 for m in inputs}
    paths = save_pictures(tmp_path, 7, inputs, preds, hidden, None, None,
                          {"rgb": (2, 2), "semseg": (2, 2)}, num_samples=2)
    assert [p.name for p in paths] == ["step_00000007_rgb.png", "step_00000007_semseg.png"]
    assert Image.open(paths[0]).size == (4 * size + 3 * GAP, 2 * size + GAP)
