"""DiffAugment: shapes, differentiability, the three transforms, policy parsing."""
import pytest
import torch

from rggan_fast.training.augment import DiffAugment, brightness, contrast, cutout, parse_policy, saturation, translation


def test_policy_parsing():
    assert parse_policy("color,translation,cutout") == ["color", "translation", "cutout"]
    assert parse_policy("") == [] and parse_policy("none") == []
    with pytest.raises(ValueError, match="flip"):
        parse_policy("color,flip")


def test_empty_policy_is_identity():
    x = torch.randn(2, 3, 8, 8)
    aug = DiffAugment("")
    assert not aug and torch.equal(aug(x), x)


def test_full_policy_is_differentiable_and_keeps_shape():
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    y = DiffAugment("color,translation,cutout")(x)
    assert y.shape == x.shape
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_translation_shifts_content_and_pads_with_zeros():
    torch.manual_seed(1)
    x = torch.arange(64.0).view(1, 1, 8, 8).repeat(16, 3, 1, 1)
    y = translation(x)
    for i in range(16):
        found = False
        for dy in range(-1, 2):
            for dx in range(-1, 2):
                ref = torch.zeros(8, 8)
                src = x[i, 0]
                ys, xs = torch.meshgrid(torch.arange(8) + dy, torch.arange(8) + dx, indexing="ij")
                ok = (ys >= 0) & (ys < 8) & (xs >= 0) & (xs < 8)
                ref[ok] = src[ys[ok], xs[ok]]
                found |= torch.equal(y[i, 0], ref)
        assert found, f"image {i} is not a shift of at most 1 pixel (ratio 1/8 of 8)"


def test_cutout_zeroes_one_square():
    torch.manual_seed(0)
    x = torch.ones(32, 3, 16, 16)
    y = cutout(x)
    zeros = (y[:, 0] == 0).sum(dim=(1, 2))
    assert torch.all(zeros <= 64) and torch.all(zeros > 0)       # a clipped 8x8 square
    assert torch.equal(y[:, 0] == 0, y[:, 2] == 0)               # same square in every channel


def test_color_ops_ranges():
    torch.manual_seed(0)
    x = torch.rand(64, 3, 4, 4) * 2 - 1
    d = brightness(x) - x
    assert torch.all(d.abs() <= 0.5 + 1e-6)
    assert torch.allclose(d.flatten(1).std(dim=1), torch.zeros(64), atol=1e-5)  # one shift per image
    assert torch.allclose(saturation(x).mean(dim=1), x.mean(dim=1), atol=1e-5)  # keeps the grey level
    assert torch.allclose(contrast(x).mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=1e-5)


def test_same_seed_same_augmentation():
    x = torch.randn(4, 3, 16, 16)
    aug = DiffAugment("color,translation,cutout")
    torch.manual_seed(5)
    a = aug(x)
    torch.manual_seed(5)
    assert torch.equal(a, aug(x))
