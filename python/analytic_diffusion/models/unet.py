"""A small epsilon-prediction UNet, its DDPM training loop and safetensors checkpoints.

The network a researcher compares the analytical denoisers with when no trained model is at
hand (``analytic-diffusion reproduce``): DDPM training (epsilon prediction, docs/algorithms.md
§1.2's linear schedule, uniform timesteps) of a 3-level UNet on a few thousand crops, a few
minutes of CPU. It follows the calling convention of :class:`~analytic_diffusion.ModelDenoiser`
and diffusers' ``UNet2DModel``: ``model(x_t, t)`` with ``t`` a long tensor ``[B]``.
"""
from __future__ import annotations

import json
import math
import numbers
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["SmallUNet", "load_unet", "save_unet", "timestep_embedding", "train_unet"]

#: ``format`` entry of a checkpoint's safetensors metadata.
CHECKPOINT_FORMAT = "analytic_diffusion.SmallUNet/1"


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps: ``t`` long ``[B]`` -> float32 ``[B, dim]``
    (``dim`` even: sines then cosines of ``t * 10000^(-i / (dim/2))``)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)


class _Block(nn.Module):
    """Two 3x3 convolutions with group norm and SiLU, the time embedding added in between, a residual."""

    def __init__(self, cin: int, cout: int, temb: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm1 = nn.GroupNorm(4, cout)
        self.time = nn.Linear(temb, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(4, cout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = F.silu(self.norm1(self.conv1(x)) + self.time(emb)[:, :, None, None])
        h = F.silu(self.norm2(self.conv2(h)))
        return h + self.skip(x)


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


class SmallUNet(nn.Module):
    """A 3-level UNet (resolutions S, S/2, S/4; widths w, 2w, 2w) predicting epsilon.

    Args:
        channels: image channels C (3 for RGB).
        width: base width w, a multiple of 4 (group norm with 4 groups). Parameters:
            w = 16: 125k, w = 24: 279k, w = 32: 494k (``num_parameters``).

    ``forward(x_t, t)``: ``x_t`` float32 ``[B, C, H, W]`` (H, W divisible by 4), ``t`` long
    ``[B]`` timesteps of the 1000-step schedule -> float32 ``[B, C, H, W]``, the predicted
    noise. Group norm, not batch norm, so the samples of a batch never interact (what
    :func:`~analytic_diffusion.sensitivity` assumes). ``config`` holds the constructor arguments.
    """

    def __init__(self, channels: int = 3, width: int = 16):
        super().__init__()
        channels = _check_int("channels", channels, 1)
        width = _check_int("width", width, 4)
        if width % 4:
            raise ValueError(f"width must be a multiple of 4 (group norm with 4 groups), got {width}")
        self.config = {"channels": channels, "width": width}
        w, temb = width, 4 * width
        self.temb_dim = temb
        self.time = nn.Sequential(nn.Linear(temb, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.inc = nn.Conv2d(channels, w, 3, padding=1)
        self.d1 = _Block(w, w, temb)
        self.down1 = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1)
        self.d2 = _Block(2 * w, 2 * w, temb)
        self.down2 = nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1)
        self.mid = _Block(2 * w, 2 * w, temb)
        self.up2 = nn.Conv2d(2 * w, 2 * w, 3, padding=1)
        self.u2 = _Block(4 * w, 2 * w, temb)
        self.up1 = nn.Conv2d(2 * w, w, 3, padding=1)
        self.u1 = _Block(2 * w, w, temb)
        self.out = nn.Sequential(nn.GroupNorm(4, w), nn.SiLU(), nn.Conv2d(w, channels, 3, padding=1))

    @property
    def num_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, x, t):
        if x.dim() != 4 or x.shape[1] != self.config["channels"] or x.shape[2] % 4 or x.shape[3] % 4:
            raise ValueError(
                f"x must be [B, {self.config['channels']}, H, W] with H and W divisible by 4 (the UNet halves them twice), "
                f"got shape {tuple(x.shape)}"
            )
        emb = self.time(timestep_embedding(t, self.temb_dim))
        h1 = self.d1(self.inc(x), emb)
        h2 = self.d2(self.down1(h1), emb)
        h3 = self.mid(self.down2(h2), emb)
        u = self.up2(F.interpolate(h3, scale_factor=2.0, mode="nearest"))
        u = self.u2(torch.cat([u, h2], 1), emb)
        u = self.up1(F.interpolate(u, scale_factor=2.0, mode="nearest"))
        u = self.u1(torch.cat([u, h1], 1), emb)
        return self.out(u)


def train_unet(
    model: nn.Module,
    data: torch.Tensor,
    steps: int,
    *,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    alphas_cumprod: Optional[torch.Tensor] = None,
    progress: bool = True,
) -> List[float]:
    """DDPM training with epsilon prediction (docs/algorithms.md §1.2): ``steps`` AdamW steps
    on ``|model(sqrt(ab_t) x0 + sqrt(1 - ab_t) eps, t) - eps|^2``, ``t`` uniform over the
    schedule, ``x0`` drawn with replacement from ``data``; linear warm-up over the first 10%
    of the steps, then cosine decay of the learning rate to zero.

    Args:
        model: ``model(x_t, t) -> eps`` (e.g. :class:`SmallUNet`), trained in place on the
            device of its parameters; left in eval mode.
        data: training images ``[N, C, H, W]``, uint8 (mapped to [-1, 1], docs/algorithms.md
            §1.1) or float in [-1, 1]. Not modified.
        steps: optimisation steps, int >= 1.
        batch_size: images per step.
        lr: peak learning rate.
        seed: seeds the image choice, timesteps and noise (a CPU generator): the same seed,
            data and initial weights give the same losses.
        alphas_cumprod: the schedule (default: the linear 1000-step one).
        progress: a tqdm bar over the steps, showing the running loss.

    Returns:
        the loss of every step (Python floats).
    """
    from .._validate import check_train, to_unit
    from ..schedule import default_alphas_cumprod

    steps = _check_int("steps", steps, 1)
    batch_size = _check_int("batch_size", batch_size, 1)
    seed = _check_int("seed", seed, 0)
    if not (isinstance(lr, numbers.Real) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    data = check_train(data, name="data")
    if data.dim() != 4:
        raise ValueError(f"data must be images [N, C, H, W], got shape {tuple(data.shape)}")
    ab = default_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod.detach().to(torch.float64).cpu()
    param = next(model.parameters())
    dev = param.device
    x_all = to_unit(data, torch.float32)  # a new tensor: the caller's data stays as it was
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)

    def factor(i):
        return (i + 1) / warm if i < warm else 0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    losses: List[float] = []
    model.train()
    from tqdm.auto import tqdm

    bar = tqdm(range(steps), desc="training", unit="step", disable=not progress)
    try:
        for _ in bar:
            idx = torch.randint(0, x_all.shape[0], (batch_size,), generator=g)
            t = torch.randint(0, ab.shape[0], (batch_size,), generator=g)
            eps = torch.randn((batch_size, *x_all.shape[1:]), generator=g)
            a = ab[t].sqrt().to(torch.float32)[:, None, None, None]
            s = (1 - ab[t]).sqrt().to(torch.float32)[:, None, None, None]
            x0, eps, a, s = x_all[idx].to(dev), eps.to(dev), a.to(dev), s.to(dev)
            loss = F.mse_loss(model(a * x0 + s * eps, t.to(dev)), eps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if len(losses) % 20 == 0:
                bar.set_postfix(loss=f"{sum(losses[-20:]) / 20:.4f}")
    finally:
        bar.close()
        model.eval()
    return losses


def save_unet(model: SmallUNet, path: Union[str, Path], metadata: Optional[Dict[str, object]] = None) -> Path:
    """Save ``model``'s weights and constructor arguments to a safetensors file (no pickles).

    ``metadata``: extra JSON-serialisable facts (training steps, data size, losses...), stored
    as JSON strings in the file's metadata. The file is written to a temporary name, then
    renamed: an interrupted save never leaves a torn checkpoint. Returns the path."""
    from safetensors.torch import save_file

    if not isinstance(model, SmallUNet):
        raise TypeError(f"model must be a SmallUNet, got {type(model).__name__}")
    path = Path(path)
    meta = {"format": CHECKPOINT_FORMAT, "config": json.dumps(model.config)}
    for k, v in (metadata or {}).items():
        if k in meta:
            raise ValueError(f"metadata key {k!r} is reserved")
        meta[str(k)] = json.dumps(v)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def load_unet(path: Union[str, Path], device=None) -> SmallUNet:
    """A :class:`SmallUNet` from a :func:`save_unet` checkpoint, in eval mode on ``device``
    (default CPU). Reads safetensors only (never a pickle). The extra metadata is in the
    returned model's ``checkpoint_metadata`` dict. Raises ValueError naming the file when it
    is not such a checkpoint."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        weights = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"checkpoint {path} is not a readable safetensors file: {e}") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path} is not a SmallUNet checkpoint (metadata format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r})")
    model = SmallUNet(**json.loads(meta["config"]))
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path} does not match its SmallUNet config {meta['config']}: {e}") from None
    model.checkpoint_metadata = {k: json.loads(v) for k, v in meta.items() if k not in ("format", "config")}
    return model.to(device or "cpu").eval()
