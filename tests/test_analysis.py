"""Locality analysis: sensitivity fields, field similarity, network adapters, agreement metrics."""
import json
import math

import numpy as np
import pytest
import torch

import analytic_diffusion as ad
from analytic_diffusion.analysis import Agreement


@pytest.fixture(scope="module")
def tiny():
    """4x4 colour crops (n = 48) and their moments: full-rank, cheap to differentiate densely."""
    data = ad.data.natural_crops(300, size=4, seed=7)
    return data, ad.estimate_moments(data)


class TinyNet(torch.nn.Module):
    """Conv net with a real dependence on t; the samples of a batch do not interact."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.c1 = torch.nn.Conv2d(3, 6, 3, padding=1).to(dtype)
        self.c2 = torch.nn.Conv2d(6, 3, 3, padding=1).to(dtype)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.4)
        self.seen_t = []

    def forward(self, x, t):
        self.seen_t.append(t)
        return self.c2(torch.tanh(self.c1(x) + t.to(x.dtype)[:, None, None, None] * 1e-3))


def per_sample_jacobian(fn, x, pixels=None):
    """Brute force: d fn(x)[b, m] / d x[b] for every b and m in ``pixels`` (default all),
    one sample and one pixel at a time: ``[B, P, C, H, W]``."""
    B, n = x.shape[0], x[0].numel()
    pixels = range(n) if pixels is None else pixels
    J = torch.empty(B, len(pixels), *x.shape[1:], dtype=x.dtype)
    for b in range(B):
        xb = x[b : b + 1].clone().requires_grad_(True)
        out = fn(xb).reshape(-1)
        for p, m in enumerate(pixels):
            (g,) = torch.autograd.grad(out[m], xb, retain_graph=True)
            J[b, p] = g[0]
    return J


# --------------------------------------------------------------------------- #
# sensitivity
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("t", [20, 500, 950])
def test_wiener_sensitivity_is_the_autograd_jacobian(tiny, t):
    _, m = tiny
    w = ad.WienerDenoiser(m)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(t))
    pixels = [0, 17, 30, 47]
    S = ad.sensitivity(w, x, t, pixels)
    assert S.shape == (2, 4, 3, 4, 4) and S.dtype == torch.float64
    J = per_sample_jacobian(lambda z: w(z, t), x)
    torch.testing.assert_close(S, J[:, pixels], rtol=1e-10, atol=1e-12)
    # A_t / a, rows of the dense filter (docs/algorithms.md §3), and the same for any x_t
    ab = ad.alpha_bar_at(t)
    A = w.filter.matrix(ab) / math.sqrt(ab)
    torch.testing.assert_close(S[1].reshape(4, 48), A[pixels], rtol=1e-12, atol=1e-14)
    assert torch.equal(ad.sensitivity(w, 3 * x, t, pixels), S)
    # dtype follows x_t
    assert ad.sensitivity(w, x.float(), t, 5).dtype == torch.float32


def test_autograd_path_on_a_denoiser_matches_the_analytic_wiener_rows(tiny):
    _, m = tiny
    w = ad.WienerDenoiser(m)

    class Plain(ad.Denoiser):  # the Wiener maths, but not a WienerDenoiser: forces autograd
        def denoise(self, x, t, alpha_bar):
            return w.filter.apply(x, alpha_bar)

    x = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    pixels = list(range(0, 48, 3))
    torch.testing.assert_close(ad.sensitivity(Plain(), x, 300, pixels, batch_pixels=5), ad.sensitivity(w, x, 300, pixels), rtol=1e-10, atol=1e-12)


def test_denoisers_with_a_sensitivity_method_are_asked_for_it():
    class Linear(ad.Denoiser):  # x0_hat = 2 x: Jacobian 2 I, reported by its own method
        def denoise(self, x, t, alpha_bar):
            return 2 * x

        def sensitivity(self, t, pixels):
            return 2 * torch.eye(12, dtype=torch.float64)[pixels].reshape(len(pixels), 3, 2, 2)

    x = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    S = ad.sensitivity(Linear(), x, 100, [1, 7])
    torch.testing.assert_close(S, per_sample_jacobian(lambda z: 2 * z, x)[:, [1, 7]])

    class Wrong(Linear):
        def sensitivity(self, t, pixels):
            return torch.zeros(len(pixels), 5)

    with pytest.raises(ValueError, match="Wrong.sensitivity returned"):
        ad.sensitivity(Wrong(), x, 100, [1, 7])


@pytest.mark.skipif(not hasattr(ad, "WindowedWienerDenoiser"), reason="no windowed Wiener denoiser in this build")
def test_windowed_wiener_sensitivity_is_the_autograd_jacobian():
    data = ad.data.natural_crops(200, size=6, seed=1)
    den = ad.WindowedWienerDenoiser(ad.estimate_patch_moments(data, patch_size=3))
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    pixels = [0, 50, 107]
    J = per_sample_jacobian(lambda z: den(z, 300), x, pixels)
    torch.testing.assert_close(ad.sensitivity(den, x, 300, pixels), J, rtol=1e-10, atol=1e-12)


def test_autograd_sensitivity_equals_brute_force_loop():
    net = TinyNet()
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x_before = x.clone()
    J = per_sample_jacobian(lambda z: net(z, torch.full((z.shape[0],), 250)), x)
    pixels = [0, 5, 11, 16, 31, 47]
    for bp in (1, 4, 100):
        S = ad.sensitivity(net, x, 250, pixels, batch_pixels=bp, prediction="x0")
        assert S.shape == (3, 6, 3, 4, 4)
        torch.testing.assert_close(S, J[:, pixels], rtol=1e-10, atol=1e-12)
    assert torch.equal(x, x_before) and x.grad is None and not x.requires_grad
    assert net.seen_t[-1].dtype == torch.long and net.seen_t[-1].tolist() == [250, 250, 250]


def test_prediction_default_is_one_rule_everywhere(tiny):
    # a plain network predicts epsilon unless told otherwise, in sensitivity, ModelDenoiser and compare
    net = TinyNet()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    default = ad.sensitivity(net, x, 600, [3, 20])
    torch.testing.assert_close(default, ad.sensitivity(net, x, 600, [3, 20], prediction="epsilon"), rtol=0, atol=0)
    torch.testing.assert_close(default, ad.sensitivity(ad.ModelDenoiser(net), x, 600, [3, 20]), rtol=0, atol=0)
    assert not torch.allclose(default, ad.sensitivity(net, x, 600, [3, 20], prediction="x0"))
    # a library denoiser knows it returns x0_hat: a contradicting prediction is refused, not ignored
    w = ad.WienerDenoiser(tiny[1])
    with pytest.raises(ValueError, match="prediction='epsilon'.*Denoiser"):
        ad.sensitivity(w, x, 600, [3], prediction="epsilon")
    with pytest.raises(ValueError, match="prediction='epsilon'.*Denoiser"):
        ad.compare({"w": w}, w, shape=(3, 4, 4), protocol="trajectory", num_samples=1, steps=2, prediction="epsilon")
    torch.testing.assert_close(ad.sensitivity(w, x, 600, [3], prediction="x0"), ad.sensitivity(w, x, 600, [3]))


def test_sensitivity_epsilon_adapter_is_the_x0_jacobian():
    net = TinyNet()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    t, pixels = 600, [3, 20, 40]
    ab = ad.alpha_bar_at(t)
    raw = ad.sensitivity(net, x, t, pixels, prediction="x0")  # the network's own Jacobian
    eps = ad.sensitivity(net, x, t, pixels, prediction="epsilon")
    # x0_hat = (x - sqrt(1 - ab) eps(x)) / sqrt(ab)  =>  J = (I - sqrt(1 - ab) J_eps) / sqrt(ab)
    eye = torch.eye(48, dtype=torch.float64)[pixels].reshape(1, 3, 3, 4, 4)
    torch.testing.assert_close(eps, (eye - math.sqrt(1 - ab) * raw) / math.sqrt(ab), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(eps, raw)


class _NumpyTwice(torch.autograd.Function):
    """x * 2 whose backward leaves torch (through numpy): it cannot be vmapped."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return torch.from_numpy(g.detach().numpy() * 2)


