"""TokenCut: the normalized cut against SciPy's generalized eigensolver (TokenCut's own call),
constructed features with a known object, the foreground side, the seed component, the keys."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.linalg import eigh

from multimae_att.scoring.tokencut import last_layer_keys, ncut_maps, seed_component


def scene_features(grid=(8, 8), box=(2, 5, 1, 4), dim=16, noise=0.15, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of an ``grid`` image whose tokens in ``box`` (rows r0:r1, cols c0:c1) share one
    direction and the rest another, plus noise; returns ``(features [1, N, dim], object [N])``."""
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    r0, r1, c0, c1 = box
    obj = torch.zeros(h, w, dtype=torch.bool)
    obj[r0:r1, c0:c1] = True
    a, b = torch.zeros(dim), torch.zeros(dim)
    a[0], b[1] = 3.0, 3.0                            # orthogonal directions: cosine 0 across
    f = torch.where(obj.flatten()[:, None], a, b) + noise * torch.randn(h * w, dim, generator=g)
    return f[None], obj.flatten()


def test_eigenvector_equals_scipy_generalized_eigh():
    f, _ = scene_features(noise=0.8, seed=3)
    x, fg = ncut_maps(f)
    fn = torch.nn.functional.normalize(f[0].double(), dim=-1).numpy()
    A = fn @ fn.T
    A = np.where(A > 0.2, 1.0, 1e-5)                   # TokenCut's binary graph
    D = np.diag(A.sum(1))
    _, vecs = eigh(D - A, D, subset_by_index=[1, 1])   # as TokenCut's ncut
    ref = vecs[:, 0]
    sign = np.sign(ref @ x[0].double().numpy())
    assert np.allclose(x[0].double().numpy(), sign * ref, atol=1e-6)
    # TokenCut's orientation: split at the mean, the seed (largest |x|) on the foreground side
    seed = int(np.abs(ref).argmax())
    assert bool(fg[0, seed]) and bool((fg[0] == (x[0] > x[0].mean())).all())


@pytest.mark.parametrize("box", [(2, 5, 1, 4), (0, 3, 5, 8), (4, 8, 0, 3)])
def test_known_partition_is_recovered_as_foreground(box):
    f, obj = scene_features(box=box)
    x, fg = ncut_maps(f)
    assert torch.equal(fg[0], obj)                   # the smaller, object side is the foreground
    assert bool((x[0][obj] > x[0][~obj].max()).all())  # and ranks above every background token
    other, obj2 = scene_features(box=(0, 2, 0, 2), seed=5)
    _, fgb = ncut_maps(torch.cat([f, other]))        # a batch of two images
    assert torch.equal(fgb[0], obj) and torch.equal(fgb[1], obj2)


def test_seed_component_keeps_the_seed_object_only():
    # two separate blobs on the foreground side: the component with the seed is kept
    fg = torch.zeros(1, 6, 6, dtype=torch.bool)
    fg[0, 0:2, 0:2] = True
    fg[0, 4:6, 3:6] = True
    eig = torch.zeros(1, 36)
    eig[0, 4 * 6 + 4] = 5.0                          # the seed lies in the second blob
    comp = seed_component(fg.view(1, 36), eig, (6, 6)).view(6, 6)
    want = torch.zeros(6, 6, dtype=torch.bool)
    want[4:6, 3:6] = True
    assert torch.equal(comp, want)


def test_last_layer_keys_are_the_last_blocks_keys():
    from multimae_att.model import create_pretrain_model

    torch.manual_seed(0)
    model = create_pretrain_model("tiny", image_size=32, semseg_num_classes=10).train()
    x = {"rgb": torch.randn(2, 3, 32, 32), "depth": torch.randn(2, 1, 32, 32)}
    keys = last_layer_keys(model, x)
    assert model.training                              # restored
    tokens = model.embed(x)
    z = torch.cat([tokens["rgb"], tokens["depth"], model.global_tokens.expand(2, -1, -1)], 1)
    model.eval()
    with torch.no_grad():
        for blk in model.encoder[:-1]:
            z = blk(z)
        last = model.encoder[-1]
        qkv = last.attn.qkv(last.norm1(z))             # [B, T, 3D]: q | k | v
    D = model.dim_tokens
    assert torch.allclose(keys["rgb"], qkv[:, :4, D:2 * D], atol=1e-5)
    assert torch.allclose(keys["depth"], qkv[:, 4:8, D:2 * D], atol=1e-5)
