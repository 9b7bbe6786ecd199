"""Decoded rows instead of zero-filled images (AMT): the packed prediction is the decoder's image,
and the losses read from it equal, in value and gradient, the losses of that image."""
import pytest
import torch

from multimae_att.masking import MaskingPolicy
from multimae_att.masking.planner import MaskPlanner
from multimae_att.model import create_pretrain_model
from multimae_att.model.packed import PackedPrediction, as_images
from multimae_att.pretrain.losses import LossSpec, multimodal_loss, packed_patch_losses
from multimae_att.pretrain.step import PretrainModule, forward_loss

MODS = ("rgb", "depth", "semseg")
N = 16  # 4 x 4 tokens of 8 px at 32 px


def _model_and_masks(uniform: bool):
    torch.manual_seed(0)
    model = create_pretrain_model("tiny", image_size=32, patch_size=8)
    x = {"rgb": torch.randn(3, 3, 32, 32), "depth": torch.randn(3, 1, 32, 32),
         "semseg": torch.randint(0, 133, (3, 8, 8))}
    g = torch.Generator().manual_seed(3)
    perm = {m: torch.stack([torch.randperm(N, generator=g) for _ in range(3)]) for m in MODS}
    visible = {m: perm[m] < 3 for m in MODS}                        # K = 9
    # uniform: 5 thrown in every sample; else 4, 5 and 7 (padding rows, masked keys)
    n_thrown = torch.tensor([5, 5, 5]) if uniform else torch.tensor([4, 5, 7])
    thrown = {m: (perm[m] >= 3) & (perm[m] < 3 + n_thrown[:, None]) for m in MODS}
    hidden = {m: ~visible[m] & ~thrown[m] for m in MODS}
    return model, x, hidden, thrown


@pytest.mark.parametrize("uniform", [True, False])
def test_packed_rows_are_the_decoders_image_and_give_the_same_losses_and_gradients(uniform):
    model, x, hidden, thrown = _model_and_masks(uniform)
    kept = {m: (int((~t).sum(1).min()), int((~t).sum(1).max())) for m, t in thrown.items()}
    weights = {m: torch.rand(3, N, generator=torch.Generator().manual_seed(5)) for m in MODS}
    results = {}
    for packed in (False, True):
        model.zero_grad()
        preds = model.forward_masked(model.embed(x), hidden, thrown, num_visible=9, kept_range=kept, packed=packed)
        patches = {}
        loss, parts = multimodal_loss(preds, x, hidden, thrown, attg_scores=weights, patch_losses=patches)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[packed] = preds, loss.detach(), parts, patches, grads
    image, packed = results[False], results[True]
    assert all(isinstance(p, PackedPrediction) for p in packed[0].values())
    assert all((p.valid is None) == uniform for p in packed[0].values())
    for k, img in as_images(packed[0]).items():
        torch.testing.assert_close(img, image[0][k], atol=0, rtol=0)
    torch.testing.assert_close(packed[1], image[1], atol=1e-6, rtol=1e-6)
    for k in image[2]:
        torch.testing.assert_close(packed[2][k], image[2][k], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(packed[3][k], image[3][k], atol=1e-6, rtol=1e-6)
    assert packed[4].keys() == image[4].keys()
    for n in image[4]:
        torch.testing.assert_close(packed[4][n], image[4][n], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("spec", [LossSpec("mse"), LossSpec("l1"), LossSpec("mse", norm_pix=True),
                                  LossSpec("ce", ignore_index=0)])
def test_packed_patch_losses_match_a_loop_over_the_counted_patches(spec):
    g = torch.Generator().manual_seed(1)
    B, h, w, ph, pw = 2, 2, 3, 2, 2
    C = 4 if spec.kind == "ce" else 3
    target = (torch.randint(0, C, (B, h * ph, w * pw), generator=g) if spec.kind == "ce"
              else torch.randn(B, C, h * ph, w * pw, generator=g))
    index = torch.tensor([[4, 0, 2, 1], [5, 3, 1, 0]])        # sample 1: its last row is padding
    valid = torch.tensor([[True] * 4, [True, True, True, False]])
    rows = torch.randn(B, 4, C * ph * pw, generator=g)
    mask = torch.zeros(B, h * w, dtype=torch.bool)
    mask[0, [4, 2]] = True
    mask[1, [5, 1]] = True                                    # counted (decoded) patches
    got = packed_patch_losses(PackedPrediction(rows, index, valid, (h, w), C, (ph, pw)), target, mask, spec)
    want = torch.zeros(B, h * w)
    for b in range(B):
        for r in range(4):
            n = int(index[b, r])
            if not (valid[b, r] and mask[b, n]):
                continue
            i, j = divmod(n, w)
            pred = rows[b, r].reshape(C, ph, pw)
            if spec.kind == "ce":
                t = target[b, i * ph:(i + 1) * ph, j * pw:(j + 1) * pw]
                want[b, n] = torch.nn.functional.cross_entropy(pred[None], t[None], reduction="none",
                                                               ignore_index=0).mean()  # ignored pixels: 0
                continue
            t = target[b, :, i * ph:(i + 1) * ph, j * pw:(j + 1) * pw]
            if spec.norm_pix:
                t = (t - t.mean()) / (t.var() + 1e-6).sqrt()
            want[b, n] = ((pred - t) ** 2).mean() if spec.kind == "mse" else (pred - t).abs().mean()
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="grid"):
        packed_patch_losses(PackedPrediction(rows, index, valid, (h, w), C, (ph, pw)), target, mask[:, :5], spec)


def test_the_step_scores_amt_decoders_packed_with_the_losses_of_their_images():
    model, x, _, _ = _model_and_masks(True)
    planner = MaskPlanner(MaskingPolicy("amt", {"throw_ratio": 0.4}, modalities=list(MODS)), 9)
    batch = dict(x)
    res = forward_loss(PretrainModule(model), batch, planner, epoch=1.0, generator=torch.Generator().manual_seed(0),
                       in_modalities=list(MODS), standardize_depth=False, loss_weights={})
    assert all(isinstance(p, PackedPrediction) for p in res.preds.values())
    again, parts = multimodal_loss(as_images(res.preds), res.inputs, res.plan.hidden, res.plan.thrown,
                                   denominators=res.plan.denominators)
    torch.testing.assert_close(res.loss.detach(), again.detach(), atol=1e-6, rtol=1e-6)
    for k, v in parts.items():
        torch.testing.assert_close(res.parts[k], v.detach(), atol=1e-6, rtol=1e-6)
