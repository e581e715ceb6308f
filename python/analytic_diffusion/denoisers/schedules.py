"""Patch-size schedules of the Kamb & Ganguli local score machines (docs/algorithms.md §10,
docs/algorithms.md §10): the published presets, their mapping to this library's timesteps, and
:func:`calibrate`, which derives a schedule from any network.

The presets are the ``files/scales_*.pt`` lists of github Kambm/convolutional_diffusion
(commit 6a87f3f; read with ``torch.load``, each a list of 20 ints). Entry ``i`` is the patch
size at step ``t = i / 20`` of its 20-step run (``utils/idealscore.py``,
``ScheduledScoreMachine.forward``: ``k = scales[i]`` at ``t = i / nsteps`` for
``i = 19 .. 1``; entry 0, ``t = 0``, is never used; the demo notebook: "ordered from earliest
(low noise) to latest (high noise)"). The noise schedule there is the "legacy" cosine one,
``1 - alpha_bar(t) = 1 - cos^2(pi t / (2 * 1.008))`` (``utils/noise_schedules.py``).
A timestep of this library maps to the published step of nearest log-SNR
``log(alpha_bar / (1 - alpha_bar))`` among ``i = 1 .. 19``. (The published calibration
script, ``scales_calibration.py``, stores the size measured at ``t = i / 20`` at index
``i - 1``, one step off from how the sampler reads it; the tables are kept as published and
read as the sampler reads them.)

All published models are 32 x 32 (MNIST and Fashion-MNIST resized to 32). Plain data: the
tables below are a dict of dicts and can be imported without torch.
"""
from __future__ import annotations

import math
import operator
from typing import Callable, Dict, Iterable, Mapping, Optional, Sequence

import torch

from ..schedule import ddim_timesteps, default_alphas_cumprod, timestep_to_int

__all__ = [
    "KAMB_GANGULI_STEPS",
    "KAMB_GANGULI_SCHEDULES",
    "PatchSchedule",
    "calibrate",
    "kamb_ganguli_alpha_bar",
    "log_snr",
    "nearest_step",
    "preset_schedule",
]

KAMB_GANGULI_STEPS = 20

# name -> {"scales": P at t = i/20 for i = 0..19, "padding": the machine it was calibrated
# for ("zeros": bbELS, "circular": ELS), "model", "dataset", "file": source in the repo}
KAMB_GANGULI_SCHEDULES: Dict[str, dict] = {
    "mnist-unet": dict(dataset="MNIST", model="UNet", padding="zeros", file="files/scales_MNIST_UNet_zeros.pt",
                       scales=[3, 3, 3, 5, 5, 7, 7, 7, 9, 9, 9, 11, 13, 15, 17, 21, 23, 23, 25, 27]),
    "mnist-resnet": dict(dataset="MNIST", model="ResNet", padding="zeros", file="files/scales_MNIST_ResNet_zeros.pt",
                         scales=[3, 3, 5, 5, 5, 7, 7, 7, 9, 9, 11, 11, 11, 11, 13, 15, 15, 15, 15, 15]),
    "mnist-resnet-circular": dict(dataset="MNIST", model="ResNet", padding="circular", file="files/scales_MNIST_ResNet_circular.pt",
                                  scales=[3, 3, 5, 5, 5, 7, 7, 9, 9, 9, 11, 11, 11, 11, 9, 9, 7, 7, 3, 3]),
    "fashion-mnist-unet": dict(dataset="Fashion-MNIST", model="UNet", padding="zeros",
                               file="files/scales_FashionMNIST_UNet_zeros_conditonal.pt",
                               scales=[3, 3, 5, 5, 7, 7, 7, 9, 11, 11, 11, 13, 15, 15, 21, 23, 25, 25, 25, 25]),
    "fashion-mnist-resnet": dict(dataset="Fashion-MNIST", model="ResNet", padding="zeros",
                                 file="files/scales_FashionMNIST_ResNet_zeros_conditonal.pt",
                                 scales=[3, 3, 5, 5, 7, 7, 9, 9, 9, 11, 11, 11, 13, 13, 13, 15, 15, 15, 17, 17]),
    "cifar10-unet": dict(dataset="CIFAR-10", model="UNet", padding="zeros", file="files/scales_CIFAR10_UNet_zeros_conditional.pt",
                         scales=[3, 3, 3, 3, 5, 5, 5, 5, 7, 7, 7, 7, 9, 9, 11, 13, 13, 15, 17, 25]),
    "cifar10-resnet": dict(dataset="CIFAR-10", model="ResNet", padding="zeros", file="files/scales_CIFAR10_ResNet_zeros_conditional.pt",
                           scales=[3, 3, 3, 3, 5, 5, 5, 7, 7, 7, 7, 9, 9, 11, 11, 13, 15, 17, 17, 17]),
    "cifar10-resnet-circular": dict(dataset="CIFAR-10", model="ResNet", padding="circular",
                                    file="files/scales_CIFAR10_ResNet_circular_conditional.pt",
                                    scales=[3, 3, 3, 3, 5, 5, 5, 5, 7, 7, 7, 9, 9, 11, 11, 13, 13, 15, 15, 15]),
    "celeba-unet": dict(dataset="CelebA", model="UNet", padding="zeros", file="files/scales_CelebA_UNet_zeros.pt",
                        scales=[3, 3, 3, 3, 3, 3, 3, 5, 5, 5, 5, 5, 7, 7, 9, 9, 9, 13, 19, 27]),
    "celeba-resnet": dict(dataset="CelebA", model="ResNet", padding="zeros", file="files/scales_CelebA_ResNet_zeros.pt",
                          scales=[3, 3, 3, 5, 5, 5, 5, 5, 7, 7, 9, 9, 9, 11, 11, 11, 13, 15, 19, 19]),
}


