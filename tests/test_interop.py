"""diffusers interop: our denoisers behind the UNet interface, run by diffusers' own DDIM code."""
import math
import os
import subprocess
import sys

import pytest
import torch

import analytic_diffusion as ad

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def small():
    data = ad.data.natural_crops(200, size=8, seed=3)
    return data, ad.estimate_moments(data)


def _denoiser(kind, small):
    data, m = small
    return ad.WienerDenoiser(m) if kind == "wiener" else ad.OptimalDenoiser(data)


@pytest.mark.parametrize("kind", ["wiener", "optimal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_diffusers_ddim_with_adapter_matches_ad_sample(small, kind, dtype):
    den = _denoiser(kind, small)
    ours_x0 = []
    ours = ad.sample(den, 4, (3, 8, 8), steps=10, seed=7, dtype=dtype, callback=lambda t, x, x0: ours_x0.append(x0))
    sched = diffusers.DDIMScheduler()  # default config: the linear schedule of docs/algorithms.md §1
    sched.set_timesteps(10)
    unet = ad.DiffusersModelAdapter(den)
    x = torch.randn((4, 3, 8, 8), generator=torch.Generator().manual_seed(7), dtype=dtype)  # ad.sample's x_T
    theirs_x0 = []
    for t in sched.timesteps:
        out = sched.step(unet(x, t).sample, t, x)
        theirs_x0.append(out.pred_original_sample)
        x = out.prev_sample
    assert [int(t) for t in sched.timesteps] == ad.ddim_timesteps(10)
    # The scheduler clips pred_original_sample (clip_sample=True) and, with alpha_prev = 1 at
    # the last step, returns it: compare with our last x0_hat, clipped. The gap per step is
    # diffusers' float32 sqrt(alpha_bar) (it divides by ~0.016 at t=900), not the adapter.
    assert (x - ours.clamp(-1, 1)).abs().max().item() < 1e-6
    for a, b in zip(ours_x0, theirs_x0):
        assert (a.clamp(-1, 1) - b).abs().max().item() < 5e-5
    assert x.dtype == dtype


def test_ddim_pipeline_samples_what_ad_sample_does(small):
    den = _denoiser("wiener", small)
    unet = ad.DiffusersModelAdapter(den)
    assert unet.config.sample_size == 8 and unet.config.in_channels == 3
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=3, generator=torch.Generator().manual_seed(5), num_inference_steps=10, output_type="pt").images
    ours = ad.sample(den, 3, (3, 8, 8), steps=10, seed=5)
    assert images.shape == (3, 3, 8, 8)
    assert (images - (ours.clamp(-1, 1) / 2 + 0.5)).abs().max().item() < 1e-6


def test_adapter_predicts_epsilon_and_accepts_timestep_forms(small):
    den = _denoiser("wiener", small)
    unet = ad.DiffusersModelAdapter(den)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ab = ad.alpha_bar_at(400)
    eps = unet(x, 400).sample
    assert eps.shape == x.shape and eps.dtype == torch.float64
    torch.testing.assert_close(eps, (x - math.sqrt(ab) * den(x, 400)) / math.sqrt(1 - ab), rtol=0, atol=1e-12)
    # the scheduler's inversion gives back x0_hat
    torch.testing.assert_close((x - math.sqrt(1 - ab) * eps) / math.sqrt(ab), den(x, 400), rtol=0, atol=1e-10)
    for t in (torch.tensor(400), torch.tensor([400]), 400.0, torch.tensor(400.0)):
        assert torch.equal(unet(x, t).sample, eps)
    (tup,) = unet(x, 400, return_dict=False)
    assert torch.equal(tup, eps) and torch.equal(unet(x, 400)[0], eps)
    # per-sample timesteps: each row as if called alone
    mixed = unet(x, torch.tensor([900, 400, 900])).sample
    torch.testing.assert_close(mixed[1], eps[1], rtol=0, atol=1e-12)  # a 1-row matmul rounds differently
    torch.testing.assert_close(mixed[[0, 2]], unet(x[[0, 2]], 900).sample, rtol=0, atol=1e-12)
    assert (mixed[0] - eps[0]).abs().max() > 0.1  # t = 900 really was used for row 0
    # half precision in, half precision out (computed in float32)
    assert unet(x.half(), 400).sample.dtype == torch.float16
    assert unet.to(torch.float16).dtype == torch.float16 and unet.device == torch.device("cpu")


def test_adapter_errors(small):
    unet = ad.DiffusersModelAdapter(_denoiser("wiener", small))
    x = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ValueError, match="integer-valued"):
        unet(x, 400.5)
    with pytest.raises(ValueError, match=r"timestep must be in \[0, 999\]"):
        unet(x, 1000)
    with pytest.raises(ValueError, match="1 or B = 2 values"):
        unet(x, torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="unconditional"):
        unet(x, 10, encoder_hidden_states=torch.zeros(2, 4, 8))
    with pytest.raises(ValueError, match=r"sample must be a float \[B, C, H, W\]"):
        unet(torch.zeros(2, 192), 10)
    with pytest.raises(TypeError, match="denoiser must be callable"):
        ad.DiffusersModelAdapter(3)
    with pytest.raises(ValueError, match="sample_shape"):
        ad.DiffusersModelAdapter(lambda x, t: x, sample_shape=(3, 8))


