"""Work that one process does for all: the main process runs it, the others wait for it.

Reading a large file once instead of once per process (the init checkpoint's hash), or reading
images only the main process uses (the loss predictor's held-out check). An error on the main
process must stop every process alike: raised on the main process alone, it would leave the
others waiting at their next collective until the launcher kills them.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["run_on_main"]

T = TypeVar("T")


def run_on_main(accelerator: Any, fn: Callable[[], T], share: bool = False) -> T | None:
    """``fn()`` on the main process only. Returns its result there; elsewhere the same result
    (``share``: sent with ``broadcast_object_list``, so it must pickle) or None. An exception
    of ``fn`` is raised in every process. One process (or no accelerator): just ``fn()``."""
    if accelerator is None or getattr(accelerator, "num_processes", 1) <= 1:
        return fn()
    from accelerate.utils import broadcast_object_list

    box: list[Any] = [None, None]   # (result if shared, error) of the main process
    result = None
    if accelerator.is_main_process:
        try:
            result = fn()
            box[0] = result if share else None
        except Exception as e:  # noqa: BLE001 -- re-raised below, in every process
            box[1] = e
    broadcast_object_list(box, from_process=0)
    if box[1] is not None:
        raise box[1]
    return result if accelerator.is_main_process else box[0]
