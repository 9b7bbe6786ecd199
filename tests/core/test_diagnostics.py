"""Masking diagnostics against brute force: AUROC by counting pairs, hidden-foreground share and
token foreground by looping over tokens and pixels."""
from __future__ import annotations

import math

import pytest
import torch

from multimae_att.diagnostics import fg_auroc, fg_share, hidden_fg_share, mean_fg_auroc, token_foreground

from helpers.pretrain import data_root


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


def test_step_diagnostics_combine_the_pieces():
    from multimae_att.diagnostics import step_diagnostics

    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 4, (5, 8, 8), generator=g)
    grids = {"rgb": (4, 4), "depth": (2, 2)}
    hidden = {"rgb": torch.rand(5, 16, generator=g) < 0.5, "depth": torch.rand(5, 4, generator=g) < 0.5}
    scores = {"rgb": torch.rand(5, 16, generator=g)}
    out = step_diagnostics(labels, grids, hidden, scores, [0])
    fg = {m: token_foreground(labels, grids[m], [0]) for m in grids}
    pairs = [(h, f) for m in grids for hr, fr in zip(hidden[m].tolist(), fg[m].tolist()) for h, f in zip(hr, fr)]
    assert out["mask/hidden_fg_share"].item() == pytest.approx(
        sum(h and f for h, f in pairs) / sum(h for h, _ in pairs))
    ok = [a for a in (_auroc_pairs(scores["rgb"][b].tolist(), fg["rgb"][b].tolist()) for b in range(5))
          if not math.isnan(a)]
    assert out["scores/fg_auroc.rgb"].item() == pytest.approx(sum(ok) / len(ok))
    assert set(out) == {"mask/hidden_fg_share", "scores/fg_auroc.rgb"}


@pytest.mark.parametrize("strategy", ["random", "high"])
def test_pretraining_logs_masking_diagnostics_on_log_steps(tmp_path, data_root, strategy):
    import json

    from helpers import REPO
    from helpers.pretrain import tiny_config

    cfg = tiny_config(tmp_path / "c.yaml", data_root, data={"background_classes": [0, 1]},
                      masking={"strategy": strategy}, train={"max_steps": 4}, log={"every": 2})
    import sys
    sys.path.insert(0, str(REPO))
    try:
        from run_pretrain import main
        main(["--config", str(cfg), f"output_dir={tmp_path / 'run'}"])
    finally:
        sys.path.remove(str(REPO))
        from accelerate.state import AcceleratorState
        AcceleratorState._reset_state(True)
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [2, 4]
    for r in recs:
        share = r["mask/hidden_fg_share"]
        assert share is None or 0.0 <= share <= 1.0
        aurocs = {k: v for k, v in r.items() if k.startswith("scores/fg_auroc.")}
        if strategy == "random":
            assert not aurocs                  # no scoring pass, no scores to judge
        else:
            assert set(aurocs) == {f"scores/fg_auroc.{m}" for m in ("rgb", "depth", "semseg")}
            assert all(v is None or 0.0 <= v <= 1.0 for v in aurocs.values())
    assert any(r["mask/hidden_fg_share"] is not None for r in recs)
    if strategy == "high":
        assert any(r[k] is not None for r in recs for k in r if k.startswith("scores/"))
