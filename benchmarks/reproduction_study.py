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


class EdgeToFull(ad.Denoiser):
    """The windowed locality denoiser, except at the steps whose window reaches the edge of
    its largest patch: there the full-covariance locality denoiser (the full-image path).
    The issue-11 alternative to keeping the too-small window."""

    name = "windowed->full"

    def __init__(self, windowed, full):
        super().__init__(windowed.alphas_cumprod)
        self.windowed, self.full = windowed, full

    def switched(self, t) -> bool:
        return bool(self.windowed.window_info(t)["touches_edge"])

    def denoise(self, x, t, alpha_bar):
        return (self.full if self.switched(t) else self.windowed)(x, t)


def study_denoisers(train, methods, threshold=0.02):
    """{name: denoiser} of the study: the reproduce command's set plus the variants."""
    from analytic_diffusion.cli.reproduce import build_denoisers

    base = [m for m in methods if m in ("wiener", "optimal", "nearest", "locality", "ls", "pspc", "scfdm")]
    dens = build_denoisers(train, base, threshold=threshold)
    size = train.shape[-1]
    moments = dens["locality"].moments if "locality" in dens else ad.estimate_moments(train)
    pm = {k: ad.estimate_patch_moments(train, k) for k in (5, 9, 15) if k <= size}
    stat = ad.estimate_stationary_moments(train) if any("stat" in m for m in methods) else None  # every lag: k = 2*size - 1
    full = dens.get("locality") or ad.LocalityDenoiser(train, moments, threshold=threshold)
    extra = {
        "locality_thr0.01": lambda: ad.LocalityDenoiser(train, moments, threshold=0.01),
        "locality_thr0.05": lambda: ad.LocalityDenoiser(train, moments, threshold=0.05),
        # the published code's arithmetic (docs/algorithms.md §5 WSSM): the mean of per-chunk softmax means.
        # CIFAR-10: chunks of 512 (its loader batch), 98 chunks; here 512 (4 chunks) or 21 (98 chunks, as CIFAR-10)
        "locality_wssm512": lambda: ad.LocalityDenoiser(train, moments, threshold=threshold, softmax="wssm", chunk_size=512),
        "locality_wssm21": lambda: ad.LocalityDenoiser(train, moments, threshold=threshold, softmax="wssm", chunk_size=21),
        "optimal_wssm21": lambda: ad.LocalityDenoiser(train, moments, threshold=1e-300, softmax="wssm", chunk_size=21),
        "win_k5": lambda: ad.LocalityDenoiser(train, pm[5], threshold=threshold),
        "win_k9": lambda: ad.LocalityDenoiser(train, pm[9], threshold=threshold),
        "win_5_9_15": lambda: ad.LocalityDenoiser(train, list(pm.values()), threshold=threshold),
        "win_5_9_15_stat": lambda: ad.LocalityDenoiser(train, list(pm.values()) + [stat], threshold=threshold),
        "win_stat": lambda: ad.LocalityDenoiser(train, stat, threshold=threshold),
        "win_k9_to_full": lambda: EdgeToFull(ad.LocalityDenoiser(train, pm[9], threshold=threshold), full),
        "win_5_9_15_to_full": lambda: EdgeToFull(ad.LocalityDenoiser(train, list(pm.values()), threshold=threshold), full),
    }
    for m in methods:
        if m in extra:
            dens[m] = extra[m]()
    return {m: dens[m] for m in methods}


ALL_METHODS = ("wiener", "optimal", "nearest", "locality", "locality_thr0.01", "locality_thr0.05",
               "win_k5", "win_k9", "win_5_9_15", "win_5_9_15_stat", "win_stat", "win_k9_to_full", "win_5_9_15_to_full",
               "ls", "pspc", "scfdm")


