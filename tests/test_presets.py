"""Published presets (docs/algorithms.md §4, §8.2, §10-§13) and the paper's nearest_dataset
convention of the nearest denoiser / op."""
import math

import pytest
import torch

import analytic_diffusion as ad
from analytic_diffusion import presets
from analytic_diffusion.ops import nearest_denoise


@pytest.fixture(scope="module")
def crops():
    return ad.data.natural_crops(120, size=4, seed=11)


# the values of the specification, typed in here so that a drifting table fails
SPEC_LOCALITY = {  # §4 thresholds, §8.2 chunk = loader batch size
    "cifar10": (512, 0.05), "mnist": (512, 0.005), "fashion_mnist": (512, 0.005), "celeba_hq": (256, 0.02), "afhq": (256, 0.02),
}
SPEC_GOLDDIFF = {  # §12 (k_min, k_max, threshold)
    "cifar10": (2500, 5000, 0.03), "celeba_hq": (1500, 3000, 0.03), "afhq": (1000, 2000, 0.04),
    "mnist": (3000, 6000, 0.02), "fashion_mnist": (3000, 6000, 0.02),
}


def test_locality_presets_are_the_published_values():
    assert sorted(presets.datasets("locality")) == sorted(SPEC_LOCALITY)
    for ds, (chunk, thr) in SPEC_LOCALITY.items():
        assert presets.settings("locality", ds) == {"softmax": "wssm", "chunk_size": chunk, "threshold": thr, "temperature": 1.0}
    assert presets.settings("locality", "CIFAR-10") == presets.settings("locality", "cifar10")
    assert presets.settings("locality", "celeba-hq")["chunk_size"] == 256
    s = presets.settings("locality", "mnist")
    s["chunk_size"] = 1  # a copy: the table is not modified
    assert presets.settings("locality", "mnist")["chunk_size"] == 512


def test_other_presets_are_the_published_values():
    for ds, (kmin, kmax, thr) in SPEC_GOLDDIFF.items():
        s = presets.settings("golddiff", ds)
        assert s["threshold"] == thr and s["screening"] == "golddiff" and s["screening_options"] == {"preset": ds}
        g = presets.published.GOLDDIFF[ds]
        assert (g["k_min"], g["k_max"]) == (kmin, kmax)
    # §11: M = 10, s = 0.1 (1 for MNIST), k = 200, tau = 1
    assert presets.settings("scfdm", "cifar10") == {"num_smoothing": 10, "smoothing": 0.1, "top_k": 200, "temperature": 1.0}
    assert presets.settings("scfdm", "mnist")["smoothing"] == 1.0
    # §13: the published CIFAR-10 schedule, 32 down to 3 on 18 EDM steps
    assert presets.settings("pspc", "cifar10") == {"patch_size": "cifar10"}
    assert presets.published.PSPC_SQUARE["cifar10"]["patch_sizes"][0] == 32 and presets.published.PSPC_SQUARE["cifar10"]["patch_sizes"][-1] == 3
    # §10: the UNet schedules, zero padding (bbELS)
    assert presets.settings("els", "cifar10") == {"patch_size": "cifar10-unet", "padding": "zeros"}
    assert presets.settings("ls", "fashion-mnist") == {"patch_size": "fashion-mnist-unet"}
    assert presets.settings("els", "cifar10-resnet-circular") == {"patch_size": "cifar10-resnet-circular", "padding": "circular"}
    assert presets.settings("nearest_dataset", "cifar10") == {"scaled": False}
    assert presets.settings("wiener", "afhq") == {} and presets.settings("optimal", "mnist") == {}
    with pytest.raises(ValueError, match="no published scfdm settings for dataset 'fashion_mnist'; available: "):
        presets.settings("scfdm", "fashion_mnist")
    with pytest.raises(ValueError, match="no published els schedule for dataset 'afhq'"):
        presets.settings("els", "afhq")
    with pytest.raises(ValueError, match="method must be one of"):
        presets.settings("unet", "cifar10")
    with pytest.raises(TypeError, match="dataset must be a name"):
        presets.settings("locality", None)


