"""LR and AttG temperature schedules against their closed forms."""
import itertools
import math

import pytest

from multimae_att.schedules import LRSchedule, cosine_lr, scaled_lr, tau_schedule


def ref_lr(e, base, lo, w, t):
    # The formula written out independently: linear warm-up, then half-cosine to `lo`.
    if e < w:
        return base * e / w
    return lo + (base - lo) * (1 + math.cos(math.pi * (e - w) / (t - w))) / 2


def test_cosine_endpoints():
    assert cosine_lr(0, 1.0, 0.0, 10, 100) == 0.0
    assert cosine_lr(5, 1.0, 0.0, 10, 100) == pytest.approx(0.5)
    assert cosine_lr(10, 1.0, 0.1, 10, 100) == pytest.approx(1.0)
    assert cosine_lr(55, 1.0, 0.1, 10, 100) == pytest.approx(0.55)   # half-way: mean of ends
    assert cosine_lr(100, 1.0, 0.1, 10, 100) == pytest.approx(0.1)
    assert cosine_lr(150, 1.0, 0.1, 10, 100) == pytest.approx(0.1)


def test_tail_mode_rides_epochs_1600_to_1700():
    base = scaled_lr(1e-4, 2048)          # MultiMAE-B: blr 1e-4, batch 2048 -> 8e-4
    assert base == pytest.approx(8e-4)
    spe = 625                             # e.g. 1.28M images / 2048
    s = LRSchedule(base, 0.0, warmup_epochs=40, total_epochs=1700, start_epoch=1600,
                   steps_per_epoch=spe)
    # First step: the rate of epoch 1600 of the 1700-epoch cosine, no warm-up.
    assert s(0) == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * 1560 / 1660)))
    for step in (0, 1, 17, 31250, 62499, 62500):
        e = 1600 + step / spe
        assert s(step) == pytest.approx(ref_lr(e, base, 0.0, 40, 1700), rel=1e-12, abs=1e-18)
    assert s(100 * spe) == pytest.approx(0.0, abs=1e-20)
    # Monotone decreasing over the tail, and already small (< 1 % of base).
    vals = [s(k * 1000) for k in range(63)]
    assert all(a >= b for a, b in itertools.pairwise(vals)) and vals[0] < 0.01 * base


def test_restart_mode_and_lr_x10():
    spe = 10
    base = scaled_lr(1e-4, 256)
    s = LRSchedule(base, 0.0, 20, 100, 0, spe)
    assert s(0) == 0.0
    assert s(10 * spe) == pytest.approx(base * 0.5)          # half-way through warm-up
    assert s(20 * spe) == pytest.approx(base)                # peak at the end of warm-up
    assert s(60 * spe) == pytest.approx(base * 0.5)          # cosine mid-point
    for step in range(0, 1001, 37):
        assert s(step) == pytest.approx(ref_lr(step / spe, base, 0.0, 20, 100))
    x10 = LRSchedule(scaled_lr(1e-4, 256, lr_scale=10), 0.0, 20, 100, 0, spe)
    for step in range(0, 1001, 53):
        assert x10(step) == pytest.approx(10 * s(step))
    tail = LRSchedule(base, 0.0, 40, 1700, 1600, spe)
    tail10 = LRSchedule(scaled_lr(1e-4, 256, 10), 0.0, 40, 1700, 1600, spe)
    assert tail10(123) == pytest.approx(10 * tail(123))


def test_schedule_rejects_bad_values():
    with pytest.raises(ValueError):
        LRSchedule(1.0, 0.0, 100, 100, 0, 10)
    with pytest.raises(ValueError):
        LRSchedule(1.0, 0.0, 1, 100, 0, 0)


def test_tau_half_cosine():
    assert tau_schedule(0, 100, 0.75, 0.25) == pytest.approx(0.75)
    assert tau_schedule(50, 100, 0.75, 0.25) == pytest.approx(0.5)
    assert tau_schedule(100, 100, 0.75, 0.25) == pytest.approx(0.25)
    assert tau_schedule(25, 100, 0.75, 0.25) == pytest.approx(0.25 + 0.25 * (1 + math.cos(math.pi / 4)))
    assert tau_schedule(500, 100, 0.75, 0.25) == pytest.approx(0.25)
    assert tau_schedule(7, 100, 0.75, 0.75) == pytest.approx(0.75)
