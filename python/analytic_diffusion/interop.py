"""Use our denoisers where diffusers expects a UNet.

:class:`DiffusersModelAdapter` wraps ``den(x_t, t) -> x0_hat`` as a module with
the call signature of diffusers' ``UNet2DModel`` -- ``model(sample, timestep)``
returning an object with ``.sample`` (or a tuple with ``return_dict=False``) --
that predicts the noise, ``eps = (x_t - sqrt(ab) x0_hat) / sqrt(1 - ab)``. Any
diffusers scheduler that reads epsilon predictions at integer timesteps of the
same 1000-step schedule (``DDIMScheduler``, ``DDPMScheduler``, ...) can then run
it, and ``DDIMPipeline(unet=adapter, scheduler=...)`` samples with it.

Nothing here imports diffusers: the adapter only mimics the interface, so
``analytic_diffusion`` keeps working where diffusers is not installed.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import torch

from .schedule import check_alphas_cumprod

__all__ = ["AdapterOutput", "DiffusersModelAdapter"]


class AdapterOutput:
    """What the adapter returns with ``return_dict=True``: ``.sample`` (the predicted
    noise, the input's shape and dtype); ``out[0]`` and ``out.to_tuple()`` also work,
    like diffusers' ``UNet2DOutput``."""

    def __init__(self, sample: torch.Tensor):
        self.sample = sample

    def to_tuple(self) -> Tuple[torch.Tensor]:
        return (self.sample,)

    def __getitem__(self, key):
        if key == 0 or key == "sample":
            return self.sample
        raise KeyError(f"AdapterOutput holds only 'sample' (index 0), got {key!r}")

    def __repr__(self) -> str:
        return f"AdapterOutput(sample=<{tuple(self.sample.shape)} {self.sample.dtype}>)"


class _Config(dict):
    """A read-only-ish dict with attribute access, like diffusers' ``FrozenDict`` config."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no field {name!r}") from None


def _same_schedule(a: torch.Tensor, b) -> bool:
    if not isinstance(b, torch.Tensor) or b.shape != a.shape:
        return False
    return torch.equal(a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64))


def _image_shape(denoiser) -> Optional[Tuple[int, ...]]:
    for obj in (denoiser, getattr(denoiser, "filter", None), getattr(denoiser, "moments", None)):
        shape = getattr(obj, "image_shape", None) if obj is not None else None
        if shape is not None and len(tuple(shape)) == 3:
            return tuple(int(s) for s in shape)
    return None


class DiffusersModelAdapter(torch.nn.Module):
    """Our denoiser behind diffusers' UNet interface, predicting epsilon.

    Args:
        denoiser: ``den(x_t, t) -> x0_hat`` (any :class:`~analytic_diffusion.Denoiser`),
            called with an integer timestep.
        alphas_cumprod: float ``[T]``, the scheduler's schedule
            (``scheduler.alphas_cumprod``): it turns ``x0_hat`` into epsilon and is
            passed on to the denoiser (``denoiser.with_schedule``, a copy; the
            original is unchanged), so that both read ``t`` on it. Default: the
            denoiser's own, else docs/algorithms.md §1's linear schedule, which is diffusers'
            default. A plain callable with no ``alphas_cumprod`` of its own just
            gets the timesteps.
        sample_shape: ``(C, H, W)`` reported as ``config.in_channels`` and
            ``config.sample_size`` (what ``DDIMPipeline`` reads to draw the noise).
            Default: the denoiser's training image shape, when it has one.

    Call: ``adapter(sample, timestep, return_dict=True)`` with ``sample`` float
    ``[B, C, H, W]`` (float16/bfloat16 are computed in float32) and ``timestep``
    an int, a 0-d / one-element tensor, or a ``[B]`` tensor of per-sample
    timesteps, integer-valued. Returns :class:`AdapterOutput` (``.sample``) or,
    with ``return_dict=False``, the tuple ``(eps,)``; ``eps`` has the sample's
    shape and dtype. Conditioning inputs (``encoder_hidden_states``,
    ``class_labels``, ...) must be None: the denoisers are unconditional.

    ``eps = (x_t - sqrt(ab) x0_hat) / sqrt(1 - ab)`` exactly, so a scheduler's
    ``pred_original_sample = (x_t - sqrt(1 - ab) eps) / sqrt(ab)`` gives back
    ``x0_hat`` (before its clipping).
    """

    def __init__(self, denoiser, alphas_cumprod: Optional[torch.Tensor] = None, sample_shape: Optional[Tuple[int, int, int]] = None):
        super().__init__()
        if not callable(denoiser):
            raise TypeError(f"denoiser must be callable den(x_t, t) -> x0_hat, got {type(denoiser).__name__}")
        own = getattr(denoiser, "alphas_cumprod", None)
        ab = check_alphas_cumprod(alphas_cumprod if alphas_cumprod is not None else own)
        if not bool((ab < 1).all()):
            raise ValueError("alphas_cumprod must have every value in (0, 1): alpha_bar = 1 has no noise to predict")
        if alphas_cumprod is not None and not _same_schedule(ab, own):
            # the denoiser must read t on the scheduler's schedule too, not only the conversion
            # x0_hat -> epsilon here
            if hasattr(denoiser, "with_schedule"):
                denoiser = denoiser.with_schedule(ab)
            elif own is not None:
                raise ValueError(
                    f"{type(denoiser).__name__} has its own alphas_cumprod, different from the one given, and no "
                    "with_schedule() to take this one: build the denoiser with alphas_cumprod=scheduler.alphas_cumprod"
                )
        shape = _image_shape(denoiser) if sample_shape is None else tuple(sample_shape)
        if shape is not None:
            if len(shape) != 3 or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1 for s in shape):
                raise ValueError(f"sample_shape must be (C, H, W) positive ints, got {sample_shape!r}")
            shape = tuple(int(s) for s in shape)
        self.denoiser = denoiser
        # The schedule is kept in float64 on the CPU: ab[t] is read as a Python float
        self._ab = ab.detach().to("cpu", torch.float64)
        self._device = torch.device("cpu")
        self._dtype = torch.float32
        C, H, W = shape if shape is not None else (None, None, None)
        self.config = _Config(
            sample_size=(H if H == W else (H, W)) if shape is not None else None,
            in_channels=C,
            out_channels=C,
            num_train_timesteps=int(ab.numel()),
        )

    # diffusers' pipelines ask their modules for these
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def to(self, *args, **kwargs):
        """Records the device / dtype pipelines query; the denoisers move their data to
        the input's device by themselves."""
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None:
            self._device = torch.device(device)
        if dtype is not None:
            if not dtype.is_floating_point:
                raise TypeError(f"dtype must be a floating dtype, got {dtype}")
            self._dtype = dtype
        return super().to(*args, **kwargs)

    def _timesteps(self, timestep, batch: int) -> torch.Tensor:
        T = self._ab.numel()
        if isinstance(timestep, bool):
            raise TypeError("timestep must be an int or a tensor, got bool")
        if isinstance(timestep, torch.Tensor):
            ts = timestep.detach().reshape(-1).cpu()
        elif isinstance(timestep, numbers.Real):
            ts = torch.tensor([timestep], dtype=torch.float64)
        else:
            raise TypeError(f"timestep must be an int or a tensor, got {type(timestep).__name__}")
        if ts.numel() not in (1, batch):
            raise ValueError(f"timestep must hold 1 or B = {batch} values, got {ts.numel()}")
        if ts.is_floating_point():
            if not bool((ts == ts.round()).all()):
                raise ValueError(f"timestep must be integer-valued (the adapter reads the {T}-step schedule), got {ts.tolist()}")
            ts = ts.round()
        ts = ts.to(torch.long)
        if int(ts.min()) < 0 or int(ts.max()) >= T:
            raise ValueError(f"timestep must be in [0, {T - 1}], got {ts.tolist()}")
        return ts.expand(batch) if ts.numel() == 1 else ts

    def forward(self, sample: torch.Tensor, timestep, *args, return_dict: bool = True, **kwargs):
        extra = [f"positional argument {i + 3}" for i, a in enumerate(args) if a is not None]
        # cross_attention_kwargs only tunes attention layers (e.g. a LoRA scale): harmless to drop
        extra += [k for k, v in kwargs.items() if v is not None and k != "cross_attention_kwargs"]
        if extra:
            raise TypeError(f"DiffusersModelAdapter is unconditional: got {', '.join(extra)}; pass None or leave them out")
        if not isinstance(sample, torch.Tensor) or sample.dim() != 4 or not sample.is_floating_point():
            raise ValueError(f"sample must be a float [B, C, H, W] tensor, got {getattr(sample, 'dtype', type(sample).__name__)} {tuple(getattr(sample, 'shape', ()))}")
        ts = self._timesteps(timestep, sample.shape[0])
        x = sample if sample.dtype in (torch.float32, torch.float64) else sample.to(torch.float32)
        eps = torch.empty_like(x)
        for t in torch.unique(ts).tolist():
            rows = (ts == t).nonzero().flatten()
            xs = x if rows.numel() == x.shape[0] else x[rows.to(x.device)]
            ab = float(self._ab[t])
            x0 = self.denoiser(xs, int(t))
            e = (xs - math.sqrt(ab) * x0.to(xs.dtype)) / math.sqrt(1.0 - ab)
            if rows.numel() == x.shape[0]:
                eps = e
            else:
                eps[rows.to(x.device)] = e
        eps = eps.to(sample.dtype)
        return AdapterOutput(eps) if return_dict else (eps,)
