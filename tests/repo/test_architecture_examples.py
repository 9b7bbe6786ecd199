"""docs/ARCHITECTURE.md: the smallest example of each extension point runs as written."""
import re

import pytest
import torch

from helpers import REPO

DOC = (REPO / "docs" / "ARCHITECTURE.md").read_text()


def _block(heading: str) -> str:
    """The first python code block under ``### heading``."""
    section = DOC.split(f"### {heading}\n", 1)[1].split("\n### ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_every_linked_file_exists():
    links = re.findall(r"\]\((\.\./[^)#]+)\)", DOC)
    assert links, "the step diagram links its files"
    missing = [link for link in links if not (REPO / "docs" / link).resolve().exists()]
    assert not missing


def test_strategy_example_registers_a_working_strategy():
    from multimae_att.masking import STRATEGIES, make_masks, sample_budgets, validate

    ns: dict = {}
    exec(_block("A masking strategy"), ns)
    try:
        g = torch.Generator().manual_seed(0)
        scores = {"rgb": torch.rand(3, 16, generator=g), "depth": torch.rand(3, 16, generator=g)}
        visible = sample_budgets([16, 16], 10, 3, generator=g)
        masks = make_masks("high_noisy", scores, visible, generator=g, sigma=0.0)
        validate(masks, visible, 10)
        high = make_masks("high", scores, visible)     # sigma = 0: exactly high
        assert all(torch.equal(masks.hidden[m], high.hidden[m]) for m in scores)
    finally:
        STRATEGIES.pop("high_noisy", None)


def test_score_source_example_scores_every_token():
    from multimae_att.model import create_pretrain_model
    from multimae_att.scoring import ScorePass

    ns: dict = {"ScorePass": ScorePass}
    exec(_block("A score source"), ns)
    model = create_pretrain_model("tiny", image_size=32).eval()
    x = {"rgb": torch.randn(2, 3, 32, 32), "depth": torch.randn(2, 1, 32, 32),
         "semseg": torch.randint(0, 133, (2, 8, 8))}
    tokens = model.embed(x)
    out = ns["FeatureNormScores"]()(model, tokens)
    assert {m: tuple(s.shape) for m, s in out.scores.items()} == dict.fromkeys(x, (2, 4))
    assert all((s > 0).all() for s in out.scores.values())
    with pytest.raises(ValueError, match="no attention heads"):
        ns["FeatureNormScores"]()(model, tokens, per_head=True)


def test_modality_example_fits_the_table():
    from multimae_att.modalities import LossSpec, Modality, Output

    block = _block("A modality")
    modality_src = block.split("# MODALITIES", 1)[1].split("# OUTPUTS", 1)[0]
    output_src = block.split("# OUTPUTS", 1)[1]
    env = {"Modality": Modality, "Output": Output, "LossSpec": LossSpec}
    (name, normal), = eval("{" + modality_src + "}", env).items()
    (out_name, out), = eval("{" + output_src + "}", env).items()
    assert (name, normal.channels, normal.model, normal.labels) == ("normal", 3, True, False)
    assert (out_name, out.target, out.loss.kind) == ("normal", "normal", "l1")


def test_finetune_task_example_trains_a_head():
    from multimae_att.finetune.config import TASK_FACTS, FinetuneConfig, TaskFacts
    from multimae_att.finetune.heads import LinearOutputAdapter
    from multimae_att.finetune.tasks import TASK_SPECS, ClassificationTask

    ns: dict = {"ClassificationTask": ClassificationTask, "LinearOutputAdapter": LinearOutputAdapter,
                "TASK_SPECS": TASK_SPECS, "TASK_FACTS": TASK_FACTS, "TaskFacts": TaskFacts}
    exec(_block("A finetune task"), ns)
    try:
        cfg = FinetuneConfig()
        cfg.model.size, cfg.data.image_size, cfg.task.num_classes = "tiny", 32, 5
        cfg.task.name = "cls_global"
        cfg.__post_init__()                   # the config checks know the new task from its row
        assert cfg.head_kind() == "linear" and "cls" in cfg.label_ranges()
        task = TASK_SPECS["cls_global"](cfg)
        model = task.build()
        batch = {"rgb": torch.randn(2, 3, 32, 32), "cls": torch.tensor([1, 2])}
        loss = task.loss(task.forward(model, batch), batch)
        loss.backward()
        assert torch.isfinite(loss) and model.output_adapters["cls"].use_mean_pooling is False
    finally:
        TASK_SPECS.pop("cls_global", None)
        TASK_FACTS.pop("cls_global", None)