def cmd_eval(a) -> None:
    from analytic_diffusion.metrics import mse, r2

    torch.set_num_threads(a.threads)
    model = load_unet(Path(a.ckpt_dir) / f"{a.name}.safetensors")
    meta = model.checkpoint_metadata
    train = ad.data.natural_crops(int(meta["num_train"]), size=int(meta["size"]), seed=int(meta["seed"]))
    shape = tuple(train.shape[1:])
    methods = a.methods.split(",") if a.methods else list(ALL_METHODS)
    net = ad.ModelDenoiser(model, "epsilon")
    ref = {}
    t0 = time.perf_counter()
    ad.sample(net, a.num_samples, shape, steps=a.steps, seed=a.seed, callback=lambda t, x, x0: ref.__setitem__(t, x0.clone()))
    net_s = time.perf_counter() - t0
    ts = list(ref)
    res = {"name": a.name, "network": meta, "num_samples": a.num_samples, "steps": a.steps, "seed": a.seed, "timesteps": ts,
           "network_seconds": net_s, "methods": {}}
    dens = study_denoisers(train, methods, a.threshold)
    for m, d in dens.items():
        rows = []

        def cb(t, x, x0, rows=rows):
            with torch.no_grad():
                nx0 = net(x, t)  # the network on this method's own x_t: protocol 'single'
            rows.append({
                "t": t,
                "trajectory_r2": float(r2(x0, ref[t])), "trajectory_mse": float(mse(x0, ref[t])),
                "single_r2": float(r2(x0, nx0)), "single_mse": float(mse(x0, nx0)),
            })
            if t == ts[-1]:
                per = r2(x0, ref[t], reduction="none")
                rows[-1]["final_r2_per_sample"] = [float(v) for v in per]

        t0 = time.perf_counter()
        ad.sample(d, a.num_samples, shape, steps=a.steps, seed=a.seed, callback=cb)
        entry = {"seconds": time.perf_counter() - t0, "steps": rows,
                 "final_r2": rows[-1]["trajectory_r2"], "final_mse": rows[-1]["trajectory_mse"],
                 "final_r2_per_sample": rows[-1].pop("final_r2_per_sample"),
                 "single_r2_mean": sum(r["single_r2"] for r in rows) / len(rows),
                 "trajectory_r2_mean": sum(r["trajectory_r2"] for r in rows) / len(rows)}
        entry["final_r2_sem"] = float(torch.tensor(entry["final_r2_per_sample"]).std()) / a.num_samples ** 0.5
        inner = d.windowed if isinstance(d, EdgeToFull) else d
        if getattr(inner, "windowed", False) is True:
            entry["windows"] = [inner.window_info(t) for t in ts]
        if isinstance(d, EdgeToFull):
            entry["full_image_steps"] = [t for t in ts if d.switched(t)]
        res["methods"][m] = entry
        print(f"{m:22s} final r2 {entry['final_r2']:+.3f} (+-{entry['final_r2_sem']:.3f})  single mean {entry['single_r2_mean']:+.3f}  "
              f"traj mean {entry['trajectory_r2_mean']:+.3f}  {entry['seconds']:.1f} s", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"eval_{a.name}{a.suffix}.json").write_text(json.dumps(res, indent=1) + "\n")


def cmd_novelty(a) -> None:
    """Does the network generalise or memorise? RMS distance ([-1, 1] units) of each final
    sample to its nearest training crop, for the network and a few denoisers (same x_T)."""
    torch.set_num_threads(a.threads)
    out = {}
    for name in a.names.split(","):
        model = load_unet(Path(a.ckpt_dir) / f"{name}.safetensors")
        meta = model.checkpoint_metadata
        train = ad.data.natural_crops(int(meta["num_train"]), size=int(meta["size"]), seed=int(meta["seed"]))
        flat = ad.data.to_unit_range(train).reshape(train.shape[0], -1)
        shape = tuple(train.shape[1:])
        dens = {"network": ad.ModelDenoiser(model, "epsilon"), **study_denoisers(train, ["wiener", "optimal", "locality"])}
        row = {}
        for k, d in dens.items():
            x = ad.sample(d, a.num_samples, shape, steps=10, seed=a.seed).float().reshape(a.num_samples, -1)
            dist = torch.cdist(x, flat).min(1).values / flat.shape[1] ** 0.5
            row[k] = {"mean_rms_to_nearest": float(dist.mean()), "min_rms_to_nearest": float(dist.min())}
        out[name] = row
        print(name, {k: round(v["mean_rms_to_nearest"], 3) for k, v in row.items()}, flush=True)
    (RESULTS / f"novelty{a.suffix}.json").write_text(json.dumps(out, indent=1) + "\n")


