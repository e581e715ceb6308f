"""The `single` protocol (docs/algorithms.md §8.2) against a hand-written loop; timings and
memory of compare; the run folder written by runs.run_compare."""
import json
import math

import numpy as np
import pytest
import torch

import analytic_diffusion as ad
from analytic_diffusion.runs import RUN_FILES, describe_denoiser, run_compare


@pytest.fixture(scope="module")
def tiny():
    data = ad.data.natural_crops(200, size=4, seed=3)
    return data, ad.estimate_moments(data)


def _eps_model(x, t):
    return torch.tanh(0.7 * x) + 2e-4 * t.to(x.dtype)[:, None, None, None]


def _own_path(den, n, shape, steps, seed, dtype):
    """DDIM by hand (docs/algorithms.md §7): every x_t and x0_hat of the path."""
    ab = ad.linear_alphas_cumprod()
    x = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed), dtype=dtype)
    xs, x0s = {}, {}
    ratio = 1000 // steps
    for i in range(steps):
        t = (steps - 1 - i) * ratio
        a = math.sqrt(float(ab[t]))
        s2 = 1 - float(ab[t])
        x0 = den(x, t)
        xs[t], x0s[t] = x, x0
        eps = (x - a * x0) / math.sqrt(s2 + 1e-8)
        x0c = ((x - math.sqrt(s2) * eps) / a).clamp(-1, 1)
        abp = float(ab[t - ratio]) if t - ratio >= 0 else 1.0
        x = math.sqrt(abp) * x0c + math.sqrt(1 - abp) * eps
    return xs, x0s


