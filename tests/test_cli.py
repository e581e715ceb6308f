"""The command line: demo, stats and sample, run in-process on tiny inputs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import analytic_diffusion as ad
from analytic_diffusion import cli

METHODS = ("wiener", "optimal", "nearest", "locality")
DEMO_METHODS = METHODS + ("windowed",)


def _run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# --------------------------------------------------------------------------- demo
@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    rc = cli.main(["demo", "--size", "8", "-N", "300", "--num-samples", "2", "--steps", "3", "--out", str(out), "--no-progress"])
    return rc, out


def test_demo_writes_figures_and_summary(demo_run):
    rc, out = demo_run
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("sizes", "timesteps", "timings_s", "masks", "backends", "versions", "build_info", "files"):
        assert key in summary
    assert summary["sizes"] == {"num_train": 300, "image_shape": [3, 8, 8], "n": 192, "num_samples": 2, "steps": 3}

    grid_path, fig_path = out / summary["files"]["grid"]["path"], out / summary["files"]["locality"]["path"]
    with Image.open(grid_path) as grid:
        grid.load()
    with Image.open(fig_path) as fig:
        fig.load()
    # 8x8 crops are shown at 16x: 128-px cells, 2 px apart; a row per method plus
    # the nearest training image to the samples of each locality denoiser
    assert grid.mode == "RGB" and list(grid.size) == summary["files"]["grid"]["size"]
    assert grid.height == 7 * (128 + 2) + 2
    assert grid.width > 2 * (128 + 2) + 2  # images plus a label column
    assert fig.mode == "RGB" and list(fig.size) == summary["files"]["locality"]["size"]
    assert fig.width > 3 * 128 and fig.height > 2 * 128  # 3 timesteps, field and window rows


def test_demo_reports_windows_and_novelty(demo_run):
    _, out = demo_run
    s = json.loads((out / "summary.json").read_text())
    win = s["windowed"]
    assert win["patch_sizes"] == [5]  # the default sizes that fit 8x8 crops
    assert [st["t"] for st in win["steps"]] == s["timesteps"]
    for st in win["steps"]:
        assert st["patch_size"] == 5 and 0 <= st["radius"] <= 2 and 0 < st["density"] <= 1
    radii = [st["radius"] for st in win["steps"]]
    assert radii == sorted(radii, reverse=True)  # windows shrink as the noise falls
    rmse = s["nearest_train"]["rmse"]
    assert set(rmse) == set(DEMO_METHODS) and all(len(v) == 2 for v in rmse.values())
    assert max(rmse["nearest"]) < 1e-3  # the nearest denoiser ends on training images
    assert s["nearest_train"]["mean_rmse"]["windowed"] == sum(rmse["windowed"]) / 2
    with Image.open(out / s["files"]["windows"]["path"]) as fig:
        assert list(fig.size) == s["files"]["windows"]["size"]


def test_demo_summary_values(demo_run):
    rc, out = demo_run
    s = json.loads((out / "summary.json").read_text())
    t = s["timings_s"]
    for key in ("data", "moments", "eigendecomposition", "masks", "figures", "total"):
        assert t[key] > 0, key
    assert set(t["sampling"]) == set(DEMO_METHODS)
    assert all(v > 0 for v in t["sampling"].values())
    assert t["total"] >= t["moments"] + t["masks"] + sum(t["sampling"].values())

    assert s["timesteps"] == ad.ddim_timesteps(3)
    assert [m["t"] for m in s["masks"]] == s["timesteps"]
    for m in s["masks"]:
        assert 0.0 <= m["density"] <= 1.0 and 0.0 < m["centre_window"] <= 1.0
        assert m["alpha_bar"] == pytest.approx(ad.alpha_bar_at(m["t"]))
    # locality emerges as the noise falls (N = 300 > n = 192: full-rank covariance)
    assert s["masks"][-1]["density"] < 0.5 < s["masks"][0]["density"]

    for op in ("locality_denoise", "optimal_denoise", "nearest_denoise", "moments"):
        assert s["backends"][op] in ad.available_backends(op, "cpu")
    assert set(s["build_info"]) == {"cpu", "cuda"}
    assert s["versions"]["torch"] == torch.__version__
    # the memorising denoisers end on a training image; the Wiener filter does not
    rmse = s["nearest_train"]["rmse"]
    assert max(rmse["nearest"]) < 1e-3 and max(rmse["optimal"]) < 1e-3
    assert min(rmse["wiener"]) > 1e-2


def test_demo_prints_where_files_went(tmp_path, capsys):
    rc, out, err = _run(capsys, "demo", "--size", "4", "-N", "60", "--num-samples", "1", "--steps", "2", "--out", tmp_path / "d", "--no-progress")
    assert rc == 0
    for name in ("grid.png", "locality.png", "summary.json"):
        assert str(tmp_path / "d" / name) in out


def test_demo_unknown_backend_fails_before_work(tmp_path, capsys):
    rc, out, err = _run(capsys, "demo", "--size", "4", "-N", "60", "--out", tmp_path / "d", "--backend", "no-such-backend", "--no-progress")
    assert rc == 2
    assert err.startswith("analytic-diffusion: error:") and "no-such-backend" in err
    assert "Traceback" not in err
    assert not (tmp_path / "d" / "summary.json").exists()


# --------------------------------------------------------------------------- stats
def _write_pngs(folder: Path, images: np.ndarray) -> None:
    """uint8 [N, C, H, W] -> numbered PNGs ('L' for C == 1, else 'RGB')."""
    folder.mkdir(parents=True)
    for i, im in enumerate(images):
        arr = im[0] if im.shape[0] == 1 else im.transpose(1, 2, 0)
        Image.fromarray(np.ascontiguousarray(arr)).save(folder / f"{i:03d}.png")


@pytest.mark.parametrize("channels", [3, 1])
def test_stats_png_folder_matches_library(tmp_path, capsys, channels):
    imgs = ad.data.natural_crops(40, size=5, seed=3).numpy()
    if channels == 1:
        imgs = imgs[:, :1]
    _write_pngs(tmp_path / "pngs", imgs)
    out = tmp_path / "sub" / "m.safetensors"
    rc, stdout, err = _run(capsys, "stats", tmp_path / "pngs", "--out", out, "--batch-size", "7", "--no-progress")
    assert rc == 0, err
    assert str(out) in stdout
    m = ad.Moments.load(out)
    ref = ad.estimate_moments(torch.from_numpy(imgs))
    assert m.count == 40 and m.kind == "full" and tuple(m.image_shape) == (channels, 5, 5)
    # uint8 sums are exact integers: the batching cannot change a bit
    assert torch.equal(m.mean, ref.mean) and torch.equal(m.cov, ref.cov)


def test_stats_npy_float(tmp_path, capsys):
    x = ad.data.to_unit_range(ad.data.natural_crops(50, size=4, seed=4)).numpy()
    np.save(tmp_path / "x.npy", x)
    rc, _, err = _run(capsys, "stats", tmp_path / "x.npy", "--out", tmp_path / "m.safetensors", "--batch-size", "16", "--no-progress")
    assert rc == 0, err
    m = ad.Moments.load(tmp_path / "m.safetensors")
    ref = ad.estimate_moments(torch.from_numpy(x))
    assert m.count == 50
    torch.testing.assert_close(m.mean, ref.mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(m.cov, ref.cov, rtol=0, atol=1e-12)


def test_stats_patch_moments(tmp_path, capsys):
    imgs = ad.data.natural_crops(30, size=7, seed=5)
    np.save(tmp_path / "x.npy", imgs.numpy())
    rc, _, err = _run(capsys, "stats", tmp_path / "x.npy", "--out", tmp_path / "p.safetensors", "--patch-size", "3", "--no-progress")
    assert rc == 0, err
    m = ad.Moments.load(tmp_path / "p.safetensors")
    ref = ad.estimate_patch_moments(imgs, 3)
    assert m.kind == "patch" and tuple(m.image_shape) == (3, 3, 3) and m.count == 30 * 5 * 5
    torch.testing.assert_close(m.mean, ref.mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(m.cov, ref.cov, rtol=0, atol=1e-12)


def test_stats_even_patch_size_is_a_clean_error(tmp_path, capsys):
    np.save(tmp_path / "x.npy", ad.data.natural_crops(4, size=5).numpy())
    rc, _, err = _run(capsys, "stats", tmp_path / "x.npy", "--out", tmp_path / "p.safetensors", "--patch-size", "2", "--no-progress")
    assert rc == 2 and "patch_size" in err and "Traceback" not in err


# --------------------------------------------------------------------------- sample
@pytest.fixture(scope="module")
def train_npy(tmp_path_factory):
    """uint8 [150, 3, 6, 6]: N > n = 108, so the covariance is full rank."""
    path = tmp_path_factory.mktemp("data") / "train.npy"
    np.save(path, ad.data.natural_crops(150, size=6, seed=6).numpy())
    return path


@pytest.mark.parametrize("method", METHODS)
def test_sample_each_method(tmp_path, capsys, train_npy, method):
    rc, out, err = _run(capsys, "sample", "--method", method, "--data", train_npy, "--steps", "3", "-n", "3", "--out", tmp_path, "--seed", "1", "--no-progress")
    assert rc == 0, err
    x = np.load(tmp_path / f"{method}_samples.npy", allow_pickle=False)
    assert x.shape == (3, 3, 6, 6) and x.dtype == np.uint8
    with Image.open(tmp_path / f"{method}_samples.png") as im:
        assert im.mode == "RGB" and im.height == (6 * 21 + 2) + 2  # 6x6 shown at 21x
    train = np.load(train_npy)
    if method in ("nearest", "optimal"):
        # both end on training images, and the uint8 round trip must return them exactly
        for s in x:
            assert (train == s).all(axis=(1, 2, 3)).any()


def test_sample_matches_library(tmp_path, capsys, train_npy):
    rc, _, err = _run(capsys, "sample", "--method", "locality", "--data", train_npy, "--steps", "2", "-n", "2", "--out", tmp_path, "--threshold", "0.05", "--softmax", "wssm", "--chunk-size", "64", "--no-progress")
    assert rc == 0, err
    train = torch.from_numpy(np.load(train_npy))
    den = ad.LocalityDenoiser(train, threshold=0.05, softmax="wssm", chunk_size=64)
    ref = ad.sample(den, 2, (3, 6, 6), steps=2, seed=0)
    expect = ((ref.double() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    np.testing.assert_array_equal(np.load(tmp_path / "locality_samples.npy"), expect)


def test_sample_grayscale_with_stats(tmp_path, capsys):
    faces = ad.data.faces()[:, :, :10, :10].contiguous()  # [100, 1, 10, 10]: n = 100 < N
    np.save(tmp_path / "faces.npy", faces.numpy())
    rc, _, err = _run(capsys, "stats", tmp_path / "faces.npy", "--out", tmp_path / "f.safetensors", "--no-progress")
    assert rc == 0, err
    rc, _, err = _run(capsys, "sample", "--method", "wiener", "--data", tmp_path / "faces.npy", "--stats", tmp_path / "f.safetensors", "--steps", "2", "-n", "2", "--out", tmp_path / "o", "--no-progress")
    assert rc == 0, err
    assert np.load(tmp_path / "o" / "wiener_samples.npy").shape == (2, 1, 10, 10)
    with Image.open(tmp_path / "o" / "wiener_samples.png") as im:
        rgb = np.asarray(im.convert("RGB"))
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()  # grey


def test_sample_stats_of_wrong_shape_fails_clearly(tmp_path, capsys, train_npy):
    np.save(tmp_path / "small.npy", ad.data.natural_crops(40, size=5, seed=7).numpy())
    rc, _, err = _run(capsys, "stats", tmp_path / "small.npy", "--out", tmp_path / "small.safetensors", "--no-progress")
    assert rc == 0, err
    rc, out, err = _run(capsys, "sample", "--method", "locality", "--data", train_npy, "--stats", tmp_path / "small.safetensors", "--steps", "2", "-n", "1", "--out", tmp_path / "o", "--no-progress")
    assert rc == 2
    assert err.startswith("analytic-diffusion: error:")
    assert "(3, 5, 5)" in err and "(3, 6, 6)" in err
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["sample", "--method", "nearest", "--data", "{tmp}/missing.npy", "--out", "{tmp}/o"], "missing.npy"),
        (["sample", "--method", "locality", "--data", "{tmp}/x.npy", "--stats", "{tmp}/missing.safetensors", "--out", "{tmp}/o"], "missing.safetensors"),
        (["sample", "--method", "locality", "--data", "{tmp}/x.npy", "--stats", "{tmp}/x.npy", "--out", "{tmp}/o"], "x.npy"),
        (["sample", "--method", "optimal", "--data", "{tmp}/x.npy", "--temperature", "0", "--out", "{tmp}/o"], "temperature"),
    ],
)
def test_sample_errors_are_clean(tmp_path, capsys, argv, needle):
    np.save(tmp_path / "x.npy", np.zeros((4, 3, 4, 4), np.uint8))
    rc, _, err = _run(capsys, *[a.format(tmp=tmp_path) for a in argv], "--no-progress")
    assert rc == 2
    assert err.startswith("analytic-diffusion: error:") and needle in err
    assert "Traceback" not in err


def test_usage_errors_return_2(capsys):
    rc, _, err = _run(capsys, "sample", "--data", "x.npy", "--out", "o")  # no --method
    assert rc == 2 and "--method" in err
    rc, _, err = _run(capsys)
    assert rc == 2


def test_module_help_subprocess():
    env = dict(os.environ)
    src = str(Path(ad.__file__).resolve().parents[1])  # works whether installed or run from the tree
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "analytic_diffusion", "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: analytic-diffusion")
    for cmd in ("demo", "stats", "sample"):
        assert cmd in r.stdout


# --------------------------------------------------------------------------- bugs vs user errors
def test_a_bug_keeps_its_traceback(tmp_path, capsys, train_npy, monkeypatch):
    """A ValueError/TypeError raised outside the stages that read the user's input is a
    bug: it must propagate (the console script then prints the traceback, exit 1), not be
    reported as a usage error with exit status 2."""
    def broken_sample(*args, **kwargs):
        raise TypeError("an internal bug")

    monkeypatch.setattr(ad, "sample", broken_sample)
    with pytest.raises(TypeError, match="an internal bug"):
        cli.main(["sample", "--method", "nearest", "--data", str(train_npy), "--out", str(tmp_path / "o"), "--no-progress"])
    from analytic_diffusion import figures

    def broken_grid(*args, **kwargs):
        raise ValueError("a figure bug")

    monkeypatch.undo()
    monkeypatch.setattr(figures, "image_grid", broken_grid)
    with pytest.raises(ValueError, match="a figure bug"):
        cli.main(["sample", "--method", "nearest", "--data", str(train_npy), "--steps", "1", "-n", "1", "--out", str(tmp_path / "o"), "--no-progress"])


def test_bad_data_found_while_streaming_is_a_user_error(tmp_path, capsys):
    x = ad.data.to_unit_range(ad.data.natural_crops(20, size=4, seed=4)).numpy()
    x[17, 0, 0, 0] = np.nan  # in the second batch: found only while the moments stream the file
    np.save(tmp_path / "x.npy", x)
    rc, _, err = _run(capsys, "stats", tmp_path / "x.npy", "--out", tmp_path / "m.safetensors", "--batch-size", "8", "--no-progress")
    assert rc == 2 and err.startswith("analytic-diffusion: error:") and "NaN" in err and "Traceback" not in err


@pytest.mark.parametrize("fmt, magic", [("pdf", b"%PDF-"), ("svg", b"<?xml")])
def test_sample_figure_format(tmp_path, capsys, train_npy, fmt, magic):
    rc, out, err = _run(capsys, "sample", "--method", "nearest", "--data", train_npy, "--steps", "2", "-n", "2", "--out", tmp_path, "--figure-format", fmt, "--no-progress")
    assert rc == 0, err
    path = tmp_path / f"nearest_samples.{fmt}"
    assert str(path) in out and path.read_bytes().startswith(magic)
    assert not (tmp_path / "nearest_samples.png").exists()