def _paired(res, a, b):
    """Mean and standard error of the per-sample difference of final r2, a - b (same x_T)."""
    x = torch.tensor(res["methods"][a]["final_r2_per_sample"]) - torch.tensor(res["methods"][b]["final_r2_per_sample"])
    return float(x.mean()), float(x.std()) / len(x) ** 0.5


def _order(res, names):
    f = {k: res["methods"][k]["final_r2"] for k in names if k in res["methods"]}
    return " > ".join(sorted(f, key=lambda k: -f[k]))


def cmd_table(a) -> None:
    """Markdown tables of docs/reproduction.md from the eval_*.json files."""
    runs = {}
    for name in a.names.split(","):
        ev = RESULTS / f"eval_{name}.json"
        if ev.is_file():
            runs[name] = json.loads(ev.read_text())
    print("### Runs (one factor varied at a time from `base`)\n")
    print("| run | params | N crops | train steps | final loss | train s | wiener | locality (full cov) | optimal | "
          "locality windowed 5,9,15 | wiener - locality (paired) | ordering |")
    print("|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---|")
    for name, r in runs.items():
        m, net = r["methods"], r["network"]
        cell = lambda k: f"{m[k]['final_r2']:+.3f} ± {m[k]['final_r2_sem']:.3f}" if k in m else "-"
        d, e = _paired(r, "wiener", "locality")
        print(f"| {name} | {net['parameters']} | {net['num_train']} | {net['steps']} | {net['loss_last']:.4f} | {net['train_seconds']:.0f} | "
              f"{cell('wiener')} | {cell('locality')} | {cell('optimal')} | {cell('win_5_9_15')} | {d:+.3f} ± {e:.3f} | "
              f"{_order(r, ('wiener', 'locality', 'optimal'))} |")
    pairs = [("wiener", "locality"), ("locality", "optimal"), ("locality_thr0.05", "locality"), ("win_5_9_15", "locality"),
             ("win_5_9_15_to_full", "win_5_9_15"), ("win_5_9_15_stat", "win_5_9_15"), ("win_k9_to_full", "win_k9"),
             ("win_k9", "win_5_9_15"), ("pspc", "wiener"), ("ls", "locality")]
    print("\n### Paired differences of final r2 (same x_T; mean ± standard error over the samples)\n")
    print("| a - b | " + " | ".join(runs) + " |")
    print("|:---|" + "---:|" * len(runs))
    for a_, b_ in pairs:
        cells = []
        for r in runs.values():
            if a_ in r["methods"] and b_ in r["methods"]:
                d, e = _paired(r, a_, b_)
                cells.append(f"{d:+.3f} ± {e:.3f}")
            else:
                cells.append("-")
        print(f"| {a_} - {b_} | " + " | ".join(cells) + " |")
    sweep = {}
    for f in sorted(RESULTS.glob("eval_base_thr*.json")):
        sweep[f.stem.split("_thr")[1]] = json.loads(f.read_text())
    stat = {"0.02": runs["base"]} if "base" in runs else {}
    for f in sorted(RESULTS.glob("eval_base_stat_thr*.json")):
        stat[f.stem.split("_thr")[1]] = json.loads(f.read_text())
    if sweep and "base" in runs:
        sweep = {"0.02": runs["base"], **sweep}
        print("\n### Threshold sweep, run `base` (final r2, 32 samples): what a step whose window reaches the edge of the "
              "15x15 patch uses\n")
        print("| threshold | locality (full cov) | windowed 5,9,15: keep 15 (the library's rule) | -> full-image path | "
              "-> stationary 31x31 | paired: full-image minus keep | paired: 31x31 minus keep | steps on the full-image path |")
        print("|---:|---:|---:|---:|---:|---:|---:|:---|")
        c = lambda e: f"{e['final_r2']:+.3f} ± {e['final_r2_sem']:.3f}"
        for thr, r in sweep.items():
            m = r["methods"]
            d, e = _paired(r, "win_5_9_15_to_full", "win_5_9_15")
            st = stat.get(thr, {}).get("methods", {})
            if "win_5_9_15_stat" in st:
                d2, e2 = _paired(stat[thr], "win_5_9_15_stat", "win_5_9_15")
                sc, sp = c(st["win_5_9_15_stat"]), f"{d2:+.3f} ± {e2:.3f}"
            else:
                sc = sp = "-"
            print(f"| {thr} | {c(m['locality'])} | {c(m['win_5_9_15'])} | {c(m['win_5_9_15_to_full'])} | {sc} | {d:+.3f} ± {e:.3f} | "
                  f"{sp} | {', '.join(map(str, m['win_5_9_15_to_full'].get('full_image_steps', [])))} |")
    wssm = {thr: RESULTS / f"eval_base_wssm_thr{thr}.json" for thr in ("0.02", "0.05")}
    if "base" in runs and all(f.is_file() for f in wssm.values()):
        print("\n### Softmax arithmetic, run `base` (final r2): exact vs the published WSSM (mean of per-chunk softmax means)\n")
        print("| threshold | exact | WSSM, chunks of 512 (4 chunks; CIFAR-10's chunk size) | WSSM, chunks of 21 (98 chunks, as CIFAR-10's 50000/512) |")
        print("|---:|---:|---:|---:|")
        exact = {"0.02": runs["base"]["methods"]["locality"]}
        f05 = RESULTS / "eval_base_thr0.05.json"
        if f05.is_file():
            exact["0.05"] = json.loads(f05.read_text())["methods"]["locality"]
        for thr, f in wssm.items():
            m = json.loads(f.read_text())["methods"]
            c = lambda e: f"{e['final_r2']:+.3f} ± {e['final_r2_sem']:.3f}" if e else "-"
            print(f"| {thr} | {c(exact.get(thr))} | {c(m.get('locality_wssm512'))} | {c(m.get('locality_wssm21'))} |")
        m05 = json.loads(wssm["0.05"].read_text())["methods"]["locality_wssm512"]
        x = torch.tensor(runs["base"]["methods"]["wiener"]["final_r2_per_sample"]) - torch.tensor(m05["final_r2_per_sample"])
        print(f"\nWiener minus the paper's CIFAR-10 setting (WSSM 512, threshold 0.05), paired over the same x_T: "
              f"{float(x.mean()):+.3f} ± {float(x.std()) / len(x) ** 0.5:.3f}.")
        m = json.loads(wssm["0.02"].read_text())["methods"]
        if "optimal_wssm21" in m:
            print(f"\nThe optimal denoiser with WSSM over 98 chunks of 21: {m['optimal_wssm21']['final_r2']:+.3f} ± "
                  f"{m['optimal_wssm21']['final_r2_sem']:.3f} (exact: {runs['base']['methods']['optimal']['final_r2']:+.3f}).")
    nov = {}
    for f in sorted(RESULTS.glob("novelty*.json")):
        nov.update(json.loads(f.read_text()))
    if nov:
        print("\n### Novelty: mean RMS distance ([-1, 1] units) of the 32 final samples to the nearest training crop\n")
        print("| run | network | Wiener | optimal | locality (full cov, 0.02) |\n|:---|---:|---:|---:|---:|")
        for n, row in nov.items():
            print(f"| {n} | " + " | ".join(f"{row[k]['mean_rms_to_nearest']:.3f}" for k in ("network", "wiener", "optimal", "locality")) + " |")
    f128 = RESULTS / "eval_base_s128.json"
    if f128.is_file():
        r = json.loads(f128.read_text())
        print(f"\n### Issue 11 with {r['num_samples']} samples, run `base`: when the window reaches the edge of its patch\n")
        print("| method | final r2 | mean `single` r2, t > 0 | steps on the full-image path |")
        print("|:---|---:|---:|:---|")
        for k, e in r["methods"].items():
            single = [row["single_r2"] for row in e["steps"] if row["t"] > 0]
            print(f"| {k} | {e['final_r2']:+.3f} ± {e['final_r2_sem']:.3f} | {sum(single) / len(single):+.3f} | "
                  f"{', '.join(map(str, e.get('full_image_steps', []))) or '-'} |")
        print("\n| paired difference of final r2 | mean ± s.e. |\n|:---|---:|")
        for a_, b_ in (("win_5_9_15_to_full", "win_5_9_15"), ("win_k9_to_full", "win_k9"), ("win_5_9_15", "win_k9"),
                       ("win_5_9_15", "locality"), ("wiener", "locality"), ("wiener", "win_5_9_15")):
            if a_ in r["methods"] and b_ in r["methods"]:
                d, e = _paired(r, a_, b_)
                print(f"| {a_} - {b_} | {d:+.3f} ± {e:.3f} |")
    for name, r in runs.items():
        print(f"\n### All methods, run `{name}` ({r['num_samples']} samples, {r['steps']} DDIM steps, seed {r['seed']})\n")
        print("| method | final r2 (trajectory, last step) | mean trajectory r2 over steps | mean `single` r2 over steps t > 0 | "
              "`single` r2 at t = 500 | seconds (sampling) |")
        print("|:---|---:|---:|---:|---:|---:|")
        for k, e in r["methods"].items():
            single = [row["single_r2"] for row in e["steps"] if row["t"] > 0]
            mid = [row["single_r2"] for row in e["steps"] if row["t"] == 500]
            print(f"| {k} | {e['final_r2']:+.3f} ± {e['final_r2_sem']:.3f} | {e['trajectory_r2_mean']:+.3f} | "
                  f"{sum(single) / len(single):+.3f} | {mid[0] if mid else float('nan'):+.3f} | {e['seconds']:.1f} |")
        ts = r["timesteps"]
        print(f"\n`single` r2 per step (run `{name}`): the network on each method's own x_t\n")
        print("| method | " + " | ".join(f"t={t}" for t in ts) + " |")
        print("|:---|" + "---:|" * len(ts))
        for k in ("wiener", "optimal", "nearest", "locality", "locality_thr0.05", "win_k5", "win_k9", "win_5_9_15", "pspc"):
            if k in r["methods"]:
                print(f"| {k} | " + " | ".join(f"{row['single_r2']:+.2f}" for row in r["methods"][k]["steps"]) + " |")
        wins = {k: e for k, e in r["methods"].items() if "windows" in e}
        if wins:
            print(f"\nWindow per step (run `{name}`): patch size k used / radius / `E` = reaches the edge of the largest patch; "
                  "`full` = the full-image path\n")
            ts = r["timesteps"]
            print("| method | " + " | ".join(f"t={t}" for t in ts) + " |")
            print("|:---|" + "---:|" * len(ts))
            for k, e in wins.items():
                full = set(e.get("full_image_steps", []))
                cells = ["full" if w["t"] in full else f"{w['patch_size']}/{w['radius']}{' E' if w['touches_edge'] else ''}" for w in e["windows"]]
                print(f"| {k} | " + " | ".join(cells) + " |")


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
    e = sub.add_parser("eval")
    e.add_argument("--name", required=True)
    e.add_argument("--num-samples", type=int, default=32)
    e.add_argument("--steps", type=int, default=10)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--threshold", type=float, default=0.02)
    e.add_argument("--methods", default="", help="comma-separated subset of " + ", ".join(ALL_METHODS))
    e.add_argument("--suffix", default="", help="appended to the result file's name")
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--ckpt-dir", default="/tmp/rep_ckpt")
    nv = sub.add_parser("novelty")
    nv.add_argument("--names", required=True)
    nv.add_argument("--num-samples", type=int, default=32)
    nv.add_argument("--seed", type=int, default=0)
    nv.add_argument("--suffix", default="")
    nv.add_argument("--threads", type=int, default=1)
    nv.add_argument("--ckpt-dir", default="/tmp/rep_ckpt")
    tb = sub.add_parser("table")
    tb.add_argument("--names", default="base,steps1000,steps6000,n256,w48")
    a = p.parse_args(argv)
    if a.cmd == "train":
        cmd_train(a)
    elif a.cmd == "eval":
        cmd_eval(a)
    elif a.cmd == "novelty":
        cmd_novelty(a)
    else:
        cmd_table(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
