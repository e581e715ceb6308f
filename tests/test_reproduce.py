"""The small UNet (shapes, training, safetensors checkpoints) and `analytic-diffusion reproduce --quick`."""
import json
import math

import pytest
import torch

import analytic_diffusion as ad
from analytic_diffusion import cli
from analytic_diffusion.cli.reproduce import DEFAULT_METHODS
from analytic_diffusion.models import SmallUNet, load_unet, save_unet, train_unet


@pytest.fixture(autouse=True)
def _one_thread():
    # a tiny network: more threads only wait at barriers on a busy machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------- the network
@pytest.mark.parametrize("shape", [(3, 3, 8, 8), (1, 3, 16, 12), (2, 1, 4, 8)])
def test_unet_output_has_input_shape(shape):
    torch.manual_seed(0)
    net = SmallUNet(channels=shape[1], width=8).eval()
    x = torch.randn(shape)
    t = torch.tensor([999, 0, 500][: shape[0]], dtype=torch.long)
    with torch.no_grad():
        out = net(x, t)
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_unet_samples_do_not_interact():
    # group norm, not batch norm: sample 0's output is the same alone and in a batch
    torch.manual_seed(0)
    net = SmallUNet(3, 8).eval()
    x = torch.randn(4, 3, 8, 8)
    t = torch.tensor([10, 300, 600, 900])
    with torch.no_grad():
        torch.testing.assert_close(net(x, t)[1:2], net(x[1:2], t[1:2]), rtol=1e-5, atol=1e-6)


def test_unet_parameter_counts_documented():
    assert SmallUNet(3, 16).num_parameters == 124723
    assert SmallUNet(3, 24).num_parameters == 279051


def test_unet_bad_arguments():
    with pytest.raises(ValueError, match="width"):
        SmallUNet(3, 6)
    with pytest.raises(ValueError, match="channels"):
        SmallUNet(0, 8)
    net = SmallUNet(3, 8)
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.randn(1, 3, 10, 8), torch.tensor([5]))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        net(torch.randn(1, 1, 8, 8), torch.tensor([5]))


# --------------------------------------------------------------------------- training
def test_training_loss_decreases_and_data_untouched():
    data = ad.data.natural_crops(64, size=8, seed=1)
    before = data.clone()
    torch.manual_seed(0)
    net = SmallUNet(3, 8)
    losses = train_unet(net, data, 40, batch_size=16, lr=3e-3, seed=0, progress=False)
    assert len(losses) == 40 and all(math.isfinite(v) for v in losses)
    # the untrained network's loss is ~1 (eps has unit variance); 40 steps lower it to ~0.6x
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10
    assert torch.equal(data, before)
    assert not net.training  # left in eval mode


def test_training_is_seeded():
    data = ad.data.natural_crops(32, size=8, seed=2)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        net = SmallUNet(3, 4)
        runs.append((train_unet(net, data, 4, batch_size=4, seed=3, progress=False), net.state_dict()))
    assert runs[0][0] == runs[1][0]
    for k, v in runs[0][1].items():
        assert torch.equal(v, runs[1][1][k]), k


def test_training_float_data_and_bad_arguments():
    data = ad.data.to_unit_range(ad.data.natural_crops(16, size=8, seed=0))
    net = SmallUNet(3, 4)
    assert len(train_unet(net, data, 2, batch_size=4, progress=False)) == 2
    with pytest.raises(ValueError, match="steps"):
        train_unet(net, data, 0, progress=False)
    with pytest.raises(ValueError, match="lr"):
        train_unet(net, data, 1, lr=float("nan"), progress=False)
    with pytest.raises(ValueError, match="data"):
        train_unet(net, data * 3, 1, progress=False)  # floats outside [-1, 1]
    with pytest.raises(ValueError, match="data"):
        train_unet(net, data.reshape(16, -1), 1, progress=False)


