"""The table-driven colour jitter of the MultiMAE recipes against the direct per-pixel formulas
they replaced (kept here as references): bit-identical on a grid of colours that includes every
channel tie, on random colours, for several hue shifts and factors."""
import numpy as np
import pytest
import torch

from multimae_att.finetune import protocols as P

_SHIFT = 12


def ref_grey(rgb):
    r, g, b = rgb.long()
    return ((9798 * r + 19235 * g + 3735 * b + (1 << 14)) >> 15)[None].to(rgb.dtype)


def ref_lut(rgb, table):
    return torch.from_numpy(np.clip(table, 0, 255).astype(np.uint8)).to(rgb.dtype)[rgb.long()]


def ref_rgb_to_hsv8(rgb):
    r, g, b = rgb.long()
    v = torch.maximum(torch.maximum(r, g), b)
    diff = v - torch.minimum(torch.minimum(r, g), b)
    i = torch.arange(256, dtype=torch.float64)
    sdiv = torch.where(i > 0, torch.round((255 << _SHIFT) / i.clamp(min=1)), 0.0).long()
    hdiv = torch.where(i > 0, torch.round((180 << _SHIFT) / (6.0 * i.clamp(min=1))), 0.0).long()
    half = 1 << (_SHIFT - 1)
    s = (diff * sdiv[v] + half) >> _SHIFT
    h = torch.where(v == r, g - b, torch.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * hdiv[diff] + half) >> _SHIFT
    return torch.where(h < 0, h + 180, h), s, v


def ref_hsv8_to_rgb(h, s, v):
    """Per pixel: OpenCV's sector table picks v, p, q or t for each channel."""
    hf = h.float() * (6.0 / 180.0)
    sf, vf = s.float() * (1.0 / 255.0), v.float() * (1.0 / 255.0)
    hf = hf - 6.0 * torch.floor(hf / 6.0)
    sector = torch.floor(hf)
    frac = hf - sector
    sector = sector.long().clamp(0, 5)
    tab = torch.stack([vf, vf * (1.0 - sf), vf * (1.0 - sf * frac), vf * (1.0 - sf * (1.0 - frac))])
    order = torch.tensor([[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]])
    bgr = tab.gather(0, order[sector].permute(2, 0, 1))
    rgb = torch.where(s[None] == 0, vf[None].expand(3, -1, -1), bgr.flip(0))
    return (rgb * 255.0).floor().clamp(0, 255)


def ref_adjust_hue(rgb, shift):
    h, s, v = ref_rgb_to_hsv8(rgb)
    lut = torch.from_numpy(np.mod(np.arange(256, dtype=np.int16) + 180 * shift, 180).astype(np.uint8)).long()
    return ref_hsv8_to_rgb(lut[h], s, v).to(rgb.dtype)


@pytest.fixture(scope="module")
def colours():
    """[3, 1, N] float: every colour of a 33-level grid per channel (0, 8, ..., 248, 255: all ties
    and extremes) and 2^14 random 8-bit colours. (All 2^24 colours x 6 shifts were compared once:
    bit-identical.)"""
    levels = torch.tensor(list(range(0, 256, 8)) + [255], dtype=torch.float32)
    grid = torch.cartesian_prod(levels, levels, levels).T
    rand = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 1 << 14)).astype(np.float32))
    return torch.cat([grid, rand], 1)[:, None]


@pytest.mark.parametrize("shift", [-0.1, -0.0371, 0.0999, 1 / 3, 0.5])
def test_hue_shift_is_bit_identical_to_the_sector_table(colours, shift):
    assert torch.equal(P.adjust_hue(colours, shift), ref_adjust_hue(colours, shift))


def test_hsv_conversion_is_bit_identical(colours):
    for new, ref in zip(P._rgb_to_hsv8(colours), ref_rgb_to_hsv8(colours)):
        assert torch.equal(new.long(), ref)


@pytest.mark.parametrize("factor", [0.5, 0.97, 1.5])
def test_saturation_is_bit_identical_to_the_float64_blend(colours, factor):
    ref = (colours.double() * factor + ref_grey(colours).double() * (1 - factor)).round().clamp(0, 255)
    assert torch.equal(P.adjust_saturation(colours, factor), ref.float())


def test_grey_and_lookups_are_bit_identical(colours):
    assert torch.equal(P.grey(colours), ref_grey(colours))
    assert torch.equal(P.to_gray(colours), ref_grey(colours).expand(3, -1, -1))
    table = np.arange(256) * 1.37 - 20.5
    assert torch.equal(P._lut(colours, table), ref_lut(colours, table))
    for factor in (0.6, 1.3):
        assert torch.equal(P.adjust_brightness(colours, factor), ref_lut(colours, np.arange(256) * factor))
        mean = float(ref_grey(colours).double().mean())
        assert torch.equal(P.adjust_contrast(colours, factor),
                           ref_lut(colours, np.arange(256) * factor + mean * (1 - factor)))
