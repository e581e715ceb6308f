"""Locality analysis: sensitivity fields and agreement with a trained network.

- :func:`sensitivity` - Jacobian rows ``d x0_hat[m] / d x_t`` (the *sensitivity
  field* of output pixel m, docs/algorithms.md §3): analytic for the Wiener denoiser, batched
  vector-Jacobian products with autograd for anything else (a trained network,
  a differentiable denoiser).
- :func:`field_similarity` - cosine and support IoU of two sets of fields.
- :class:`ModelDenoiser` - a network ``model(x_t, t) -> eps or x0`` as a denoiser
  ``den(x_t, t) -> x0_hat`` (plugs into :func:`analytic_diffusion.sample`).
- :func:`compare` - r2 and MSE (docs/algorithms.md §8) per timestep between analytical
  denoisers and a network, on the same ``x_t`` or along their own DDIM
  trajectories; :class:`Agreement` holds the result (table, plot, dict).

Figures of these results live in :mod:`analytic_diffusion.figures`
(``Agreement.plot``, ``figures.fields_figure``); this module only computes.

Model calling convention (everything that is not an :class:`~analytic_diffusion.Denoiser`):
``model(x_t, t_tensor)`` with ``x_t`` ``[B, C, H, W]`` (x_t's dtype and device)
and ``t_tensor`` a long tensor ``[B]`` holding the integer timestep of the
1000-step schedule (the convention of diffusers' ``UNet2DModel``). It may return
a tensor of x_t's shape, an object with a ``.sample`` tensor (diffusers'
``UNet2DOutput``) or a tuple whose first element is that tensor.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ._validate import FLOAT_DTYPES, check_finite, check_queries, check_train, to_unit
from .denoisers import Denoiser, WienerDenoiser
from .metrics import mse as _mse
from .metrics import r2 as _r2
from .sampling import ddim_step
from .schedule import ddim_timesteps, default_alphas_cumprod, timestep_to_int

__all__ = [
    "Agreement",
    "ModelDenoiser",
    "compare",
    "field_similarity",
    "sensitivity",
]

_PREDICTIONS = ("x0", "epsilon")
_PROTOCOLS = ("single", "single_step", "trajectory")


# --------------------------------------------------------------------------- #
# small checks
# --------------------------------------------------------------------------- #
def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)


def _check_prediction(prediction) -> str:
    if prediction not in _PREDICTIONS:
        raise ValueError(f"prediction must be 'x0' or 'epsilon', got {prediction!r}")
    return prediction


def _check_schedule(alphas_cumprod) -> torch.Tensor:
    if alphas_cumprod is None:
        return default_alphas_cumprod()
    if not isinstance(alphas_cumprod, torch.Tensor) or alphas_cumprod.dim() != 1 or not alphas_cumprod.is_floating_point():
        raise TypeError(f"alphas_cumprod must be a 1-D float tensor [T], got {getattr(alphas_cumprod, 'shape', type(alphas_cumprod).__name__)}")
    if alphas_cumprod.numel() == 0 or not bool(((alphas_cumprod > 0) & (alphas_cumprod < 1)).all()):
        raise ValueError("alphas_cumprod must be non-empty with every value in (0, 1)")
    return alphas_cumprod


def _model_output(out, what: str) -> torch.Tensor:
    """The prediction tensor inside whatever a network returned."""
    if isinstance(out, torch.Tensor):
        return out
    s = getattr(out, "sample", None)
    if isinstance(s, torch.Tensor):  # diffusers' UNet2DOutput and friends
        return s
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"{what} must return a tensor, an object with a .sample tensor or a tuple (tensor, ...), got {type(out).__name__}")


def _pixel_index(pixels, n: int) -> torch.Tensor:
    if isinstance(pixels, bool):
        raise TypeError("pixels must be an int or a sequence of ints, got bool")
    if isinstance(pixels, numbers.Integral):
        pixels = [int(pixels)]
    if isinstance(pixels, torch.Tensor):
        if pixels.is_floating_point() or pixels.dtype == torch.bool or pixels.dim() > 1:
            raise TypeError(f"pixels must be integer flat indices ([P] long tensor), got dtype {pixels.dtype} shape {tuple(pixels.shape)}")
        idx = pixels.reshape(-1).to(torch.long).cpu()
    else:
        try:
            vals = list(pixels)
        except TypeError:
            raise TypeError(f"pixels must be an int or a sequence of ints, got {type(pixels).__name__}") from None
        if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in vals):
            raise TypeError(f"pixels must hold ints (flat indices c*H*W + h*W + w), got {vals!r}")
        idx = torch.tensor([int(v) for v in vals], dtype=torch.long)
    if idx.numel() == 0:
        raise ValueError("pixels is empty: give at least one flat output pixel index")
    if int(idx.min()) < 0 or int(idx.max()) >= n:
        raise ValueError(f"pixels must be flat indices in [0, {n - 1}] (c*H*W + h*W + w), got {idx.tolist()}")
    return idx


# --------------------------------------------------------------------------- #
# networks as denoisers
# --------------------------------------------------------------------------- #
class ModelDenoiser(Denoiser):
    """A trained network as a denoiser ``den(x_t, t) -> x0_hat`` (plugs into ``ad.sample``).

    Args:
        model: ``torch.nn.Module`` or callable, called as ``model(x_t, t_tensor)``
            with ``t_tensor`` a long tensor ``[B]`` (see the module docstring for
            what it may return). Put a module in eval mode yourself: a batch-norm
            layer in training mode mixes the samples of a batch.
        prediction: what the model predicts, ``"epsilon"`` (the noise; then
            ``x0_hat = (x_t - sqrt(1 - ab) eps) / sqrt(ab)``) or ``"x0"``.
        alphas_cumprod: the schedule, float ``[T]`` (default: docs/algorithms.md §1's linear one).

    ``den(x_t, t)`` takes float32/float64 ``[B, C, H, W]`` and an integer timestep and
    returns ``x0_hat`` with x_t's shape and dtype. It builds an autograd graph only
    when ``x_t`` requires grad (for :func:`sensitivity`); otherwise the model runs
    under ``torch.no_grad()``, so sampling does not keep every step's graph alive.
    """

    name = "model"

    def __init__(self, model, prediction: str = "epsilon", alphas_cumprod: Optional[torch.Tensor] = None):
        if not callable(model):
            raise TypeError(f"model must be a torch.nn.Module or a callable model(x_t, t), got {type(model).__name__}")
        if isinstance(model, Denoiser):
            raise TypeError(f"model is already a denoiser ({type(model).__name__}); use it directly instead of wrapping it")
        super().__init__(_check_schedule(alphas_cumprod))
        self.model = model
        self.prediction = _check_prediction(prediction)

    def denoise(self, x, t, alpha_bar):
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        grad = x.requires_grad and torch.is_grad_enabled()
        with contextlib.nullcontext() if grad else torch.no_grad():
            out = _model_output(self.model(x, tt), "model")
        if out.shape != x.shape:
            raise ValueError(f"model returned shape {tuple(out.shape)} for x_t of shape {tuple(x.shape)}; it must predict one value per input value")
        if not out.is_floating_point():
            raise TypeError(f"model returned dtype {out.dtype}; expected a float tensor")
        out = out.to(x.dtype)
        if self.prediction == "x0":
            return out
        return (x - math.sqrt(1.0 - alpha_bar) * out) / math.sqrt(alpha_bar)


def _as_denoiser(obj, prediction: Optional[str], alphas_cumprod, what: str) -> Denoiser:
    """Denoisers are used as they are (they know they return x0_hat); networks get wrapped.

    One rule everywhere: ``prediction=None`` means ``"epsilon"`` for a network (what
    diffusers' UNets predict) and nothing for a :class:`Denoiser`; a prediction other than
    ``"x0"`` given with a Denoiser is refused, never silently ignored."""
    if isinstance(obj, Denoiser):
        if prediction not in (None, "x0"):
            raise ValueError(
                f"prediction={prediction!r} was given with {what} = {type(obj).__name__}, an analytic_diffusion "
                "Denoiser, which always returns x0_hat; prediction describes plain networks only (leave it unset)"
            )
        return obj
    if not callable(obj):
        raise TypeError(f"{what} must be a denoiser, a torch.nn.Module or a callable model(x_t, t), got {type(obj).__name__}")
    return ModelDenoiser(obj, "epsilon" if prediction is None else prediction, alphas_cumprod)


# --------------------------------------------------------------------------- #
# sensitivity fields
# --------------------------------------------------------------------------- #
def sensitivity(
    denoiser_or_model,
    x_t: torch.Tensor,
    t,
    pixels: Union[int, Sequence[int], torch.Tensor],
    *,
    batch_pixels: int = 16,
    prediction: Optional[str] = None,
    alphas_cumprod: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Sensitivity fields: Jacobian rows ``d x0_hat[b, m] / d x_t[b]`` for output pixels m.

    Args:
        denoiser_or_model: a :class:`~analytic_diffusion.Denoiser` with a
            ``sensitivity(t, pixels)`` method -- a linear denoiser such as
            :class:`~analytic_diffusion.WienerDenoiser`, whose Jacobian of
            ``mean + A_t (x/a - mean)`` is ``A_t / a`` from the filter's
            eigendecomposition, the same for every ``x_t`` -- is asked for its exact
            rows; any other :class:`~analytic_diffusion.Denoiser`
            (``den(x_t, t) -> x0_hat``, differentiable in torch, e.g. a
            :class:`ModelDenoiser`) goes through autograd; a network / callable
            ``model(x_t, t_tensor)`` (``t_tensor`` long ``[B]``) is first wrapped in
            ``ModelDenoiser(model, prediction, alphas_cumprod)``.
        x_t: float32/float64 ``[B, C, H, W]``, the noisy images the Jacobian is taken
            at (not modified; its ``.grad`` is not touched).
        t: integer timestep of the schedule.
        pixels: flat output pixel indices ``c*H*W + h*W + w`` (an int, a sequence or
            a long tensor), ``P`` of them.
        batch_pixels: how many pixels share one backward pass (autograd path). Each
            pass is a batched vector-Jacobian product (``torch.autograd.grad`` with
            ``is_grads_batched=True``); a model whose ops cannot be batched that way
            falls back to one backward pass per pixel, with the same result.
        prediction: what a wrapped network returns, ``"epsilon"`` (default for networks)
            or ``"x0"``; leave it unset for a :class:`~analytic_diffusion.Denoiser`.
            Ignored for denoisers (they return ``x0_hat``).
        alphas_cumprod: the schedule of a wrapped network (default: linear).

    Returns:
        ``[B, P, C, H, W]`` in x_t's dtype and device, detached: entry
        ``[b, p]`` is row ``pixels[p]`` of sample b's Jacobian, reshaped like an
        image. The autograd path assumes the samples of a batch do not interact
        (true for eval-mode networks and all analytical denoisers): it
        differentiates ``sum_b x0_hat[b, m]``.
    """
    x = check_queries(x_t, "x_t")
    if x.dim() != 4:
        raise ValueError(f"x_t must be [B, C, H, W], got shape {tuple(x.shape)}")
    prediction = None if prediction is None else _check_prediction(prediction)
    batch_pixels = _check_int("batch_pixels", batch_pixels, 1)
    n = x[0].numel()
    idx = _pixel_index(pixels, n)
    den = _as_denoiser(denoiser_or_model, prediction, alphas_cumprod, "denoiser_or_model")
    t = timestep_to_int(t, den.alphas_cumprod.shape[0])

    if isinstance(den, WienerDenoiser):
        shape = den.filter.image_shape
        if den.filter.n != n or (shape is not None and tuple(shape) != tuple(x.shape[1:])):
            raise ValueError(f"x_t has image shape {tuple(x.shape[1:])}, but the Wiener filter is for {tuple(shape) if shape else f'n = {den.filter.n}'}")
    analytic = getattr(den, "sensitivity", None)
    if callable(analytic):
        # a linear denoiser (Wiener, windowed Wiener) knows its Jacobian exactly; it is the same for every x_t
        try:
            takes_shape = "image_shape" in inspect.signature(analytic).parameters
        except (TypeError, ValueError):
            takes_shape = False
        rows = analytic(t, idx.tolist(), image_shape=tuple(x.shape[1:])) if takes_shape else analytic(t, idx.tolist())
        if not isinstance(rows, torch.Tensor) or rows.numel() != len(idx) * n:
            raise ValueError(f"{type(den).__name__}.sensitivity returned {getattr(rows, 'shape', type(rows).__name__)}, expected [P, C, H, W] = [{len(idx)}, {', '.join(map(str, x.shape[1:]))}]")
        rows = rows.reshape(len(idx), *x.shape[1:]).to(device=x.device, dtype=x.dtype)
        return rows.unsqueeze(0).repeat(x.shape[0], *([1] * rows.dim()))

    xg = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = den(xg, t)
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        raise ValueError(f"the denoiser returned {getattr(out, 'shape', type(out).__name__)} for x_t of shape {tuple(x.shape)}")
    if not out.requires_grad:
        raise RuntimeError(
            f"the output of {type(den).__name__} does not depend on x_t through autograd (computed without "
            "gradients, e.g. by a compiled backend or under torch.no_grad()); use a differentiable "
            "denoiser, or backend='reference' where the denoiser has one"
        )
    flat = out.reshape(x.shape[0], n)
    pieces: List[torch.Tensor] = []
    batched = True
    for start in range(0, len(idx), batch_pixels):
        chunk = idx[start : start + batch_pixels]
        k = len(chunk)
        if batched:
            cot = torch.zeros((k, x.shape[0], n), dtype=flat.dtype, device=flat.device)
            cot[torch.arange(k), :, chunk.to(flat.device)] = 1.0
            try:
                (g,) = torch.autograd.grad(flat, xg, grad_outputs=cot, retain_graph=True, is_grads_batched=True)
                pieces.append(g.detach())
                continue
            except (RuntimeError, NotImplementedError):
                batched = False  # an op without a batching rule: one backward pass per pixel from here on
        for m in chunk.tolist():
            cot = torch.zeros_like(flat)
            cot[:, m] = 1.0
            (g,) = torch.autograd.grad(flat, xg, grad_outputs=cot, retain_graph=True)
            pieces.append(g.detach().unsqueeze(0))
    fields = torch.cat(pieces, 0)  # [P, B, C, H, W]
    return fields.transpose(0, 1).contiguous().to(x.dtype)


def field_similarity(a: torch.Tensor, b: torch.Tensor, threshold: float = 0.02) -> Dict[str, torch.Tensor]:
    """Cosine similarity and support IoU of sensitivity fields, field by field.

    Args:
        a, b: float ``[P, C, H, W]`` or ``[B, P, C, H, W]`` (e.g. from
            :func:`sensitivity`; a ``[P, ...]`` Wiener field against a ``[B, P, ...]``
            network field broadcasts). One field is the trailing ``[C, H, W]``.
        threshold: in (0, 1]; the support of a field ``f`` is
            ``{ j : |f_j| >= threshold * max |f| }`` (docs/algorithms.md §4's binarisation, per field;
            an all-zero field has an empty support).

    Returns:
        ``{"cosine": ..., "iou": ...}``, float64 ``[P]`` or ``[B, P]``:
        ``cosine = <a, b> / (|a| |b|)`` of the flattened fields (NaN when either is
        all zero); ``iou = |S_a & S_b| / |S_a | S_b|`` (1 when both supports are empty).
    """
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise TypeError(f"a and b must be tensors, got {type(a).__name__} and {type(b).__name__}")
    for name, f in (("a", a), ("b", b)):
        if f.dim() not in (4, 5) or not f.is_floating_point():
            raise ValueError(f"{name} must be float [P, C, H, W] or [B, P, C, H, W], got {f.dtype} shape {tuple(f.shape)}")
        check_finite(name, f)
    if a.shape[-3:] != b.shape[-3:]:
        raise ValueError(f"a and b must hold fields of one shape [C, H, W], got {tuple(a.shape[-3:])} and {tuple(b.shape[-3:])}")
    try:
        lead = torch.broadcast_shapes(a.shape[:-3], b.shape[:-3])
    except RuntimeError:
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)} do not broadcast (leading dims [P] or [B, P])") from None
    thr = float(threshold)
    if not 0.0 < thr <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    fa = a.to(torch.float64).flatten(-3).expand(*lead, -1)
    fb = b.to(torch.float64).to(fa.device).flatten(-3).expand(*lead, -1)
    na, nb = fa.norm(dim=-1), fb.norm(dim=-1)
    cos = (fa * fb).sum(-1) / (na * nb)
    cos = torch.where((na > 0) & (nb > 0), cos, torch.full_like(cos, float("nan")))

    def support(f):
        mx = f.abs().amax(-1, keepdim=True)
        return (f.abs() >= thr * mx) & (mx > 0)

    sa, sb = support(fa), support(fb)
    inter = (sa & sb).sum(-1).to(torch.float64)
    union = (sa | sb).sum(-1).to(torch.float64)
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
    return {"cosine": cos, "iou": iou}


