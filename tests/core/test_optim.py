"""AdamW kernels: the device's fused kernel is chosen, computes the same update as the loop, survives loading."""
import copy

import pytest
import torch

from multimae_att.optim import adamw_implementation, build_adamw, load_optimizer_state


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))


def _groups(model):
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}]


def _train(opt, model, steps=4, lrs=(1e-2, 2e-2, 5e-3, 1e-2)):
    g = torch.Generator().manual_seed(1)
    for i in range(steps):
        for group in opt.param_groups:
            group["lr"] = lrs[i % len(lrs)]  # the runners set the schedule's lr every step
        x = torch.randn(8, 7, generator=g)
        opt.zero_grad(set_to_none=True)
        (model(x) ** 2).mean().backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_implementation_per_device():
    assert adamw_implementation("cpu") == "fused"  # torch >= 2.4 has a fused CPU AdamW
    assert adamw_implementation("cuda") == "fused"
    assert adamw_implementation(torch.device("meta")) == "for-loop"
    assert build_adamw(_model().parameters(), "cpu").defaults["fused"] is True
    with pytest.raises(ValueError, match="AdamW implementation"):
        build_adamw(_model().parameters(), "cpu", implementation="apex")


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_kernels_compute_the_loop_update(impl):
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    ref_model, model = _model(), _model()
    ref = _train(build_adamw(_groups(ref_model), "cpu", implementation="for-loop", **kw), ref_model)
    out = _train(build_adamw(_groups(model), "cpu", implementation=impl, **kw), model)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert any((a - p).abs().max() > 1e-3 for a, p in zip(out, _model().parameters()))  # it trained


def test_loading_a_loop_state_keeps_the_fused_kernel_and_continues_identically():
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    loop_model = _model()
    loop = build_adamw(_groups(loop_model), "cpu", implementation="for-loop", **kw)
    _train(loop, loop_model, steps=2)
    state = copy.deepcopy(loop.state_dict())  # as read back from a checkpoint file
    fused_model = _model()
    fused_model.load_state_dict(loop_model.state_dict())
    fused = build_adamw(_groups(fused_model), "cpu", **kw)
    load_optimizer_state(fused, state)
    assert all(g["fused"] for g in fused.param_groups)
    ref = _train(loop, loop_model, steps=2)
    out = _train(fused, fused_model, steps=2)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
