"""The attention kernel chosen per pass (``train.attention``) and fused == explicit, values and gradients."""
import pytest
import torch

from multimae_att.model import create_pretrain_model
from multimae_att.model.attention import attention_modules, auto_fused, use_fused

S, P = 32, 8
MODS = ("rgb", "depth", "semseg")


def tiny_model():
    torch.manual_seed(0)
    return create_pretrain_model("tiny", image_size=S, patch_size=P)


def inputs(B=2):
    g = torch.Generator().manual_seed(1)
    return {"rgb": torch.randn(B, 3, S, S, generator=g), "depth": torch.randn(B, 1, S, S, generator=g),
            "semseg": torch.randint(0, 133, (B, S // 4, S // 4), generator=g)}


def masks(B=2):
    n = (S // P) ** 2  # 16 tokens per modality; 3 + 2 + 4 visible in every sample
    return {m: torch.arange(n).expand(B, n) >= k for m, k in zip(MODS, (3, 2, 4))}


@pytest.mark.parametrize("device, dtype, grad, fused", [
    ("cpu", torch.bfloat16, True, False),    # the slow CPU flash-attention backward
    ("cpu", torch.float16, True, False),
    ("cpu", torch.bfloat16, False, True),    # no-grad scoring pass: fused
    ("cpu", torch.float32, True, True),
    ("cpu", torch.float32, False, True),
    ("cuda", torch.bfloat16, True, True),
    ("cuda", torch.float32, True, True),
])
def test_auto_choice_per_device_dtype_and_pass(device, dtype, grad, fused):
    assert auto_fused(device, dtype, grad) is fused


def test_use_fused_reads_autocast_and_grad_mode_and_obeys_overrides():
    x = torch.zeros(2, 3)
    assert use_fused("auto", x)  # fp32, grad on
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not use_fused("auto", x)
        assert use_fused("auto", x, grad=False)
        with torch.no_grad():
            assert use_fused("auto", x)
        assert use_fused("fused", x) and not use_fused("explicit", x, grad=False)
    assert not use_fused("auto", x.bfloat16())  # a bf16 model without autocast
    with pytest.raises(ValueError, match="attention must be one of"):
        use_fused("flash", x)
    with pytest.raises(ValueError, match="attention must be one of"):
        tiny_model().set_attention("flash")


def _flags_seen(model, fn):
    """Run fn; return the set of fused_attn values the attention modules had when they ran."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(mod.fused_attn))
             for m in attention_modules(model)]
    try:
        fn()
    finally:
        for h in hooks:
            h.remove()
    assert seen, "no attention module ran"
    return set(seen)


def test_a_bf16_cpu_step_trains_explicit_and_scores_fused():
    model = tiny_model().train()
    x = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = model.embed(x)
        assert _flags_seen(model, lambda: model.attention_scores(tokens)) == {True}
        assert _flags_seen(model, lambda: model.forward_masked(tokens, masks())) == {False}
    # fp32 training and a forced mode
    assert _flags_seen(model, lambda: model.forward_masked(model.embed(x), masks())) == {True}
    model.set_attention("fused")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _flags_seen(model, lambda: model.forward_masked(model.embed(x), masks())) == {True}
    model.set_attention("explicit")
    assert _flags_seen(model, lambda: model.attention_scores(x)) == {False}


def test_finetune_passes_choose_too():
    from multimae_att.model import MultiViT

    model = tiny_model()
    vit = MultiViT(model.input_adapters, None, dim_tokens=model.dim_tokens, depth=len(model.encoder),
                   num_heads=model.num_heads)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _flags_seen(vit, lambda: vit(inputs())) == {False}
        with torch.no_grad():
            assert _flags_seen(vit, lambda: vit(inputs())) == {True}


def _loss_and_grads(model, mode, dtype=None):
    model.set_attention(mode)
    model.zero_grad(set_to_none=True)
    ctx = torch.autocast("cpu", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False)
    with ctx:
        preds = model.forward_masked(model.embed(inputs()), masks())
        loss = sum((p.float() ** 2).mean() for p in preds.values())
    loss.backward()
    return preds, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_fused_and_explicit_paths_give_the_same_predictions_and_gradients():
    model = tiny_model().train()
    p_f, g_f = _loss_and_grads(model, "fused")
    p_e, g_e = _loss_and_grads(model, "explicit")
    assert set(g_f) == set(g_e) and len(g_f) > 50
    for k in p_f:
        torch.testing.assert_close(p_e[k], p_f[k], atol=1e-5, rtol=1e-5)
    for n in g_f:
        torch.testing.assert_close(g_e[n], g_f[n], atol=1e-5, rtol=1e-4, msg=n)


def test_fused_and_explicit_agree_in_bf16_to_bf16_precision():
    model = tiny_model().train()
    p_f, g_f = _loss_and_grads(model, "fused", torch.bfloat16)
    p_e, g_e = _loss_and_grads(model, "explicit", torch.bfloat16)
    for k in p_f:  # bf16 has 8 bits of mantissa: agree to a few units of its last place
        torch.testing.assert_close(p_e[k].float(), p_f[k].float(), atol=0.05, rtol=0.05)
    num = sum((g_e[n] - g_f[n]).float().norm() ** 2 for n in g_f) ** 0.5
    den = sum(g_f[n].float().norm() ** 2 for n in g_f) ** 0.5
    assert float(num / den) < 0.05