def kamb_ganguli_alpha_bar(i: int, steps: int = KAMB_GANGULI_STEPS) -> float:
    """``alpha_bar`` at step ``i`` (``t = i / steps``) of the published cosine schedule:
    ``cos^2(pi t / (2 * 1.008))``."""
    return math.cos(math.pi * (i / steps) / (2 * 1.008)) ** 2


def log_snr(alpha_bar: float) -> float:
    """``log(alpha_bar / (1 - alpha_bar))`` (+inf at alpha_bar = 1)."""
    if alpha_bar >= 1.0:
        return math.inf
    return math.log(alpha_bar) - math.log1p(-alpha_bar)


def nearest_step(alpha_bar: float, steps: int = KAMB_GANGULI_STEPS) -> int:
    """The published step ``i`` in ``1 .. steps-1`` of nearest log-SNR (ties: the noisier)."""
    target = log_snr(alpha_bar)
    return min(range(steps - 1, 0, -1), key=lambda i: abs(log_snr(kamb_ganguli_alpha_bar(i, steps)) - target))


def _odd(name: str, P) -> int:
    if isinstance(P, bool):
        raise TypeError(f"{name} must be an odd int, got bool")
    try:
        P = operator.index(P)
    except TypeError:
        raise TypeError(f"{name} must be an odd int, got {type(P).__name__} {P!r}") from None
    if P < 1 or P % 2 == 0:
        raise ValueError(f"{name} must be an odd positive int, got {P}")
    return P


class PatchSchedule:
    """Patch size per timestep of this library's schedule.

    ``spec``: an odd int (every step), a mapping ``{timestep: P}`` (a timestep not in it takes
    the key of nearest log-SNR), or a preset name of :data:`KAMB_GANGULI_SCHEDULES` (mapped by
    nearest log-SNR to the published 20-step cosine run). ``schedule(t) -> P``.
    """

    def __init__(self, spec, alphas_cumprod: Optional[torch.Tensor] = None, name: str = "patch_size"):
        self.alphas_cumprod = default_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod
        self.preset = None
        self.constant = None
        self.mapping = None
        if isinstance(spec, str):
            key = spec.lower().replace("_", "-")
            if key not in KAMB_GANGULI_SCHEDULES:
                raise ValueError(f"{name}: unknown preset {spec!r}; presets: {', '.join(sorted(KAMB_GANGULI_SCHEDULES))}")
            self.preset = key
            self.scales = list(KAMB_GANGULI_SCHEDULES[key]["scales"])
        elif isinstance(spec, Mapping):
            if not spec:
                raise ValueError(f"{name} is an empty mapping; give at least one {{timestep: P}} entry")
            T = self.alphas_cumprod.shape[0]
            self.mapping = {}
            for t, P in spec.items():
                try:
                    tt = timestep_to_int(t, T)
                except (TypeError, ValueError) as exc:
                    raise type(exc)(f"{name}: bad timestep key {t!r}: {exc}") from None
                self.mapping[tt] = _odd(f"{name}[{t}]", P)
        else:
            try:
                self.constant = _odd(name, spec)
            except TypeError:
                raise TypeError(
                    f"{name} must be an odd int, a mapping {{timestep: P}} or a preset name "
                    f"({', '.join(sorted(KAMB_GANGULI_SCHEDULES))}), got {type(spec).__name__}"
                ) from None

    def __call__(self, t) -> int:
        if self.constant is not None:
            return self.constant
        t = timestep_to_int(t, self.alphas_cumprod.shape[0])
        ab = float(self.alphas_cumprod[t])
        if self.preset is not None:
            return self.scales[nearest_step(ab)]
        if t in self.mapping:
            return self.mapping[t]
        target = log_snr(ab)
        key = min(self.mapping, key=lambda k: (abs(log_snr(float(self.alphas_cumprod[k])) - target), -k))
        return self.mapping[key]

    def table(self, timesteps: Iterable[int]) -> Dict[int, int]:
        """``{t: P}`` for the given timesteps (e.g. ``ad.ddim_timesteps(10)``)."""
        return {int(t): self(t) for t in timesteps}

    def __repr__(self) -> str:
        what = self.constant if self.constant is not None else (repr(self.preset) if self.preset else self.mapping)
        return f"PatchSchedule({what})"


