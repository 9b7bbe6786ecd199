"""Task heads: MultiMAE state-dict names, shapes, token layout, gradients; k-NN and few-shot."""
import pytest
import torch
from einops import rearrange

from multimae_att.finetune.heads import ConvNeXtAdapter, DPTOutputAdapter, LinearOutputAdapter, fill_dpt_aliases
from multimae_att.finetune.knn import few_shot_indices, knn_evaluate, knn_scores


def _info(h, w, grid, tasks=("rgb",), globals_=1):
    n = grid[0] * grid[1]
    t = {m: {"start_idx": i * n, "end_idx": (i + 1) * n, "num_tokens": n} for i, m in enumerate(tasks)}
    return {"image_size": (h, w), "tasks": t, "num_task_tokens": n * len(tasks),
            "num_global_tokens": globals_}


# Names read from MultiMAE's released finetuned checkpoints / output_adapters.py (facts, not code).
CONVNEXT_BLOCK_KEYS = {"dwconv.weight", "dwconv.bias", "norm.weight", "norm.bias", "pwconv1.weight",
                       "pwconv1.bias", "pwconv2.weight", "pwconv2.bias"}


def test_convnext_recipe_keys_and_shapes():
    head = ConvNeXtAdapter(num_classes=150, embed_dim=6144, preds_per_patch=16, depth=4,
                           dim_tokens_enc=768)
    sd = head.state_dict()
    expected = {"proj_dec.weight", "proj_dec.bias", "final_layer.weight", "final_layer.bias"}
    expected |= {f"blocks.{i}.{k}" for i in range(4) for k in CONVNEXT_BLOCK_KEYS}
    assert set(sd) == expected
    assert sd["proj_dec.weight"].shape == (6144, 768)
    assert sd["blocks.0.dwconv.weight"].shape == (384, 1, 7, 7)
    assert sd["blocks.3.pwconv1.weight"].shape == (1536, 384)
    assert sd["final_layer.weight"].shape == (150, 384, 1, 1)


def test_convnext_token_unfolding_matches_einops_reference():
    """The (p c) channel layout and (nh ph)(nw pw) unfolding, checked against einops."""
    head = ConvNeXtAdapter(num_classes=3, embed_dim=4 * 8, preds_per_patch=4, depth=0,
                           main_tasks=("rgb", "depth"), patch_size=4, dim_tokens_enc=6)
    head.blocks = torch.nn.Identity()
    head.final_layer = torch.nn.Identity()
    head.interpolate_mode = "nearest"
    b, grid = 2, (3, 2)
    tokens = torch.randn(b, 2 * 6 + 1, 6)                      # rgb, depth tokens + 1 global
    info = _info(12, 8, grid, ("rgb", "depth"))
    out = head(tokens, info)                                   # [B, 8, 12, 8] (identity classifier)
    x = head.proj_dec(torch.cat([tokens[:, :6], tokens[:, 6:12]], dim=-1))
    ref = rearrange(x, "b (nh nw) (ph pw c) -> b c (nh ph) (nw pw)", nh=3, nw=2, ph=2, pw=2)
    ref = torch.nn.functional.interpolate(ref, size=(12, 8), mode="nearest")
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("head_type,channels", [("regression", 1), ("semseg", 5)])
def test_dpt_output_shape_aliases_and_gradients(head_type, channels):
    head = DPTOutputAdapter(num_classes=channels, patch_size=16, hooks=(0, 1, 2, 3),
                            layer_dims=(8, 8, 16, 16), feature_dim=16, dim_tokens_enc=12,
                            head_type=head_type)
    sd = head.state_dict()
    assert sd["act_postprocess.0.1.weight"].data_ptr() == sd["act_1_postprocess.1.weight"].data_ptr()
    assert sd["scratch.layer_rn.3.weight"].data_ptr() == sd["scratch.layer4_rn.weight"].data_ptr()
    assert {"head.0.weight", "head.4.weight"} <= set(sd)
    grid = (4, 3)
    layers = [torch.randn(2, 12 + 1, 12, requires_grad=True) for _ in range(4)]
    out = head(layers, _info(64, 48, grid))
    assert out.shape == (2, channels, 64, 48)
    out.square().mean().backward()
    # refinenet4 has no skip input: its resConfUnit1 is unused, as in DPT and MultiMAE
    # (hence find_unused_parameters for DDP with this head)
    for name, p in head.named_parameters():
        if name.startswith("scratch.refinenet4.resConfUnit1."):
            assert p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_fill_dpt_aliases_restores_a_deduplicated_state_dict():
    head = DPTOutputAdapter(num_classes=1, hooks=(0, 1, 2, 3), layer_dims=(4, 4, 8, 8),
                            feature_dim=8, dim_tokens_enc=8)
    prefix = "output_adapters.depth."
    full = {prefix + k: v.clone() for k, v in head.state_dict().items()}
    dedup = {k: v for k, v in full.items() if "act_postprocess." not in k and "layer_rn." not in k}
    assert len(dedup) < len(full)
    filled = fill_dpt_aliases(dedup, prefix)
    assert set(filled) == set(full)
    for k in full:
        assert torch.equal(filled[k], full[k]), k


