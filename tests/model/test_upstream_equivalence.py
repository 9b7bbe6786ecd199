"""Numerical equivalence with the original MultiMAE code (EPFL-VILAB/MultiMAE).

Runs only when ``MULTIMAE_SRC`` points to an upstream checkout (its ``multimae/`` and
``utils/`` folders); nothing from it is vendored here. Both models get the same state dict and
the same masks; every prediction must match to 1e-5 in float32. MultiMAE handles external
masks only for batch size 1 (it counts visible tokens over the whole batch), so the masked
comparison is per sample against our batched forward.
"""
import importlib
import importlib.util
import os

import pytest
import torch

from multimae_att.model import MultiViT, build_2d_sincos_posemb, create_pretrain_model

from helpers.upstream import SRC, up

pytestmark = pytest.mark.skipif(
    not os.path.isdir(os.path.join(SRC, "multimae")),
    reason="set MULTIMAE_SRC to a checkout of EPFL-VILAB/MultiMAE to run the equivalence tests")

S, P = 32, 8
MODS = ("rgb", "depth", "semseg")
TOL = dict(atol=1e-5, rtol=1e-5)


def upstream_pretrain(up, dim=96, depth=3, heads=3, dec_dim=64, dec_depth=2, dec_heads=2, size=S,
                      use_task_queries=True, num_global_tokens=1, cls=None):
    inputs = {"rgb": up.PatchedInputAdapter(num_channels=3, stride_level=1, patch_size_full=P, image_size=size),
              "depth": up.PatchedInputAdapter(num_channels=1, stride_level=1, patch_size_full=P, image_size=size),
              "semseg": up.SemSegInputAdapter(num_classes=133, stride_level=4, patch_size_full=P, image_size=size,
                                              dim_class_emb=64)}
    outputs = {name: up.SpatialOutputAdapter(
        num_channels=ch, stride_level=st, patch_size_full=P, dim_tokens=dec_dim, depth=dec_depth,
        num_heads=dec_heads, image_size=size, task=task, context_tasks=list(MODS), use_task_queries=use_task_queries)
        for name, task, ch, st in [("rgb", "rgb", 3, 1), ("depth", "depth", 1, 1), ("semseg", "semseg", 133, 4),
                                   ("norm_rgb", "rgb", 3, 1)]}
    cls = cls or up.MultiMAE
    return cls(inputs, outputs, dim_tokens=dim, depth=depth, num_heads=heads,
               num_global_tokens=num_global_tokens).eval()


def pair_of_models(up, **kw):
    ours = create_pretrain_model("tiny", image_size=S, patch_size=P, **kw).eval()
    theirs = upstream_pretrain(up, use_task_queries=kw.get("use_task_queries", True),
                               num_global_tokens=kw.get("num_global_tokens", 1))
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


def inputs(B, size=S):
    return {"rgb": torch.randn(B, 3, size, size), "depth": torch.randn(B, 1, size, size),
            "semseg": torch.randint(0, 133, (B, size // 4, size // 4))}


def masks(B, n, K):
    order = torch.rand(B, 3 * n).argsort(dim=1)
    hidden = torch.ones(B, 3 * n, dtype=torch.long).scatter(1, order[:, :K], 0)
    return dict(zip(MODS, hidden.split(n, dim=1)))


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_fresh_pos_emb_tables_are_identical(up):
    ours, theirs = create_pretrain_model("tiny", image_size=S, patch_size=P), upstream_pretrain(up)
    theirs_sd = theirs.state_dict()
    for key, value in ours.state_dict().items():
        if key.endswith("pos_emb"):
            assert torch.equal(value, theirs_sd[key]), key
    for h, d in [(14, 768), (14, 256), (4, 96)]:
        assert torch.equal(up.multimae_utils.build_2d_sincos_posemb(h, h, d),
                           build_2d_sincos_posemb(h, h, d))


@pytest.mark.parametrize("config", [{}, {"use_task_queries": False}, {"num_global_tokens": 2}])
@pytest.mark.parametrize("size", [S, 48])
def test_masked_predictions_match_per_sample(up, config, size):
    ours, theirs = pair_of_models(up, **config)
    B, n = 4, (size // P) ** 2
    x, m = inputs(B, size), masks(B, n, K=n // 2 + 3)
    with torch.no_grad():
        preds, returned = ours(x, task_masks=m)
        worst = 0.0
        for b in range(B):
            ref, _ = theirs({k: v[b:b + 1] for k, v in x.items()}, task_masks={k: v[b:b + 1] for k, v in m.items()})
            mine = {k: v[b:b + 1] for k, v in preds.items()}
            for k in ref:
                torch.testing.assert_close(mine[k], ref[k], **TOL)
            worst = max(worst, max_diff(mine, ref))
    assert returned is m
    print(f"max |ours - MultiMAE| masked, config={config}, size={size}: {worst:.2e}")


def test_unmasked_predictions_match_for_a_batch(up):
    ours, theirs = pair_of_models(up)
    x = inputs(3)
    with torch.no_grad():
        mine, _ = ours(x, mask_inputs=False)
        ref, _ = theirs(x, mask_inputs=False, num_encoded_tokens=3 * 16)  # upstream shuffles; order-invariant
    for k in ref:
        torch.testing.assert_close(mine[k], ref[k], **TOL)
    print(f"max |ours - MultiMAE| unmasked: {max_diff(mine, ref):.2e}")


def test_multivit_encoder_matches(up):
    ours = MultiViT(create_pretrain_model("tiny", image_size=S, patch_size=P).input_adapters, None,
                    dim_tokens=96, depth=3, num_heads=3).eval()
    theirs = upstream_pretrain(up, cls=up.MultiViT)
    theirs.output_adapters = None
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert unexpected == [] and all(k.startswith("output_adapters") for k in missing)
    x = inputs(2)
    with torch.no_grad():
        for a, b in zip(ours(x, return_all_layers=True), theirs(x, return_all_layers=True)):
            torch.testing.assert_close(a, b, **TOL)


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(f"_upstream_{name}", os.path.join(SRC, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_layout_conversions_match_upstream_converters(up):
    from multimae_att.checkpoint import multimae_to_timm, timm_to_multimae

    state = create_pretrain_model("tiny", image_size=S, patch_size=P).state_dict()
    ref = _load_tool("multimae2vit_converter").multimae_to_vit(state)
    ours = multimae_to_timm(state)
    assert sorted(ours) == sorted(ref) and all(torch.equal(ours[k], ref[k]) for k in ref)
    ours["pos_embed"][0, 0] = torch.randn(96)  # a timm release has a non-zero class-token position
    mine = timm_to_multimae(ours)
    theirs = _load_tool("vit2multimae_converter").vit_to_multimae({k: v.clone() for k, v in ours.items()})
    assert sorted(mine) == sorted(theirs) and all(torch.equal(mine[k], theirs[k]) for k in theirs)