# --------------------------------------------------------------------------- #
# agreement with a network
# --------------------------------------------------------------------------- #
class _Batched:
    """Calls a denoiser on at most ``batch_size`` samples at a time (bounds peak memory)."""

    def __init__(self, den, batch_size: int):
        self.den, self.batch_size = den, batch_size
        self.name = getattr(den, "name", "denoiser")
        prep = getattr(den, "prepare", None)
        if prep is not None:
            self.prepare = prep

    def __call__(self, x, t):
        outs = [self.den(x[i : i + self.batch_size], t) for i in range(0, x.shape[0], self.batch_size)]
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            raise ValueError(f"{self.name} returned {getattr(out, 'shape', type(out).__name__)} for x_t of shape {tuple(x.shape)}")
        return out


class _Memory:
    """Peak memory of one call: ``torch.cuda.max_memory_allocated`` on a CUDA device (reset
    before the call); on the CPU the process's peak resident set size (Linux: ``VmHWM``,
    reset before the call by writing 5 to ``/proc/self/clear_refs``), since torch's CPU
    allocations bypass ``tracemalloc``. Where neither works the peak is ``None``."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind: Optional[str] = None
        if device.type == "cuda":
            self.kind = "cuda_max_memory_allocated"
        elif device.type == "cpu" and self._reset_rss() and self._rss_peak() is not None:
            self.kind = "cpu_peak_rss"

    @staticmethod
    def _reset_rss() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _rss_peak() -> Optional[int]:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return None
        return None

    def reset(self) -> None:
        if self.kind == "cuda_max_memory_allocated":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == "cpu_peak_rss":
            self._reset_rss()

    def peak(self) -> Optional[int]:
        if self.kind == "cuda_max_memory_allocated":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.kind == "cpu_peak_rss":
            return self._rss_peak()
        return None


class _Meter:
    """Wraps a batched denoiser: seconds and peak memory of every call, by timestep."""

    def __init__(self, fn: _Batched, memory: _Memory):
        self.fn, self.memory = fn, memory
        self.name = fn.name
        self.seconds: Dict[int, float] = {}
        self.peak: Dict[int, Optional[int]] = {}
        self.setup_seconds = 0.0
        prep = getattr(fn, "prepare", None)
        if prep is not None:
            self.prepare = self._timed_prepare

    def _sync(self) -> None:
        if self.memory.device.type == "cuda":
            torch.cuda.synchronize(self.memory.device)

    def _timed_prepare(self, timesteps, device) -> None:
        self._sync()
        t0 = time.perf_counter()
        self.fn.prepare(timesteps, device)
        self._sync()
        self.setup_seconds += time.perf_counter() - t0

    def __call__(self, x, t):
        self.memory.reset()
        t0 = time.perf_counter()
        out = self.fn(x, t)
        self._sync()
        self.seconds[t] = self.seconds.get(t, 0.0) + time.perf_counter() - t0
        p = self.memory.peak()
        old = self.peak.get(t)
        self.peak[t] = p if old is None or p is None else max(old, p)
        return out

    def summary(self, ts: Sequence[int]) -> dict:
        """Per reported timestep and over every call: seconds and peak memory."""
        peaks = [p for p in self.peak.values() if p is not None]
        return {
            "seconds": [self.seconds[t] for t in ts],
            "peak_memory": [self.peak[t] for t in ts],
            "seconds_per_step": sum(self.seconds.values()) / max(1, len(self.seconds)),
            "peak_memory_max": max(peaks) if peaks else None,
            "setup_seconds": self.setup_seconds,
        }


@dataclass
class Agreement:
    """Result of :func:`compare`: agreement of each denoiser with the network per timestep.

    ``r2[name][i]`` and ``mse[name][i]`` belong to ``timesteps[i]`` (Python floats;
    r2 with the network's prediction as the target, docs/algorithms.md §8).

    Measurements of the same run (docs/algorithms.md §8.2):

    - ``seconds[name][i]``, ``peak_memory[name][i]``: wall-clock seconds of the denoiser's
      call at ``timesteps[i]`` (all ``num_samples`` samples; CUDA synchronised) and the peak
      memory in bytes during it, of kind ``memory_kind`` (``"cuda_max_memory_allocated"``,
      ``"cpu_peak_rss"``: the process's peak resident set, or ``None``: not measurable;
      measuring resets the process's ``VmHWM`` / CUDA peak counters).
    - ``final[name]``: ``{"r2", "mse", "seconds_per_step", "peak_memory", "setup_seconds"}``.
      ``r2``/``mse``: for ``single`` and ``trajectory`` what the paper's code reports, the
      trajectory agreement at the last step (the denoiser's sample, i.e. its last ``x0_hat``
      from its own DDIM path, against the network's own sample from the same ``x_T``); for
      ``single_step`` the values at the last reported timestep. ``seconds_per_step``: mean
      over every call; ``peak_memory``: max over every call; ``setup_seconds``: its
      ``prepare`` (masks, plans) before the first step.
    - ``network``: the same measurements for the network (``seconds``, ``peak_memory`` per
      reported timestep from its own trajectory, or its calls in ``single_step``;
      ``seconds_per_step``, ``peak_memory_max``).
    - ``samples[name]``: the denoiser's final ``x0_hat`` (``[num_samples, C, H, W]``, CPU;
      for ``single_step`` its prediction at the last reported timestep), ``network_sample``
      the network's. ``step_images[name]``: ``{"pred": [S, k, C, H, W], "target": [S, k, C, H, W]}``,
      the first ``k = keep_images`` samples' prediction and the network's target at each
      reported timestep (empty unless ``compare(keep_images=k)``).
    """

    protocol: str
    timesteps: List[int]
    r2: Dict[str, List[float]]
    mse: Dict[str, List[float]]
    num_samples: int
    seed: int
    steps: Optional[int] = None
    names: List[str] = field(default_factory=list)
    seconds: Dict[str, List[float]] = field(default_factory=dict)
    peak_memory: Dict[str, List[Optional[int]]] = field(default_factory=dict)
    memory_kind: Optional[str] = None
    final: Dict[str, Dict[str, Optional[float]]] = field(default_factory=dict)
    network: Dict[str, object] = field(default_factory=dict)
    samples: Dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    network_sample: Optional[torch.Tensor] = field(default=None, repr=False)
    step_images: Dict[str, Dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        """Plain JSON-serialisable dict of every field except the images."""
        return {
            "protocol": self.protocol,
            "timesteps": list(self.timesteps),
            "names": list(self.names),
            "r2": {k: list(v) for k, v in self.r2.items()},
            "mse": {k: list(v) for k, v in self.mse.items()},
            "num_samples": self.num_samples,
            "seed": self.seed,
            "steps": self.steps,
            "seconds": {k: list(v) for k, v in self.seconds.items()},
            "peak_memory": {k: list(v) for k, v in self.peak_memory.items()},
            "memory_kind": self.memory_kind,
            "final": {k: dict(v) for k, v in self.final.items()},
            "network": {k: (list(v) if isinstance(v, list) else v) for k, v in self.network.items()},
        }

    def table(self) -> str:
        """Markdown table: one row per timestep, ``<name> r2`` and ``<name> MSE`` columns."""
        head = ["t"] + [f"{k} {m}" for k in self.names for m in ("r2", "MSE")]
        lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
        for i, t in enumerate(self.timesteps):
            cells = [str(t)]
            for k in self.names:
                cells += [f"{self.r2[k][i]:.4f}", f"{self.mse[k][i]:.4g}"]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def summary_table(self) -> str:
        """Markdown table in the layout of the papers' tables: one row per method, columns
        MSE, r2 (``final``), seconds per step and peak memory (MiB); the network last."""

        def mib(v):
            return "n/a" if v is None else f"{v / 2**20:.1f}"

        lines = ["| Method | MSE | r2 | time / step (s) | peak memory (MiB) |", "|:---|---:|---:|---:|---:|"]
        for k in self.names:
            f = self.final.get(k, {})
            lines.append(f"| {k} | {f.get('mse', float('nan')):.4g} | {f.get('r2', float('nan')):.4f} | "
                         f"{f.get('seconds_per_step', float('nan')):.4g} | {mib(f.get('peak_memory'))} |")
        if self.network:
            lines.append(f"| network (reference) | - | - | {self.network.get('seconds_per_step', float('nan')):.4g} | "
                         f"{mib(self.network.get('peak_memory_max'))} |")
        return "\n".join(lines)

    def plot(self, path=None, *, size: Tuple[int, int] = (360, 260)):
        """Line plots of r2 (left) and MSE (right) against the timestep, one line per denoiser.

        ``path``: also save the figure there (``.png``, ``.pdf`` or ``.svg``).
        ``size``: one panel's ``(width, height)`` in pixels. Returns the
        :class:`matplotlib.figure.Figure` (see :func:`analytic_diffusion.figures.agreement_figure`).
        """
        from .figures import agreement_figure  # matplotlib only when a figure is asked for

        return agreement_figure(self, size=size, path=path)


def _progress(iterable, enabled: bool, **kw):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, **kw)


def compare(
    denoisers: Mapping[str, Callable],
    model,
    data=None,
    timesteps: Optional[Sequence[int]] = None,
    *,
    protocol: str = "single_step",
    num_samples: int = 8,
    seed: int = 0,
    steps: int = 10,
    batch_size: int = 64,
    prediction: Optional[str] = None,
    alphas_cumprod: Optional[torch.Tensor] = None,
    shape: Optional[Sequence[int]] = None,
    dtype: torch.dtype = torch.float32,
    device=None,
    keep_images: int = 0,
    progress: bool = False,
) -> Agreement:
    """r2 and MSE (docs/algorithms.md §8) per timestep between analytical denoisers and a
    network, with each denoiser's seconds and peak memory per step.

    Args:
        denoisers: ``{name: den}``, each ``den(x_t, t) -> x0_hat`` (any
            :class:`~analytic_diffusion.Denoiser`, or a callable with that interface).
        model: the reference: a network ``model(x_t, t_tensor)`` predicting
            ``prediction`` (wrapped in :class:`ModelDenoiser`), or a denoiser.
        data: images ``[N, C, H, W]``, uint8 or float in [-1, 1] (any source
            ``ad.data.load_images`` takes). ``single_step``: ``num_samples`` of them
            (a seeded random choice) are noised. ``single`` / ``trajectory``: only their
            shape is used (or pass ``shape`` and no data).
        timesteps: integer timesteps to report. Default: the ``steps``-step DDIM
            schedule (900, 800, ..., 0 for 10). For ``single`` and ``trajectory`` they must
            be among that schedule's timesteps.
        protocol (docs/algorithms.md §8.2):

            - ``"single_step"``: at each t, every denoiser and the network see the same
              ``x_t = sqrt(ab) x0 + sqrt(1 - ab) eps`` (one seeded ``eps`` for all timesteps).
            - ``"single"`` (the default protocol of the locality paper's code): each
              denoiser follows its own DDIM path (``steps`` steps from the seeded ``x_T``,
              the same for every denoiser); at each step the network is evaluated on that
              denoiser's ``x_t`` and the two ``x0_hat`` are compared.
            - ``"trajectory"``: each one, the network included, follows its own DDIM path
              from the same ``x_T``; the denoiser's ``x0_hat`` at each step is compared
              with the network's at that step.

            For ``single`` and ``trajectory`` the network also samples its own path once,
            and ``final`` holds the trajectory agreement at the last step (what the
            paper's code reports).
        num_samples: images (single_step) or samples (single, trajectory).
        seed: seeds the image choice and noise (single_step) or ``x_T`` (a CPU generator,
            as :func:`analytic_diffusion.sample`).
        steps: DDIM steps (the default timesteps; the trajectory length).
        batch_size: at most this many samples per denoiser / network call.
        prediction: ``"epsilon"`` (default for networks) or ``"x0"``, what ``model``
            returns when it is a network; leave it unset for a denoiser.
        alphas_cumprod: the schedule (default: docs/algorithms.md §1's linear one).
        shape: image shape ``(C, H, W)`` for ``single`` / ``trajectory`` without data.
        dtype, device: of ``x_t`` (float32 or float64; default CPU).
        keep_images: keep the first ``keep_images`` samples' prediction and target at
            every reported timestep in ``Agreement.step_images`` (for figures).
        progress: tqdm bars over the denoisers and the steps.

    Returns:
        :class:`Agreement` with ``.table()``, ``.summary_table()``, ``.plot(path)`` and
        ``.to_dict()``. Everything runs under ``torch.no_grad()``.
    """
    if not isinstance(denoisers, Mapping) or len(denoisers) == 0:
        raise TypeError(f"denoisers must be a non-empty dict {{name: denoiser}}, got {type(denoisers).__name__} {denoisers!r}"[:200])
    for k, d in denoisers.items():
        if not isinstance(k, str) or not k:
            raise TypeError(f"denoisers keys must be non-empty strings (the names), got {k!r}")
        if not callable(d):
            raise TypeError(f"denoisers[{k!r}] must be callable den(x_t, t) -> x0_hat, got {type(d).__name__}")
    if protocol not in _PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(repr(p) for p in _PROTOCOLS)}, got {protocol!r}")
    prediction = None if prediction is None else _check_prediction(prediction)
    ab = _check_schedule(alphas_cumprod)
    T = ab.shape[0]
    num_samples = _check_int("num_samples", num_samples, 1)
    seed = _check_int("seed", seed, 0)
    batch_size = _check_int("batch_size", batch_size, 1)
    steps = _check_int("steps", steps, 1)
    keep_images = _check_int("keep_images", keep_images, 0)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    schedule = ddim_timesteps(steps, T)
    if timesteps is None:
        ts = list(schedule)
    else:
        if isinstance(timesteps, (numbers.Number, str)) or (isinstance(timesteps, torch.Tensor) and timesteps.dim() == 0):
            raise TypeError(f"timesteps must be a sequence of ints, e.g. [900, 500, 100], got {timesteps!r}")
        ts = [timestep_to_int(t, T) for t in timesteps]
        if not ts:
            raise ValueError("timesteps is empty")
        if len(set(ts)) != len(ts):
            raise ValueError(f"timesteps has repeated values: {ts}")
        if protocol != "single_step":
            missing = [t for t in ts if t not in schedule]
            if missing:
                raise ValueError(f"timesteps {missing} are not steps of the {steps}-step DDIM trajectory {schedule}; the {protocol} protocol can only report those")
    ref = _as_denoiser(model, prediction, ab, "model")
    dev = torch.device(device or "cpu")
    memory = _Memory(dev)
    dens = {k: _Meter(_Batched(d, batch_size), memory) for k, d in denoisers.items()}
    ref_m = _Meter(_Batched(ref, batch_size), memory)

    if data is not None:
        if not isinstance(data, torch.Tensor):
            from .data import load_images

            data = load_images(data)
        data = check_train(data, name="data")
        if data.dim() != 4:
            raise ValueError(f"data must be images [N, C, H, W], got shape {tuple(data.shape)}")
    if shape is not None:
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"shape must be (C, H, W), got {shape}")
        if data is not None and tuple(data.shape[1:]) != shape:
            raise ValueError(f"shape {shape} disagrees with the data's image shape {tuple(data.shape[1:])}")
    img_shape = shape if data is None else tuple(data.shape[1:])

    r2s: Dict[str, List[float]] = {k: [] for k in dens}
    mses: Dict[str, List[float]] = {k: [] for k in dens}
    final: Dict[str, Dict[str, Optional[float]]] = {}
    samples: Dict[str, torch.Tensor] = {}
    kept: Dict[str, Dict[str, List[torch.Tensor]]] = {k: {"pred": [], "target": []} for k in dens}
    network_sample: Optional[torch.Tensor] = None

    def keep(k: str, pred: torch.Tensor, target: torch.Tensor) -> None:
        if keep_images:
            kept[k]["pred"].append(pred[:keep_images].detach().cpu())
            kept[k]["target"].append(target[:keep_images].detach().cpu())

    def trajectory(den, on_step=None, desc: str = "") -> torch.Tensor:
        # the loop of ad.sample (docs/algorithms.md §7), step for step: same x_T, same updates
        gen = torch.Generator(device="cpu").manual_seed(seed)
        x = torch.randn((num_samples, *img_shape), generator=gen, dtype=dtype).to(dev)
        x0 = x
        prep = getattr(den, "prepare", None)
        if prep is not None:
            prep(schedule, x.device)
        for t in _progress(schedule, progress, desc=desc, unit="step", leave=False):
            x0 = den(x, t)
            if on_step is not None:
                on_step(t, x, x0)
            prev = t - T // steps
            x = ddim_step(x, x0, float(ab[t]), float(ab[prev]) if prev >= 0 else 1.0)
        return x0

    with torch.no_grad():
        if protocol == "single_step":
            if data is None:
                raise ValueError("protocol='single_step' needs data: the clean images that are noised")
            if num_samples > data.shape[0]:
                raise ValueError(f"num_samples={num_samples} exceeds the {data.shape[0]} images in data")
            g = torch.Generator().manual_seed(seed)
            pick = torch.randperm(data.shape[0], generator=g)[:num_samples]
            x0 = to_unit(data[pick], dtype)
            eps = torch.randn(x0.shape, generator=g, dtype=dtype)
            x0, eps = x0.to(dev), eps.to(dev)
            for t in _progress(ts, progress, desc="single_step", unit="step"):
                a_t = float(ab[t])
                x = math.sqrt(a_t) * x0 + math.sqrt(1.0 - a_t) * eps
                target = ref_m(x, t)
                for k, d in dens.items():
                    pred = d(x, t)
                    r2s[k].append(float(_r2(pred, target)))
                    mses[k].append(float(_mse(pred, target)))
                    keep(k, pred, target)
                    if t == ts[-1]:
                        samples[k] = pred.detach().cpu()
                if t == ts[-1]:
                    network_sample = target.detach().cpu()
            for k in dens:
                final[k] = {"r2": r2s[k][-1], "mse": mses[k][-1]}
        else:
            if img_shape is None:
                raise ValueError(f"protocol={protocol!r} needs data or shape=(C, H, W) for the image shape")
            ref_x0: Dict[int, torch.Tensor] = {}

            def keep_ref(t, x, x0):
                if t in ts:
                    ref_x0[t] = x0

            # the network's own path: its sample (final values) and, for trajectory, the targets
            network_sample = trajectory(ref_m, keep_ref, desc="network").detach().cpu()
            # the network's calls on the denoisers' x_t (single) are not its own trajectory's timings
            ref_on = _Batched(ref, batch_size)
            for k, d in _progress(list(dens.items()), progress, desc=f"{protocol}: methods", unit="method"):
                got: Dict[int, Tuple[float, float]] = {}

                def score(t, x, x0, k=k, got=got):
                    if t not in ts:
                        return
                    target = ref_x0[t] if protocol == "trajectory" else ref_on(x, t)
                    got[t] = (float(_r2(x0, target)), float(_mse(x0, target)))
                    keep(k, x0, target)

                last = trajectory(d, score, desc=k).detach().cpu()
                samples[k] = last
                r2s[k] = [got[t][0] for t in ts]
                mses[k] = [got[t][1] for t in ts]
                final[k] = {"r2": float(_r2(last, network_sample)), "mse": float(_mse(last, network_sample))}
    seconds: Dict[str, List[float]] = {}
    peaks: Dict[str, List[Optional[int]]] = {}
    for k, d in dens.items():
        s = d.summary(ts)
        seconds[k], peaks[k] = s["seconds"], s["peak_memory"]
        final[k].update(seconds_per_step=s["seconds_per_step"], peak_memory=s["peak_memory_max"], setup_seconds=s["setup_seconds"])
    step_images = {}
    if keep_images:
        step_images = {k: {w: torch.stack(v[w]) for w in ("pred", "target")} for k, v in kept.items()}
    return Agreement(
        protocol=protocol, timesteps=ts, r2=r2s, mse=mses, num_samples=num_samples, seed=seed,
        steps=steps if (protocol != "single_step" or timesteps is None) else None, names=list(dens),
        seconds=seconds, peak_memory=peaks, memory_kind=memory.kind, final=final, network=ref_m.summary(ts),
        samples=samples, network_sample=network_sample, step_images=step_images,
    )
