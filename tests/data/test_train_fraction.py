"""data.train_fraction: stratified, seeded subsets (counted per class), and the finetune runner
training on exactly that subset."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from multimae_att.data.subset import SubsetDataset, stratified_subset, training_subset


def test_subset_keeps_the_share_of_every_class_and_depends_only_on_the_seed():
    labels = [0] * 50 + [1] * 20 + [2] * 3 + [3] * 1
    keep = stratified_subset(labels, 0.1, seed=0)
    counts = Counter(labels[i] for i in keep)
    assert counts == {0: 5, 1: 2, 2: 1, 3: 1}          # max(1, round(0.1 * n_c))
    assert keep == sorted(set(keep))
    assert keep == stratified_subset(labels, 0.1, seed=0)
    assert keep != stratified_subset(labels, 0.1, seed=1)
    assert stratified_subset(labels, 1.0, seed=3) == list(range(len(labels)))
    with pytest.raises(ValueError, match="fraction"):
        stratified_subset(labels, 0.0, seed=0)


def test_subset_draws_uniformly_within_a_class():
    labels = [0] * 10
    hits = Counter(i for s in range(2000) for i in stratified_subset(labels, 0.3, seed=s))
    assert all(abs(hits[i] / 2000 - 0.3) < 0.05 for i in range(10))


class _Labelled(torch.utils.data.Dataset):
    def __init__(self, targets):
        self.targets = targets

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return {"index": i, "cls": self.targets[i]}

    def sample_ids(self):
        return [f"s{i}" for i in range(len(self.targets))]


def test_training_subset_wraps_map_datasets_and_refuses_unlabelled_ones():
    base = _Labelled([0, 1] * 10)
    sub = training_subset(base, 0.5, seed=2)
    assert isinstance(sub, SubsetDataset) and len(sub) == 10
    assert [sub[i]["index"] for i in range(len(sub))] == sub.indices
    assert sub.sample_ids() == [f"s{i}" for i in sub.indices]
    assert training_subset(base, 1.0, seed=2) is base
    with pytest.raises(ValueError, match="folder layout"):
        training_subset(torch.utils.data.TensorDataset(torch.zeros(4)), 0.5, seed=0)


def test_finetune_trains_on_the_subset(tmp_path):
    import json
    import sys

    from helpers import REPO
    from helpers.pretrain import make_synthetic

    data = make_synthetic(tmp_path / "data")          # 16 training scenes
    sys.path.insert(0, str(REPO))
    try:
        from run_finetune import main
        steps = {}
        for fraction in (1.0, 0.5):
            out = tmp_path / f"f{fraction}"
            main(["--config", str(REPO / "configs/finetune/synthetic_linear_probe.yaml"), f"data.root={data}",
                  "data.image_size=32", "data.batch_size=2", "train.epochs=1", "log.every=1",
                  "log.progress=false", f"data.train_fraction={fraction}", f"output_dir={out}"])
            lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            steps[fraction] = max(r["step"] for r in lines)
    finally:
        sys.path.remove(str(REPO))
    labels = [int(p.parent.name.split("_")[0]) for p in sorted((data / "train" / "rgb").glob("*/*.png"))]
    assert steps[1.0] == len(labels) // 2
    assert steps[0.5] == len(stratified_subset(labels, 0.5, seed=0)) // 2
    assert steps[0.5] < steps[1.0]
