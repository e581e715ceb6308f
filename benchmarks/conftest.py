"""Shared benchmark harness.

Every benchmark times a backend and the reference PyTorch implementation on the
same inputs in the same run and records the ratio and the relative error.
``AD_BENCH_QUICK=1`` shrinks every shape (CI runs the benchmarks that way, once
each, so they cannot rot). ``AD_BENCH_RECORD=1`` writes the table to
``benchmarks/results/<device>.md`` and ``.json``.
"""
from __future__ import annotations

import functools
import json
import math
import os
import platform
import re
import time
from pathlib import Path

import pytest
import torch

QUICK = os.environ.get("AD_BENCH_QUICK", "") not in ("", "0")
RECORD = os.environ.get("AD_BENCH_RECORD", "") not in ("", "0")
_ROWS: list[dict] = []


def device_name(device: str = "cpu") -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} threads)"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn, device: str = "cpu", repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds (synchronised on GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double().cpu()
    return float((out.double().cpu() - ref).norm() / ref.norm().clamp_min(1e-300))


def geo_mean(values) -> float:
    """Geometric mean of positive numbers (speed-up ratios)."""
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


@functools.lru_cache(maxsize=None)
def crops_split(n_train: int, batch: int, size: int):
    """``(train [n_train, 3, size, size], held [batch, 3, size, size])`` uint8 natural crops
    (seed 0), the data every CPU benchmark uses; cached, never modified by a benchmark."""
    import analytic_diffusion as ad

    crops = ad.data.natural_crops(n_train + batch, size=size, seed=0)
    return crops[:n_train], crops[n_train:]


def noisy_queries(held: torch.Tensor, t: int):
    """``(x, alpha_bar)``: float64 queries ``sqrt(ab) x0 + sqrt(1 - ab) eps`` at DDPM step t
    for the uint8 images ``held`` (x0 in [-1, 1]); the noise is seeded by t, so every
    benchmark (and both sides of each comparison) sees the same inputs at a step."""
    import analytic_diffusion as ad

    ab = ad.alpha_bar_at(t)
    g = torch.Generator().manual_seed(t)
    x0 = held.double() / 127.5 - 1
    return math.sqrt(ab) * x0 + math.sqrt(1 - ab) * torch.randn(x0.shape, generator=g, dtype=torch.float64), ab


@pytest.fixture
def record():
    """``record(bench, case, impl, seconds, baseline=..., baseline_seconds=..., rel_err=..., **extra)``."""

    def _record(bench, case, impl, seconds, *, baseline=None, baseline_seconds=None, rel_err=None, device="cpu", **extra):
        row = dict(bench=bench, case=case, impl=impl, seconds=seconds, device=device_name(device))
        if baseline is not None:
            row.update(baseline=baseline, baseline_seconds=baseline_seconds, speedup=baseline_seconds / seconds if seconds else None)
        if rel_err is not None:
            row["rel_err"] = rel_err
        row.update(extra)
        _ROWS.append(row)
        return row

    return _record


_STD_KEYS = {"bench", "case", "impl", "seconds", "device", "baseline", "baseline_seconds", "speedup", "rel_err", "date"}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _table(rows) -> str:
    lines = [
        "| bench | case | impl | time (ms) | baseline | baseline (ms) | speed-up | rel. error | more |",
        "|---|---|---|---:|---|---:|---:|---:|---|",
    ]
    for r in rows:
        has_base = r.get("baseline") is not None
        base_ms = "%.2f" % (1e3 * r["baseline_seconds"]) if has_base else ""
        speedup = "%.2fx" % r["speedup"] if has_base else ""
        err = "%.1e" % r["rel_err"] if r.get("rel_err") is not None else ""
        ms = f"{1e3 * r['seconds']:.2f}" if r.get("seconds") is not None else ""
        more = ", ".join(f"{k}={_fmt(v)}" for k, v in r.items() if k not in _STD_KEYS)
        lines.append(
            f"| {r['bench']} | {r['case']} | {r['impl']} | {ms} | {r.get('baseline') or ''} | {base_ms} | {speedup} | {err} | {more} |"
        )
    return "\n".join(lines)


def pytest_terminal_summary(terminalreporter):
    if not _ROWS:
        return
    terminalreporter.write_sep("-", "analytic-diffusion: backends vs baselines (same inputs, same run)")
    terminalreporter.write_line(_table(_ROWS))
    if RECORD and not QUICK:
        dev = _ROWS[0]["device"]
        slug = re.sub(r"[^A-Za-z0-9]+", "-", dev).strip("-").lower()[:60]
        out = Path(__file__).parent / "results"
        out.mkdir(exist_ok=True)
        stamp = time.strftime("%Y-%m-%d")
        # Merge with earlier runs on this device: a row is replaced only by a new
        # measurement of the same (bench, case, impl), so separate runs add up.
        rows = []
        old = out / f"{slug}.json"
        if old.exists():
            rows = json.loads(old.read_text()).get("rows", [])
        fresh = {(r["bench"], r["case"], r["impl"]) for r in _ROWS}
        rows = [r for r in rows if (r["bench"], r["case"], r["impl"]) not in fresh]
        rows += [dict(r, date=stamp) for r in _ROWS]
        rows.sort(key=lambda r: (r["bench"], r["case"], r["impl"]))
        header = f"# Benchmarks on {dev}\n\ntorch {torch.__version__}, {os.cpu_count()} CPU threads; each row dated in the JSON file\n\n"
        (out / f"{slug}.md").write_text(header + _table(rows) + "\n")
        old.write_text(json.dumps({"device": dev, "torch": torch.__version__, "rows": rows}, indent=1))
        terminalreporter.write_line(f"recorded in {out / slug}.md")


def write_bench_table(prefix: str, title: str) -> None:
    """Write this run's rows whose bench starts with ``prefix`` to ``benchmarks/results/<prefix>.md``
    (full-size runs only; one file per benchmark, so separate benchmarks never merge-conflict)."""
    if QUICK:
        return
    rows = [r for r in _ROWS if r["bench"].startswith(prefix)]
    if not rows:
        return
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    head = f"# {title}\n\n{rows[0]['device']}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n"
    (out / f"{prefix}.md").write_text(head + _table(rows) + "\n")
    (out / f"{prefix}.json").write_text(json.dumps({"device": rows[0]["device"], "torch": torch.__version__, "rows": rows}, indent=1))
