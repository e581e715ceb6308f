"""Schedule and DDIM sampler (docs/algorithms.md §1, §7) against a transcription and against diffusers."""
import math

import pytest
import torch

import analytic_diffusion as ad


def test_schedule_float32_linear():
    ab = ad.linear_alphas_cumprod()
    assert ab.dtype == torch.float32 and ab.shape == (1000,)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32)
    assert torch.equal(ab, torch.cumprod(1 - betas, 0))
    assert ad.ddim_timesteps(10) == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert ad.ddim_timesteps(3) == [666, 333, 0]


def test_schedule_matches_diffusers_bitwise():
    diffusers = pytest.importorskip("diffusers")
    s = diffusers.DDIMScheduler()
    assert torch.equal(s.alphas_cumprod, ad.linear_alphas_cumprod())


class Shrink:
    """A deterministic toy denoiser with real dependence on x and t."""

    name = "shrink"

    def __call__(self, x, t):
        return torch.tanh(0.7 * x + 0.001 * t)


def test_sampler_equals_step_by_step_transcription():
    ab = ad.linear_alphas_cumprod()
    S = 7
    ratio = 1000 // S
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 2, 4, 4, generator=g)
    den = Shrink()
    for i in range(S):
        t = (S - 1 - i) * ratio
        a_t = ab[t].item()
        x0 = den(x, t)
        eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t + 1e-8)
        x0c = ((x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)).clamp(-1, 1)
        ab_prev = ab[t - ratio].item() if t - ratio >= 0 else 1.0
        x = math.sqrt(ab_prev) * x0c + math.sqrt(1 - ab_prev) * eps
    out = ad.sample(den, 3, (2, 4, 4), steps=S, seed=5)
    assert torch.equal(out, x0)


def test_sampler_equals_diffusers_ddim_over_10_steps(crops):
    diffusers = pytest.importorskip("diffusers")
    den = ad.OptimalDenoiser(crops[:100])
    ours = ad.sample(den, 4, (3, 16, 16), steps=10, seed=11)
    sched = diffusers.DDIMScheduler()
    sched.set_timesteps(10)
    x = torch.randn((4, 3, 16, 16), generator=torch.Generator().manual_seed(11))
    for t in sched.timesteps:
        ab = sched.alphas_cumprod[int(t)]
        x0 = den(x, int(t))
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
        x = sched.step(eps, t, x).prev_sample
    assert [int(t) for t in sched.timesteps] == ad.ddim_timesteps(10)
    assert (ours - x0).abs().max().item() < 1e-4


def test_sampler_seed_and_validation():
    a = ad.sample(Shrink(), 2, (1, 3, 3), steps=4, seed=1)
    b = ad.sample(Shrink(), 2, (1, 3, 3), steps=4, seed=1)
    c = ad.sample(Shrink(), 2, (1, 3, 3), steps=4, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="steps"):
        ad.sample(Shrink(), 1, (1, 2, 2), steps=0)
    with pytest.raises(ValueError, match="num_samples"):
        ad.sample(Shrink(), 0, (1, 2, 2))
    with pytest.raises(ValueError, match=r"t must be in \[0, 999\]"):
        ad.OptimalDenoiser(torch.zeros(3, 4, dtype=torch.uint8))(torch.zeros(1, 4), 1000)
    with pytest.raises(TypeError, match="t must be an int"):
        ad.OptimalDenoiser(torch.zeros(3, 4, dtype=torch.uint8))(torch.zeros(1, 4), 1.5)


@pytest.mark.parametrize(
    "schedule, error, match",
    [
        (torch.full((10, 2), 0.5), ValueError, "1-D"),
        (torch.empty(0), ValueError, "1-D and non-empty"),
        (torch.tensor([0.9, float("nan"), 0.5]), ValueError, "NaN"),
        (torch.tensor([0.9, 0.5, 0.0]), ValueError, r"\(0, 1\].*t = 2"),
        (torch.tensor([1.5, 0.5, 0.1]), ValueError, r"\(0, 1\].*t = 0"),
        (torch.tensor([0.9, 0.5, 0.7, 0.1]), ValueError, r"non-increasing.*alpha_bar\[2\]"),
        (torch.tensor([9, 5, 1]), TypeError, "float"),
        ("linear", TypeError, "1-D float tensor"),
    ],
)
def test_sample_validates_alphas_cumprod(schedule, error, match):
    """Review: a malformed schedule was used as given (NaN samples, or an index error)."""
    with pytest.raises(error, match=match):
        ad.sample(Shrink(), 1, (1, 2, 2), steps=2, alphas_cumprod=schedule)


def test_sample_accepts_a_custom_schedule():
    ab = torch.linspace(0.999, 0.01, 50, dtype=torch.float64)
    ab[0] = 1.0  # (0, 1]: alpha_bar = 1 (no noise) is a valid schedule value
    seen = []
    ad.sample(Shrink(), 1, (1, 2, 2), steps=5, alphas_cumprod=ab, callback=lambda t, x, x0: seen.append(t))
    assert seen == [40, 30, 20, 10, 0]
    out = ad.sample(Shrink(), 1, (1, 2, 2), steps=5, alphas_cumprod=ab.tolist())  # a sequence works too
    assert torch.isfinite(out).all()


def test_denoisers_validate_alphas_cumprod():
    train = torch.zeros(3, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="non-increasing"):
        ad.OptimalDenoiser(train, alphas_cumprod=torch.tensor([0.5, 0.9]))
    with pytest.raises(ValueError, match="NaN"):
        ad.NearestDenoiser(train, alphas_cumprod=torch.tensor([0.9, float("nan")]))
    den = ad.OptimalDenoiser(train).with_schedule(torch.tensor([0.9, 0.5], dtype=torch.float64))
    assert den.alpha_bar(1) == 0.5


def test_progress_covers_prepare(crops, crop_moments, capsys):
    """Review: the first seconds of ad.sample (eigendecomposition, masks, plans in prepare)
    showed no progress; with progress=True they get their own bar."""
    den = ad.LocalityDenoiser(crops[:50], moments=crop_moments)
    ad.sample(den, 1, (3, 16, 16), steps=3, progress=True)
    err = capsys.readouterr().err
    assert "preparing (locality)" in err and "sampling (locality)" in err
    assert err.index("preparing") < err.index("sampling")
    assert "4/4" in err  # the eigendecomposition and the 3 steps' masks
    ad.sample(den, 1, (3, 16, 16), steps=3, progress=False)
    assert capsys.readouterr().err == ""


def test_progress_with_a_prepare_that_takes_no_progress(capsys):
    seen = []

    class Own(Shrink):
        def prepare(self, timesteps, device):
            seen.append(list(timesteps))

    ad.sample(Own(), 1, (1, 2, 2), steps=2, progress=True)
    assert seen == [[500, 0]] and "sampling" in capsys.readouterr().err
