"""Loss prediction: HPM's ranking loss against a brute-force pairwise reference, Spearman against
SciPy, targets, and gradients (the head gets them, the encoder none) through the real step."""
from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import spearmanr

from multimae_att.scoring.loss_prediction import LossPredictor, count_pairs, loss_targets, ranking_loss, spearman


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def hpm_reference(pred: dict, target: dict, counted: dict) -> float:
    """HPM's ``forward_learning_loss(relative=True)`` written out pair by pair, per sample and
    modality (no 1e-6 inside the logs): both orders of every non-tied pair of counted tokens,
    divided by the number of such ordered pairs."""
    total, pairs = 0.0, 0
    for m in pred:
        B, N = pred[m].shape
        for b in range(B):
            idx = [i for i in range(N) if counted[m][b, i]]
            for i in idx:
                for j in idx:
                    t_i, t_j = float(target[m][b, i]), float(target[m][b, j])
                    if t_i == t_j:
                        continue
                    x = float(pred[m][b, j] - pred[m][b, i])
                    sig = 1 / (1 + math.exp(-x))
                    total += -math.log(sig) if t_j > t_i else -math.log(1 - sig)
                    pairs += 1
    return total / pairs


def random_case(seed: int, ties: bool = False):
    g = gen(seed)
    num = {"rgb": 9, "depth": 6}
    pred = {m: torch.randn(4, n, generator=g) for m, n in num.items()}
    target = {m: (torch.randint(0, 3, (4, n), generator=g).float() if ties else torch.rand(4, n, generator=g))
              for m, n in num.items()}
    counted = {m: torch.rand(4, n, generator=g) > 0.35 for m, n in num.items()}
    counted["depth"][1] = False                      # a sample with nothing counted
    counted["rgb"][2] = False
    counted["rgb"][2, 3] = True                      # ... and one with a single token
    return pred, target, counted


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ranking_loss_equals_hpm_pairwise_reference(seed):
    pred, target, counted = random_case(seed)
    got = ranking_loss(pred, target, counted)
    assert got.item() == pytest.approx(hpm_reference(pred, target, counted), rel=1e-5)


def test_ranking_loss_ties_add_nothing_but_count_in_the_divisor():
    pred, target, counted = random_case(5, ties=True)
    got = ranking_loss(pred, target, counted)
    untied = 0
    for m in pred:
        for b in range(pred[m].shape[0]):
            t = target[m][b][counted[m][b]]
            untied += int((t[:, None] != t[None, :]).sum()) // 2
    all_pairs = float(count_pairs(counted))
    assert all_pairs > untied > 0
    # HPM divides by non-tied pairs; here every unordered counted pair counts
    assert got.item() == pytest.approx(hpm_reference(pred, target, counted) * untied / all_pairs, rel=1e-5)
    # an explicit divisor (the runner's global pair count) replaces the local one
    assert ranking_loss(pred, target, counted, num_pairs=2 * all_pairs).item() == pytest.approx(got.item() / 2)


def test_ranking_loss_falls_as_the_order_improves():
    t = {"rgb": torch.arange(8.0)[None]}
    c = {"rgb": torch.ones(1, 8, dtype=torch.bool)}
    right = ranking_loss({"rgb": 5 * t["rgb"]}, t, c)
    wrong = ranking_loss({"rgb": -5 * t["rgb"]}, t, c)
    flat = ranking_loss({"rgb": torch.zeros(1, 8)}, t, c)
    assert right < flat < wrong and flat.item() == pytest.approx(math.log(2))
    # only differences matter: a shift of the predictions changes nothing
    assert ranking_loss({"rgb": 5 * t["rgb"] + 3}, t, c).item() == pytest.approx(right.item())


def test_spearman_matches_scipy():
    pred, target, counted = random_case(3)
    want, rows = 0.0, 0
    for m in pred:
        for b in range(pred[m].shape[0]):
            c = counted[m][b]
            if int(c.sum()) >= 2:
                want += spearmanr(pred[m][b][c].numpy(), target[m][b][c].numpy()).statistic
                rows += 1
    assert spearman(pred, target, counted).item() == pytest.approx(want / rows, abs=1e-6)
    t = {"rgb": torch.rand(2, 7, generator=gen(0))}
    c = {"rgb": torch.ones(2, 7, dtype=torch.bool)}
    assert spearman({"rgb": t["rgb"] ** 3}, t, c).item() == pytest.approx(1.0)
    assert spearman({"rgb": -t["rgb"]}, t, c).item() == pytest.approx(-1.0)
    assert spearman({"rgb": t["rgb"]}, t, {"rgb": torch.zeros(2, 7, dtype=torch.bool)}).item() == 0.0


