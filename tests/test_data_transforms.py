"""data.preprocess (subset, grayscale, resize) and data.torchvision_dataset (download=False)."""
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

import analytic_diffusion as ad
from analytic_diffusion.data import preprocess, torchvision_dataset


@pytest.fixture(scope="module")
def crops():
    return ad.data.natural_crops(6, size=12, seed=4)


def test_grayscale_is_pillows_L(crops):
    g = preprocess(crops, grayscale=True)
    assert g.shape == (6, 1, 12, 12) and g.dtype == torch.uint8
    for i in range(6):
        pil = np.asarray(Image.fromarray(crops[i].permute(1, 2, 0).numpy()).convert("L"))
        np.testing.assert_array_equal(g[i, 0].numpy(), pil)
    f = ad.data.to_unit_range(crops, torch.float64)
    gf = preprocess(f, grayscale=True)
    want = 0.299 * f[:, 0] + 0.587 * f[:, 1] + 0.114 * f[:, 2]
    torch.testing.assert_close(gf[:, 0], want, rtol=0, atol=1e-15)
    assert preprocess(g, grayscale=True) is g  # one channel stays as it is
    with pytest.raises(ValueError, match="grayscale needs RGB"):
        preprocess(torch.zeros(1, 2, 4, 4, dtype=torch.uint8), grayscale=True)


def test_resize(crops):
    # area halving is the mean of 2x2 blocks (float64 reference), rounded for uint8
    r = preprocess(crops, size=6, mode="area")
    want = crops.double().reshape(6, 3, 6, 2, 6, 2).mean((3, 5)).round().to(torch.uint8)
    torch.testing.assert_close(r, want, rtol=0, atol=0)
    # bilinear with antialiasing when shrinking: Pillow's BILINEAR resize, up to rounding
    b = preprocess(crops, size=(8, 6))
    assert b.shape == (6, 3, 8, 6) and b.dtype == torch.uint8
    for i in range(6):
        pil = np.asarray(Image.fromarray(crops[i].permute(1, 2, 0).numpy()).resize((6, 8), Image.BILINEAR)).astype(int)
        assert np.abs(b[i].permute(1, 2, 0).numpy().astype(int) - pil).max() <= 1
    # a constant image stays constant at any size and mode; floats stay in [-1, 1]
    c = torch.full((2, 1, 5, 7), 0.25, dtype=torch.float32)
    for mode in ("bilinear", "bicubic", "area", "nearest"):
        torch.testing.assert_close(preprocess(c, size=9, mode=mode), torch.full((2, 1, 9, 9), 0.25))
    f = preprocess(ad.data.to_unit_range(crops), size=30, mode="bicubic")
    assert f.dtype == torch.float32 and float(f.abs().max()) <= 1.0
    assert preprocess(crops, size=12) is crops  # nothing to do: the input itself
    with pytest.raises(ValueError, match="size must be a positive int"):
        preprocess(crops, size=(0, 4))
    with pytest.raises(ValueError, match="mode must be one of"):
        preprocess(crops, size=4, mode="lanczos")


def test_subset(crops):
    before = crops.clone()
    torch.testing.assert_close(preprocess(crops, subset=4), crops[:4], rtol=0, atol=0)
    s = preprocess(crops, subset=3, seed=1)
    pick = torch.randperm(6, generator=torch.Generator().manual_seed(1))[:3].sort().values
    torch.testing.assert_close(s, crops[pick], rtol=0, atol=0)  # a seeded choice, in the source's order
    # order: subset, then grayscale, then resize
    both = preprocess(crops, subset=2, grayscale=True, size=6, mode="area")
    torch.testing.assert_close(both, preprocess(preprocess(crops[:2], grayscale=True), size=6, mode="area"), rtol=0, atol=0)
    assert torch.equal(crops, before)
    with pytest.raises(ValueError, match="subset=7 exceeds the 6 images"):
        preprocess(crops, subset=7)
    with pytest.raises(ValueError, match="seed chooses a random subset"):
        preprocess(crops, seed=3)


def _fake_torchvision(monkeypatch, calls):
    class CIFAR10:
        def __init__(self, root, train=True, transform=None, download=False):
            calls.append({"root": root, "train": train, "download": download})
            if not (root.endswith("ok")):
                raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")
            self.n = 3 if train else 2

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            return Image.fromarray(np.full((4, 4, 3), 10 * i, dtype=np.uint8)), i

    class CelebA:
        def __init__(self, root, split="train", download=False):
            calls.append({"root": root, "split": split, "download": download})

    tv = types.ModuleType("torchvision")
    dsm = types.ModuleType("torchvision.datasets")
    dsm.CIFAR10, dsm.CelebA = CIFAR10, CelebA
    tv.datasets = dsm
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", dsm)


def test_torchvision_dataset_never_downloads(monkeypatch, tmp_path):
    calls = []
    _fake_torchvision(monkeypatch, calls)
    root = tmp_path / "ok"
    root.mkdir()
    ds = torchvision_dataset("CIFAR-10", root)
    assert calls[-1] == {"root": str(root), "train": True, "download": False}
    x = ad.data.load_images(ds)
    assert x.shape == (3, 3, 4, 4) and x.dtype == torch.uint8 and int(x[2, 0, 0, 0]) == 20
    assert len(torchvision_dataset("cifar10", root, train=False)) == 2 and calls[-1]["train"] is False
    torchvision_dataset("celeba", root, split="valid")
    assert calls[-1] == {"root": str(root), "split": "valid", "download": False}
    bad = tmp_path / "empty"
    bad.mkdir()
    with pytest.raises(FileNotFoundError, match="CIFAR10 is not under"):
        torchvision_dataset("cifar10", bad)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        torchvision_dataset("cifar10", tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown torchvision dataset 'imagenet21k'"):
        torchvision_dataset("imagenet21k", root)
    with pytest.raises(ValueError, match="takes train=, not split="):
        torchvision_dataset("cifar10", root, split="test")


def test_torchvision_missing(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import fails
    with pytest.raises(ImportError, match="needs torchvision"):
        torchvision_dataset("cifar10", tmp_path)
