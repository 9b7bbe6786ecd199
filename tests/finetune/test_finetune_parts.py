"""Engine parts: berHu / L1 depth loss, layer-wise LR decay groups, RandAugment on samples, configs."""
import pytest
import torch

from multimae_att.finetune.augment import RandAugmentRGB, with_sample_transform
from multimae_att.finetune.config import ConfigError, load_finetune_config
from multimae_att.finetune.engine import build_optimizer
from multimae_att.finetune.tasks import make_task, masked_depth_loss

from helpers import REPO


def test_berhu_and_l1_hand_values():
    pred = torch.tensor([1.0, 2.0, 7.0, 0.0]).view(1, 1, 2, 2)
    target = torch.tensor([1.5, 2.0, 2.0, 9.0]).view(1, 1, 2, 2)
    valid = torch.tensor([True, True, True, False]).view(1, 1, 2, 2)
    # valid |d| = 0.5, 0, 5 -> c = 0.2 * 5 = 1; berHu: 0.5, 0, (25 + 1) / 2 = 13
    assert masked_depth_loss(pred, target, valid, "berhu").item() == pytest.approx((0.5 + 0 + 13) / 3)
    assert masked_depth_loss(pred, target, valid, "l1").item() == pytest.approx(5.5 / 3)


def test_layer_decay_groups_follow_block_depth():
    cfg = load_finetune_config(None, ["model.size=tiny", "task.num_classes=4", "optim.layer_decay=0.5",
                                      "optim.lr=1.0"])
    model = make_task(cfg).build()
    optimizer, base_lr = build_optimizer(cfg, model, global_batch=256)
    scale = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            scale[names[id(p)]] = (group["lr_scale"], group["weight_decay"])
    depth = len(model.encoder)   # tiny: 3 blocks -> layers 0 (stem) .. 4 (head)
    assert base_lr == 1.0
    assert scale["input_adapters.rgb.proj.weight"] == (0.5 ** (depth + 1), cfg.optim.weight_decay)
    assert scale["global_tokens"][0] == 0.5 ** (depth + 1) and scale["global_tokens"][1] == 0.0
    assert scale["encoder.0.attn.qkv.weight"][0] == 0.5 ** depth
    assert scale[f"encoder.{depth - 1}.mlp.fc1.weight"][0] == 0.5
    assert scale["output_adapters.cls.head.weight"] == (1.0, cfg.optim.weight_decay)
    assert scale["output_adapters.cls.head.bias"][1] == 0.0       # 1-d: no weight decay
    assert "input_adapters.rgb.pos_emb" not in scale              # fixed sin-cos grid


