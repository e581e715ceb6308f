"""`analytic-diffusion compare`: a user's network (MODULE:CLASS from a tmp folder, safetensors
or torch.save state_dict; a diffusers UNet2DModel folder), the run folder, against the library."""
import json
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import analytic_diffusion as ad
from analytic_diffusion import cli

NET_SRC = textwrap.dedent('''
    import torch

    class TinyEps(torch.nn.Module):
        def __init__(self, channels=3, width=4):
            super().__init__()
            self.c1 = torch.nn.Conv2d(channels, width, 3, padding=1)
            self.c2 = torch.nn.Conv2d(width, channels, 3, padding=1)

        def forward(self, x, t):
            h = torch.tanh(self.c1(x) + t.to(x.dtype)[:, None, None, None] * 1e-3)
            return self.c2(h)
''')


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    """A folder with PNG images (CIFAR-10 style), a model module and its checkpoints; cwd there."""
    name = f"usernet_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(NET_SRC)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    imgs = ad.data.natural_crops(40, size=6, seed=2)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, im in enumerate(imgs):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
    torch.manual_seed(0)
    sys.modules.pop(name, None)
    mod = __import__(name)
    net = mod.TinyEps()
    from safetensors.torch import save_file

    save_file(net.state_dict(), str(tmp_path / "net.safetensors"))
    torch.save(net.state_dict(), tmp_path / "net.pt")
    yield {"path": tmp_path, "module": name, "net": net.eval(), "images": imgs, "folder": folder}
    sys.modules.pop(name, None)