def test_package_imports_and_adapts_without_diffusers():
    code = (
        "import sys; sys.modules['diffusers'] = None\n"  # any 'import diffusers' now fails
        "import torch, analytic_diffusion as ad\n"
        "u = ad.DiffusersModelAdapter(lambda x, t: 0 * x, sample_shape=(1, 2, 2))\n"
        "e = u(torch.ones(1, 1, 2, 2), 0).sample\n"
        "assert e.shape == (1, 1, 2, 2) and 'diffusers' not in {m.split('.')[0] for m in sys.modules if sys.modules[m]}\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(os.path.dirname(__file__), "..", "python"), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("kind", ["optimal", "locality"])
def test_adapter_passes_a_custom_schedule_on_to_the_denoiser(small, kind):
    """Review: with a custom alphas_cumprod the adapter converted x0_hat -> eps with it, but
    the denoiser still read t on its own (linear) schedule."""
    data, m = small
    custom = ad.linear_alphas_cumprod(500, beta_start=2e-4, beta_end=0.04)  # another T and noise levels
    make = {
        "optimal": lambda **kw: ad.OptimalDenoiser(data[:100], **kw),
        "locality": lambda **kw: ad.LocalityDenoiser(data[:100], moments=m, **kw),
    }[kind]
    den = make()
    own = den.alphas_cumprod
    unet = ad.DiffusersModelAdapter(den, alphas_cumprod=custom)
    ref = make(alphas_cumprod=custom)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for t in (450, 200, 30):
        ab = float(custom[t])
        want = (x - math.sqrt(ab) * ref(x, t)) / math.sqrt(1 - ab)
        torch.testing.assert_close(unet(x, t).sample, want, rtol=0, atol=1e-10)
    assert den.alphas_cumprod is own  # the user's denoiser is unchanged
    if kind == "locality":
        assert torch.equal(den.mask(200), make().mask(200))  # its masks are still its schedule's


def test_adapter_refuses_a_schedule_it_cannot_pass_on():
    class Fixed:
        alphas_cumprod = ad.linear_alphas_cumprod()

        def __call__(self, x, t):
            return x

    with pytest.raises(ValueError, match="build the denoiser with alphas_cumprod"):
        ad.DiffusersModelAdapter(Fixed(), alphas_cumprod=ad.linear_alphas_cumprod(500))
    ad.DiffusersModelAdapter(Fixed(), alphas_cumprod=ad.linear_alphas_cumprod())  # the same one is fine
    ad.DiffusersModelAdapter(lambda x, t: x, alphas_cumprod=ad.linear_alphas_cumprod(500))  # no schedule of its own
    with pytest.raises(ValueError, match="non-increasing"):
        ad.DiffusersModelAdapter(lambda x, t: x, alphas_cumprod=torch.tensor([0.5, 0.9]))