def test_single_protocol_by_hand(tiny):
    data, m = tiny
    dens = {"wiener": ad.WienerDenoiser(m), "optimal": ad.OptimalDenoiser(data)}
    net = ad.ModelDenoiser(_eps_model)
    res = ad.compare(dens, _eps_model, data, protocol="single", num_samples=3, seed=5, steps=5, dtype=torch.float64, keep_images=2)
    assert res.protocol == "single" and res.timesteps == [800, 600, 400, 200, 0] and res.steps == 5
    _, net_x0 = _own_path(net, 3, (3, 4, 4), 5, 5, torch.float64)
    for k, d in dens.items():
        xs, x0s = _own_path(d, 3, (3, 4, 4), 5, 5, torch.float64)
        for i, t in enumerate(res.timesteps):
            target = net(xs[t], t)  # the network on the analytic model's own x_t
            np.testing.assert_allclose(res.r2[k][i], float(ad.r2(x0s[t], target)), rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(res.mse[k][i], float(ad.mse(x0s[t], target)), rtol=1e-12, atol=1e-12)
        # final: the paper's trajectory r2 at the last step (sample against the network's own sample)
        np.testing.assert_allclose(res.final[k]["r2"], float(ad.r2(x0s[0], net_x0[0])), rtol=1e-12)
        np.testing.assert_allclose(res.final[k]["mse"], float(ad.mse(x0s[0], net_x0[0])), rtol=1e-12)
        torch.testing.assert_close(res.samples[k], x0s[0])
        assert res.step_images[k]["pred"].shape == (5, 2, 3, 4, 4)
        torch.testing.assert_close(res.step_images[k]["target"][2], net(xs[400], 400)[:2])
    torch.testing.assert_close(res.network_sample, net_x0[0])
    # single differs from trajectory except where the paths coincide (the first step: same x_T)
    tr = ad.compare(dens, _eps_model, data, protocol="trajectory", num_samples=3, seed=5, steps=5, dtype=torch.float64)
    assert tr.r2["wiener"][0] == res.r2["wiener"][0] and tr.r2["wiener"][-1] != res.r2["wiener"][-1]
    assert tr.final["wiener"]["r2"] == res.final["wiener"]["r2"]
    # a subset of reported steps gives the same numbers at those steps
    sub = ad.compare(dens, _eps_model, data, [600, 0], protocol="single", num_samples=3, seed=5, steps=5, dtype=torch.float64)
    assert sub.r2["optimal"] == [res.r2["optimal"][1], res.r2["optimal"][4]]
    with pytest.raises(ValueError, match=r"timesteps \[500\] are not steps of the 5-step DDIM trajectory"):
        ad.compare(dens, _eps_model, data, [500], protocol="single", steps=5)


def test_compare_measures_time_and_memory(tiny):
    data, m = tiny
    res = ad.compare({"wiener": ad.WienerDenoiser(m)}, _eps_model, data, protocol="single", num_samples=2, steps=3)
    assert len(res.seconds["wiener"]) == 3 and all(s > 0 for s in res.seconds["wiener"])
    assert res.final["wiener"]["seconds_per_step"] == pytest.approx(sum(res.seconds["wiener"]) / 3)
    assert len(res.network["seconds"]) == 3 and res.network["seconds_per_step"] > 0
    if res.memory_kind is not None:  # Linux: the peak RSS during the step, a plausible size
        assert all(2**20 < p < 2**40 for p in res.peak_memory["wiener"])
    d = res.to_dict()
    assert json.loads(json.dumps(d)) == d and d["final"]["wiener"]["r2"] == res.final["wiener"]["r2"]
    table = res.summary_table().splitlines()
    assert table[0] == "| Method | MSE | r2 | time / step (s) | peak memory (MiB) |"
    assert table[2].startswith("| wiener | ") and table[3].startswith("| network (reference) |")


def test_run_compare_writes_the_run_folder(tiny, tmp_path):
    data, m = tiny
    dens = {"wiener": ad.WienerDenoiser(m), "locality wssm": ad.LocalityDenoiser(data, m, softmax="wssm", chunk_size=64)}
    out = run_compare(dens, _eps_model, out_dir=tmp_path / "run", data=data, num_samples=3, steps=4, seed=1,
                      config={"data": "crops"}, title="tiny", progress=False)
    assert out == tmp_path / "run"
    names = {p.name for p in out.iterdir()}
    assert set(RUN_FILES) | {"agreement.png", "samples.png", "samples.npz", "steps_wiener.png", "steps_locality_wssm.png"} <= names
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["protocol"] == "single" and cfg["steps"] == 4 and cfg["seed"] == 1 and cfg["data"] == "crops"
    assert cfg["method_settings"]["locality wssm"]["softmax"] == "wssm" and cfg["method_settings"]["locality wssm"]["chunk_size"] == 64
    assert cfg["method_settings"]["wiener"]["class"] == "WienerDenoiser" and "steps_wiener.png" in cfg["files"]
    met = json.loads((out / "metrics.json").read_text())
    res = ad.compare(dens, _eps_model, data, protocol="single", num_samples=3, steps=4, seed=1)
    for k in dens:
        assert [s["t"] for s in met["methods"][k]["per_step"]] == [750, 500, 250, 0]
        assert [s["r2"] for s in met["methods"][k]["per_step"]] == res.r2[k]
        assert met["methods"][k]["final"]["r2"] == res.final[k]["r2"]
        assert met["methods"][k]["final"]["seconds_per_step"] > 0
    assert met["network"]["final"]["seconds_per_step"] > 0
    table = (out / "table.md").read_text()
    assert table.startswith("# tiny\n") and "| locality wssm | " in table and "## Per step" in table
    with np.load(out / "samples.npz", allow_pickle=False) as z:
        assert list(z["names"]) == ["network", "wiener", "locality wssm"]
        assert z["method_0"].shape == (3, 3, 4, 4) and z["method_0"].dtype == np.uint8
        np.testing.assert_array_equal(z["method_0"], ad.data.to_uint8(res.samples["wiener"].clamp(-1, 1)).numpy())
    from PIL import Image

    with Image.open(out / "samples.png") as f:
        a = np.asarray(f.convert("RGB"))
    assert (a != 255).any(axis=-1).mean() > 0.05
    with pytest.raises(ValueError, match="figure_format"):
        run_compare(dens, _eps_model, out_dir=tmp_path / "x", data=data, figure_format="gif")


def test_describe_denoiser_keeps_settings_only(tiny):
    data, m = tiny
    d = describe_denoiser(ad.LocalityDenoiser(data, m, threshold=0.05, softmax="wssm", chunk_size=512))
    assert d["class"] == "LocalityDenoiser" and d["threshold"] == 0.05 and d["chunk_size"] == 512
    assert d["train"] == {"count": 200, "shape": [3, 4, 4], "dtype": "torch.uint8"}
    assert json.loads(json.dumps(d)) == d and d["moments"] == {"class": "Moments", "count": 200, "extra": {}, "image_shape": [3, 4, 4], "kind": "full"}
    els = describe_denoiser(ad.presets.build("els", data, "cifar10"))
    assert els["padding"] == "zeros" and els["schedule"]["preset"] == "cifar10-unet" and len(els["schedule"]["scales"]) == 20
