"""Model core: layout contract, pos-emb formula, masked pass invariants, gradients."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from multimae_att.model import (
    MultiMAE,
    MultiViT,
    PatchedInputAdapter,
    SpatialOutputAdapter,
    Tokens,
    build_2d_sincos_posemb,
    create_pretrain_model,
)

# Key/shape list of MultiMAE's released ViT-B pretraining checkpoint (copy of the project's reference file).
REFERENCE = os.path.join(os.path.dirname(__file__), "test_model_reference_keys.json")
S, P, N = 32, 8, 16  # image size, patch size, tokens per modality (4 x 4 grid)
MODS = ("rgb", "depth", "semseg")


def tiny(**kw) -> MultiMAE:
    model = create_pretrain_model("tiny", image_size=S, patch_size=P, **kw)
    return model.eval()


def inputs(B: int, size: int = S) -> dict[str, torch.Tensor]:
    return {"rgb": torch.randn(B, 3, size, size), "depth": torch.randn(B, 1, size, size),
            "semseg": torch.randint(0, 133, (B, size // 4, size // 4))}


def random_hidden(B: int, sizes: list[int], K: int) -> dict[str, torch.Tensor]:
    """Different visible sets per sample, exactly K visible each (1 = hidden)."""
    order = torch.rand(B, sum(sizes)).argsort(dim=1)
    hidden = torch.ones(B, sum(sizes), dtype=torch.bool).scatter(1, order[:, :K], False)
    return dict(zip(MODS, hidden.split(sizes, dim=1)))


@pytest.mark.skipif(not os.path.exists(REFERENCE), reason=f"reference key list not found at {REFERENCE}")
def test_base_pretrain_model_has_exactly_the_reference_keys_and_shapes():
    with torch.device("meta"):
        model = create_pretrain_model("base")
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    with open(REFERENCE) as f:
        ref = json.load(f)
    assert set(ours) - set(ref) == set() and set(ref) - set(ours) == set()
    assert {k: v for k, v in ours.items() if v != ref[k]} == {}


def test_sincos_pos_emb_channel_layout_matches_the_formula():
    D, h, w = 16, 3, 5  # non-square on purpose: rows and columns must not mix
    pe = build_2d_sincos_posemb(h, w, D)
    assert pe.shape == (1, D, h, w)
    q = D // 4
    for k in range(q):
        omega = 1.0 / 10000 ** (k / q)
        for r in range(h):
            for c in range(w):
                expect = [math.sin(r * omega), math.cos(r * omega), math.sin(c * omega), math.cos(c * omega)]
                got = [pe[0, b * q + k, r, c].item() for b in range(4)]
                assert got == pytest.approx(expect, abs=1e-6)


def test_adapter_resizes_pos_emb_bicubic_for_other_input_sizes():
    adapter = PatchedInputAdapter(3, 1, P, dim_tokens=32, image_size=S)
    x = torch.randn(2, 3, 48, 40)
    tokens = adapter(x)
    assert tokens.shape == (2, 6 * 5, 32)
    pos = F.interpolate(adapter.pos_emb, size=(6, 5), mode="bicubic", align_corners=False)
    patches = adapter.proj(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokens, patches + pos.flatten(2).transpose(1, 2))


def test_masked_batch_equals_stack_of_single_sample_forwards():
    model = tiny()
    B = 4
    x = inputs(B)
    hidden = random_hidden(B, [N] * 3, K=7)
    with torch.no_grad():
        tokens = model.embed(x)
        batch = model.forward_masked(tokens, hidden)
        for b in range(B):
            single = model.forward_masked(model.embed({m: v[b:b + 1] for m, v in x.items()}),
                                          {m: v[b:b + 1] for m, v in hidden.items()})
            for name, pred in batch.items():
                torch.testing.assert_close(pred[b:b + 1], single[name], atol=1e-5, rtol=1e-5)


def test_thrown_queries_dropped_per_sample_with_different_counts():
    """Thrown counts differ per sample (padding path); each sample must equal its own forward,
    and thrown positions are zero-filled."""
    model = tiny()
    B = 3
    x = inputs(B)
    hidden = random_hidden(B, [N] * 3, K=6)
    thrown = {m: h & (torch.rand(h.shape) < 0.5) for m, h in hidden.items()}
    thrown["rgb"][0] = False  # sample 0 throws nothing in rgb: different widths in the batch
    hidden = {m: h & ~thrown[m] for m, h in hidden.items()}
    with torch.no_grad():
        batch = model.forward_masked(model.embed(x), hidden, thrown)
        for b in range(B):
            one = model.forward_masked(model.embed({m: v[b:b + 1] for m, v in x.items()}),
                                       {m: v[b:b + 1] for m, v in hidden.items()},
                                       {m: v[b:b + 1] for m, v in thrown.items()})
            for name, pred in batch.items():
                torch.testing.assert_close(pred[b:b + 1], one[name], atol=1e-5, rtol=1e-5)
    grid_thrown = thrown["rgb"].reshape(B, 1, 4, 1, 4, 1).expand(B, 3, 4, P, 4, P).reshape(B, 3, S, S)
    assert bool((batch["rgb"][grid_thrown] == 0).all()) and bool((batch["norm_rgb"][grid_thrown] == 0).all())
    assert bool((batch["rgb"][~grid_thrown] != 0).all())


def test_unequal_visible_counts_are_rejected():
    model = tiny()
    hidden = {m: torch.ones(2, N, dtype=torch.bool) for m in MODS}
    hidden["rgb"][0, :5] = False  # sample 0: 5 visible
    hidden["depth"][1, :4] = False  # sample 1: 4 visible
    with pytest.raises(ValueError, match="same number of visible tokens"):
        model(inputs(2), task_masks=hidden)


def test_every_trainable_parameter_gets_a_gradient():
    model = tiny().train()
    x = inputs(2)
    preds, _ = model(x, task_masks=random_hidden(2, [N] * 3, K=8))
    sum(p.float().pow(2).mean() for p in preds.values()).backward()
    no_grad = {n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())}
    assert no_grad == set()  # the standard set-up has no legitimately unused parameter
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {f"input_adapters.{m}.pos_emb" for m in MODS} | {
        f"output_adapters.{m}.pos_emb" for m in ("rgb", "depth", "semseg", "norm_rgb")}


def test_task_queries_equal_the_canonical_sequence_sliced_with_the_same_gradients():
    """A decoder's queries are its modality's slice of the canonical sequence (mask token +
    embeddings everywhere, visible tokens scattered in): built for the slice only, they must
    equal the full sequence sliced (MultiMAE's construction), values and gradients."""
    torch.manual_seed(0)
    model = tiny()
    tokens = model.embed(inputs(3))
    info = model.input_info(tokens)
    ids_keep = model._visible_ids(tokens, random_hidden(3, [N] * 3, K=9), None)
    for name, adapter in model.output_adapters.items():
        ctx = torch.randn(3, 9 + 1, adapter.dim_tokens, requires_grad=True)
        queries, _ = adapter._queries_and_context(ctx, info, ids_keep, (4, 4))
        # Reference: the whole canonical sequence [B, 3N, D], then this modality's slice.
        pos = adapter.pos_emb.flatten(2).transpose(1, 2)[0]
        emb = adapter._context_embeddings(info, pos)
        visible = ctx[:, :9] + emb[ids_keep]
        full = (adapter.mask_token[0] + emb).expand(3, -1, -1).scatter(
            1, ids_keep.unsqueeze(-1).expand(-1, -1, ctx.shape[-1]), visible)
        task = info["tasks"][adapter.task]
        ref = full[:, task["start_idx"]:task["end_idx"]]
        torch.testing.assert_close(queries, ref, rtol=0, atol=0, msg=name)
        w = torch.randn_like(ref)
        grads = torch.autograd.grad((queries * w).sum(), [ctx, adapter.mask_token])
        ref_grads = torch.autograd.grad((ref * w).sum(), [ctx, adapter.mask_token])
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, msg=name)


