"""Attention readout vs a plain explicit-softmax reference; fused vs explicit attention."""
import pytest
import torch

from multimae_att.model import CrossAttention, MultiMAE, PatchedInputAdapter, SemSegInputAdapter

S, P = 32, 8


def model_with(num_global_tokens: int = 1, **kw) -> MultiMAE:
    inputs = {"rgb": PatchedInputAdapter(3, 1, P, image_size=S),
              "semseg": SemSegInputAdapter(10, 4, P, image_size=S, dim_class_emb=8)}
    return MultiMAE(inputs, None, num_global_tokens=num_global_tokens, dim_tokens=48, depth=3,
                    num_heads=4, **kw).eval()


def batch(B: int = 3):
    return {"rgb": torch.randn(B, 3, S, S), "semseg": torch.randint(0, 10, (B, S // 4, S // 4))}


def explicit_block(block, z):
    """A timm Block written out with materialised softmax; returns (output, probs [B, H, T, T])."""
    attn = block.attn
    B, T, D = z.shape
    h = attn.num_heads
    x = block.norm1(z)
    q, k, v = attn.qkv(x).reshape(B, T, 3, h, D // h).permute(2, 0, 3, 1, 4)
    probs = ((q @ k.transpose(-2, -1)) * (D // h) ** -0.5).softmax(dim=-1)
    z = z + attn.proj((probs @ v).transpose(1, 2).reshape(B, T, D))
    return z + block.mlp(block.norm2(z)), probs


def reference_scores(model, x, layer, query):
    tokens = model.embed(x)
    z = torch.cat(list(tokens.values()) + [model.global_tokens.expand(x["rgb"].shape[0], -1, -1)], dim=1)
    G = model.num_global_tokens
    for i, block in enumerate(model.encoder):
        z, probs = explicit_block(block, z)
        if i == layer % len(model.encoder):
            break
    rows = probs[:, :, -G:] if query == "global" else probs
    per_head = rows.mean(dim=2)[:, :, :-G]  # [B, H, N]
    return dict(zip(tokens, per_head.split([t.shape[1] for t in tokens.values()], dim=-1)))


@pytest.mark.parametrize("num_global_tokens", [1, 2])
@pytest.mark.parametrize("layer", [0, 1, -1])
@pytest.mark.parametrize("query", ["global", "mean"])
def test_readout_matches_explicit_softmax_reference(num_global_tokens, layer, query):
    model = model_with(num_global_tokens)
    x = batch()
    with torch.no_grad():
        ref = reference_scores(model, x, layer, query)
    heads = model.attention_scores(x, layer=layer, query=query, per_head=True)
    avg = model.attention_scores(x, layer=layer, query=query)
    assert list(heads) == ["rgb", "semseg"]
    for m in ref:
        assert heads[m].shape == (3, 4, 16) and avg[m].shape == (3, 16)
        torch.testing.assert_close(heads[m], ref[m], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(avg[m], ref[m].mean(dim=1), atol=1e-6, rtol=1e-5)


def test_scores_from_cached_tokens_equal_scores_from_inputs_and_carry_no_grad():
    model = model_with()
    x = batch()
    tokens = model.embed(x)
    assert tokens["rgb"].requires_grad
    from_tokens = model.attention_scores(tokens)
    from_inputs = model.attention_scores(x)
    for m in from_tokens:
        assert not from_tokens[m].requires_grad
        torch.testing.assert_close(from_tokens[m], from_inputs[m])
    # global row: a softmax row over patches + global token, so patch mass is in (0, 1)
    total = sum(s.sum(dim=1) for s in from_tokens.values())
    assert bool(((total > 0) & (total < 1)).all())


def test_readout_under_bf16_autocast_returns_float32_close_to_fp32():
    model = model_with()
    x = batch()
    ref = model.attention_scores(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model.attention_scores(x)
    for m in ref:
        assert low[m].dtype == torch.float32
        torch.testing.assert_close(low[m], ref[m], atol=2e-2, rtol=0.1)


def test_scores_ignore_stochastic_depth_in_training_mode():
    model = model_with(drop_path_rate=0.9)  # stochastic depth would change a training forward
    x = batch()
    ref = model.attention_scores(x)
    model.train()
    for _ in range(2):
        got = model.attention_scores(x)
        for m in ref:
            torch.testing.assert_close(got[m], ref[m])
    assert model.training and all(block.training for block in model.encoder)


def test_readout_rejects_bad_layer_and_query():
    model = model_with()
    with pytest.raises(ValueError, match="out of range"):
        model.attention_scores(batch(), layer=3)
    with pytest.raises(ValueError, match="unknown attention query"):
        model.attention_scores(batch(), query="cls")


def test_fused_and_explicit_encoder_blocks_agree():
    model = model_with()
    z = torch.randn(2, 33, 48)
    for block in model.encoder:
        assert block.attn.fused_attn  # fused SDPA is what runs in training
        fused = block(z)
        block.attn.fused_attn = False
        try:
            explicit_timm = block(z)
        finally:
            block.attn.fused_attn = True
        explicit_ours, _ = explicit_block(block, z)
        torch.testing.assert_close(fused, explicit_timm, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fused, explicit_ours, atol=1e-5, rtol=1e-5)


def test_cross_attention_matches_explicit_softmax():
    xattn = CrossAttention(32, num_heads=4, qkv_bias=True).eval()
    x, ctx = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    q = xattn.q(x).reshape(2, 5, 4, 8).transpose(1, 2)
    k, v = xattn.kv(ctx).reshape(2, 7, 2, 4, 8).permute(2, 0, 3, 1, 4)
    probs = (q @ k.transpose(-2, -1) / 8 ** 0.5).softmax(-1)
    expect = xattn.proj((probs @ v).transpose(1, 2).reshape(2, 5, 32))
    torch.testing.assert_close(xattn(x, ctx), expect, atol=1e-6, rtol=1e-5)


def test_mean_readout_in_row_chunks_equals_one_block(monkeypatch):
    import multimae_att.scoring.readout as readout

    model = model_with()
    x = batch()
    whole = model.attention_scores(x, query="mean", per_head=True)
    monkeypatch.setattr(readout, "MAX_LOGITS", 3 * 4 * 33 * 5)  # 5 query rows per chunk, uneven tail
    chunked = model.attention_scores(x, query="mean", per_head=True)
    for m in whole:
        torch.testing.assert_close(chunked[m], whole[m], atol=1e-7, rtol=1e-6)


def test_set_fused_attn_switches_every_block_and_keeps_the_function():
    from multimae_att.model import create_pretrain_model

    model = create_pretrain_model("tiny", image_size=S, patch_size=P).eval()
    x = {"rgb": torch.randn(2, 3, S, S), "depth": torch.randn(2, 1, S, S),
         "semseg": torch.randint(0, 133, (2, S // 4, S // 4))}
    hidden = {m: torch.arange(16).expand(2, 16) >= 3 for m in ("rgb", "depth", "semseg")}
    with torch.no_grad():
        fused, _ = model(x, task_masks=hidden)
        model.set_fused_attn(False)
        explicit, _ = model(x, task_masks=hidden)
        flags = [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]  # set by the pass
    assert len(flags) == 3 + 4 * 3 and not any(flags)  # encoder blocks + per decoder: xattn + 2 blocks
    for name in fused:
        torch.testing.assert_close(explicit[name], fused[name], atol=1e-5, rtol=1e-5)