def test_sensitivity_falls_back_to_a_loop_without_batching_rules():
    net = TinyNet()

    def model(x, t):
        return net(_NumpyTwice.apply(x), t)

    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    cot = torch.zeros(3, 2, 48, dtype=torch.float64)
    cot[:, :, 0] = 1
    with pytest.raises(RuntimeError):  # the batched path really fails for this model
        xg = x.clone().requires_grad_(True)
        torch.autograd.grad(model(xg, torch.full((2,), 9)).reshape(2, 48), xg, cot, is_grads_batched=True)
    S = ad.sensitivity(model, x, 9, [0, 7, 33], batch_pixels=2, prediction="x0")
    J = per_sample_jacobian(lambda z: model(z, torch.full((z.shape[0],), 9)), x)
    torch.testing.assert_close(S, J[:, [0, 7, 33]], rtol=1e-10, atol=1e-12)


def test_sensitivity_bad_inputs(tiny):
    _, m = tiny
    w = ad.WienerDenoiser(m)
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match=r"pixels must be flat indices in \[0, 47\]"):
        ad.sensitivity(w, x, 10, [48])
    with pytest.raises(ValueError, match="pixels is empty"):
        ad.sensitivity(w, x, 10, [])
    with pytest.raises(TypeError, match="pixels"):
        ad.sensitivity(w, x, 10, 1.5)
    with pytest.raises(ValueError, match=r"x_t must be \[B, C, H, W\]"):
        ad.sensitivity(w, torch.zeros(1, 48), 10, 0)
    with pytest.raises(ValueError, match="image shape"):
        ad.sensitivity(w, torch.zeros(1, 3, 2, 8), 10, 0)
    with pytest.raises(ValueError, match="prediction"):
        ad.sensitivity(TinyNet(), x.double(), 10, 0, prediction="v")
    with pytest.raises(ValueError, match="batch_pixels"):
        ad.sensitivity(TinyNet(), x.double(), 10, 0, batch_pixels=0)
    with pytest.raises(ValueError, match=r"t must be in \[0, 999\]"):
        ad.sensitivity(w, x, 1000, 0)
    with pytest.raises(TypeError, match="denoiser_or_model"):
        ad.sensitivity("wiener", x, 10, 0)
    with pytest.raises(RuntimeError, match="does not depend on x_t through autograd"):
        ad.sensitivity(ad.NearestDenoiser(tiny[0]), x, 10, 0)


