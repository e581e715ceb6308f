"""What the GPU benchmark scripts (bench_moments_gpu.py, bench_locality_gpu.py) share:
device choice and the dry run, timing, errors, the JSON record.

A script run with ``--dry-run`` uses the CPU under Triton's interpreter
(TRITON_INTERPRET=1, which must be set before the package is imported: gpu_check.sh
--dry-run does that) at tiny shapes: the same Python paths as on a GPU, so that the
device script cannot rot where no GPU is available. Times then are wall-clock seconds of
the interpreter and mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU + Triton interpreter (needs TRITON_INTERPRET=1 in the environment), tiny shapes")


def pick_device(args) -> str:
    """'cuda', or 'cpu' for a dry run; raises SystemExit with a reason when neither works."""
    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--dry-run needs TRITON_INTERPRET=1 set before Python starts (gpu_check.sh --dry-run sets it)")
        return "cpu"
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --dry-run to exercise the script on the CPU)")
    return "cuda"


def device_name(dev: str) -> str:
    return torch.cuda.get_device_name() if dev == "cuda" else "cpu (Triton interpreter, dry run)"


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def cuda_seconds(fn, repeats: int = 3, warmup: int = 1, dev: str = "cuda") -> float:
    """Median device time of ``fn()`` by CUDA events (launch overhead included); wall time
    on the CPU (the dry run)."""
    for _ in range(warmup):
        fn()
    sync(dev)
    times = []
    for _ in range(repeats):
        if dev == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:500]


def free(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.empty_cache()


def write_json(path, rows, dev: str, **extra) -> None:
    """The rows with the torch version, device name and build info, for gpu_check.sh."""
    if not path:
        return
    import analytic_diffusion as ad

    with open(path, "w") as f:
        json.dump(dict(torch=torch.__version__, device=device_name(dev), dry_run=dev != "cuda",
                       build_info=ad.build_info(), rows=rows, **extra), f, indent=1, default=str)
