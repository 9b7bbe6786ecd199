"""Checks on tensor values, and host constants moved to the device, that do not stall an accelerator.

``if not bool(cond): raise ...`` copies ``cond`` to the host: on a GPU the Python thread waits
until every queued kernel has run, and the GPU then idles until new work is queued. A training
step holds several such checks (mask counts, budgets, finite scores); each is a stall per step.
:func:`check` raises the usual exception with its message on a CPU (where reading a value costs
nothing) and queues a device-side assertion elsewhere: the step continues at full speed, and a
failing check aborts the process with ``message`` in the device error.

:func:`to_device` moves a small host tensor (token counts, Dirichlet concentrations) to a GPU
from pinned memory without waiting: a blocking copy synchronises the stream, a stall too.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["check", "to_device"]


def check(cond: torch.Tensor, message: str, error: type[Exception] = ValueError,
          detail: Callable[[], str] | None = None) -> None:
    """Raise ``error(message)`` unless every element of the boolean tensor ``cond`` is True;
    on a non-CPU device, or inside a compiled graph, without a host sync (an asynchronous
    assertion: ``RuntimeError(message)``).

    ``detail``: called only when the check fails on a CPU, for a message that reads tensor
    values (which on a GPU would be the very sync this function avoids).
    """
    if torch.compiler.is_compiling():
        # Inside a compiled graph (``train.compile``) a host read is a graph break; the assertion
        # is traced as an op instead and fails with ``RuntimeError(message)`` on any device.
        torch._assert_async(cond.all(), message)
    elif cond.device.type == "cpu":
        if not bool(cond.all()):
            raise error(message + (f": {detail()}" if detail is not None else ""))
    else:
        torch._assert_async(cond.all(), message)


def to_device(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``x.to(device)``; a CPU tensor bound for a GPU goes from pinned memory, asynchronously."""
    device = torch.device(device)
    if x.device == device or device.type == "cpu":
        return x.to(device)
    if x.device.type == "cpu" and device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)
