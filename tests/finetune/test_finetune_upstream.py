"""Task models against the original MultiMAE code (EPFL-VILAB/MultiMAE): same state dict, same
outputs. Runs only when ``MULTIMAE_SRC`` points to an upstream checkout (see
tests/model/test_upstream_equivalence.py; both use the import fixture ``up`` of tests/helpers/upstream.py)."""
import pytest
import torch

from multimae_att.finetune.config import load_finetune_config
from multimae_att.finetune.tasks import make_task

from helpers.upstream import SRC, up

pytestmark = pytest.mark.skipif(
    not SRC, reason="set MULTIMAE_SRC to a checkout of EPFL-VILAB/MultiMAE to run the equivalence tests")

DIM, DEPTH, HEADS, SIZE = 96, 3, 3, 64
CASES = {
    "cls": ["task.name=cls", "task.num_classes=7", "head.init_scale=1.0"],
    "convnext_rgbd": ["task.name=semseg", "task.num_classes=5", "model.in_modalities=[rgb,depth]",
                      "head.main_modalities=[rgb,depth]", "head.embed_dim=128", "head.depth=2",
                      "data.standardize_depth=false"],
    "dpt_depth": ["task.name=depth", "task.loss=berhu", "head.hooks=[0,1,2,2]",
                  "head.layer_dims=[8,16,24,32]", "head.feature_dim=16"],
}


def _upstream_model(up, name, cfg):
    """The same task model built from upstream's classes (exported by its ``multimae`` package)."""
    mods, h = cfg.model.in_modalities, cfg.head
    inputs = {m: up.PatchedInputAdapter(num_channels=3 if m == "rgb" else 1, stride_level=1,
                                        patch_size_full=16, image_size=SIZE) for m in mods}
    if name == "cls":
        head = {"cls": up.LinearOutputAdapter(num_classes=7, use_mean_pooling=True, init_scale=1.0)}
    elif name == "convnext_rgbd":
        head = {"semseg": up.ConvNeXtAdapter(num_classes=5, embed_dim=h.embed_dim, preds_per_patch=16,
                                             main_tasks=mods, patch_size=16, depth=h.depth)}
    else:
        head = {"depth": up.DPTOutputAdapter(num_classes=1, stride_level=1, patch_size=16, main_tasks=("rgb",),
                                             hooks=h.hooks, layer_dims=h.layer_dims, feature_dim=h.feature_dim)}
    return up.MultiViT(input_adapters=inputs, output_adapters=head, dim_tokens=DIM, depth=DEPTH,
                       num_heads=HEADS, num_global_tokens=1)


@pytest.mark.parametrize("name", sorted(CASES))
def test_task_model_matches_upstream(up, name):
    cfg = load_finetune_config(None, CASES[name] + ["model.size=tiny", f"data.image_size={SIZE}",
                                                    "model.drop_path_rate=0.0"])
    task = make_task(cfg)
    ours = task.build().eval()
    torch.manual_seed(0)
    theirs = _upstream_model(up, name, cfg).eval()
    # upstream's state dict (names and shapes) loads strictly into ours, and back
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    g = torch.Generator().manual_seed(1)
    batch = {"rgb": torch.randn(2, 3, SIZE, SIZE, generator=g),
             "depth": torch.rand(2, 1, SIZE, SIZE, generator=g)}
    x = {m: batch[m] for m in cfg.model.in_modalities}
    with torch.no_grad():
        mine = task.forward(ours, batch)
        ref = theirs(x, return_all_layers=task.return_all_layers)[task.output]
    torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-5)