def test_linear_head_pools_all_tokens_and_keys():
    head = LinearOutputAdapter(num_classes=7, dim_tokens_enc=8, init_scale=1.0)
    assert set(head.state_dict()) == {"norm.weight", "norm.bias", "head.weight", "head.bias"}
    tokens = torch.randn(3, 5, 8)
    torch.testing.assert_close(head(tokens), head.head(head.norm(tokens.mean(1))))
    probe = LinearOutputAdapter(num_classes=7, dim_tokens_enc=8, norm="batch", use_mean_pooling=False)
    assert not any(k.startswith("norm.weight") for k in probe.state_dict())
    probe.eval()
    torch.testing.assert_close(probe(tokens), probe.head(probe.norm(tokens[:, -1])))


def test_knn_scores_brute_force():
    g = torch.Generator().manual_seed(0)
    bank, labels = torch.randn(30, 6, generator=g), torch.randint(0, 4, (30,), generator=g)
    query = torch.randn(7, 6, generator=g)
    scores = knn_scores(query, bank, labels, num_classes=4, k=5, temperature=0.1, chunk_size=3)
    bn, qn = bank / bank.norm(dim=1, keepdim=True), query / query.norm(dim=1, keepdim=True)
    for i in range(7):
        sim = bn @ qn[i]
        top = sim.argsort(descending=True)[:5]
        ref = torch.zeros(4)
        for j in top:
            ref[labels[j]] += torch.exp(sim[j] / 0.1)
        torch.testing.assert_close(scores[i], ref, rtol=1e-5, atol=1e-6)


def test_few_shot_indices_per_class_counts():
    labels = torch.tensor([0, 0, 0, 1, 2, 2, 2, 2, 1, 0])
    idx = few_shot_indices(labels, 2, torch.Generator().manual_seed(3))
    counts = torch.bincount(labels[idx], minlength=3)
    assert counts.tolist() == [2, 2, 2] and idx.unique().numel() == idx.numel()
    idx1 = few_shot_indices(labels, 1, torch.Generator().manual_seed(3))
    assert torch.bincount(labels[idx1], minlength=3).tolist() == [1, 1, 1]


def test_knn_evaluate_separable_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(4) * 10
    train_y, val_y = torch.arange(40) % 4, torch.arange(12) % 4
    train_x = centres[train_y] + torch.randn(40, 4, generator=g)
    val_x = centres[val_y] + torch.randn(12, 4, generator=g)
    out = knn_evaluate(train_x, train_y, val_x, val_y, num_classes=4, k=20, shots=(1, 5))
    assert out["knn_top1"] == 100.0 and out["knn_1shot_top1"] == 100.0
    assert set(out) == {"knn_top1", "knn_top5", "knn_1shot_top1", "knn_5shot_top1"}