def preset_schedule(name: str, timesteps: Sequence[int], alphas_cumprod: Optional[torch.Tensor] = None) -> Dict[int, int]:
    """``{t: P}`` of a published preset at this library's ``timesteps``."""
    return PatchSchedule(name, alphas_cumprod).table(timesteps)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)


def calibrate(
    model: Callable[[torch.Tensor, int], torch.Tensor],
    train,
    *,
    patch_sizes: Sequence[int] = (1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31),
    padding: str = "zeros",
    steps: int = 20,
    samples: int = 8,
    image_shape: Optional[Sequence[int]] = None,
    seed: int = 0,
    backend: Optional[str] = None,
    return_details: bool = False,
    alphas_cumprod: Optional[torch.Tensor] = None,
):
    """Derive a patch-size schedule from a network, as Kamb & Ganguli calibrate theirs
    (``scales_calibration.py``, cosine mode): follow the network's own DDIM trajectory from
    ``samples`` seeded noise images; at each step and for each sample take the P in
    ``patch_sizes`` whose ELS score ``-(x_t - a*x0_hat)/s2`` has the highest cosine similarity
    with the network's; the step's P is the median over samples (the lower median, so it is
    one of ``patch_sizes``).

    ``model``: a denoiser ``model(x_t, t) -> x0_hat`` (e.g. ``ad.ModelDenoiser(net)``);
    ``train``: the ELS machine's training set ``[N, C, H, W]``; ``padding``: ``"zeros"``
    (bbELS) or ``"circular"`` (ELS; sizes above min(H, W) are skipped). Returns ``{t: P}``
    over ``ad.ddim_timesteps(steps)``, usable as ``patch_size=`` of the ELS and LS denoisers;
    with ``return_details=True`` also the per-sample choices and cosines.
    """
    from ..ops.els import PADDINGS, els_denoise
    from ..sampling import ddim_step
    from .base import as_train

    train = as_train(train)
    if train.dim() != 4:
        raise ValueError(f"train must be images [N, C, H, W], got shape {tuple(train.shape)}")
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    shape = tuple(train.shape[1:]) if image_shape is None else tuple(int(s) for s in image_shape)
    if shape != tuple(train.shape[1:]):
        raise ValueError(f"image_shape {shape} differs from the training images {tuple(train.shape[1:])}")
    C, H, W = shape
    sizes = sorted({_odd("patch_sizes", P) for P in patch_sizes})
    if padding == "circular":
        sizes = [P for P in sizes if P <= min(H, W)]
    if not sizes:
        raise ValueError(f"patch_sizes has no usable size for {H}x{W} images with padding={padding!r}")
    if int(samples) != samples or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples!r}")
    ab_all = default_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod
    ts = ddim_timesteps(steps, ab_all.shape[0])
    ratio = ab_all.shape[0] // int(steps)
    gen = torch.Generator().manual_seed(int(seed))
    x = torch.randn((int(samples), C, H, W), generator=gen, dtype=torch.float64)
    chosen: Dict[int, list] = {}
    cosines: Dict[int, torch.Tensor] = {}
    for t in ts:
        ab = float(ab_all[t])
        a, s2 = math.sqrt(ab), 1.0 - ab
        x0_net = model(x.float(), t).double()
        score_net = -(x - a * x0_net) / s2
        cos = torch.stack(
            [_cosine(score_net, -(x - a * els_denoise(x, train, P, ab, padding=padding, backend=backend)) / s2) for P in sizes], 1
        )  # [samples, len(sizes)]
        best = [sizes[i] for i in cos.argmax(1).tolist()]
        chosen[t] = best
        cosines[t] = cos
        prev = t - ratio
        x = ddim_step(x, x0_net, ab, float(ab_all[prev]) if prev >= 0 else 1.0)
    table = {t: int(torch.tensor(v).median().item()) for t, v in chosen.items()}
    if return_details:
        return table, {"patch_sizes": sizes, "choices": chosen, "cosines": cosines}
    return table