def _run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_compare_writes_the_run_folder_and_matches_the_library(workdir, capsys):
    w = workdir
    rc, out, err = _run(capsys, "compare", "--data", w["folder"], "--model", f"{w['module']}:TinyEps", "--checkpoint", "net.safetensors",
                        "--methods", "wiener,locality,nearest_dataset", "--preset", "cifar10", "--chunk-size", "16",
                        "--steps", "3", "--num-samples", "2", "--out", "run", "--no-progress")
    assert rc == 0, err
    run = w["path"] / "run"
    for f in ("config.json", "metrics.json", "table.md", "agreement.png", "samples.png", "samples.npz", "steps_locality.png"):
        assert (run / f).is_file(), f
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["command"] == "compare" and cfg["protocol"] == "single" and cfg["preset"] == "cifar10"
    loc = cfg["method_settings"]["locality"]
    assert (loc["softmax"], loc["chunk_size"], loc["threshold"]) == ("wssm", 16, 0.05)  # preset, --chunk-size overrides
    assert cfg["method_settings"]["nearest_dataset"]["scaled"] is False
    assert cfg["network_parameters"] == sum(p.numel() for p in w["net"].parameters())
    met = json.loads((run / "metrics.json").read_text())
    # the same comparison through the library
    data = w["images"]
    m = ad.estimate_moments(data)
    dens = {"wiener": ad.WienerDenoiser(m), "locality": ad.LocalityDenoiser(data, m, softmax="wssm", chunk_size=16, threshold=0.05),
            "nearest_dataset": ad.NearestDenoiser(data, scaled=False)}
    res = ad.compare(dens, w["net"], shape=(3, 6, 6), protocol="single", steps=3, num_samples=2)
    for k in dens:
        np.testing.assert_allclose([s["r2"] for s in met["methods"][k]["per_step"]], res.r2[k], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(met["methods"][k]["final"]["mse"], res.final[k]["mse"], rtol=1e-5, atol=1e-7)
    assert "| locality |" in out and "Wrote the run folder" in out
    # a torch.save state_dict (weights_only) gives the same numbers; trajectory protocol
    rc, out, err = _run(capsys, "compare", "--data", w["folder"], "--model", f"{w['module']}:TinyEps", "--checkpoint", "net.pt",
                        "--methods", "wiener", "--protocol", "trajectory", "--steps", "3", "--num-samples", "2", "--out", "run2", "--no-progress")
    assert rc == 0, err
    met2 = json.loads((w["path"] / "run2" / "metrics.json").read_text())
    tr = ad.compare({"wiener": dens["wiener"]}, w["net"], shape=(3, 6, 6), protocol="trajectory", steps=3, num_samples=2)
    np.testing.assert_allclose([s["r2"] for s in met2["methods"]["wiener"]["per_step"]], tr.r2["wiener"], rtol=1e-5, atol=1e-6)
    assert met2["methods"]["wiener"]["final"]["r2"] == pytest.approx(met["methods"]["wiener"]["final"]["r2"], rel=1e-5)  # final is the trajectory r2 under both


def test_compare_data_options_and_single_step(workdir, capsys):
    w = workdir
    hold = ad.data.natural_crops(10, size=8, seed=9)
    np.save(w["path"] / "hold.npy", hold.numpy())
    net_src = NET_SRC.replace("channels=3", "channels=1")
    (w["path"] / f"{w['module']}_gray.py").write_text(net_src)
    mod = __import__(f"{w['module']}_gray")
    from safetensors.torch import save_file

    save_file(mod.TinyEps().state_dict(), str(w["path"] / "gray.safetensors"))
    rc, out, err = _run(capsys, "compare", "--data", w["folder"], "--model", f"{w['module']}_gray:TinyEps", "--checkpoint", "gray.safetensors",
                        "--methods", "optimal,nearest", "--protocol", "single_step", "--holdout", "hold.npy", "--size", "4", "--grayscale",
                        "--subset", "30", "--subset-seed", "1", "--num-samples", "3", "--steps", "2", "--out", "run", "--no-progress")
    sys.modules.pop(f"{w['module']}_gray", None)
    assert rc == 0, err
    cfg = json.loads((w["path"] / "run" / "config.json").read_text())
    assert cfg["image_shape"] == [1, 4, 4] and cfg["method_settings"]["optimal"]["train"]["count"] == 30
    met = json.loads((w["path"] / "run" / "metrics.json").read_text())
    assert met["protocol"] == "single_step" and [s["t"] for s in met["methods"]["nearest"]["per_step"]] == [500, 0]


def test_compare_user_errors(workdir, capsys):
    w = workdir
    base = ["compare", "--data", w["folder"], "--model", f"{w['module']}:TinyEps", "--checkpoint", "net.safetensors", "--no-progress", "--out", "e"]
    cases = [
        (["--methods", "wiener,unet"], "--methods takes a comma-separated list"),
        (["--methods", "els"], "els needs a patch size"),
        (["--methods", "scfdm", "--preset", "fashion_mnist"], "scfdm has no published settings"),
        (["--holdout", "x.npy"], "--holdout is used by --protocol single_step only"),
        (["--subset-seed", "3"], "--subset-seed chooses a random --subset"),
        (["--grayscale", "--methods", "wiener"], "the network fails on 1x6x6 images"),  # a 3-channel net
        (["--subset", "99"], "subset=99 exceeds the 40 images"),
    ]
    for extra, msg in cases:
        rc, out, err = _run(capsys, *base, *extra)
        assert rc == 2 and msg in err, (extra, err)
    rc, out, err = _run(capsys, "compare", "--data", w["folder"], "--checkpoint", "net.safetensors", "--no-progress")
    assert rc == 2 and "is a file: give --model MODULE:CLASS" in err
    torch.save({"net": w["net"]}, w["path"] / "pickled.pt")  # a pickled module, not a state_dict: refused
    rc, out, err = _run(capsys, "compare", "--data", w["folder"], "--model", f"{w['module']}:TinyEps", "--checkpoint", "pickled.pt", "--no-progress")
    assert rc == 2 and "weights_only=True" in err
    (w["path"] / "notunet").mkdir()
    rc, out, err = _run(capsys, "compare", "--data", w["folder"], "--checkpoint", "notunet", "--no-progress")
    assert rc == 2 and "holds no config.json" in err


def test_compare_without_diffusers_is_a_clear_error(workdir, capsys, monkeypatch):
    (workdir["path"] / "unet").mkdir()
    (workdir["path"] / "unet" / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "diffusers", None)
    rc, out, err = _run(capsys, "compare", "--data", workdir["folder"], "--checkpoint", "unet", "--no-progress")
    assert rc == 2 and "diffusers is not importable" in err


def test_compare_diffusers_folder(workdir, capsys):
    diffusers = pytest.importorskip("diffusers")  # an optional dependency
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(4, 8),
                                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    pipe = workdir["path"] / "pipe"
    unet.save_pretrained(pipe / "unet")
    (pipe / "scheduler").mkdir()
    (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "sample", "beta_schedule": "linear"}))
    rc, out, err = _run(capsys, "compare", "--data", workdir["folder"], "--checkpoint", pipe, "--size", "8", "--methods", "wiener",
                        "--steps", "2", "--num-samples", "2", "--out", "drun", "--no-progress")
    assert rc == 0, err
    cfg = json.loads((workdir["path"] / "drun" / "config.json").read_text())
    assert cfg["prediction"] == "x0" and "diffusers UNet2DModel" in cfg["network"]
    met = json.loads((workdir["path"] / "drun" / "metrics.json").read_text())
    data = ad.data.preprocess(workdir["images"], size=8)
    res = ad.compare({"wiener": ad.WienerDenoiser(ad.estimate_moments(data))}, unet.eval(), shape=(3, 8, 8), protocol="single", steps=2,
                     num_samples=2, prediction="x0")
    np.testing.assert_allclose([s["r2"] for s in met["methods"]["wiener"]["per_step"]], res.r2["wiener"], rtol=1e-4, atol=1e-5)
    (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps({"beta_schedule": "squaredcos_cap_v2"}))
    rc, out, err = _run(capsys, "compare", "--data", workdir["folder"], "--checkpoint", pipe, "--size", "8", "--no-progress")
    assert rc == 2 and "squaredcos_cap_v2" in err