def test_decoder_without_context_tasks_and_task_queries_works():
    model = MultiMAE({"rgb": PatchedInputAdapter(3, 1, P, image_size=S)},
                     {"rgb": SpatialOutputAdapter(3, 1, P, dim_tokens=32, depth=1, num_heads=2, image_size=S,
                                                  use_task_queries=False, task="rgb")},
                     dim_tokens=32, depth=1, num_heads=2)
    preds, _masks = model({"rgb": torch.randn(3, 3, S, S)}, task_masks={"rgb": random_hidden(3, [N], 5)["rgb"]})
    assert preds["rgb"].shape == (3, 3, S, S)
    preds["rgb"].sum().backward()
    unused = {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None}
    assert unused == set()


def test_mask_inputs_false_keeps_canonical_order_and_all_tokens():
    model = tiny()
    model.output_adapters = None  # forward returns the encoder output
    x = inputs(2)
    x_reordered = {m: x[m] for m in ("semseg", "rgb", "depth")}  # caller's order must not matter
    with torch.no_grad():
        encoded, masks = model(x_reordered, mask_inputs=False)
        tokens = model.embed(x)
        z = torch.cat([tokens[m] for m in MODS] + [model.global_tokens.expand(2, -1, -1)], dim=1)
        torch.testing.assert_close(encoded, model.encoder(z))
    assert all(int(m.sum()) == 0 and m.shape == (2, N) for m in masks.values())


