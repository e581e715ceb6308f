"""Run folders: :func:`analysis.compare` with its measurements written to disk, in the
layout of the published code's runs (docs/algorithms.md §8.2).

:func:`run_compare` runs the comparison of analytical denoisers with a network and writes

- ``config.json``: the protocol, steps, seed, shapes, device, each method's settings
  (class and simple attributes), the versions, and whatever ``config=`` adds;
- ``metrics.json``: per method, per step (``t``, ``r2``, ``mse``, ``seconds``,
  ``peak_memory_bytes``) and final (``r2``, ``mse``, ``seconds_per_step``,
  ``peak_memory_bytes``, ``setup_seconds``); the network's timings; the memory kind;
- ``table.md``: the papers' table (one row per method; MSE, r2, time per step, peak
  memory), then the per-step r2 / MSE table;
- ``agreement.<fmt>``: r2 and MSE against the timestep (``figures.agreement_figure``);
- ``samples.<fmt>``: the final samples, one row for the network and one per method;
- ``steps_<method>.<fmt>``: per reported step, the method's ``x0_hat`` and the network's
  target it was compared with, for the first few samples;
- ``samples.npz``: the final samples as uint8 arrays ``[num_samples, C, H, W]`` (no pickles).

Figures are drawn by :mod:`analytic_diffusion.figures` only.
"""
from __future__ import annotations

import json
import math
import platform
import re
import time
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Sequence, Union

import torch

from .analysis import Agreement, compare

__all__ = ["RUN_FILES", "describe_denoiser", "run_compare", "write_run"]

RUN_FILES = ("config.json", "metrics.json", "table.md")
_FORMATS = ("png", "pdf", "svg")


def _json_value(v):
    """v as a JSON value when it is a simple one (numbers, strings, short lists), else None."""
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, torch.dtype):
        return str(v)
    if isinstance(v, (list, tuple)) and len(v) <= 64:
        vals = [_json_value(x) for x in v]
        return vals if all(x is not None or y is None for x, y in zip(vals, v)) else None
    if isinstance(v, dict) and len(v) <= 64 and all(isinstance(k, (str, int)) for k in v):
        vals = {str(k): _json_value(x) for k, x in v.items()}
        return vals if all(x is not None or v[k] is None for k, x in zip(v, vals.values())) else None
    return None


def describe_denoiser(den, _depth: int = 0) -> dict:
    """The settings of a denoiser as JSON: ``{"class": ..., <public simple attributes>}``
    (threshold, temperature, softmax, chunk_size, backend, scaled, ...), with the objects it
    holds (a patch-size schedule, a screening, moments) described one level down; tensors,
    training sets, logs and caches are left out. For ``config.json``."""
    out = {"class": type(den).__name__}
    if hasattr(den, "train") and isinstance(getattr(den, "train"), torch.Tensor):
        tr = den.train
        out["train"] = {"count": int(tr.shape[0]), "shape": list(tr.shape[1:]), "dtype": str(tr.dtype)}
    for k, v in sorted(vars(den).items()) if hasattr(den, "__dict__") else ():
        if k.startswith("_") or k in ("train", "alphas_cumprod", "process_group") or k.endswith("_log"):
            continue
        j = _json_value(v)
        if j is not None or v is None:
            out[k] = j
        elif _depth == 0 and hasattr(v, "__dict__") and not isinstance(v, (torch.Tensor, torch.nn.Module, type)):
            out[k] = describe_denoiser(v, 1)
    return out


def _versions() -> dict:
    from . import __version__

    return {"analytic_diffusion": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "torch_threads": torch.get_num_threads()}


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "method"