# --------------------------------------------------------------------------- #
# ModelDenoiser
# --------------------------------------------------------------------------- #
def test_model_denoiser_adapters_and_outputs():
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    eps_model = lambda x, t: 0.5 * x + 1e-3 * t.to(x.dtype)[:, None, None, None]  # noqa: E731
    ab = ad.alpha_bar_at(400)
    expect = (x - math.sqrt(1 - ab) * eps_model(x, torch.full((2,), 400))) / math.sqrt(ab)
    torch.testing.assert_close(ad.ModelDenoiser(eps_model)(x, 400), expect, rtol=0, atol=1e-6)
    torch.testing.assert_close(ad.ModelDenoiser(eps_model, prediction="x0")(x, 400), eps_model(x, torch.full((2,), 400)))

    class Out:
        def __init__(self, s):
            self.sample = s

    for wrap in (lambda y: Out(y), lambda y: (y, None)):
        got = ad.ModelDenoiser(lambda x, t: wrap(eps_model(x, t)), prediction="x0")(x, 400)
        torch.testing.assert_close(got, eps_model(x, torch.full((2,), 400)))
    # no graph is kept when x_t does not require grad, even though the weights do
    net = TinyNet(torch.float32)
    assert not ad.ModelDenoiser(net)(x, 10).requires_grad
    assert ad.ModelDenoiser(net)(x.clone().requires_grad_(True), 10).requires_grad
    s = ad.sample(ad.ModelDenoiser(net), 2, (3, 4, 4), steps=3, seed=0)
    assert s.shape == (2, 3, 4, 4) and torch.isfinite(s).all()


def test_model_denoiser_errors():
    with pytest.raises(ValueError, match="prediction must be 'x0' or 'epsilon'"):
        ad.ModelDenoiser(lambda x, t: x, prediction="eps")
    with pytest.raises(TypeError, match="model must be"):
        ad.ModelDenoiser(3)
    with pytest.raises(TypeError, match="already a denoiser"):
        ad.ModelDenoiser(ad.NearestDenoiser(torch.zeros(2, 4, dtype=torch.uint8)))
    with pytest.raises(ValueError, match="model returned shape"):
        ad.ModelDenoiser(lambda x, t: x[:, :1])(torch.zeros(1, 3, 2, 2), 5)
    with pytest.raises(TypeError, match=r"must return a tensor"):
        ad.ModelDenoiser(lambda x, t: "x")(torch.zeros(1, 3, 2, 2), 5)


