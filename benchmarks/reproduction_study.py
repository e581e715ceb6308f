"""The reproduction study of docs/reproduction.md: which choices decide the ordering of r2
(locality vs Wiener vs optimal) against a small trained UNet on bundled natural crops.

    python benchmarks/reproduction_study.py train --name base --width 24 -N 2048 --steps 3000
    python benchmarks/reproduction_study.py eval  --name base [--num-samples 32]

``train`` writes the checkpoint (safetensors) to ``--ckpt-dir`` (default /tmp/rep_ckpt, not
committed) and ``benchmarks/results/reproduction/train_<name>.json`` (losses, seconds);
``eval`` writes ``eval_<name>.json``: per method and step, r2 and MSE under the
``trajectory`` and ``single`` protocols (docs/algorithms.md §8), from one analytic sampling
pass per method. One factor is varied at a time from ``base``; each run uses 1 torch thread.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

import analytic_diffusion as ad  # noqa: E402
from analytic_diffusion.models import SmallUNet, load_unet, save_unet, train_unet  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "reproduction"


def cmd_train(a) -> None:
    torch.set_num_threads(a.threads)
    data = ad.data.natural_crops(a.num_train, size=a.size, seed=a.seed)
    torch.manual_seed(a.seed)
    model = SmallUNet(3, a.width)
    t0 = time.perf_counter()
    losses = train_unet(model, data, a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed, progress=not a.no_progress)
    secs = time.perf_counter() - t0
    k = max(1, len(losses) // 20)
    info = {
        "name": a.name, "width": a.width, "parameters": model.num_parameters, "num_train": a.num_train, "size": a.size,
        "steps": a.steps, "batch_size": a.batch_size, "lr": a.lr, "seed": a.seed, "threads": a.threads,
        "train_seconds": secs, "loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k,
        "loss_curve": [sum(losses[i:i + k]) / len(losses[i:i + k]) for i in range(0, len(losses), k)],
    }
    Path(a.ckpt_dir).mkdir(parents=True, exist_ok=True)
    save_unet(model, Path(a.ckpt_dir) / f"{a.name}.safetensors", {k2: v for k2, v in info.items() if k2 != "loss_curve"})
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"train_{a.name}.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps({k2: v for k2, v in info.items() if k2 != "loss_curve"}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--name", required=True)
    t.add_argument("--width", type=int, default=24)
    t.add_argument("-N", "--num-train", type=int, default=2048)
    t.add_argument("--size", type=int, default=16)
    t.add_argument("--steps", type=int, default=3000)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--ckpt-dir", default="/tmp/rep_ckpt")
    t.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.cmd == "train":
        cmd_train(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
