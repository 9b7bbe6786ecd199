"""Checkpoint IO: safe loading, layouts, checked loading, adaptation, export, atomic saves."""
import argparse
import os
import pickle
from functools import partial

import pytest
import torch
from torch import nn

from multimae_att.checkpoint import (
    CheckpointKeyError,
    UnsafeCheckpointError,
    export_weights,
    load_checkpoint,
    load_state_dict_file,
    load_weights,
    multimae_to_timm,
    save_atomic,
    timm_to_multimae,
)
from multimae_att.model import MultiViT, PatchedInputAdapter, create_pretrain_model

S, P = 32, 8


def tiny(size=S, **kw):
    return create_pretrain_model("tiny", image_size=size, patch_size=P, **kw).eval()


def inputs(B, size=S):
    return {"rgb": torch.randn(B, 3, size, size), "depth": torch.randn(B, 1, size, size),
            "semseg": torch.randint(0, 133, (B, size // 4, size // 4))}


def _touch(path):  # what a malicious pickle would call
    with open(path, "w") as f:
        f.write("pwned")


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return _touch, (self.marker,)


def test_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "args": Payload(str(marker))}, path)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError, match="refusing to load .*evil.pth"):
        load_checkpoint(path)
    with pytest.raises(UnsafeCheckpointError):
        load_weights(tiny(), path)
    assert not marker.exists()


def test_released_style_checkpoint_with_namespace_args_loads(tmp_path):
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(inputs(1), mask_inputs=False)[0]["rgb"].sum().backward()
    opt.step()
    path = tmp_path / "release.pth"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 1599,
                "scaler": {"scale": 65536.0, "growth_tracker": 3},
                "args": argparse.Namespace(in_domains=["rgb", "depth"], lr=1e-4, model="x")}, path)
    ckpt = load_checkpoint(path)
    assert ckpt["epoch"] == 1599 and ckpt["args"].in_domains == ["rgb", "depth"]
    fresh = tiny()
    assert load_weights(fresh, path) == ([], [])
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k


def test_export_round_trip_is_bit_exact(tmp_path):
    model = tiny()
    path = tmp_path / "export.pth"
    export_weights(model, path, extra={"epoch": 3})
    state = load_state_dict_file(path)
    fresh = tiny()
    load_weights(fresh, state)
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k
    assert load_checkpoint(path)["epoch"] == 3


def test_multimae_timm_round_trip_is_bit_exact():
    state = tiny().state_dict()
    timm_state = multimae_to_timm(state)
    assert timm_state["pos_embed"].shape == (1, 1 + 16, 96) and not timm_state["pos_embed"][0, 0].any()
    back = timm_to_multimae(timm_state)
    encoder_keys = [k for k in state if k.startswith(("encoder.", "input_adapters.rgb.")) or k == "global_tokens"]
    assert sorted(back) == sorted(encoder_keys)
    for k in encoder_keys:
        assert torch.equal(back[k], state[k]), k


def test_timm_class_token_position_folds_into_global_token():
    state = multimae_to_timm(tiny().state_dict())
    state["pos_embed"][0, 0] = torch.randn(96)
    back = timm_to_multimae(state)
    torch.testing.assert_close(back["global_tokens"], state["cls_token"] + state["pos_embed"][:, :1])


