"""FLOPs of a benchmark case and the device's matrix-product peak, for ``efficiency``.

``flops``: floating-point operations of one call, counted by ``torch.utils.flop_counter``
(matrix products, convolutions and scaled-dot-product attention, forward and backward; 2 per
multiply-add; elementwise work is not counted). torch registers the CUDA attention kernels;
the CPU flash-attention kernels are added here with the same formulas. What is counted is the
function, not the kernel: torch counts a fused attention backward as 5 products (it recomputes
the logits), an explicit one does 4; fused backward counts are scaled by 4/5 so that fused and
explicit attention (and our step and the original's explicit one) count the same work.

``efficiency`` = achieved FLOP/s of a case / ``matmul_peak``, the FLOP/s of a large square matrix
product in the same dtype on the same device and threads (best of a few): the share of what
this machine's matrix units deliver that a step turns into counted work.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.utils import flop_counter

from multimae_att.bench.timing import synchronize

__all__ = ["count_flops", "matmul_peak"]

_aten = torch.ops.aten


def _cpu_flash(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


_CPU_ATTENTION = {_aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash,
                  _aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` (it runs once, for real); see the module docstring."""
    counter = flop_counter.FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION)
    with counter:
        fn()
    total = 0.0
    for op, count in counter.get_flop_counts().get("Global", {}).items():
        name = str(op)
        fused_backward = "attention" in name and "backward" in name
        total += count * (4 / 5 if fused_backward else 1)
    return int(round(total))


def matmul_peak(device: torch.device, dtype: str, size: int, repeats: int = 3) -> float:
    """FLOP/s of an ``n x n @ n x n`` product in ``dtype`` (``fp32``/``bf16``), best of ``repeats``.

    Timed as the bench times its cases: process CPU time on a CPU (steady on a shared machine,
    per thread-second with several threads), wall time with synchronisation on a GPU.
    """
    n = size
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=g).to(dt)
    b = torch.randn(n, n, device=device, generator=g).to(dt)
    a @ b  # warm-up (kernel selection, page faults)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        a @ b
        synchronize(device)
        best = min(best, (time.process_time() - c0) if device.type == "cpu" else (time.perf_counter() - t0))
    return 2.0 * n ** 3 / max(best, 1e-12)
