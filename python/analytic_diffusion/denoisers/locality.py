"""The paper's locality denoiser with Wiener-derived windows (docs/algorithms.md §4, §5)."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .. import registry
from .._validate import check_chunk_size, check_positive, check_threshold
from ..filters import WienerFilter, WindowedWiener
from ..ops import MomentAccumulator, Moments, estimate_moments
from ..schedule import timestep_to_int
from .base import TrainSetDenoiser


class LocalityDenoiser(TrainSetDenoiser):
    """The paper's locality denoiser (docs/algorithms.md §5) with Wiener-derived windows (docs/algorithms.md §4).

    ``train``: uint8 or float ``[N, C, H, W]`` (or any source ``data.load_images``
    takes); ``moments``: the statistics the windows come from.

    - Full-image :class:`Moments` (estimated from ``train`` when None): the windows are
      the columns of the dense ``[n, n]`` mask of the Wiener filter (docs/algorithms.md §4);
      each timestep's mask is built once and cached bit-packed (n*n/8 bytes; the bool mask
      of the step in use is kept unpacked). For moderate n (3x32x32: 9 MB per step).
    - Patch moments (``kind == "patch"``, e.g. ``estimate_patch_moments(train, 9)``), or a
      sequence of them with different patch sizes: the windowed path (docs/algorithms.md
      §9). Each step's window is the thresholded kernel of the windowed Wiener filter,
      ``[C, C, k, k]``, the same for every pixel and cut at the border, and the step runs
      :func:`~analytic_diffusion.ops.windowed_locality_denoise`: no n x n object anywhere,
      memory O(B*n + N*n). When the thresholded kernel reaches the edge of its k x k patch,
      k was too small for that step (at high noise the true window is most of the image):
      the next larger patch size given is used for it; if the largest still reaches its
      edge, it is used and :meth:`window_info` reports ``touches_edge=True``.

    :meth:`prepare` builds the masks or windows, and the backend's plans, of a whole
    sampling schedule up front (``ad.sample`` calls it).

    ``screening="golddiff"``: the approximate GoldDiff mode (docs/algorithms.md §12): per
    step and per query, a random pool, a coarse screening by average-pooled distances and a
    fine screening by full-resolution distances keep k_t images, and the exact softmax runs
    over those only. ``screening_options``: see :class:`~analytic_diffusion.denoisers.screening.GoldDiffScreening`
    (``preset``, ``k_min``, ``k_max``, ``pool_size``, ``seed``, ``record_error``); the
    published settings are in ``presets.published.GOLDDIFF`` (their ``threshold`` goes to
    this denoiser's ``threshold=``). :meth:`screening_error` compares one step with the exact
    denoiser; ``record_error=True`` does so at every call and appends to ``screening_log``.
    Default ``screening=None``: exact over all N.

    ``process_group``: a torch.distributed group (or ``True`` for the default group)
    when ``train`` is this rank's shard (exact softmax only). Moments estimated here
    are then all-reduced, so every rank builds the same masks, and each step merges
    the ranks' softmax states: every rank returns the full-dataset result.
    """

    name = "locality"

    @classmethod
    def from_preset(cls, train, dataset: str, moments=None, **overrides) -> "LocalityDenoiser":
        """The locality paper's published settings for ``dataset`` (docs/algorithms.md §8.2;
        ``presets.published.LOCALITY``: ``softmax="wssm"``, ``chunk_size`` = its loader's batch
        size, 512 for CIFAR-10 / MNIST / Fashion-MNIST and 256 for CelebA-HQ / AFHQ, and its
        threshold), with ``overrides`` (e.g. ``backend=``) winning. Keep the training set in
        the published loader's order: WSSM chunks are consecutive images."""
        from ..presets import settings

        return cls(train, moments, **{**settings("locality", dataset), **overrides})

    def __init__(
        self,
        train,
        moments: Optional[Union[Moments, Sequence[Moments]]] = None,
        *,
        threshold: float = 0.02,
        temperature: float = 1.0,
        softmax: str = "exact",
        chunk_size: int = 256,
        backend: Optional[str] = None,
        alphas_cumprod=None,
        process_group=None,
        screening: Optional[str] = None,
        screening_options: Optional[dict] = None,
    ):
        super().__init__(train, backend=backend, alphas_cumprod=alphas_cumprod, process_group=process_group)
        if softmax not in ("exact", "wssm"):
            raise ValueError(f"softmax must be 'exact' or 'wssm', got {softmax!r}")
        if softmax == "wssm" and self.sharded:
            raise ValueError("softmax='wssm' cannot be sharded across processes (its per-chunk softmaxes do not merge); use softmax='exact'")
        self.threshold = check_threshold(threshold)
        self.temperature = check_positive("temperature", temperature)
        self.softmax = softmax
        self.chunk_size = check_chunk_size(chunk_size)
        if moments is None:
            if self.sharded:
                acc = MomentAccumulator(tuple(self.train.shape[1:])).update(self.train)
                moments = acc.all_reduce(None if process_group is True else process_group).result()
            else:
                moments = estimate_moments(self.train)
        patches = _patch_moments_list(moments)
        if patches is not None:
            # windows from the windowed Wiener filter: only the channel count must match
            if self.train.dim() != 4:
                raise ValueError(f"patch moments need training images [N, C, H, W], got shape {tuple(self.train.shape)}")
            for m in patches:
                if not m.image_shape or int(m.image_shape[0]) != self.train.shape[1]:
                    raise ValueError(f"the patch moments are for {m.image_shape} patches, but the training images have {self.train.shape[1]} channels")
            if self.threshold <= 0:
                raise ValueError(f"threshold must be > 0 with patch moments (the windowed path needs binary windows), got {self.threshold}")
            self.moments = patches[-1]
            self._windowed = [WindowedWiener(m, self.image_shape) for m in patches]
        else:
            moments.check_compatible(self.train.shape[1:], "the training set")
            self.moments = moments
            self._windowed = None
        self._filter = None  # WienerFilter (full moments)
        self._masks: Dict[int, _StoredMask] = {}
        self._windows: Dict[int, Tuple[torch.Tensor, WindowedWiener, dict]] = {}
        self._dense: Optional[tuple] = None  # (t, device, mask): the unpacked mask in use
        self.screening = None
        self.screening_log: List[dict] = []
        if screening is not None:
            if screening != "golddiff":
                raise ValueError(f"screening must be None (exact) or 'golddiff', got {screening!r}")
            if softmax != "exact":
                raise ValueError("screening='golddiff' runs the exact softmax over the screened images; use softmax='exact'")
            if self.sharded:
                raise ValueError("screening='golddiff' cannot be combined with a process_group (sharded training sets)")
            if screening_options is not None and not isinstance(screening_options, dict):
                raise TypeError(f"screening_options must be a dict or None, got {type(screening_options).__name__}")
            from .screening import GoldDiffScreening

            self.screening = GoldDiffScreening(self.train, tuple(self.train.shape[1:]), screening_options)
        elif screening_options is not None:
            raise ValueError("screening_options is given but screening is None; pass screening='golddiff'")

    @property
    def windowed(self) -> bool:
        """True when the windows come from patch moments (the windowed path, no n x n mask)."""
        return self._windowed is not None

    @property
    def filter(self):
        """The filter the windows come from: :class:`WienerFilter` (full moments) or the
        :class:`WindowedWiener` of the largest patch size (patch moments). Both have
        ``sensitivity(alpha_bar, pixels, image_shape=None) -> [P, C, H, W]``."""
        if self._windowed is not None:
            return self._windowed[-1]
        if self._filter is None:
            self._filter = WienerFilter(self.moments)
        return self._filter

    def _reset_timestep_caches(self) -> None:
        # masks are cached by timestep, so a copy on another schedule starts without them
        self._masks = {}
        self._windows = {}
        self._dense = None

    def _window(self, t: int) -> Tuple[torch.Tensor, WindowedWiener, dict]:
        """(window bool [C, C, k, k], the filter it came from, its description) at step t."""
        if t not in self._windows:
            ab = self.alpha_bar(t)
            for f in self._windowed:
                w = f.mask(ab, self.threshold)
                edge = bool(w[:, :, 0].any() or w[:, :, -1].any() or w[:, :, :, 0].any() or w[:, :, :, -1].any())
                if not edge:
                    break
            k = w.shape[-1]
            idx = torch.nonzero(w)
            radius = int((idx[:, 2:] - k // 2).abs().max()) if idx.numel() else 0
            info = {"t": t, "patch_size": k, "radius": radius, "touches_edge": edge, "density": float(w.float().mean())}
            self._windows[t] = (w, f, info)
        return self._windows[t]

    def window_info(self, t) -> dict:
        """The windowed path's choice at step ``t``: ``patch_size`` (k of the statistics used),
        ``radius`` (the largest |offset| in the window), ``touches_edge`` (the window reaches
        the edge of the largest patch given: larger statistics would change it) and
        ``density`` (the fraction of the k x k x C x C pattern that is in the window)."""
        if self._windowed is None:
            raise ValueError("window_info is for the windowed path (patch moments); this denoiser has full-image moments")
        return dict(self._window(timestep_to_int(t, self.alphas_cumprod.shape[0]))[2])

    def mask(self, t, *, threshold: Optional[float] = None, device=None) -> torch.Tensor:
        """The mask for timestep ``t``, on ``device`` (default CPU). Full moments: bool
        ``[n, n]`` (float64 if threshold <= 0), column m the window of output pixel m;
        built once per timestep with this denoiser's own threshold (``threshold=None``) and
        stored bit-packed; another threshold builds an uncached mask. Patch moments: the
        window itself, bool ``[C, C, k, k]`` (see :meth:`window_info`)."""
        t = timestep_to_int(t, self.alphas_cumprod.shape[0])
        device = torch.device(device or "cpu")
        if self._windowed is not None:
            if threshold is not None and check_threshold(threshold) != self.threshold:
                return self._window(t)[1].mask(self.alpha_bar(t), check_threshold(threshold)).to(device)
            return self._window(t)[0].to(device)
        if threshold is not None and check_threshold(threshold) != self.threshold:
            return self._build_mask(t, check_threshold(threshold)).to(device)
        if self._dense is not None and self._dense[0] == t and self._dense[1] == device:
            return self._dense[2]
        if t not in self._masks:
            self._masks[t] = _StoredMask(self._build_mask(t, self.threshold))
        m = self._masks[t].unpack(device)
        self._dense = (t, device, m)
        return m

    def window_of(self, t, pixel: int) -> torch.Tensor:
        """The window of one output pixel (flat index ``pixel``) at step ``t`` as bool
        ``[C, H, W]``: the input pixels its distance compares, on both paths (column
        ``pixel`` of the dense mask, or the step's [C, C, k, k] window placed at the pixel
        and cut at the border)."""
        C, H, W = self.image_shape
        n = C * H * W
        if not 0 <= int(pixel) < n:
            raise ValueError(f"pixel must be a flat index in [0, {n}), got {pixel}")
        c, h, w = int(pixel) // (H * W), (int(pixel) // W) % H, int(pixel) % W
        if self._windowed is None:
            return (self.mask(t)[:, int(pixel)] != 0).reshape(C, H, W)
        win = self.mask(t)[c]  # [C_in, k, k]
        r = win.shape[-1] // 2
        out = torch.zeros(C, H + 2 * r, W + 2 * r, dtype=torch.bool)
        out[:, h : h + 2 * r + 1, w : w + 2 * r + 1] = win
        return out[:, r : r + H, r : r + W].clone()

    def _build_mask(self, t: int, threshold: float) -> torch.Tensor:
        return self.filter.mask(self.alpha_bar(t), threshold)

    def sensitivity(self, t, pixels, *, image_shape=None) -> torch.Tensor:
        """Sensitivity fields of the filter the windows come from at step ``t`` (Jacobian rows
        of the Wiener or windowed Wiener denoiser) for flat output pixels: float64 ``[P, C, H, W]``."""
        t = timestep_to_int(t, self.alphas_cumprod.shape[0])
        f = self._window(t)[1] if self._windowed is not None else self.filter
        return f.sensitivity(self.alpha_bar(t), pixels, image_shape)

    def prepare(self, timesteps, device=None, *, progress: bool = False) -> "LocalityDenoiser":
        """Build the masks of ``timesteps`` (and, where the backend plans its work per
        mask, its plans) now rather than during the first sampling run. ``progress``: a
        tqdm bar over the eigendecomposition (full moments, first call) and the steps
        (``ad.sample(..., progress=True)`` asks for it)."""
        device = torch.device(device or self.train.device)
        timesteps = list(timesteps)
        eig = self._windowed is None and self._filter is None  # the first mask pays for it
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(timesteps) + int(eig), desc=f"preparing ({self.name})", unit="step")
        try:
            if eig:
                if bar is not None:
                    bar.set_postfix_str("eigendecomposition")
                self.filter  # noqa: B018 - built here so that the bar shows it
                if bar is not None:
                    bar.update(1)
            prep = None if self._windowed is not None else registry.select("locality_denoise", device, self.backend).prepare
            for t in timesteps:
                if bar is not None:
                    bar.set_postfix_str(f"t={t}: {'window' if self._windowed is not None else 'mask' + (' + plan' if prep else '')}")
                if self._windowed is not None:
                    self._window(timestep_to_int(t, self.alphas_cumprod.shape[0]))
                else:
                    m = self.mask(t, device=device)
                    if prep is not None:
                        prep(m)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return self

    def mask_bytes(self) -> int:
        """Memory held by the cached masks (packed), in bytes."""
        return sum(m.nbytes for m in self._masks.values())

    def denoise(self, x, t, alpha_bar):
        if self.screening is None:
            return self._denoise_exact(x, t, alpha_bar)
        if not self.screening.record_error:
            return self._denoise_screened(x, t, alpha_bar)[0]
        out, info = self._screening_compare(x, t, alpha_bar)
        self.screening_log.append(info)
        return out

    def screening_error(self, x_t, t) -> dict:
        """Run one screened step and the exact step on ``x_t`` at ``t``; returns ``{"t", "m"
        (pool size), "k_t" (images kept), "rel_error" (||screened - exact|| / ||exact|| over
        the batch), "max_abs_error", "seconds_screened", "seconds_exact"}``. Draws one set
        of random pools."""
        if self.screening is None:
            raise ValueError("screening_error needs screening='golddiff' (this denoiser is exact)")
        from .._validate import check_queries

        t = timestep_to_int(t, self.alphas_cumprod.shape[0])
        x = check_queries(x_t, "x_t")
        return self._screening_compare(x, t, self.alpha_bar(t))[1]

    def _screening_compare(self, x, t, alpha_bar):
        import time

        t0 = time.perf_counter()
        out, (m, k_t) = self._denoise_screened(x, t, alpha_bar)
        t1 = time.perf_counter()
        exact = self._denoise_exact(x, t, alpha_bar)
        t2 = time.perf_counter()
        diff = (out.double() - exact.double())
        info = {
            "t": t, "m": m, "k_t": k_t,
            "rel_error": float(diff.norm() / exact.double().norm().clamp_min(1e-300)),
            "max_abs_error": float(diff.abs().max()),
            "seconds_screened": t1 - t0, "seconds_exact": t2 - t1,
        }
        return out, info

    def _denoise_screened(self, x, t, alpha_bar):
        """GoldDiff (docs/algorithms.md §12): the exact step over each query's survivors."""
        train = self._train_for(x)
        B = x.shape[0]
        flat = x.reshape(B, -1)
        keep = self.screening.select(flat, train, alpha_bar)
        out = torch.empty_like(flat)
        for b in range(B):
            sub = train[keep[b]]
            out[b] = self._denoise_exact(x[b : b + 1], t, alpha_bar, sub).reshape(-1)
        return out.reshape(x.shape), self.screening.sizes(train.shape[0], alpha_bar)

    def _denoise_exact(self, x, t, alpha_bar, train=None):
        train = self._train_for(x) if train is None else train
        if self._windowed is not None:
            return self._denoise_windowed(x, t, alpha_bar, train)
        mask = self.mask(t, device=x.device)
        impl = self._impl("locality_denoise", x)
        out = impl(
            x.reshape(x.shape[0], -1), train.reshape(train.shape[0], -1), mask, alpha_bar,
            self.temperature, self.softmax, self.chunk_size, self.sharded,
        )
        if self.sharded:
            out = self._merged(out).to(x.dtype)
        return out.reshape(x.shape)


    def _denoise_windowed(self, x, t, alpha_bar, train):
        shape = x.shape
        if x.dim() == 2:
            x = x.reshape(x.shape[0], *self.image_shape)
        window = self.mask(t, device=x.device)
        impl = self._impl("windowed_locality_denoise", x)
        out = impl(x, train, window, alpha_bar, self.temperature, self.softmax, self.chunk_size, self.sharded)
        if self.sharded:
            out = self._merged(out).to(x.dtype)
        return out.reshape(shape)


def _patch_moments_list(moments) -> Optional[List[Moments]]:
    """Patch moments sorted by patch size, or None for full-image moments."""
    items = list(moments) if isinstance(moments, (list, tuple)) else [moments]
    if not items:
        raise ValueError("moments must be Moments or a non-empty sequence of patch Moments, got an empty sequence")
    for m in items:
        if not isinstance(m, Moments):
            raise TypeError(f"moments must be analytic_diffusion.Moments (or a sequence of patch Moments), got {type(m).__name__}")
    if len(items) == 1 and items[0].kind != "patch":
        return None
    if any(m.kind != "patch" for m in items):
        raise ValueError("a sequence of moments must be patch moments (kind 'patch') of different patch sizes")
    items.sort(key=lambda m: m.patch_size)
    sizes = [m.patch_size for m in items]
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"the patch moments must have different patch sizes, got {sizes}")
    return items


class _StoredMask:
    """A mask kept compactly: bool masks bit-packed along rows (n * ceil(n/8) bytes);
    real-valued masks (threshold <= 0) as they are."""

    def __init__(self, mask: torch.Tensor):
        self.shape = tuple(mask.shape)
        if mask.dtype == torch.bool:
            self.packed = torch.from_numpy(np.packbits(mask.cpu().numpy(), axis=1))
            self.dense = None
        else:
            self.packed, self.dense = None, mask

    @property
    def nbytes(self) -> int:
        t = self.packed if self.packed is not None else self.dense
        return t.numel() * t.element_size()

    def unpack(self, device) -> torch.Tensor:
        if self.dense is not None:
            return self.dense.to(device)
        bits = np.unpackbits(self.packed.numpy(), axis=1, count=self.shape[1])
        return torch.from_numpy(bits.view(np.bool_)).to(device)
