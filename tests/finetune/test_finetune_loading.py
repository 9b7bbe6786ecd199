"""Initialising task models from checkpoints: exact missing/unexpected key sets, resized grids."""
import pytest
import torch

from multimae_att.checkpoint import CheckpointKeyError, export_weights, save_atomic
from multimae_att.finetune.config import load_finetune_config
from multimae_att.finetune.loading import load_pretrained
from multimae_att.finetune.tasks import make_task
from multimae_att.model import create_pretrain_model

TASK_OVERRIDES = {
    "cls": ["task.name=cls", "task.num_classes=8"],
    "linear_probe": ["task.name=linear_probe", "task.num_classes=8"],
    "knn": ["task.name=knn", "task.num_classes=8"],
    "semseg_rgbd": ["task.name=semseg", "task.num_classes=10", "model.in_modalities=[rgb,depth]",
                    "head.embed_dim=64", "head.depth=1"],
    "semseg_dpt": ["task.name=semseg", "task.num_classes=10", "head.kind=dpt",
                   "head.hooks=[0,1,2,2]", "head.layer_dims=[8,8,8,8]", "head.feature_dim=8"],
    "depth": ["task.name=depth", "task.loss=berhu", "head.hooks=[0,1,2,2]",
              "head.layer_dims=[8,8,8,8]", "head.feature_dim=8"],
}


@pytest.fixture(scope="module")
def pretrain_ckpt(tmp_path_factory):
    """A MultiMAE-layout pretraining checkpoint (rgb+depth+semseg in, 4 decoders) at 32 px."""
    torch.manual_seed(0)
    model = create_pretrain_model("tiny", image_size=32, patch_size=16)
    path = tmp_path_factory.mktemp("ckpt") / "pretrain.pth"
    export_weights(model, path, extra={"epoch": 1599})
    return path, model.state_dict()


def _task_model(name, image_size=64):
    cfg = load_finetune_config(None, TASK_OVERRIDES[name] + ["model.size=tiny",
                                                             f"data.image_size={image_size}"])
    task = make_task(cfg)
    return task, task.build()


@pytest.mark.parametrize("name", sorted(TASK_OVERRIDES))
def test_pretraining_checkpoint_reports_exact_key_sets(pretrain_ckpt, name):
    path, ckpt = pretrain_ckpt
    task, model = _task_model(name)
    target = model.state_dict()
    report = load_pretrained(model, path, task)
    head = {k for k in target if task.output and k.startswith(f"output_adapters.{task.output}.")}
    used_inputs = {k.split(".")[1] for k in target if k.startswith("input_adapters.")}
    expected_unexpected = {k for k in ckpt if k.startswith("output_adapters.")
                           or (k.startswith("input_adapters.") and k.split(".")[1] not in used_inputs)}
    assert set(report.missing) == head and not report.head_loaded
    assert set(report.unexpected) == expected_unexpected
    # encoder weights copied, positional grid resized from 2x2 (32 px) to 4x4 (64 px)
    loaded = model.state_dict()
    torch.testing.assert_close(loaded["encoder.1.mlp.fc1.weight"], ckpt["encoder.1.mlp.fc1.weight"])
    assert loaded["input_adapters.rgb.pos_emb"].shape[-2:] == (4, 4)


def test_timm_layout_checkpoint_loads_into_cls(pretrain_ckpt, tmp_path):
    _, ckpt = pretrain_ckpt
    source = create_pretrain_model("tiny", image_size=32, patch_size=16)
    source.load_state_dict(ckpt)
    path = tmp_path / "timm.pth"
    export_weights(source, path, layout="timm")
    task, model = _task_model("cls", image_size=32)
    report = load_pretrained(model, path, task)
    assert set(report.missing) == {k for k in model.state_dict() if k.startswith("output_adapters.cls.")}
    torch.testing.assert_close(model.state_dict()["encoder.2.attn.qkv.weight"], ckpt["encoder.2.attn.qkv.weight"])


def test_finetuned_checkpoint_reloads_its_head(tmp_path):
    _task, model = _task_model("depth")
    # keep only one name of each DPT alias pair: the loader fills in the twin
    sd = {k: v for k, v in model.state_dict().items() if ".act_postprocess." not in k}
    save_atomic({"model": sd}, tmp_path / "best.pth")
    task2, model2 = _task_model("depth")
    report = load_pretrained(model2, tmp_path / "best.pth", task2)
    assert report.head_loaded and report.missing == [] and report.unexpected == []
    for k, v in model.state_dict().items():
        assert torch.equal(model2.state_dict()[k], v), k


def test_undeclared_difference_is_an_error(pretrain_ckpt, tmp_path):
    _, ckpt = pretrain_ckpt
    save_atomic({"model": {**ckpt, "encoder.99.weird": torch.zeros(1)}}, tmp_path / "odd.pth")
    task, model = _task_model("cls")
    with pytest.raises(CheckpointKeyError, match="encoder.99.weird"):
        load_pretrained(model, tmp_path / "odd.pth", task)
    broken = {k: v for k, v in ckpt.items() if k != "encoder.0.norm1.weight"}
    save_atomic({"model": broken}, tmp_path / "broken.pth")
    with pytest.raises(CheckpointKeyError, match="encoder.0.norm1.weight"):
        load_pretrained(model, tmp_path / "broken.pth", task)


def test_semseg_class_embedding_is_padded(tmp_path):
    """A semseg input adapter with more classes than the checkpoint's keeps the old rows."""
    source = create_pretrain_model("tiny", image_size=32, patch_size=16, semseg_num_classes=10)
    export_weights(source, tmp_path / "ten.pth")
    cfg = load_finetune_config(None, ["task.name=cls", "task.num_classes=8", "model.size=tiny",
                                      "model.in_modalities=[rgb,semseg]", "model.semseg_num_classes=12",
                                      "data.image_size=64"])
    task = make_task(cfg)
    model = task.build()
    report = load_pretrained(model, tmp_path / "ten.pth", task)
    old = source.state_dict()["input_adapters.semseg.class_emb.weight"]
    new = model.state_dict()["input_adapters.semseg.class_emb.weight"]
    assert new.shape[0] == 12 and torch.equal(new[:10], old)
    assert not any(k.startswith("input_adapters.") for k in report.missing)
    assert {k.split(".")[1] for k in report.unexpected if k.startswith("input_adapters.")} == {"depth"}
