"""Masking diagnostics against brute force: AUROC by counting pairs, hidden-foreground share and
token foreground by looping over tokens and pixels."""
from __future__ import annotations

import math

import pytest
import torch

from multimae_att.diagnostics import fg_auroc, fg_share, hidden_fg_share, mean_fg_auroc, token_foreground


def _auroc_pairs(scores: list[float], fg: list[bool]) -> float:
    """P(fg score > bg score) + 1/2 P(tie), by enumerating every (fg, bg) pair."""
    pos = [s for s, f in zip(scores, fg) if f]
    neg = [s for s, f in zip(scores, fg) if not f]
    if not pos or not neg:
        return math.nan
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auroc_matches_pair_counting_with_ties():
    g = torch.Generator().manual_seed(0)
    B, N = 40, 23
    scores = torch.randint(0, 6, (B, N), generator=g).float()   # many ties
    fg = torch.rand(B, N, generator=g) < torch.rand(B, 1, generator=g)
    fg[0], fg[1] = True, False                                   # undefined rows
    auroc, valid = fg_auroc(scores, fg)
    for b in range(B):
        want = _auroc_pairs(scores[b].tolist(), fg[b].tolist())
        if math.isnan(want):
            assert not valid[b] and math.isnan(auroc[b].item())
        else:
            assert valid[b]
            assert auroc[b].item() == pytest.approx(want, abs=1e-12)
    total, count = mean_fg_auroc(scores, fg)
    ok = [_auroc_pairs(scores[b].tolist(), fg[b].tolist()) for b in range(B)]
    ok = [a for a in ok if not math.isnan(a)]
    assert count.item() == len(ok)
    assert total.item() / count.item() == pytest.approx(sum(ok) / len(ok), abs=1e-12)


def test_auroc_extremes():
    fg = torch.tensor([[True, True, False, False, False]])
    assert fg_auroc(torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]]), fg)[0].item() == 1.0
    assert fg_auroc(torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]]), fg)[0].item() == 0.0
    assert fg_auroc(torch.ones(1, 5), fg)[0].item() == 0.5


def test_hidden_fg_share_and_fg_share_match_counting():
    g = torch.Generator().manual_seed(1)
    hidden = torch.rand(7, 30, generator=g) < 0.7
    fg = torch.rand(7, 30, generator=g) < 0.4
    pairs = [(h, f) for hr, fr in zip(hidden.tolist(), fg.tolist()) for h, f in zip(hr, fr)]
    want = sum(1 for h, f in pairs if h and f) / sum(1 for h, _ in pairs if h)
    assert hidden_fg_share(hidden, fg).item() == pytest.approx(want, abs=1e-12)
    assert fg_share(fg).item() == pytest.approx(sum(f for _, f in pairs) / len(pairs), abs=1e-12)
    assert math.isnan(hidden_fg_share(torch.zeros(2, 3, dtype=torch.bool), torch.ones(2, 3, dtype=torch.bool)).item())


@pytest.mark.parametrize("size,grid", [((24, 24), (6, 6)), ((12, 18), (3, 3))])
def test_token_foreground_is_the_majority_of_each_cell(size, grid):
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 5, (3,) + size, generator=g)
    fg = token_foreground(labels, grid, background_classes=[0, 1])
    h, w = size
    ch, cw = h // grid[0], w // grid[1]
    for b in range(3):
        for i in range(grid[0]):
            for j in range(grid[1]):
                cell = labels[b, i * ch:(i + 1) * ch, j * cw:(j + 1) * cw].flatten().tolist()
                share = sum(1 for v in cell if v not in (0, 1)) / len(cell)
                assert fg[b, i * grid[1] + j].item() == (share > 0.5)
