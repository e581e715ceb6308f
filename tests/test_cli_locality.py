"""`analytic-diffusion locality`: sensitivity fields and windows per timestep, run in-process
on tiny inputs and checked against the library (full and windowed filters, a user model)."""
import json
import math
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import analytic_diffusion as ad
from analytic_diffusion import cli


def _run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _summary(out):
    return json.loads((out / "locality.json").read_text())


# --------------------------------------------------------------------------- full covariance
@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("loc")
    rc = cli.main(["locality", "--size", "8", "-N", "300", "--timesteps", "900,500", "100", "0",
                   "--pixels", "centre", "0,7", "--out", str(out), "--no-progress"])
    return rc, out


def test_full_run_writes_figures_table_and_arrays(full_run):
    rc, out = full_run
    assert rc == 0
    s = _summary(out)
    assert s["image_shape"] == [3, 8, 8] and s["filter"]["kind"] == "full" and s["filter"]["window"] is None
    assert s["timesteps"] == [900, 500, 100, 0] and s["pixels"] == [[4, 4], [0, 7]] and s["channel"] == 1
    assert [f["path"] for f in s["files"]["figures"]] == ["locality_r4_c4.png", "locality_r0_c7.png"]
    for f in s["files"]["figures"]:
        with Image.open(out / f["path"]) as im:
            im.load()
        assert im.mode == "RGB" and list(im.size) == f["size"]
        assert im.width > 4 * 128 and im.height > 2 * 128  # 8x8 shown at 16x: 4 columns, field and window rows
    md = (out / "locality.md").read_text().splitlines()
    assert md[0].startswith("| t | alpha_bar | mask density | (4, 4) window")
    assert len(md) == 2 + 4 and md[2].startswith("| 900 |") and md[-1].startswith("| 0 |")


def test_full_run_matches_library(full_run):
    rc, out = full_run
    s = _summary(out)
    f = ad.WienerFilter(ad.estimate_moments(ad.data.natural_crops(300, size=8, seed=0)))
    arrays = np.load(out / "fields.npz", allow_pickle=False)
    assert arrays["wiener_fields"].shape == (2, 4, 3, 8, 8) and arrays["windows"].dtype == np.bool_
    flat = [1 * 64 + 4 * 8 + 4, 1 * 64 + 0 * 8 + 7]
    for ti, row in enumerate(s["table"]):
        ab = ad.alpha_bar_at(row["t"])
        assert row["alpha_bar"] == pytest.approx(ab)
        M = f.mask(ab, 0.02)
        assert row["density"] == pytest.approx(M.double().mean().item())
        for i, m in enumerate(flat):
            assert np.array_equal(arrays["windows"][i, ti], M[:, m].reshape(3, 8, 8).numpy())
            assert row["pixels"][i]["window"] == int(M[:, m].sum())
            np.testing.assert_allclose(arrays["wiener_fields"][i, ti], f.sensitivity(ab, m, (3, 8, 8))[0].numpy(), rtol=1e-6, atol=1e-7)
    dens = [r["density"] for r in s["table"]]
    assert dens[-1] < dens[0]  # N = 300 > n = 192: local windows emerge as the noise falls
    assert s["table"][-1]["pixels"][0]["radius90"] <= s["table"][-1]["pixels"][0]["radius"]


# --------------------------------------------------------------------------- windowed
def test_window_path_matches_windowed_filter(tmp_path, capsys):
    rc, stdout, err = _run(capsys, "locality", "--size", "12", "-N", "60", "--window", "5", "--timesteps", "500", "0",
                           "--pixels", "0,0", "6,6", "--threshold", "0.05", "--out", tmp_path, "--no-progress")
    assert rc == 0, err
    assert str(tmp_path / "locality_r0_c0.png") in stdout
    s = _summary(tmp_path)
    assert s["filter"] == {"kind": "windowed", "window": 5, "moments_count": 60 * 8 * 8}
    f = ad.WindowedWiener(ad.estimate_patch_moments(ad.data.natural_crops(60, size=12, seed=0), 5), (3, 12, 12))
    arrays = np.load(tmp_path / "fields.npz", allow_pickle=False)
    for ti, row in enumerate(s["table"]):
        ab = ad.alpha_bar_at(row["t"])
        assert row["density"] == pytest.approx(f.mask_density(ab, 0.05))
        win = f.window(ab, 0.05, [144, 144 + 6 * 12 + 6])
        assert np.array_equal(arrays["windows"][:, ti], win.numpy())
        assert [p["window"] for p in row["pixels"]] == [int(w.sum()) for w in win]
        assert row["pixels"][1]["radius"] <= 2  # a 5x5 window
    assert s["table"][1]["pixels"][1]["window"] < s["table"][0]["pixels"][1]["window"]