def test_build_every_method(crops):
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    built = {}
    for m in presets.METHODS:
        kw = {}
        if m in ("els", "ls"):
            kw = {"patch_size": 3}
        elif m == "pspc":
            kw = {"patch_size": 3}
        elif m == "golddiff":
            kw = {"screening_options": {"k_min": 10, "k_max": 20}}
        built[m] = presets.build(m, crops, **kw)
        out = built[m](x, 500)
        assert out.shape == x.shape and torch.isfinite(out).all(), m
    assert built["nearest_dataset"].scaled is False and built["nearest"].scaled is True
    loc = presets.build("locality", crops, "cifar10")
    assert (loc.softmax, loc.chunk_size, loc.threshold) == ("wssm", 512, 0.05)
    loc = presets.build("locality", crops, "cifar10", threshold=0.1, chunk_size=32)  # overrides win
    assert (loc.softmax, loc.chunk_size, loc.threshold) == ("wssm", 32, 0.1)
    els = presets.build("els", crops, "cifar10")
    assert els.padding == "zeros" and els.schedule.preset == "cifar10-unet"
    pspc = presets.build("pspc", crops, "cifar10")
    assert pspc.train.shape[0] == 240 and torch.equal(pspc.train[120:], crops.flip(-1))  # xflip, as the published sampler
    assert presets.build("pspc", crops, "cifar10", xflip=False).train.shape[0] == 120
    assert presets.build("scfdm", crops, "mnist").smoothing == 1.0
    with pytest.raises(ValueError, match="needs a patch-size schedule"):
        presets.build("els", crops)
    with pytest.raises(ValueError, match="xflip= is an option of pspc only"):
        presets.build("optimal", crops, xflip=True)
    with pytest.raises(ValueError, match="moments= is used by"):
        presets.build("optimal", crops, moments=ad.estimate_moments(crops))


def test_locality_from_preset_is_the_published_wssm(crops):
    m = ad.estimate_moments(crops)
    den = ad.LocalityDenoiser.from_preset(crops, "cifar10", m, chunk_size=50)
    ref = ad.LocalityDenoiser(crops, m, softmax="wssm", chunk_size=50, threshold=0.05)
    exact = ad.LocalityDenoiser(crops, m, threshold=0.05)
    x = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(den(x, 300), ref(x, 300), rtol=0, atol=0)
    # 120 images in chunks of 50: the per-chunk means differ from one softmax over all
    assert (den(x, 300) - exact(x, 300)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="no published locality settings for dataset 'imagenet'"):
        ad.LocalityDenoiser.from_preset(crops, "imagenet", m)


def test_nearest_dataset_convention(crops):
    y = ad.data.to_unit_range(crops, torch.float64).flatten(1)
    x = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x[3] = 0.5 * y[7].reshape(3, 4, 4) + 0.01  # a query close to a scaled image
    xs = x.clone()
    for t in (900, 400, 50):
        ab = ad.alpha_bar_at(t)
        a = math.sqrt(ab)
        d_scaled = torch.cdist(x.flatten(1), a * y)
        d_plain = torch.cdist(x.flatten(1), y)
        want_scaled, want_plain = y[d_scaled.argmin(1)], y[d_plain.argmin(1)]
        for backend in ad.available_backends("nearest_denoise"):
            paper = ad.NearestDenoiser(crops, scaled=False, backend=backend)
            default = ad.NearestDenoiser(crops, backend=backend)
            torch.testing.assert_close(paper(x, t).flatten(1), want_plain, rtol=0, atol=0)
            torch.testing.assert_close(default(x, t).flatten(1), want_scaled, rtol=0, atol=0)
            torch.testing.assert_close(nearest_denoise(x, crops, ab, scaled=False, backend=backend).flatten(1), want_plain, rtol=0, atol=0)
            torch.testing.assert_close(nearest_denoise(x, crops, ab, backend=backend).flatten(1), want_scaled, rtol=0, atol=0)
        if t == 900:  # at high noise the two conventions disagree (the point of the option)
            assert not torch.equal(want_plain, want_scaled)
    assert torch.equal(x, xs)  # input not modified
    assert ad.NearestDenoiser(crops, scaled=False).name == "nearest_dataset"
    with pytest.raises(TypeError, match="scaled must be a bool"):
        ad.NearestDenoiser(crops, scaled="no")
    with pytest.raises(TypeError, match="scaled must be a bool"):
        nearest_denoise(x, crops, 0.5, scaled=1)
