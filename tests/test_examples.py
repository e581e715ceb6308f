"""The examples run end to end (smallest settings, in a subprocess)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_train_small_unet_smoke(tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable, str(ROOT / "examples" / "train_small_unet.py"),
        "--size", "8", "-N", "64", "--steps", "3", "--batch-size", "8", "--width", "4",
        "--num-samples", "2", "--ddim-steps", "3", "--threads", "1", "--out", str(out),
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| t | locality r2 | locality MSE | wiener r2 | wiener MSE | optimal r2 | optimal MSE |" in r.stdout
    for name in ("model.safetensors", "agreement_single_step.md", "agreement_single_step.png",
                 "agreement_trajectory.md", "agreement_trajectory.png", "sensitivity.png", "summary.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    for protocol in ("single_step", "trajectory"):
        res = summary["agreement"][protocol]
        assert res["timesteps"] == [666, 333, 0] and res["names"] == ["locality", "wiener", "optimal"]
        assert all(math.isfinite(v) for k in res["names"] for v in res["r2"][k] + res["mse"][k])
    assert [s["t"] for s in summary["sensitivity_similarity"]] == [666, 333, 0]
    from safetensors.torch import load_file

    weights = load_file(str(out / "model.safetensors"))
    assert sum(v.numel() for v in weights.values()) == summary["parameters"]
    assert all(v.dtype == torch.float32 for v in weights.values())
