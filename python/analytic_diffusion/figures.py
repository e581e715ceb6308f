"""Every figure the library draws, on matplotlib: image grids, sensitivity fields and
locality windows, agreement line plots.

Each builder returns a :class:`matplotlib.figure.Figure` and, given ``path=``, also
saves it (``.png``, ``.pdf`` or ``.svg``, chosen by the suffix; see :func:`save`).
Figures are made with ``Figure()`` and an Agg canvas, never with ``pyplot``: nothing
is registered in pyplot's global figure list or changes the user's backend, and a
figure is freed like any other object once unreferenced (no ``plt.close`` needed).

Image panels are laid out in pixels at :data:`DPI` and drawn with nearest-neighbour
interpolation, so in a PNG every image pixel is a crisp ``scale x scale`` square
(a 32x32 image is otherwise unreadable) and sizes are exact (e.g. a grid is
``label_w + ncols * (W*scale + pad) + pad`` pixels wide).

Value conventions follow docs/algorithms.md §1: float images live in [-1, 1]; uint8 images are
shown as they are.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg, RendererAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.patches import Rectangle

from .data.convert import to_uint8

__all__ = [
    "DPI", "FORMATS", "agreement_figure", "display_scale", "diverging_colormap", "fields_figure",
    "image_grid", "locality_figure", "save", "to_array",
]

ArrayLike = Union[torch.Tensor, np.ndarray]

#: Pixels per inch of every figure: sizes given in pixels map to inches through it.
DPI = 100
#: File suffixes :func:`save` writes.
FORMATS = (".png", ".pdf", ".svg")

# ColorBrewer RdBu (red = positive): equal magnitudes of either sign look equally
# strong, and red/blue stay distinguishable for most colour-blind readers.
_CMAP = matplotlib.colormaps["RdBu_r"]
_MARK = (1.0, 0.78, 0.0)  # the probed pixel's outline: visible on red, blue, black and white
_FRAME = (0.67, 0.67, 0.67)
# Okabe-Ito: distinguishable for the common forms of colour blindness
_PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000"]
_TITLE_PT, _LABEL_PT, _SMALL_PT, _TICK_PT = 10, 9, 8, 7


# ---- conversions
def _as_tensor(x: ArrayLike, what: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    raise TypeError(f"{what} must be a torch.Tensor or numpy array, got {type(x).__name__}")


def _hwc_uint8(x: ArrayLike) -> np.ndarray:
    """Images ``[B, C, H, W]``, uint8 or float in [-1, 1] -> uint8 ``[B, H, W, C]``."""
    return np.ascontiguousarray(to_uint8(_as_tensor(x, "x")).permute(0, 2, 3, 1).numpy())


def _rgb(hwc: np.ndarray) -> np.ndarray:
    """uint8 ``[..., H, W, C]`` with C in {1, 3} (or 4: alpha dropped) -> ``[..., H, W, 3]``."""
    c = hwc.shape[-1]
    if c == 1:
        return np.repeat(hwc, 3, axis=-1)
    if c in (3, 4):
        return hwc[..., :3]
    raise ValueError(f"images must have 1 or 3 channels to be shown, got {c}")


def diverging_colormap(values: ArrayLike, vmax: Optional[float] = None) -> np.ndarray:
    """Blue-white-red colours (matplotlib's ``RdBu_r``) for signed values: uint8 ``[..., 3]``.

    The scale is symmetric, ``[-vmax, +vmax]``: 0 is the map's white centre,
    ``+vmax`` and above its darkest red, ``-vmax`` and below its darkest blue.
    ``vmax=None`` uses ``max |values|``; a zero or non-finite scale gives the
    centre colour everywhere, as does NaN.
    """
    v = _as_tensor(values, "values").to(torch.float64).numpy()
    if vmax is None:
        finite = v[np.isfinite(v)]
        vmax = float(np.abs(finite).max()) if finite.size else 0.0
    vmax = float(vmax)
    if not math.isfinite(vmax) or vmax <= 0:
        t = np.zeros_like(v)
    else:
        t = np.clip(np.nan_to_num(v / vmax, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)
    return _CMAP((t + 1.0) / 2.0, bytes=True)[..., :3]


def _window_rgb(window: np.ndarray) -> np.ndarray:
    """bool ``[C, H, W]`` -> uint8 ``[H, W, 3]``: black outside, white where every channel
    is in the window, and for RGB the colour of the channels that are (red = R only ...)."""
    w = window.astype(np.uint8) * 255
    if w.shape[0] == 1:
        return np.repeat(w[0][..., None], 3, axis=-1)
    if w.shape[0] == 3:
        return np.ascontiguousarray(w.transpose(1, 2, 0))
    return np.repeat((window.any(0).astype(np.uint8) * 255)[..., None], 3, axis=-1)


def display_scale(h: int, w: int) -> int:
    """Integer upscaling that shows an ``h x w`` image about 128 px wide (32x32 -> 4, 256 -> 1)."""
    return max(1, 128 // max(int(h), int(w), 1))


def _check_scale(scale, h: int, w: int) -> int:
    if scale is None:
        return display_scale(h, w)
    if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    return int(scale)


def _check_pixel(pixel, H: int, W: int) -> Optional[Tuple[int, int]]:
    if pixel is None:
        return None
    if len(pixel) != 2 or not (0 <= pixel[0] < H and 0 <= pixel[1] < W):
        raise ValueError(f"pixel {tuple(pixel)} is outside the {H}x{W} image")
    return int(pixel[0]), int(pixel[1])


# ---- figures laid out in pixels
@functools.lru_cache(maxsize=1)
def _renderer() -> RendererAgg:
    return RendererAgg(1, 1, DPI)


def _text_px(text: str, points: float) -> Tuple[int, int]:
    """Width and height in pixels (at :data:`DPI`) of possibly multi-line ``text``."""
    if not text:
        return 0, 0
    prop = FontProperties(size=points)
    lines = text.split("\n")
    width = max(_renderer().get_text_width_height_descent(s or " ", prop, ismath=False)[0] for s in lines)
    line_h = 1.2 * points * DPI / 72.0  # matplotlib's default linespacing
    return int(math.ceil(width)), int(math.ceil(line_h * len(lines)))


class _Canvas:
    """A figure of ``width x height`` pixels with helpers placing things by pixel
    coordinates measured from the top-left corner."""

    def __init__(self, width: int, height: int):
        self.w, self.h = int(width), int(height)
        self.fig = Figure(figsize=(self.w / DPI, self.h / DPI), dpi=DPI, facecolor="white")
        FigureCanvasAgg(self.fig)

    def axes(self, x: float, y: float, w: float, h: float, frame: bool = False):
        ax = self.fig.add_axes((x / self.w, 1.0 - (y + h) / self.h, w / self.w, h / self.h))
        ax.set(xticks=[], yticks=[])
        for s in ax.spines.values():
            s.set(visible=frame, color=_FRAME, linewidth=0.8)
        return ax

    def image(self, x: float, y: float, img: np.ndarray, scale: int, frame: bool = False):
        """uint8 ``[H, W, 3]`` drawn ``scale`` times larger, top-left corner at (x, y)."""
        ax = self.axes(x, y, img.shape[1] * scale, img.shape[0] * scale, frame)
        ax.imshow(img, interpolation="nearest", aspect="auto")
        return ax

    def text(self, x: float, y: float, s: str, points: float, ha: str = "left", va: str = "top", **kw):
        self.fig.text(x / self.w, 1.0 - y / self.h, s, fontsize=points, ha=ha, va=va, **kw)


def _outline(ax, pixel: Tuple[int, int], scale: int) -> None:
    h, w = pixel
    tiny = scale < 3  # too small for a hollow box: fill the pixel
    ax.add_patch(Rectangle((w - 0.5, h - 0.5), 1, 1, fill=tiny, facecolor=_MARK, edgecolor=_MARK, linewidth=1.0))


def _fmt(v: float) -> str:
    """Short tick labels: 0.48, 49, 3.7e-4 (colour bars are only ~100 px wide)."""
    if v == 0 or 1e-2 <= abs(v) < 1e4:
        return f"{v:.2g}"
    mantissa, exp = f"{v:.1e}".split("e")
    return f"{mantissa}e{int(exp)}"


def _colorbar(fig: Figure, cax, vmax: float) -> None:
    """A horizontal colour bar of :func:`diverging_colormap` over ``[-vmax, +vmax]``,
    labelled at both ends and 0; end labels are aligned inward so that neighbouring
    columns' labels never collide."""
    v = vmax if math.isfinite(vmax) and vmax > 0 else 1.0
    cb = fig.colorbar(ScalarMappable(Normalize(-v, v), _CMAP), cax=cax, orientation="horizontal")
    cb.outline.set_linewidth(0.5)
    if v == vmax:
        cb.set_ticks([-v, 0.0, v], labels=[f"-{_fmt(v)}", "0", f"+{_fmt(v)}"])
    else:
        cb.set_ticks([0.0], labels=["0"])
    cax.tick_params(labelsize=_TICK_PT, length=2, pad=1, width=0.5)
    labels = cax.get_xticklabels()
    if len(labels) == 3:
        labels[0].set_horizontalalignment("left")
        labels[-1].set_horizontalalignment("right")


def save(fig: Figure, path: Union[str, os.PathLike]) -> Figure:
    """Write ``fig`` to ``path`` as PNG, PDF or SVG, chosen by the suffix (:data:`FORMATS`).

    Saved at the figure's own dpi and size: a PNG is RGB with exactly the pixel size
    the builder laid out. PDF/SVG carry no creation date, so reruns give identical files.
    Returns ``fig``.
    """
    p = os.fspath(path)
    suffix = os.path.splitext(p)[1].lower()
    if suffix not in FORMATS:
        raise ValueError(f"cannot save a figure as {p!r}: the file name must end in {', '.join(FORMATS)}")
    if suffix == ".png":
        from PIL import Image

        # matplotlib writes RGBA; an opaque figure is smaller and simpler as RGB
        Image.fromarray(to_array(fig), "RGB").save(p, optimize=True)
    else:
        meta = {"Date": None} if suffix == ".svg" else {"CreationDate": None}
        fig.savefig(p, format=suffix[1:], dpi=fig.dpi, facecolor="white", metadata=meta)
    return fig


def to_array(fig: Figure) -> np.ndarray:
    """``fig`` rendered by Agg: uint8 ``[H, W, 3]`` RGB, ``H x W`` its size in pixels."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _finish(fig: Figure, path) -> Figure:
    return fig if path is None else save(fig, path)


# ---- grids of images
def image_grid(
    rows: Sequence[ArrayLike],
    labels: Optional[Sequence[str]] = None,
    *,
    scale: Optional[int] = None,
    pad: int = 2,
    path=None,
) -> Figure:
    """One row of images per entry of ``rows``, each row optionally labelled on the left.

    Args:
        rows: tensors/arrays ``[B_i, C, H, W]``, float in [-1, 1] or uint8. All rows
            share ``H`` and ``W``; ``C`` may be 1 (grayscale, shown as grey) or 3.
            Rows may hold different numbers of images; shorter rows end early.
        labels: one string per row (may hold newlines); ``None`` for no label column.
        scale: integer nearest-neighbour upscaling (default :func:`display_scale`).
        pad: pixels of white between images and around the border.
        path: also save the figure there (``.png``/``.pdf``/``.svg``).
    Returns:
        A figure of ``label_w + ncols * (W*scale + pad) + pad`` by
        ``len(rows) * (H*scale + pad) + pad`` pixels, ``ncols = max B_i``,
        ``label_w`` 0 without labels.
    """
    if isinstance(rows, (torch.Tensor, np.ndarray)):
        raise TypeError("rows must be a list of [B, C, H, W] tensors (one per row), not a single tensor")
    if len(rows) == 0:
        raise ValueError("rows is empty: nothing to draw")
    imgs = []
    for i, r in enumerate(rows):
        if np.ndim(r) != 4:
            raise ValueError(f"rows[{i}] must be [B, C, H, W], got shape {tuple(np.shape(r))}")
        imgs.append(_rgb(_hwc_uint8(r)))
    H, W = imgs[0].shape[1:3]
    for i, r in enumerate(imgs):
        if r.shape[1:3] != (H, W):
            raise ValueError(f"rows[{i}] holds {r.shape[1]}x{r.shape[2]} images, but rows[0] holds {H}x{W}")
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"got {len(labels)} labels for {len(rows)} rows")
    scale = _check_scale(scale, H, W)
    if isinstance(pad, bool) or int(pad) != pad or pad < 0:
        raise ValueError(f"pad must be an integer >= 0, got {pad!r}")
    pad = int(pad)

    label_w = 0 if labels is None else max(_text_px(str(s), _LABEL_PT)[0] for s in labels) + 2 * pad + 10
    cw, ch = W * scale, H * scale
    ncols = max(r.shape[0] for r in imgs)
    c = _Canvas(label_w + ncols * (cw + pad) + pad, len(rows) * (ch + pad) + pad)
    for i, r in enumerate(imgs):
        y = pad + i * (ch + pad)
        for j in range(r.shape[0]):
            c.image(label_w + pad + j * (cw + pad), y, r[j], scale)
        if labels is not None and labels[i]:
            c.text(pad + 4, y + ch / 2, str(labels[i]), _LABEL_PT, va="center")
    return _finish(c.fig, path)


# ---- sensitivity fields and locality windows
def fields_figure(
    rows: Mapping[str, ArrayLike],
    timesteps: Sequence[int],
    captions: Optional[Mapping[str, Sequence[str]]] = None,
    *,
    pixel: Optional[Tuple[int, int]] = None,
    scale: Optional[int] = None,
    colorbars: bool = True,
    path=None,
) -> Figure:
    """Sensitivity fields and windows: one row per source, one column per timestep.

    Args:
        rows: ``{label: [T, C, H, W]}`` tensors or arrays, drawn top to bottom. Float
            rows are fields (e.g. :func:`analytic_diffusion.sensitivity` rows), drawn
            summed over channels with :func:`diverging_colormap` on a symmetric
            scale per cell (a field's magnitude grows with the noise), each with a
            colour bar of its range when ``colorbars``. Bool rows are windows: black
            outside, white inside; for RGB, the colour of the input channels inside.
        timesteps: ``T`` integer timesteps (column titles).
        captions: optional ``{label: T strings}`` printed under that row's cells
            (e.g. the cosine with another row; may hold newlines).
        pixel: ``(h, w)`` of the probed pixel, outlined in every cell.
        scale: integer upscaling (default :func:`display_scale`).
        colorbars: draw a colour bar under every field cell.
        path: also save the figure there (``.png``/``.pdf``/``.svg``).
    Returns:
        The figure (a frame marks each cell, so an all-white one still shows).
    """
    if not isinstance(rows, Mapping) or not rows:
        raise TypeError("rows must be a non-empty dict {label: [T, C, H, W] tensor}")
    arrays: Dict[str, np.ndarray] = {}
    for k, v in rows.items():
        if not isinstance(v, (torch.Tensor, np.ndarray)) or np.ndim(v) != 4:
            raise ValueError(f"rows[{k!r}] must be a [T, C, H, W] tensor, got {getattr(v, 'shape', type(v).__name__)}")
        a = _as_tensor(v, f"rows[{k!r}]")
        arrays[str(k)] = a.numpy() if a.dtype == torch.bool else a.to(torch.float64).numpy()
    shapes = {a.shape for a in arrays.values()}
    if len(shapes) != 1:
        raise ValueError(f"all rows must have one shape [T, C, H, W], got {sorted(shapes)}")
    T, C, H, W = next(iter(shapes))
    timesteps = [int(t) for t in timesteps]
    if len(timesteps) != T:
        raise ValueError(f"got {len(timesteps)} timesteps for {T} columns")
    caps = {str(k): [str(s) for s in v] for k, v in (captions or {}).items()}
    for k, v in caps.items():
        if k not in arrays or len(v) != T:
            raise ValueError(f"captions[{k!r}] must name a row and hold {T} strings")
    pixel = _check_pixel(pixel, H, W)
    scale = _check_scale(scale, H, W)

    pad = 6
    cw, ch = W * scale, H * scale
    col_w = max(cw, 104)  # room for a colour bar's three labels under tiny images
    label_w = max(_text_px(k, _LABEL_PT)[0] for k in arrays) + 2 * pad
    title_h = _text_px("t=0", _TITLE_PT)[1] + 4
    bar_h, tick_h = 7, _text_px("0", _TICK_PT)[1] + 8
    heights = []
    for k, a in arrays.items():
        h = ch
        if colorbars and a.dtype != np.bool_:
            h += 3 + bar_h + tick_h
        if k in caps:
            h += 2 + max(_text_px(s, _SMALL_PT)[1] for s in caps[k])
        heights.append(h + pad)
    c = _Canvas(label_w + T * (col_w + pad) + pad, pad + title_h + sum(heights))
    for i, t in enumerate(timesteps):
        c.text(label_w + pad + i * (col_w + pad) + col_w / 2, pad, f"t={t}", _TITLE_PT, ha="center")
    y = pad + title_h
    for (k, a), h in zip(arrays.items(), heights):
        c.text(pad, y + ch / 2, k, _LABEL_PT, va="center")
        for i in range(T):
            x0 = label_w + pad + i * (col_w + pad)
            x = x0 + (col_w - cw) // 2
            if a.dtype == np.bool_:
                img, vmax = _window_rgb(a[i]), None
            else:
                summed = a[i].sum(0)
                vmax = float(np.abs(summed).max()) if summed.size else 0.0
                img = diverging_colormap(summed, vmax)
            ax = c.image(x, y, img, scale, frame=True)
            if pixel is not None:
                _outline(ax, pixel, scale)
            below = y + ch + 3
            if vmax is not None and colorbars:
                _colorbar(c.fig, c.axes(x, below, cw, bar_h, frame=True), vmax)
                below += bar_h + tick_h
            if k in caps:
                c.text(x0 + col_w / 2, below, caps[k][i], _SMALL_PT, ha="center")
        y += h
    return _finish(c.fig, path)


def locality_figure(
    fields: ArrayLike,
    windows: ArrayLike,
    timesteps: Sequence[int],
    densities: Optional[Sequence[float]] = None,
    *,
    scale: Optional[int] = None,
    pixel: Optional[Tuple[int, int]] = None,
    model_fields: Optional[ArrayLike] = None,
    path=None,
) -> Figure:
    """Sensitivity field and mask window of one output pixel, one column per timestep.

    Args:
        fields: float ``[T, C, H, W]``, the Wiener sensitivity field (Jacobian row,
            ``WienerFilter.sensitivity``) of the probed pixel at each timestep, drawn
            as in :func:`fields_figure` with a colour bar per timestep.
        windows: bool ``[T, C, H, W]``, the pixel's mask window (column m of the mask
            reshaped to ``[C, H, W]``); its size (fraction of all ``C*H*W`` inputs)
            is printed below.
        timesteps: ``T`` integer timesteps, for the column titles.
        densities: optional ``T`` fractions in [0, 1] (the density of the whole mask
            at each step), printed under the window size.
        scale: integer upscaling (default :func:`display_scale`).
        pixel: ``(h, w)`` of the probed pixel, outlined in every panel.
        model_fields: optional float ``[T, C, H, W]``, a network's fields of the same
            pixel, drawn as a third row.
        path: also save the figure there (``.png``/``.pdf``/``.svg``).
    """
    f = _as_tensor(fields, "fields")
    win = _as_tensor(windows, "windows")
    if f.dim() != 4:
        raise ValueError(f"fields must be [T, C, H, W], got shape {tuple(f.shape)}")
    if win.shape != f.shape:
        raise ValueError(f"windows must have the shape of fields {tuple(f.shape)}, got {tuple(win.shape)}")
    T = f.shape[0]
    if len(timesteps) != T:
        raise ValueError(f"got {len(timesteps)} timesteps for {T} fields")
    if densities is not None and len(densities) != T:
        raise ValueError(f"got {len(densities)} densities for {T} fields")
    win = win != 0 if win.dtype != torch.bool else win
    rows = {"Wiener\nsensitivity\n(sum over C)": f.to(torch.float64)}
    if model_fields is not None:
        mf = _as_tensor(model_fields, "model_fields")
        if mf.shape != f.shape:
            raise ValueError(f"model_fields must have the shape of fields {tuple(f.shape)}, got {tuple(mf.shape)}")
        rows["model\nsensitivity\n(sum over C)"] = mf.to(torch.float64)
    rows["mask\nwindow"] = win
    caption = []
    for i in range(T):
        s = f"window {100.0 * float(win[i].float().mean()):.1f}%"
        if densities is not None:
            s += f"\nmask {100.0 * float(densities[i]):.1f}%"
        caption.append(s)
    return fields_figure(rows, timesteps, {"mask\nwindow": caption}, pixel=pixel, scale=scale, path=path)


# ---- agreement with a network
def agreement_figure(agreement, *, size: Tuple[int, int] = (360, 260), path=None) -> Figure:
    """r2 (left) and MSE (right) against the timestep, one line per denoiser.

    Args:
        agreement: an :class:`analytic_diffusion.analysis.Agreement` (anything with
            ``timesteps``, ``names`` and ``r2`` / ``mse`` dicts of per-timestep floats).
        size: one panel's ``(width, height)`` in pixels, at least (120, 100); the
            legend goes below both panels.
        path: also save the figure there (``.png``/``.pdf``/``.svg``).

    The x axis runs from high to low noise, the order of sampling. r2 below -1 is
    drawn at -1 (the axis floor, said in the title). MSE gets a log axis when it
    spans more than two decades, as it does between high and low noise.
    """
    w, h = int(size[0]), int(size[1])
    if w < 120 or h < 100:
        raise ValueError(f"size must be at least (120, 100), got {size}")
    names = list(agreement.names)
    ts = [int(t) for t in agreement.timesteps]
    legend_h = 10 + 16 * math.ceil(len(names) / 3)
    fig = Figure(figsize=(2 * w / DPI, (h + legend_h) / DPI), dpi=DPI, facecolor="white", layout="constrained")
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(2, 2, height_ratios=[h, legend_h])
    ax_r2, ax_mse = fig.add_subplot(gs[0, 0]), fig.add_subplot(gs[0, 1])

    r2 = {k: np.asarray(agreement.r2[k], dtype=np.float64) for k in names}
    finite = np.concatenate([v[np.isfinite(v)] for v in r2.values()] + [np.zeros(1)])
    r2_lo = max(-1.0, math.floor(finite.min() * 10.0) / 10.0)
    mse = {k: np.asarray(agreement.mse[k], dtype=np.float64) for k in names}
    pos = np.concatenate([v[np.isfinite(v) & (v > 0)] for v in mse.values()] + [np.zeros(0)])
    log = pos.size > 0 and pos.max() / pos.min() > 100
    order = np.argsort(ts)
    x = np.asarray(ts)[order]
    handles = []
    for i, k in enumerate(names):
        style = dict(color=_PALETTE[i % len(_PALETTE)], marker="o", markersize=3.5, linewidth=1.5)
        (line,) = ax_r2.plot(x, np.maximum(r2[k][order], r2_lo), **style)
        m = mse[k][order]
        ax_mse.plot(x, np.where(m > 0, m, np.nan) if log else m, **style)
        handles.append(line)
    ax_r2.set_ylim(r2_lo, 1.0 + 0.03 * (1.0 - r2_lo))
    ax_r2.set_title("r2 vs network (higher is better)" + (", clipped at -1" if finite.min() < -1.0 else ""), fontsize=_LABEL_PT)
    ax_mse.set_title("MSE vs network" + (" (log)" if log else ""), fontsize=_LABEL_PT)
    if log:
        ax_mse.set_yscale("log")
    else:
        ax_mse.set_ylim(bottom=0.0)
    for ax in (ax_r2, ax_mse):
        ax.set_xlabel("timestep t (high noise \u2192 low)", fontsize=_SMALL_PT)
        ax.tick_params(labelsize=_TICK_PT + 0.5)
        ax.grid(True, color="0.9", linewidth=0.6)
        ax.set_axisbelow(True)
        if len(x) > 1 and not ax.xaxis_inverted():
            ax.invert_xaxis()
    if r2_lo < 0:
        ax_r2.axhline(0.0, color="0.6", linewidth=0.8, zorder=0)
    lax = fig.add_subplot(gs[1, :])
    lax.set_axis_off()
    lax.legend(handles, names, loc="center", ncol=min(3, max(1, len(names))), frameon=False, fontsize=_LABEL_PT)
    return _finish(fig, path)
