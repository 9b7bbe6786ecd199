"""device_checks on a CPU: checks raise the requested error with their message; moves are plain copies."""
import pytest
import torch

from multimae_att.device_checks import check, to_device


def test_check_raises_the_error_with_message_and_detail_only_when_false():
    check(torch.tensor([True, True]), "never")
    calls = []
    with pytest.raises(RuntimeError, match=r"counts differ: \[1, 2\]"):
        check(torch.tensor([True, False]), "counts differ", RuntimeError,
              lambda: calls.append(1) or str([1, 2]))
    check(torch.ones(3) > 0, "fine", detail=lambda: calls.append(2) or "")
    assert calls == [1]  # the detail is built only for a failing check


def test_to_device_on_the_cpu_is_the_tensor_itself():
    x = torch.arange(3)
    assert to_device(x, "cpu") is x