# --------------------------------------------------------------------------- #
# field_similarity
# --------------------------------------------------------------------------- #
def _field(values):
    f = torch.zeros(1, 1, 2, 3, dtype=torch.float64)
    f.view(-1)[: len(values)] = torch.tensor(values, dtype=torch.float64)
    return f


def test_field_similarity_hand_made():
    a = _field([1.0, 0.5, 0.25, 0, 0, 0])
    b = _field([0, 1.0, 1.0, 1.0, 0, 0])
    s = ad.field_similarity(a, b, threshold=0.2)
    assert s["cosine"].shape == (1,) and s["cosine"].dtype == torch.float64
    assert s["cosine"].item() == pytest.approx((0.5 + 0.25) / (math.sqrt(1 + 0.25 + 0.0625) * math.sqrt(3)), rel=1e-12)
    assert s["iou"].item() == pytest.approx(2 / 4)  # supports {0,1,2} and {1,2,3}
    # a higher threshold drops 0.25 from a's support: {0,1} vs {1,2,3}
    assert ad.field_similarity(a, b, threshold=0.3)["iou"].item() == pytest.approx(1 / 4)
    same = ad.field_similarity(a, -2 * a)
    assert same["cosine"].item() == pytest.approx(-1.0) and same["iou"].item() == 1.0
    disjoint = ad.field_similarity(_field([1, 0, 0, 0, 0, 0]), _field([0, 0, 0, 0, 0, 3]))
    assert disjoint["cosine"].item() == 0.0 and disjoint["iou"].item() == 0.0
    zero = ad.field_similarity(torch.zeros_like(a), torch.zeros_like(a))
    assert math.isnan(zero["cosine"].item()) and zero["iou"].item() == 1.0
    # [P, ...] against [B, P, ...] broadcasts to [B, P]
    P = torch.cat([a, b])  # [2, 1, 2, 3]
    out = ad.field_similarity(P, torch.stack([P, -P, P]))
    assert out["cosine"].shape == (3, 2)
    torch.testing.assert_close(out["cosine"], torch.tensor([[1.0, 1.0], [-1.0, -1.0], [1.0, 1.0]], dtype=torch.float64))


def test_field_similarity_errors():
    a = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="one shape"):
        ad.field_similarity(a, torch.zeros(2, 1, 2, 3))
    with pytest.raises(ValueError, match="do not broadcast"):
        ad.field_similarity(a, torch.zeros(3, 1, 2, 2))
    with pytest.raises(ValueError, match=r"a must be float \[P, C, H, W\]"):
        ad.field_similarity(torch.zeros(4), torch.zeros(4))
    with pytest.raises(ValueError, match="threshold"):
        ad.field_similarity(a, a, threshold=0)
    with pytest.raises(TypeError):
        ad.field_similarity(np.zeros((2, 1, 2, 2)), a)


# --------------------------------------------------------------------------- #
# compare
# --------------------------------------------------------------------------- #
def _eps_model(x, t):
    return torch.tanh(0.8 * x) + 1e-4 * t.to(x.dtype)[:, None, None, None]


def test_compare_single_step_by_hand(tiny):
    data, m = tiny
    dens = {"wiener": ad.WienerDenoiser(m), "optimal": ad.OptimalDenoiser(data[:100])}
    ts = [800, 300, 10]
    res = ad.compare(dens, _eps_model, data, ts, num_samples=5, seed=4, dtype=torch.float64)
    assert isinstance(res, Agreement) and res.protocol == "single_step" and res.timesteps == ts
    g = torch.Generator().manual_seed(4)
    pick = torch.randperm(data.shape[0], generator=g)[:5]
    x0 = ad.data.to_unit_range(data[pick], torch.float64)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    ref = ad.ModelDenoiser(_eps_model)
    for i, t in enumerate(ts):
        ab = ad.alpha_bar_at(t)
        x = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps
        target = ref(x, t)
        for k, d in dens.items():
            assert res.r2[k][i] == float(ad.r2(d(x, t), target))
            assert res.mse[k][i] == float(ad.mse(d(x, t), target))
    # batching the calls does not change the numbers (beyond rounding)
    res1 = ad.compare(dens, _eps_model, data, ts, num_samples=5, seed=4, dtype=torch.float64, batch_size=2)
    for k in dens:
        np.testing.assert_allclose(res1.r2[k], res.r2[k], rtol=1e-12, atol=1e-12)
    # a different seed picks other images
    assert ad.compare(dens, _eps_model, data, ts, num_samples=5, seed=5, dtype=torch.float64).r2 != res.r2