# --------------------------------------------------------------------------- --stats
def test_stats_full_and_patch(tmp_path, capsys):
    imgs = ad.data.natural_crops(150, size=6, seed=6)
    np.save(tmp_path / "x.npy", imgs.numpy())
    ad.estimate_moments(imgs).save(tmp_path / "full.safetensors")
    rc, _, err = _run(capsys, "stats", tmp_path / "x.npy", "--out", tmp_path / "patch.safetensors", "--patch-size", "3", "--no-progress")
    assert rc == 0, err

    # full stats without --data: the image shape comes from the file
    rc, _, err = _run(capsys, "locality", "--stats", tmp_path / "full.safetensors", "--timesteps", "0", "--out", tmp_path / "a", "--no-progress")
    assert rc == 0, err
    s = _summary(tmp_path / "a")
    assert s["image_shape"] == [3, 6, 6] and s["filter"]["kind"] == "full" and s["filter"]["moments_count"] == 150
    M = ad.WienerFilter(ad.Moments.load(tmp_path / "full.safetensors")).mask(ad.alpha_bar_at(0), 0.02)
    assert s["table"][0]["density"] == pytest.approx(M.double().mean().item())

    # patch stats: the windowed filter at the data's size, or at any crop size
    rc, _, err = _run(capsys, "locality", "--stats", tmp_path / "patch.safetensors", "--data", tmp_path / "x.npy", "--timesteps", "100", "--out", tmp_path / "b", "--no-progress")
    assert rc == 0, err
    s = _summary(tmp_path / "b")
    assert s["filter"]["kind"] == "windowed" and s["filter"]["window"] == 3 and s["image_shape"] == [3, 6, 6]
    rc, _, err = _run(capsys, "locality", "--stats", tmp_path / "patch.safetensors", "--size", "20", "--timesteps", "100", "--out", tmp_path / "c", "--no-progress")
    assert rc == 0, err
    s = _summary(tmp_path / "c")
    assert s["image_shape"] == [3, 20, 20] and s["pixels"] == [[10, 10]]
    assert np.load(tmp_path / "c" / "fields.npz")["wiener_fields"].shape == (1, 1, 3, 20, 20)


def test_faces_windowed(tmp_path, capsys):
    rc, _, err = _run(capsys, "locality", "--data", "faces", "--window", "7", "--timesteps", "300", "0", "--out", tmp_path, "--no-progress")
    assert rc == 0, err
    s = _summary(tmp_path)
    assert s["image_shape"] == [1, 25, 25] and s["channel"] == 0 and s["pixels"] == [[12, 12]]
    with Image.open(tmp_path / "locality_r12_c12.png") as im:
        rgb = np.asarray(im.convert("RGB"))
    assert rgb.shape[1] > 2 * 25 * 5


# --------------------------------------------------------------------------- --model
TINY_NET = textwrap.dedent(
    """
    import torch


    class TinyNet(torch.nn.Module):
        def __init__(self, channels=3):
            super().__init__()
            self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)

        def forward(self, x, t):
            return self.conv(x)
    """
)


@pytest.fixture
def tiny_net(tmp_path, monkeypatch):
    """A module file importable as ``tinynet_cli_locality`` and a state_dict checkpoint of it."""
    (tmp_path / "tinynet_cli_locality.py").write_text(TINY_NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("tinynet_cli_locality", None)
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 3, 3, padding=1)
    state = {f"conv.{k}": v.detach().clone() for k, v in conv.state_dict().items()}
    torch.save(state, tmp_path / "ck.pt")
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "ck.safetensors"))
    yield tmp_path, state
    sys.modules.pop("tinynet_cli_locality", None)


@pytest.mark.parametrize("ckpt", ["ck.pt", "ck.safetensors"])
def test_model_fields_are_its_jacobian(tmp_path, capsys, tiny_net, ckpt):
    folder, state = tiny_net
    out = tmp_path / "o"
    rc, stdout, err = _run(capsys, "locality", "--size", "8", "-N", "250", "--timesteps", "500", "0", "--pixels", "centre", "0,0",
                           "--model", "tinynet_cli_locality:TinyNet", "--checkpoint", folder / ckpt, "--prediction", "x0",
                           "--model-inputs", "2", "--out", out, "--no-progress")
    assert rc == 0, err
    s = _summary(out)
    assert s["model"]["prediction"] == "x0" and s["model"]["inputs"] == 2
    fields = np.load(out / "fields.npz", allow_pickle=False)["model_fields"]
    assert fields.shape == (2, 2, 3, 8, 8)
    # a linear x0-predicting conv: the field of output (c=1, h, w) is its kernel placed there
    w = state["conv.weight"].numpy()
    expect = np.zeros((3, 8, 8), np.float32)
    expect[:, 3:6, 3:6] = w[1]
    np.testing.assert_allclose(fields[0, 0], expect, atol=1e-6)
    np.testing.assert_allclose(fields[0, 1], expect, atol=1e-6)
    expect_corner = np.zeros((3, 8, 8), np.float32)
    expect_corner[:, 0:2, 0:2] = w[1][:, 1:, 1:]
    np.testing.assert_allclose(fields[1, 0], expect_corner, atol=1e-6)
    for row in s["table"]:
        for p in row["pixels"]:
            assert -1.0 <= p["model"]["cosine"] <= 1.0 and 0.0 <= p["model"]["support_iou"] <= 1.0
    assert "model cosine / support IoU" in (out / "locality.md").read_text()
    with Image.open(out / "locality_r4_c4.png") as with_model:
        with_model.load()
    rc, _, err = _run(capsys, "locality", "--size", "8", "-N", "250", "--timesteps", "500", "0", "--out", tmp_path / "p", "--no-progress")
    with Image.open(tmp_path / "p" / "locality_r4_c4.png") as plain:
        plain.load()
    assert with_model.width == plain.width and with_model.height > plain.height  # one more row