def _metrics(agreement: Agreement) -> dict:
    a = agreement
    methods = {}
    for k in a.names:
        per_step = [
            {"t": t, "r2": a.r2[k][i], "mse": a.mse[k][i],
             "seconds": a.seconds[k][i] if k in a.seconds else None,
             "peak_memory_bytes": a.peak_memory[k][i] if k in a.peak_memory else None}
            for i, t in enumerate(a.timesteps)
        ]
        f = a.final.get(k, {})
        methods[k] = {
            "per_step": per_step,
            "final": {"r2": f.get("r2"), "mse": f.get("mse"), "seconds_per_step": f.get("seconds_per_step"),
                      "peak_memory_bytes": f.get("peak_memory"), "setup_seconds": f.get("setup_seconds")},
        }
    net = a.network or {}
    network = {
        "per_step": [{"t": t, "seconds": net["seconds"][i], "peak_memory_bytes": net["peak_memory"][i]}
                     for i, t in enumerate(a.timesteps)] if "seconds" in net else [],
        "final": {"seconds_per_step": net.get("seconds_per_step"), "peak_memory_bytes": net.get("peak_memory_max")},
    }
    return {
        "protocol": a.protocol,
        "timesteps": list(a.timesteps),
        "steps": a.steps,
        "num_samples": a.num_samples,
        "seed": a.seed,
        "memory_kind": a.memory_kind,
        "final_means": ("trajectory r2/MSE at the last step: each method's sample against the network's own sample "
                        "from the same x_T (docs/algorithms.md §8.2)") if a.protocol != "single_step"
        else "r2/MSE at the last reported timestep",
        "methods": methods,
        "network": network,
    }


def _table(agreement: Agreement, title: Optional[str]) -> str:
    a = agreement
    head = f"# {title}\n\n" if title else ""
    mem = {"cuda_max_memory_allocated": "torch.cuda.max_memory_allocated during the step",
           "cpu_peak_rss": "the process's peak resident set size during the step (includes the data and the network)",
           None: "not measured on this platform"}[a.memory_kind]
    final = "trajectory r2 / MSE at the last step (sample vs the network's sample)" if a.protocol != "single_step" else "r2 / MSE at the last timestep"
    return (
        f"{head}Protocol `{a.protocol}`, {a.num_samples} samples, seed {a.seed}"
        + (f", {a.steps} DDIM steps" if a.steps else "")
        + f". MSE, r2: {final}. Time: mean seconds per step for all samples. Memory: {mem}.\n\n"
        + a.summary_table()
        + "\n\n## Per step\n\n"
        + a.table()
        + "\n"
    )


def write_run(agreement: Agreement, out_dir: Union[str, Path], *, config: Optional[dict] = None,
              title: Optional[str] = None, figure_format: str = "png", max_images: int = 8) -> Path:
    """Write the run folder of an :class:`~analytic_diffusion.analysis.Agreement` (see the
    module docstring for the files). ``config``: extra JSON-serialisable entries for
    ``config.json``. ``max_images``: samples per row in the grids. Returns ``out_dir``."""
    from . import figures
    from .data import to_uint8

    if figure_format not in _FORMATS:
        raise ValueError(f"figure_format must be one of {_FORMATS}, got {figure_format!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"protocol": agreement.protocol, "timesteps": list(agreement.timesteps), "steps": agreement.steps,
           "num_samples": agreement.num_samples, "seed": agreement.seed, "methods": list(agreement.names),
           "versions": _versions()}
    cfg.update(config or {})
    (out / "config.json").write_text(json.dumps(cfg, indent=2, default=str) + "\n")
    (out / "metrics.json").write_text(json.dumps(_metrics(agreement), indent=2) + "\n")
    (out / "table.md").write_text(_table(agreement, title))
    files = list(RUN_FILES)
    agreement.plot(out / f"agreement.{figure_format}")
    files.append(f"agreement.{figure_format}")
    images = agreement.samples
    net = agreement.network_sample
    if images and net is not None and net.dim() == 4 and net.shape[1] in (1, 3):
        k = min(max_images, net.shape[0])
        rows = [net[:k]] + [images[n][:k] for n in agreement.names]
        labels = ["network"] + list(agreement.names)
        figures.image_grid(rows, labels, path=out / f"samples.{figure_format}")
        files.append(f"samples.{figure_format}")
        import numpy as np

        arrays = {"network": to_uint8(net.float().clamp(-1, 1)).numpy()}
        for i, n in enumerate(agreement.names):
            arrays[f"method_{i}"] = to_uint8(images[n].float().clamp(-1, 1)).numpy()
        np.savez(out / "samples.npz", names=np.asarray(["network"] + list(agreement.names)), **arrays)
        files.append("samples.npz")
        for n, v in agreement.step_images.items():
            pred, target = v["pred"][:, :max_images], v["target"][:, :max_images]
            rows, labels = [], []
            for i, t in enumerate(agreement.timesteps):
                rows += [pred[i], target[i]]
                labels += [f"t={t} {n}", f"t={t} network"]
            path = out / f"steps_{_safe_name(n)}.{figure_format}"
            figures.image_grid(rows, labels, path=path)
            files.append(path.name)
    cfg["files"] = files
    (out / "config.json").write_text(json.dumps(cfg, indent=2, default=str) + "\n")
    return out


