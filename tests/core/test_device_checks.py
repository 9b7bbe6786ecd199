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


def test_check_inside_a_compiled_graph_is_traced_not_a_graph_break():
    """``train.compile``: a check in a compiled module must not split its graph (a host read is
    a graph break) and must still fail with its message."""
    def f(x):
        check(x > 0, "x must be positive")
        return x * 2

    explained = torch._dynamo.explain(f)(torch.ones(3))
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    compiled = torch.compile(f, backend="eager")
    assert torch.equal(compiled(torch.ones(3)), torch.full((3,), 2.0))
    with pytest.raises(RuntimeError, match="x must be positive"):
        compiled(-torch.ones(3))
