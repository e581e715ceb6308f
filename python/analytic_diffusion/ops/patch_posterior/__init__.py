"""``patch_posterior_denoise`` (PSPC-square, docs/algorithms.md §13): the validated public
entry dispatching to the registered backends (``reference.py``: one window at a time, literal;
``boxsum.py``: every window at once from integral images, float64, any device)."""
from __future__ import annotations

from typing import Optional

from ... import registry
from ..._validate import check_alpha_bar, check_chunk_size, check_positive, check_queries, check_same_device, check_train
from .reference import patch_posterior_denoise_reference

__all__ = ["patch_posterior_denoise", "patch_posterior_denoise_reference", "check_patch_size"]

registry.register("patch_posterior_denoise", "reference", patch_posterior_denoise_reference, priority=0)


def check_patch_size(patch_size, H: int, W: int, name: str = "patch_size") -> int:
    """An int P with 1 <= P <= min(H, W) (a window must fit inside the image)."""
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) and not (hasattr(patch_size, "__index__")):
        raise TypeError(f"{name} must be an int, got {type(patch_size).__name__} {patch_size!r}")
    P = int(patch_size)
    if not 1 <= P <= min(H, W):
        raise ValueError(f"{name} must be in [1, min(H, W)] = [1, {min(H, W)}] for {H} x {W} images, got {P}")
    return P


def patch_posterior_denoise(
    x,
    train,
    patch_size: int,
    alpha_bar: float,
    *,
    temperature: float = 1.0,
    chunk_size: int = 256,
    backend: Optional[str] = None,
):
    """PSPC-square (docs/algorithms.md §13): for every ``patch_size`` x ``patch_size`` window
    position (no padding) the exact posterior mean of the query's patch over the N training
    patches at the same position; each pixel the average of the means covering it.

    ``x``: float32/float64 ``[B, C, H, W]``; ``train``: uint8 or float in [-1, 1]
    ``[N, C, H, W]``. Returns x's shape and dtype.
    """
    x = check_queries(x)
    if x.dim() != 4:
        raise ValueError(f"x must be [B, C, H, W] (windows need the image layout), got shape {tuple(x.shape)}")
    train = check_train(train, x[0].numel(), tuple(x.shape[1:]))
    if train.dim() != 4:
        raise ValueError(f"train must be [N, C, H, W] (windows need the image layout), got shape {tuple(train.shape)}")
    P = check_patch_size(patch_size, x.shape[2], x.shape[3])
    ab = check_alpha_bar(alpha_bar)
    tau = check_positive("temperature", temperature)
    chunk_size = check_chunk_size(chunk_size)
    check_same_device(x=x, train=train)
    impl = registry.select("patch_posterior_denoise", x.device, backend).fn
    return impl(x, train, P, ab, tau, chunk_size)


from . import boxsum as _boxsum_backend  # noqa: E402,F401  (registers itself)
from . import windowed as _windowed_backend  # noqa: E402,F401  (registers itself)