def test_loss_targets_sum_weighted_outputs_per_input():
    g = gen(1)
    patch = {o: torch.rand(2, 4, generator=g) for o in ("rgb", "norm_rgb", "depth", "semseg")}
    w = {"rgb": 0.5, "norm_rgb": 2.0, "depth": 1.0, "semseg": 0.0}
    t = loss_targets(patch, w, ["rgb", "depth", "semseg"])
    assert torch.allclose(t["rgb"], 0.5 * patch["rgb"] + 2.0 * patch["norm_rgb"])
    assert torch.equal(t["depth"], patch["depth"]) and torch.equal(t["semseg"], torch.zeros(2, 4))
    assert set(loss_targets(patch, w, ["depth"])) == {"depth"}


def test_predictor_shapes_and_errors():
    head = LossPredictor(["rgb", "depth"], dim=8, hidden=0)
    out = head({"rgb": torch.randn(3, 5, 8), "depth": torch.randn(3, 2, 8)})
    assert out["rgb"].shape == (3, 5) and out["depth"].dtype == torch.float32
    assert sum(p.numel() for p in head.parameters()) == 2 * 8   # one linear map of D per modality
    mlp = LossPredictor(["rgb"], dim=8, hidden=4)
    assert mlp({"rgb": torch.randn(1, 3, 8)})["rgb"].shape == (1, 3)
    assert sum(p.numel() for p in mlp.parameters()) == 8 * 4 + 4 + 4   # no bias after the last map
    assert LossPredictor(["rgb"], dim=8).hidden == 32
    with pytest.raises(KeyError, match="semseg"):
        head({"semseg": torch.randn(1, 2, 8)})
    for h in (head, mlp):
        empty = h({"rgb": torch.randn(0, 5, 8)})["rgb"]   # no sample this step: still in the graph
        empty.sum().backward()
        assert all(p.grad is not None and not p.grad.any() for p in h.heads["rgb"].parameters())


def test_ranking_loss_trains_the_head_and_not_the_encoder():
    """Through the runner's own step: the ranking loss (rebuilt from the step's predictions and
    losses, equal to the logged one) has a gradient for every predictor parameter and none for
    any model parameter (the features are detached); the total loss trains both."""
    from multimae_att.masking import MaskingPolicy
    from multimae_att.masking.planner import MaskPlanner
    from multimae_att.model import create_pretrain_model
    from multimae_att.pretrain.losses import multimodal_loss
    from multimae_att.pretrain.step import PretrainModule, forward_loss
    from multimae_att.scoring.sources import PredictedLossScores

    torch.manual_seed(0)
    model = create_pretrain_model("tiny", image_size=64, semseg_num_classes=10)   # 16 tokens each
    head = LossPredictor(["rgb", "depth", "semseg"], model.dim_tokens)
    module = PretrainModule(model, loss_predictor=head)
    planner = MaskPlanner(MaskingPolicy("hpm"), 8, source=PredictedLossScores(head), total_epochs=10.0)
    g = gen(0)
    batch = {"rgb": torch.randn(3, 3, 64, 64, generator=g), "depth": torch.rand(3, 1, 64, 64, generator=g),
             "semseg": torch.randint(0, 10, (3, 16, 16), generator=g)}
    kw = dict(epoch=5.0, in_modalities=["rgb", "depth", "semseg"], standardize_depth=True,
              loss_weights={}, device=torch.device("cpu"))
    res = forward_loss(module, batch, planner, generator=gen(1), **kw)
    assert set(res.extras) == {"lossp/loss", "lossp/spearman_train"}
    assert -1 <= res.extras["lossp/spearman_train"] <= 1
    plan = res.plan
    assert all(not f.requires_grad for f in plan.features.values())
    patches: dict = {}
    multimodal_loss(res.preds, res.inputs, plan.hidden, plan.thrown, patch_losses=patches,
                    denominators=plan.denominators)
    rank = ranking_loss(plan.lossp_pred, loss_targets(patches, {}, list(plan.hidden)), plan.counted(),
                        num_pairs=plan.lossp_pairs)
    assert rank.item() == pytest.approx(res.extras["lossp/loss"].item(), rel=1e-6) and rank > 0
    # the total is the reconstruction losses plus the ranking loss (weight 1)
    assert res.loss.item() == pytest.approx(sum(res.parts.values()).item() + rank.item(), rel=1e-5)
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(rank, [*head.parameters(), *trainable], allow_unused=True, retain_graph=True)
    n_head = len(list(head.parameters()))
    assert all(gr is not None and gr.abs().sum() > 0 for gr in grads[:n_head])
    assert all(gr is None for gr in grads[n_head:])
    res.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    assert model.encoder[0].attn.qkv.weight.grad.abs().sum() > 0