def test_model_epsilon_prediction(tmp_path, capsys, tiny_net):
    folder, state = tiny_net
    rc, _, err = _run(capsys, "locality", "--size", "6", "-N", "150", "--timesteps", "300", "--model", "tinynet_cli_locality:TinyNet",
                      "--checkpoint", folder / "ck.pt", "--model-inputs", "1", "--out", tmp_path / "o", "--no-progress")
    assert rc == 0, err
    field = np.load(tmp_path / "o" / "fields.npz")["model_fields"][0, 0]
    ab = ad.alpha_bar_at(300)
    # x0 = (x - sqrt(1 - ab) eps(x)) / sqrt(ab): identity minus the scaled kernel, over sqrt(ab)
    expect = np.zeros((3, 6, 6))
    expect[:, 2:5, 2:5] = -math.sqrt(1 - ab) * state["conv.weight"].numpy()[1]
    expect[1, 3, 3] += 1.0
    np.testing.assert_allclose(field, expect / math.sqrt(ab), atol=1e-5)


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--size", "6", "--pixels", "6,0"], "outside the 6x6"),
        (["--size", "6", "--pixels", "a,b"], "pixel"),
        (["--stats", "{tmp}/missing.safetensors"], "missing.safetensors"),
        (["--stats", "{tmp}/m5.safetensors", "--data", "{tmp}/x6.npy"], "(3, 5, 5)"),
        (["--stats", "{tmp}/m5.safetensors", "--window", "3"], "patch moments"),
        (["--size", "6", "--window", "4"], "odd"),
        (["--size", "6", "--timesteps", "1000"], "--timesteps"),
        (["--size", "6", "--channel", "3"], "--channel"),
        (["--size", "6", "--model", "nocolon", "--checkpoint", "{tmp}/ck.pt"], "MODULE:CLASS"),
        (["--size", "6", "--model", "no_such_module_xyz:Net", "--checkpoint", "{tmp}/ck.pt"], "no_such_module_xyz"),
        (["--size", "6", "--model", "tinynet_cli_locality:Missing", "--checkpoint", "{tmp}/ck.pt"], "Missing"),
        (["--size", "6", "--model", "tinynet_cli_locality:TinyNet"], "--checkpoint"),
        (["--size", "6", "--model", "tinynet_cli_locality:TinyNet", "--checkpoint", "{tmp}/nope.pt"], "nope.pt"),
        (["--size", "6", "--model", "tinynet_cli_locality:TinyNet", "--checkpoint", "{tmp}/ck.pt", "--model-kwargs", '{"channels": 1}'], "does not fit"),
        (["--size", "6", "--model", "tinynet_cli_locality:TinyNet", "--checkpoint", "{tmp}/pickled.pt"], "weights_only"),
    ],
)
def test_bad_inputs_are_clean_errors(tmp_path, capsys, tiny_net, argv, needle):
    folder, _ = tiny_net
    np.save(tmp_path / "x6.npy", ad.data.natural_crops(40, size=6, seed=1).numpy())
    ad.estimate_moments(ad.data.natural_crops(40, size=5, seed=1)).save(tmp_path / "m5.safetensors")
    torch.save({"net": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pt")  # a pickled object, not a state_dict
    (tmp_path / "ck.pt").write_bytes((folder / "ck.pt").read_bytes())
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    rc, _, err = _run(capsys, "locality", *argv, "--out", tmp_path / "o", "--no-progress")
    assert rc == 2
    assert err.startswith("analytic-diffusion: error:") or "usage:" in err  # argparse's own errors print the usage first
    assert "analytic-diffusion" in err and "error:" in err and needle in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_help_lists_locality(capsys):
    rc, out, _ = _run(capsys, "--help")
    assert rc == 0 and "locality" in out
    rc, out, _ = _run(capsys, "locality", "--help")
    assert rc == 0 and "--window" in out and "--model" in out