def test_num_encoded_tokens_none_means_all_tokens():
    model = tiny()
    model.output_adapters = None
    with torch.no_grad():
        encoded, masks = model(inputs(2), num_encoded_tokens=None)
    assert encoded.shape == (2, 3 * N + 1, 96)
    assert all(int(m.sum()) == 0 for m in masks.values())


def test_random_masks_have_exactly_k_visible_per_sample():
    model = tiny()
    with torch.no_grad():
        preds, masks = model(inputs(5), num_encoded_tokens=9, alphas=0.5)
    visible = sum((1 - m).sum(1) for m in masks.values())
    assert visible.tolist() == [9] * 5
    assert preds["semseg"].shape == (5, 133, S // 4, S // 4)


def test_token_dicts_are_told_apart_from_inputs():
    model = tiny()
    x = inputs(2)
    tokens = model.embed(x)
    assert isinstance(tokens, Tokens) and tokens.image_size == (S, S) and list(tokens) == list(MODS)
    assert model.is_token_dict(tokens) and model.is_token_dict(dict(tokens)) and not model.is_token_dict(x)
    hidden = random_hidden(2, [N] * 3, K=5)
    with torch.no_grad():
        a = model.forward_masked(tokens, hidden)
        b = model.forward_masked({m: tokens[m] for m in ("depth", "semseg", "rgb")}, hidden)  # plain dict
    for name in a:
        torch.testing.assert_close(a[name], b[name])


def test_multivit_returns_all_layers_in_canonical_order():
    mae = tiny()
    vit = MultiViT(mae.input_adapters, None, dim_tokens=96, depth=3, num_heads=3)
    vit.load_state_dict({k: v for k, v in mae.state_dict().items() if not k.startswith("output_adapters")})
    vit.eval()
    x = inputs(2)
    with torch.no_grad():
        layers = vit(x, return_all_layers=True)
        last = vit(x)
        mae.output_adapters = None
        encoded, _ = mae(x, mask_inputs=False)
    assert len(layers) == 3 and layers[-1].shape == (2, 3 * N + 1, 96)
    torch.testing.assert_close(layers[-1], last)
    torch.testing.assert_close(last, encoded)


def test_bf16_autocast_keeps_the_residual_stream_in_float32():
    model = tiny()
    x = inputs(2)
    hidden = random_hidden(2, [N] * 3, K=8)
    with torch.no_grad():
        ref = model.forward_masked(model.embed(x), hidden)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tokens = model.embed(x)
            low, encoded = model.forward_masked(tokens, hidden, return_encoder=True)
    assert all(t.dtype == torch.float32 for t in tokens.values()) and encoded.dtype == torch.float32
    for name in ref:
        scale = ref[name].abs().max()
        assert (low[name].float() - ref[name]).abs().max() < 0.05 * scale


def test_fp32_output_adapters_run_outside_autocast():
    model = tiny()
    hidden = random_hidden(2, [N] * 3, K=8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        preds, _ = model(inputs(2), task_masks=hidden, fp32_output_adapters=["semseg"])
    assert preds["semseg"].dtype == torch.float32 and preds["rgb"].dtype == torch.bfloat16


def test_sample_tasks_uniformly_keeps_k_visible():
    model = tiny()
    model.output_adapters = None
    with torch.no_grad():
        encoded, masks = model(inputs(6), num_encoded_tokens=10, sample_tasks_uniformly=True)
    assert encoded.shape == (6, 11, 96)
    assert sum((1 - m).sum(1) for m in masks.values()).tolist() == [10] * 6


def test_cross_modal_decoders_for_outputs_that_are_not_inputs():
    model = tiny(in_domains=("rgb",), out_domains=("depth", "semseg"), extra_norm_rgb=False)
    hidden = {"rgb": random_hidden(2, [N], K=5)["rgb"]}
    preds, _masks = model({"rgb": torch.randn(2, 3, S, S)}, task_masks=hidden)
    assert preds["depth"].shape == (2, 1, S, S) and preds["semseg"].shape == (2, 133, S // 4, S // 4)
    sum(p.sum() for p in preds.values()).backward()
    no_grad = {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None}
    assert no_grad == set()
