"""Sizes known without reading masks: the policy's bound on kept tokens holds and is tight, and the
decoders and losses give the same result when padded to it as when sized by the masks."""
import pytest
import torch

from multimae_att.masking import MaskingPolicy, sample_budgets
from multimae_att.model import create_pretrain_model
from multimae_att.pretrain.losses import LossSpec, counted_patch_losses

N = {"rgb": 16, "depth": 16, "semseg": 16}


@pytest.mark.parametrize("K", [2, 9, 20, 40])
@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.4, 0.9])
def test_amt_bound_on_kept_tokens_holds_and_is_reached(K, ratio):
    policy = MaskingPolicy("amt", {"throw_ratio": ratio})
    kept = policy.kept_range(N, K, epoch=1.0)
    bound = {m: hi for m, (_, hi) in kept.items()}
    g = torch.Generator().manual_seed(K)
    most, fewest = dict.fromkeys(N, 0), dict.fromkeys(N, 99)
    for _ in range(20):
        visible = sample_budgets(list(N.values()), K, 16, alphas=0.3, generator=g)
        scores = {m: torch.rand(16, n, generator=g) for m, n in N.items()}
        masks = policy(scores, visible, 1.0, g)
        for m in N:
            n_kept = (~masks.thrown[m]).sum(1)
            assert kept[m][0] <= int(n_kept.min()) and int(n_kept.max()) <= kept[m][1]
            counted = (masks.hidden[m] & ~masks.thrown[m]).sum(1)
            assert int(counted.max()) <= kept[m][1]
            most[m], fewest[m] = max(most[m], int(n_kept.max())), min(fewest[m], int(n_kept.min()))
    assert most == bound  # tight: some sample keeps exactly that many
    assert fewest == {m: lo for m, (lo, _) in kept.items()}


def test_kept_range_without_throwing_with_some_random_samples_and_exact():
    every = dict.fromkeys(N, (16, 16))
    assert MaskingPolicy("random").kept_range(N, 9, 1.0) == every
    assert MaskingPolicy("high").kept_range(N, 9, 1.0) == every
    assert MaskingPolicy("amt", warmup_epochs=2).kept_range(N, 9, 1.0) == every  # still random
    assert MaskingPolicy("amt", prob=0.5).kept_range(N, 9, 1.0) == dict.fromkeys(N, (10, 16))  # random ones keep all
    # floor(0.4 * 16) = 6 thrown whenever a sample has at most 16 - 6 visible: with K = 9, always
    assert MaskingPolicy("amt").kept_range(N, 9, 2.0) == dict.fromkeys(N, (10, 10))
    assert MaskingPolicy("amt").kept_range(N, 12, 2.0) == dict.fromkeys(N, (10, 12))  # 12 visible: 4 thrown


@pytest.mark.parametrize("spec", [LossSpec("ce"), LossSpec("mse", norm_pix=True)])
def test_losses_padded_to_a_bound_equal_losses_sized_by_the_mask(spec):
    g = torch.Generator().manual_seed(0)
    B, C = 3, (5 if spec.kind == "ce" else 3)
    pred = torch.randn(B, C, 16, 16, generator=g)
    target = (torch.randint(0, 5, (B, 16, 16), generator=g) if spec.kind == "ce"
              else torch.randn(B, 3, 16, 16, generator=g))
    mask = torch.rand(B, 16, generator=g) < 0.4
    mask[:, 12:] = False  # at most 12 counted
    read = counted_patch_losses(pred, target, mask, spec, (4, 4), gather_up_to=0.8)
    padded = counted_patch_losses(pred, target, mask, spec, (4, 4), gather_up_to=0.8, max_count=12)
    torch.testing.assert_close(padded, read)
    with pytest.raises(ValueError, match="max_count=2"):
        counted_patch_losses(pred, target, mask, spec, (4, 4), gather_up_to=0.8, max_count=2)


def test_decoder_padded_to_a_bound_equals_decoder_sized_by_the_mask():
    torch.manual_seed(0)
    model = create_pretrain_model("tiny", image_size=32, patch_size=8).eval()
    x = {"rgb": torch.randn(2, 3, 32, 32), "depth": torch.randn(2, 1, 32, 32),
         "semseg": torch.randint(0, 133, (2, 8, 8))}
    tokens = model.embed(x)
    g = torch.Generator().manual_seed(3)
    perm = {m: torch.stack([torch.randperm(16, generator=g) for _ in range(2)]) for m in N}
    visible = {m: perm[m] < 3 for m in N}             # 3 visible per modality: K = 9
    thrown = {m: (perm[m] >= 3) & (perm[m] < 8) for m in N}  # 5 thrown: 11 kept
    hidden = {m: ~visible[m] & ~thrown[m] for m in N}
    with torch.no_grad():
        read = model.forward_masked(tokens, hidden, thrown)
        padded = model.forward_masked(tokens, hidden, thrown, num_visible=9, kept_range=dict.fromkeys(N, (0, 13)))
        exact = model.forward_masked(tokens, hidden, thrown, num_visible=9, kept_range=dict.fromkeys(N, (11, 11)))
    for k in read:
        torch.testing.assert_close(padded[k], read[k], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(exact[k], read[k], atol=1e-5, rtol=1e-5)
    for bad in ((0, 10), (12, 13)):
        with pytest.raises(ValueError, match="outside kept_range"):
            model.forward_masked(tokens, hidden, thrown, num_visible=9, kept_range=dict.fromkeys(N, bad))
    with pytest.raises(ValueError, match="exactly 8 visible"):
        model.forward_masked(tokens, hidden, thrown, num_visible=8)