def test_compare_trajectory_by_hand(tiny):
    data, m = tiny
    w = ad.WienerDenoiser(m)
    res = ad.compare({"wiener": w}, _eps_model, data, [600, 0], protocol="trajectory", num_samples=3, seed=2, steps=5)
    assert res.timesteps == [600, 0] and res.steps == 5
    got = {}
    for name, den in (("model", ad.ModelDenoiser(_eps_model)), ("wiener", w)):
        got[name] = {}
        ad.sample(den, 3, (3, 4, 4), steps=5, seed=2, callback=lambda t, x, x0, d=got[name]: d.__setitem__(t, x0))
    for i, t in enumerate([600, 0]):
        assert res.r2["wiener"][i] == float(ad.r2(got["wiener"][t], got["model"][t]))
        assert res.mse["wiener"][i] == float(ad.mse(got["wiener"][t], got["model"][t]))
    # default timesteps: the whole schedule; shape instead of data
    full = ad.compare({"wiener": w}, _eps_model, None, protocol="trajectory", num_samples=3, seed=2, steps=5, shape=(3, 4, 4))
    assert full.timesteps == ad.ddim_timesteps(5)
    assert full.r2["wiener"][1] == res.r2["wiener"][0] and full.r2["wiener"][-1] == res.r2["wiener"][1]


def test_compare_agrees_perfectly_with_itself_and_reports(tiny, tmp_path):
    data, m = tiny
    w = ad.WienerDenoiser(m)
    # a "network" that is the Wiener denoiser in disguise: r2 = 1, MSE = 0 under both protocols
    as_x0_model = lambda x, t: w(x, int(t[0]))  # noqa: E731
    for protocol in ("single_step", "trajectory"):
        res = ad.compare({"wiener": w, "nearest": ad.NearestDenoiser(data)}, as_x0_model, data, protocol=protocol, num_samples=4, steps=4, prediction="x0")
        assert res.r2["wiener"] == [1.0] * 4 and res.mse["wiener"] == [0.0] * 4
        assert min(res.r2["nearest"]) < 0.99
    table = res.table().splitlines()
    assert table[0] == "| t | wiener r2 | wiener MSE | nearest r2 | nearest MSE |"
    assert len(table) == 2 + 4 and table[2].startswith("| 750 | 1.0000 | 0 |")
    d = res.to_dict()
    assert json.loads(json.dumps(d)) == d and d["names"] == ["wiener", "nearest"]
    fig = res.plot(tmp_path / "agree.png", size=(300, 200))
    from PIL import Image

    with Image.open(tmp_path / "agree.png") as f:
        assert f.mode == "RGB" and f.size[0] == 600 and f.size[1] > 200  # two panels, legend below
        a = np.asarray(f)
    assert (a != 255).any(axis=-1).mean() > 0.02  # something was drawn
    legend = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert len(legend) == 1 and [t.get_text() for t in legend[0].get_texts()] == ["wiener", "nearest"]


def test_compare_bad_inputs(tiny):
    data, m = tiny
    w = {"wiener": ad.WienerDenoiser(m)}
    with pytest.raises(TypeError, match="non-empty dict"):
        ad.compare({}, _eps_model, data)
    with pytest.raises(TypeError, match="must be callable"):
        ad.compare({"w": 3}, _eps_model, data)
    with pytest.raises(ValueError, match="protocol"):
        ad.compare(w, _eps_model, data, protocol="joint")
    with pytest.raises(ValueError, match="num_samples=400 exceeds the 300 images"):
        ad.compare(w, _eps_model, data, num_samples=400)
    with pytest.raises(ValueError, match="needs data"):
        ad.compare(w, _eps_model, None)
    with pytest.raises(ValueError, match=r"timesteps \[550\] are not steps of the 10-step DDIM trajectory"):
        ad.compare(w, _eps_model, data, [500, 550], protocol="trajectory")
    with pytest.raises(TypeError, match="timesteps must be a sequence"):
        ad.compare(w, _eps_model, data, 500)
    with pytest.raises(ValueError, match="repeated"):
        ad.compare(w, _eps_model, data, [500, 500])
    with pytest.raises(ValueError, match="num_samples"):
        ad.compare(w, _eps_model, data, num_samples=0)
    with pytest.raises(TypeError, match="model must be"):
        ad.compare(w, None, data)