# --------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    net = SmallUNet(3, 8).eval()
    path = save_unet(net, tmp_path / "m.safetensors", {"steps": 12, "num_train": 64, "note": [1, 2]})
    back = load_unet(path)
    assert isinstance(back, SmallUNet) and not back.training and back.config == {"channels": 3, "width": 8}
    assert back.checkpoint_metadata == {"steps": 12, "num_train": 64, "note": [1, 2]}
    for k, v in net.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([100, 700])
    with torch.no_grad():
        assert torch.equal(net(x, t), back(x, t))
    assert not list(tmp_path.glob("*.tmp"))  # written to a temporary name, then renamed


def test_checkpoint_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_unet(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="junk.safetensors"):
        load_unet(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a SmallUNet checkpoint"):
        load_unet(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="reserved"):
        save_unet(SmallUNet(3, 4), tmp_path / "x.safetensors", {"config": 1})
    with pytest.raises(TypeError, match="SmallUNet"):
        save_unet(torch.nn.Linear(2, 2), tmp_path / "x.safetensors")


# --------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    rc = cli.main(["reproduce", "--quick", "--out", str(out), "--no-progress", "--threads", "1"])
    return rc, out


def test_reproduce_quick_writes_run_folder(quick_run):
    rc, out = quick_run
    assert rc == 0
    for name in ("config.json", "metrics.json", "table.md", "model.safetensors", "agreement.png", "samples.png", "samples.npz"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert config["methods"] == list(DEFAULT_METHODS) and config["protocol"] == "single"
    assert config["method_settings"]["locality_cifar10"]["softmax"] == "wssm"
    assert config["method_settings"]["locality_cifar10"]["threshold"] == 0.05
    assert config["image_shape"] == [3, 8, 8]
    assert config["network_training"]["steps"] == 5 and config["network_training"]["num_train"] == 64
    assert [w["t"] for w in config["windowed_steps"]] == [666, 333, 0]
    assert metrics["timesteps"] == [666, 333, 0] and list(metrics["methods"]) == list(DEFAULT_METHODS)
    for k in DEFAULT_METHODS:
        m = metrics["methods"][k]
        vals = [r["r2"] for r in m["per_step"]] + [r["mse"] for r in m["per_step"]] + [m["final"]["r2"], m["final"]["mse"]]
        assert len(vals) == 8 and all(math.isfinite(v) for v in vals), k
    table = (out / "table.md").read_text()
    assert all(f"| {k} |" in table for k in DEFAULT_METHODS)


def test_reproduce_from_checkpoint_gives_the_same_numbers(quick_run, tmp_path):
    rc, out = quick_run
    assert rc == 0
    rc2 = cli.main(["reproduce", "--quick", "--checkpoint", str(out / "model.safetensors"), "--methods", "wiener,locality",
                    "--out", str(tmp_path), "--no-progress", "--threads", "1"])
    assert rc2 == 0
    first = json.loads((out / "metrics.json").read_text())["methods"]
    again = json.loads((tmp_path / "metrics.json").read_text())["methods"]
    assert list(again) == ["wiener", "locality"]
    for k in again:
        assert [r["r2"] for r in again[k]["per_step"]] == [r["r2"] for r in first[k]["per_step"]]
        assert again[k]["final"]["r2"] == first[k]["final"]["r2"]
    assert not (tmp_path / "model.safetensors").exists()  # nothing trained


@pytest.mark.parametrize("argv, needle", [
    (["--methods", "wiener,bogus"], "--methods"),
    (["--patch-sizes", "4"], "--patch-sizes"),
    (["--size", "10"], "--size"),
    (["--width", "6"], "--width"),
])
def test_reproduce_bad_arguments(tmp_path, capsys, argv, needle):
    rc = cli.main(["reproduce", "--quick", "--out", str(tmp_path / "o"), "--no-progress", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_reproduce_foreign_checkpoint_is_a_clean_error(tmp_path, capsys):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    rc = cli.main(["reproduce", "--quick", "--checkpoint", str(tmp_path / "other.safetensors"), "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2 and "not a SmallUNet checkpoint" in capsys.readouterr().err