def test_randaugment_sample_transform_keeps_layout():
    class Base(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return {"rgb": torch.randn(3, 32, 32).clamp(-2, 2), "cls": torch.tensor(i), "sample_id": str(i)}

        def set_epoch(self, epoch):
            self.epoch = epoch

    ds = with_sample_transform(Base(), RandAugmentRGB("rand-m9-n3-mstd0.5"))
    ds.set_epoch(3)                                               # forwarded to the base dataset
    assert ds.base.epoch == 3 and len(ds) == 2
    torch.manual_seed(0)
    import random
    random.seed(0)
    sample = ds[1]
    assert sample["rgb"].shape == (3, 32, 32) and sample["cls"] == 1 and sample["sample_id"] == "1"
    assert sample["rgb"].dtype == torch.float32


@pytest.mark.parametrize("path", sorted((REPO / "configs/finetune").glob("*.yaml")), ids=lambda p: p.name)
def test_every_finetune_config_loads(path):
    if path.name == "synthetic_base.yaml":
        pytest.skip("shared include")
    make_task(load_finetune_config(str(path)))


def test_multimae_recipes():
    def load(name):
        return load_finetune_config(str(REPO / "configs/finetune" / name))
    c = load("in1k_cls_100e_multimae-b.yaml")
    assert (c.train.epochs, c.optim.blr, c.optim.layer_decay, c.model.drop_path_rate) == (100, 5e-4, 0.65, 0.1)
    a = load("ade20k_semseg_64e_multimae-b.yaml")
    assert (a.train.epochs, a.data.image_size, a.optim.lr, a.optim.layer_decay) == (64, 512, 1e-4, 0.75)
    assert (a.head_kind(), a.head.embed_dim, a.head.depth, a.task.num_classes) == ("convnext", 6144, 4, 150)
    assert a.task.reduce_zero_label
    for suffix, inputs in (("rgb", ["rgb"]), ("depth", ["depth"]), ("rgb-depth", ["rgb", "depth"])):
        n = load(f"nyuv2_semseg_200e_multimae-b_{suffix}.yaml")
        assert (n.train.epochs, n.data.image_size, n.task.num_classes) == (200, 640, 40)
        assert n.model.in_modalities == inputs
    d = load("nyuv2_depth_2000e_multimae-b.yaml")
    assert (d.train.epochs, d.data.image_size, d.head_kind(), d.task.loss) == (2000, 256, "dpt", "berhu")
    assert d.head.hooks == [2, 5, 8, 11] and d.task.mask_valid


def test_mixup_is_a_function_of_step_micro_batch_and_process():
    """Mixup/CutMix draws one weight (and box) per batch: the micro-batches and processes of one
    step must not all draw the same one, and a repeated (step, micro, rank) must draw it again."""
    cfg = load_finetune_config(None, ["task.name=cls", "model.size=tiny", "task.num_classes=4",
                                      "task.mixup=0.8", "task.cutmix=1.0"])
    task = make_task(cfg)
    g = torch.Generator().manual_seed(0)
    batch = {"rgb": torch.randn(4, 3, 16, 16, generator=g), "cls": torch.tensor([0, 1, 2, 3])}
    draws = {key: task.train_batch(dict(batch), *key)["soft_target"] for key in
             [(5, 0, 0), (5, 1, 0), (5, 0, 1), (6, 0, 0)]}
    again = task.train_batch(dict(batch), 5, 1, 0)["soft_target"]
    assert torch.equal(again, draws[(5, 1, 0)])
    keys = list(draws)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert not torch.equal(draws[a], draws[b]), (a, b)


def test_the_task_table_drives_the_config_checks():
    """One TASK_FACTS row per task (the names of task.name's Literal and of TASK_SPECS), and the
    checks follow each row: auto head, heads that fit, rgb for image-level tasks, the predicted
    modality not as an input, losses, MultiMAE's recipe, class-label ranges."""
    import typing

    from multimae_att.finetune.config import TASK_FACTS, TASKS, TaskConfig
    from multimae_att.finetune.tasks import TASK_SPECS

    assert set(typing.get_args(typing.get_type_hints(TaskConfig)["name"])) == set(TASKS) == set(TASK_SPECS)
    for name, facts in TASK_FACTS.items():
        def cfg(*extra, name=name, facts=facts):
            return load_finetune_config(None, [f"task.name={name}", f"task.loss={(facts.losses or ('ce',))[0]}",
                                               *extra])

        c = cfg("model.in_modalities=[rgb]")
        assert c.head_kind() == facts.heads[0] and ("cls" in c.label_ranges()) == (not facts.dense)
        for kind in ("linear", "convnext", "dpt"):
            if kind in facts.heads:
                assert cfg(f"head.kind={kind}").head_kind() == kind
            else:
                with pytest.raises(ConfigError, match="does not fit"):
                    cfg(f"head.kind={kind}")
        if facts.dense:
            with pytest.raises(ConfigError, match="cannot also be an input"):
                cfg(f"model.in_modalities=[rgb,{facts.predicts}]")
        else:
            with pytest.raises(ConfigError, match="reads RGB"):
                cfg("model.in_modalities=[depth]")
        for loss in ("ce", "berhu", "l1"):
            if facts.losses is not None and loss not in facts.losses:
                with pytest.raises(ConfigError, match="does not fit"):
                    cfg(f"task.loss={loss}")
        if facts.multimae is not None:
            m = cfg("data.protocol=multimae")
            assert (m.aug(), m.eval_mode()) == facts.multimae
