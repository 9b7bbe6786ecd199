"""A training step reads no device value on the host (each such read stalls a GPU).

On this CPU-only suite the reads are caught where they happen: every op that copies a tensor
value to the host (``.item()``, ``bool()``, ``int()``, ``float()``: ``aten._local_scalar_dense``;
data-dependent shapes: ``nonzero``, ``masked_select``, ``unique``) is recorded with its call
stack while a full step runs (forward, losses, backward, AdamW). Allowed: checks made through
:func:`multimae_att.device_checks.check` (a device-side assertion on a GPU) and the attention
cache, whose arrays live on the host by design.
"""
import collections
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from multimae_att.bench.cases import BenchCases
from multimae_att.bench.presets import PRESETS

READS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_dim",
         "unique_consecutive", "item"}
HOST_SIDE = ("multimae_att/device_checks.py", "multimae_att/scoring/cache.py")


class HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.found = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in READS:
            frames = [f for f in traceback.extract_stack() if "multimae_att" in f.filename]
            if not any(f.filename.endswith(HOST_SIDE) for f in frames):
                where = " <- ".join(f"{f.filename.split('multimae_att/')[-1]}:{f.lineno}" for f in frames[::-1][:4])
                self.found[f"{func.overloadpacket.__name__} at {where}"] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return BenchCases(PRESETS["micro"], torch.device("cpu"), "fp32", str(tmp_path_factory.mktemp("cache")))


@pytest.mark.parametrize("case", ["random_step", "attention_step", "cached_step", "amt_step", "hpm_step",
                                  "cached_hpm_step"])
def test_training_step_reads_nothing_from_the_device(bench, case):
    step = bench.cases()[case]
    step()  # optimizer state exists from here on
    spy = HostReads()
    with spy:
        loss = step()
    assert torch.isfinite(loss)
    assert not spy.found, f"host reads in {case}: {dict(spy.found)}"


def test_cached_step_training_the_loss_predictor_reads_nothing_from_the_device(bench):
    """The bench's cached hpm step trains the head on no sample; here every sample gets its
    no-mask pass (the rows are drawn on the host, then gathered on the device)."""
    planner = bench.hpm_planner(True)
    planner.cached_train_share = 1.0
    bench.train_step(planner, bench.lossp_module, epoch=1.0)
    spy = HostReads()
    with spy:
        loss = bench.train_step(planner, bench.lossp_module, epoch=1.0)
    assert torch.isfinite(loss)
    assert not spy.found, f"host reads: {dict(spy.found)}"


def test_the_spy_sees_reads():
    spy = HostReads()
    with spy:
        x = torch.ones(3)
        float(x.sum()), (x > 0).nonzero()
    assert sum(spy.found.values()) == 2
    from multimae_att.pretrain.losses import LossSpec, counted_patch_losses

    spy = HostReads()
    with spy:  # without a bound the fullest sample's count is read
        counted_patch_losses(torch.zeros(2, 133, 8, 8), torch.zeros(2, 8, 8, dtype=torch.long),
                             torch.eye(2, 4, dtype=torch.bool), LossSpec("ce"), (2, 2))
    assert any("pretrain/losses.py" in k for k in spy.found)
