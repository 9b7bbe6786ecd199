"""The modality table is the one source of modality facts: every reader agrees with it."""
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from multimae_att.modalities import (
    MODALITIES,
    MODEL_MODALITIES,
    OUTPUTS,
    SEMSEG_NUM_CLASSES,
    get_modality,
    get_output,
    output_names,
    target_of,
)


def test_table_entries_are_consistent():
    assert MODEL_MODALITIES == ("rgb", "depth", "semseg")
    for name, m in MODALITIES.items():
        assert m.name == name
        assert m.labels == (m.channels is None)
        assert (m.classes is not None) == m.labels      # label modalities name their class count
        assert m.model == (m.picture is not None)       # what the model sees is drawn in pictures
    for name, o in OUTPUTS.items():
        assert o.name == name and MODALITIES[o.target].model
    assert {o.target for o in OUTPUTS.values()} == set(MODEL_MODALITIES)   # every model modality decodes
    assert MODALITIES["semseg"].classes == SEMSEG_NUM_CLASSES
    assert SEMSEG_NUM_CLASSES == 133
    with pytest.raises(dataclasses.FrozenInstanceError):
        MODALITIES["rgb"].stride = 2
    with pytest.raises(TypeError):
        MODALITIES["normal"] = MODALITIES["rgb"]


def test_lookups_name_the_nearest_entry():
    assert get_modality("depth").encoding == "depth16"
    with pytest.raises(KeyError, match="did you mean 'semseg'"):
        get_modality("semsegg")
    with pytest.raises(KeyError, match="did you mean 'norm_rgb'"):
        get_output("normrgb")
    assert [target_of(o) for o in ("rgb", "norm_rgb", "depth", "semseg")] == ["rgb", "rgb", "depth", "semseg"]
    assert output_names(["rgb", "depth"], extra_norm_rgb=True) == ["rgb", "depth", "norm_rgb"]
    assert output_names(["semseg"]) == ["semseg"]


def test_losses_read_the_table_with_multimae_s_losses():
    """The losses each output gets (MultiMAE's: MSE on rgb, MSE on per-patch normalised rgb, L1 on
    depth, cross-entropy on semseg) and the mask each reads come from the table."""
    from multimae_att.pretrain import losses
    assert {name: dataclasses.astuple(spec) for name, spec in losses.DEFAULT_SPECS.items()} == {
        "rgb": ("mse", False, -100), "norm_rgb": ("mse", True, -100), "depth": ("l1", False, -100),
        "semseg": ("ce", False, -100)}
    assert [losses.input_modality_of(o) for o in ("rgb", "norm_rgb", "depth", "semseg")] == \
        ["rgb", "rgb", "depth", "semseg"]


def test_config_schemas_agree_with_the_table():
    from multimae_att.finetune.config import MODALITIES as FINETUNE_MODALITIES
    from multimae_att.pretrain.config import PretrainConfig

    assert set(PretrainConfig().loss.weights) == set(OUTPUTS)
    assert tuple(FINETUNE_MODALITIES) == MODEL_MODALITIES


def test_model_adapters_follow_the_table():
    from multimae_att.model import create_pretrain_model

    model = create_pretrain_model("tiny", image_size=64, patch_size=16)
    ins, outs = model.input_adapters, model.output_adapters
    assert sorted(outs) == sorted(output_names(MODEL_MODALITIES, extra_norm_rgb=True))
    for name in MODEL_MODALITIES:
        m = MODALITIES[name]
        assert ins[name].stride_level == m.stride
        assert (16 // m.stride, 16 // m.stride) == (ins[name].P_H, ins[name].P_W)
    assert ins["rgb"].num_channels == 3 and ins["depth"].num_channels == 1
    assert ins["semseg"].num_classes == 133 and ins["semseg"].dim_class_emb == MODALITIES["semseg"].class_dim
    for name, adapter in outs.items():
        target = MODALITIES[OUTPUTS[name].target]
        assert adapter.num_channels == (SEMSEG_NUM_CLASSES if target.labels else target.channels)
        assert adapter.stride_level == target.stride


# stored file per encoding: Pillow mode, array dtype, channels (None: one plane)
_STORED = {"rgb8": ("RGB", np.uint8, 3), "depth16": ("I;16", np.uint16, None), "labels": ("L", np.uint8, None),
           "mask": ("L", np.uint8, None), "map": ("L", np.uint8, None)}


@pytest.mark.parametrize("name", list(MODALITIES))
def test_data_pipeline_follows_the_encoding(name, tmp_path):
    """Decode a stored file of each modality and convert it: dtype, shape and values per encoding."""
    from multimae_att.data.decode import CorruptSample, decode_modality
    from multimae_att.data.transforms import _RESAMPLE, to_tensors

    m = MODALITIES[name]
    mode, dtype, channels = _STORED[m.encoding]
    shape = (4, 6) if channels is None else (4, 6, channels)
    array = (np.arange(np.prod(shape)) % 7).astype(dtype).reshape(shape)
    path = tmp_path / f"{name}.png"
    Image.fromarray(array).save(path)
    image = decode_modality(name, str(path))
    assert image.mode == mode
    assert _RESAMPLE[name] == {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR,
                               "nearest": Image.NEAREST}[m.resample]
    t = to_tensors({name: np.array(image)})[name]
    stored = torch.from_numpy(array.astype(np.float64))
    if m.encoding == "rgb8":
        assert t.shape == (3, 4, 6) and t.dtype == torch.float32
    elif m.encoding == "depth16":
        assert t.shape == (1, 4, 6) and torch.allclose(t[0].double(), stored / 2 ** 16)
    elif m.encoding == "labels":
        assert t.dtype == torch.int64 and torch.equal(t, stored.long())
    elif m.encoding == "mask":
        assert t.dtype == torch.bool and torch.equal(t[0], stored > 0)
    else:
        assert t.dtype == torch.float32 and torch.allclose(t.double(), stored / 255)
    if m.encoding in ("depth16",):   # an 8-bit file of a 16-bit modality: the scale would be wrong
        Image.fromarray(array.astype(np.uint8)).save(tmp_path / "eight.png")
        with pytest.raises(CorruptSample, match="16-bit"):
            decode_modality(name, str(tmp_path / "eight.png"))
    if m.encoding == "map":            # a palette is not a greyscale map
        Image.fromarray(array.astype(np.uint8)).convert("P").save(tmp_path / "pal.png")
        with pytest.raises(CorruptSample, match="greyscale"):
            decode_modality(name, str(tmp_path / "pal.png"))