def run_compare(
    denoisers: Mapping[str, Callable],
    network,
    *,
    out_dir: Union[str, Path],
    data=None,
    shape: Optional[Sequence[int]] = None,
    protocol: str = "single",
    steps: int = 10,
    timesteps: Optional[Sequence[int]] = None,
    num_samples: int = 8,
    seed: int = 0,
    batch_size: int = 64,
    prediction: Optional[str] = None,
    alphas_cumprod: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float32,
    device=None,
    config: Optional[dict] = None,
    title: Optional[str] = None,
    figure_format: str = "png",
    keep_images: int = 4,
    progress: bool = True,
) -> Path:
    """Compare analytical denoisers with a network (:func:`~analytic_diffusion.compare`,
    docs/algorithms.md §8) and write a run folder: ``config.json``, ``metrics.json``,
    ``table.md``, figures and sample grids (see the module docstring).

    Args:
        denoisers: ``{name: den}``, each ``den(x_t, t) -> x0_hat`` (float ``[B, C, H, W]``).
        network: the reference network ``network(x_t, t_tensor)`` (or a denoiser).
        out_dir: the run folder (created; existing files of the same names are replaced).
        data, shape: images ``[N, C, H, W]`` (any source ``ad.data.load_images`` takes) or
            the image shape ``(C, H, W)``; ``single_step`` needs data.
        protocol: ``"single"`` (default, the locality paper's code), ``"trajectory"`` or
            ``"single_step"`` (docs/algorithms.md §8.2). The same seed, hence the same
            ``x_T``, for every method.
        steps, timesteps, num_samples, seed, batch_size, prediction, alphas_cumprod,
            dtype, device: as in :func:`~analytic_diffusion.compare`.
        config: extra entries for ``config.json`` (e.g. the command line, the data source).
        title: heading of ``table.md``.
        figure_format: ``"png"``, ``"pdf"`` or ``"svg"``.
        keep_images: samples shown per step in ``steps_<method>`` figures (0: none).
        progress: tqdm bars over the methods and the steps.

    Returns:
        The run folder's :class:`~pathlib.Path`. Seconds per step and peak memory are
        measured around each denoiser call (CUDA synchronised; on CUDA
        ``torch.cuda.max_memory_allocated``, on the CPU the process's peak RSS).
    """
    if figure_format not in _FORMATS:
        raise ValueError(f"figure_format must be one of {_FORMATS}, got {figure_format!r}")
    t0 = time.perf_counter()
    agreement = compare(
        denoisers, network, data, timesteps, protocol=protocol, num_samples=num_samples, seed=seed, steps=steps,
        batch_size=batch_size, prediction=prediction, alphas_cumprod=alphas_cumprod, shape=shape, dtype=dtype,
        device=device, keep_images=keep_images, progress=progress,
    )
    wall = time.perf_counter() - t0
    cfg: Dict[str, object] = {
        "dtype": str(dtype), "device": str(torch.device(device or "cpu")), "batch_size": batch_size,
        "prediction": prediction if prediction is not None else ("epsilon" if not _is_denoiser(network) else "x0"),
        "image_shape": list(agreement.samples[agreement.names[0]].shape[1:]) if agreement.samples else (list(shape) if shape else None),
        "method_settings": {k: describe_denoiser(d) for k, d in denoisers.items()},
        "network": type(network).__name__,
        "compare_seconds": wall,
    }
    if isinstance(network, torch.nn.Module):
        cfg["network_parameters"] = int(sum(p.numel() for p in network.parameters()))
    cfg.update(config or {})
    return write_run(agreement, out_dir, config=cfg, title=title, figure_format=figure_format, max_images=max(8, keep_images))


def _is_denoiser(obj) -> bool:
    from .denoisers import Denoiser

    return isinstance(obj, Denoiser)