def test_timm_layout_export_runs_the_same_encoder_in_timm(tmp_path):
    import timm

    mae = tiny()
    path = tmp_path / "vit.pth"
    export_weights(mae, path, layout="timm")
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=S, patch_size=P, embed_dim=96, depth=3, num_heads=3, num_classes=0,
        norm_layer=partial(nn.LayerNorm, eps=1e-6)).eval()
    missing, unexpected = load_weights(vit, path, expected_missing=["norm.*"])
    assert sorted(missing) == ["norm.bias", "norm.weight"] and unexpected == []
    vit.norm = nn.Identity()
    rgb_only = MultiViT({"rgb": PatchedInputAdapter(3, 1, P, image_size=S)}, None, dim_tokens=96, depth=3,
                        num_heads=3).eval()
    load_weights(rgb_only, path)  # timm layout converted back on the fly
    x = torch.randn(2, 3, S, S)
    with torch.no_grad():
        ours = rgb_only({"rgb": x})  # global token LAST
        theirs = vit.forward_features(x)  # class token FIRST
    torch.testing.assert_close(ours[:, -1], theirs[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[:, :-1], theirs[:, 1:], atol=1e-5, rtol=1e-5)


def test_checked_loading_names_undeclared_differences():
    state = tiny().state_dict()
    rgb_vit = MultiViT({"rgb": PatchedInputAdapter(3, 1, P, image_size=S)}, None, dim_tokens=96, depth=3,
                       num_heads=3)
    with pytest.raises(CheckpointKeyError, match="unexpected keys: .*input_adapters.depth.proj.weight"):
        load_weights(rgb_vit, state)
    missing, unexpected = load_weights(rgb_vit, state, expected_unexpected=[
        "output_adapters.*", "input_adapters.depth.*", "input_adapters.semseg.*"])
    assert missing == [] and "output_adapters.rgb.mask_token" in unexpected
    del state["encoder.1.attn.qkv.bias"]
    with pytest.raises(CheckpointKeyError, match=r"missing keys: \['encoder.1.attn.qkv.bias'\]"):
        load_weights(tiny(), state)
    state = tiny().state_dict()
    state["encoder.0.mlp.fc1.weight"] = torch.zeros(5, 96)
    with pytest.raises(CheckpointKeyError,
                       match=r"encoder.0.mlp.fc1.weight: checkpoint \[5, 96\] vs model \[384, 96\]"):
        load_weights(tiny(), state)


def test_pos_emb_resized_for_another_input_size_reproduces_on_the_fly_resizing():
    small = tiny(size=S)
    big = tiny(size=48)
    load_weights(big, small.state_dict())
    assert big.input_adapters.rgb.pos_emb.shape[-2:] == (6, 6)
    x = inputs(2, size=48)
    hidden = {m: torch.rand(2, 36).argsort(1) >= 10 for m in ("rgb", "depth", "semseg")}
    with torch.no_grad():
        a, b = small.embed(x), big.embed(x)
        for m in a:  # bicubic (rgb, depth) and bilinear (semseg): same as the small model's on-the-fly resize
            torch.testing.assert_close(a[m], b[m], atol=1e-6, rtol=1e-6)
        pa, pb = small.forward_masked(a, hidden), big.forward_masked(b, hidden)
    for name in pa:  # decoders: bilinear, as on the fly
        torch.testing.assert_close(pa[name], pb[name], atol=1e-5, rtol=1e-5)


def test_semseg_class_embedding_padded_when_classes_grow():
    old = tiny()
    new = tiny(semseg_num_classes=150)
    init_rows = new.input_adapters.semseg.class_emb.weight[133:].clone()
    # the semseg decoder's output layer changes width with the class count: a declared difference
    state = {k: v for k, v in old.state_dict().items() if not k.startswith("output_adapters.semseg.out_proj")}
    load_weights(new, state, expected_missing=["output_adapters.semseg.out_proj.*"])
    weight = new.input_adapters.semseg.class_emb.weight
    assert weight.shape == (150, 64)
    assert torch.equal(weight[:133], old.input_adapters.semseg.class_emb.weight)
    assert torch.equal(weight[133:], init_rows)


def test_save_atomic_replaces_whole_file_and_leaves_no_temp_on_failure(tmp_path):
    path = tmp_path / "sub" / "state.pth"
    save_atomic({"a": torch.arange(3)}, path)
    assert torch.equal(load_checkpoint(path)["a"], torch.arange(3))
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        save_atomic({"a": lambda: 0}, path)  # lambdas cannot be pickled: the write fails midway
    assert torch.equal(load_checkpoint(path)["a"], torch.arange(3))  # old file intact
    assert os.listdir(path.parent) == ["state.pth"]


def test_safetensors_file_in_timm_layout_loads(tmp_path):
    from safetensors.torch import save_file

    model = tiny()
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in multimae_to_timm(model.state_dict()).items()}, str(path))
    rgb_only = MultiViT({"rgb": PatchedInputAdapter(3, 1, P, image_size=S)}, None, dim_tokens=96, depth=3,
                        num_heads=3)
    load_weights(rgb_only, path)
    assert torch.equal(rgb_only.encoder[2].mlp.fc2.weight, model.encoder[2].mlp.fc2.weight)
    assert torch.equal(rgb_only.global_tokens, model.global_tokens)
