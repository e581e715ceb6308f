"""Small Pillow-only figure helpers for samples and locality maps.

Nothing here needs matplotlib: the figures are plain RGB ``PIL.Image`` objects
built from uint8 arrays, upscaled with nearest-neighbour so that every image
pixel stays a crisp square (32x32 images are otherwise unreadable).

Value conventions follow SPEC 1: float images live in [-1, 1]; uint8 images
are shown as they are.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = [
    "BLUE",
    "RED",
    "WHITE",
    "colorbar",
    "diverging_colormap",
    "image_grid",
    "locality_figure",
    "to_uint8_images",
]

ArrayLike = Union[torch.Tensor, np.ndarray]

# ColorBrewer RdBu end points: strong enough to read on white, and unlike pure
# (255, 0, 0) / (0, 0, 255) they stay distinguishable for most colour-blind readers.
RED: Tuple[int, int, int] = (178, 24, 43)
BLUE: Tuple[int, int, int] = (33, 102, 172)
WHITE: Tuple[int, int, int] = (255, 255, 255)

_BACKGROUND = (255, 255, 255)
_TEXT = (0, 0, 0)
_MARK = (255, 200, 0)  # outline of the probed pixel: visible on red, blue, black and white


# --------------------------------------------------------------------------- #
# conversions
# --------------------------------------------------------------------------- #
def _as_tensor(x: ArrayLike, what: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    raise TypeError(f"{what} must be a torch.Tensor or numpy array, got {type(x).__name__}")


def to_uint8_images(x: ArrayLike) -> np.ndarray:
    """Images ``[B, C, H, W]`` (or one ``[C, H, W]``) -> uint8 ``[B, H, W, C]`` (or ``[H, W, C]``).

    Float input is read in [-1, 1] and mapped by ``round((x + 1) * 127.5)``
    clamped to [0, 255], the inverse of SPEC 1's ``u / 127.5 - 1`` (so uint8
    data survives a round trip exactly). Values outside [-1, 1] (a Wiener
    sample may overshoot) are clipped, not rescaled. uint8 input is only
    transposed. NaN maps to 0.
    """
    t = _as_tensor(x, "x")
    if t.dim() not in (3, 4):
        raise ValueError(f"x must be [B, C, H, W] or [C, H, W], got shape {tuple(t.shape)}")
    if t.dtype == torch.uint8:
        u = t
    elif t.is_floating_point():
        # float64 so that (u/127.5 - 1 + 1) * 127.5 lands on u up to far less than 0.5
        u = ((t.to(torch.float64) + 1.0) * 127.5).nan_to_num(0.0).round().clamp(0, 255).to(torch.uint8)
    else:
        raise TypeError(f"x must be uint8 or float, got {t.dtype}")
    perm = (0, 2, 3, 1) if u.dim() == 4 else (1, 2, 0)
    return np.ascontiguousarray(u.permute(*perm).numpy())


def _rgb(hwc: np.ndarray) -> np.ndarray:
    """uint8 ``[..., H, W, C]`` with C in {1, 3} (or 4: alpha dropped) -> ``[..., H, W, 3]``."""
    c = hwc.shape[-1]
    if c == 1:
        return np.repeat(hwc, 3, axis=-1)
    if c in (3, 4):
        return hwc[..., :3]
    raise ValueError(f"images must have 1 or 3 channels to be shown, got {c}")


def _upscale(img: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour upscaling of ``[H, W, ...]`` by an integer factor."""
    if scale == 1:
        return img
    return np.repeat(np.repeat(img, scale, axis=0), scale, axis=1)


def _check_scale(scale) -> int:
    if isinstance(scale, bool) or int(scale) != scale or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    return int(scale)


# --------------------------------------------------------------------------- #
# text
# --------------------------------------------------------------------------- #
def _font(size: int = 13):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType
    except (TypeError, ImportError, OSError):  # older Pillow: the fixed bitmap font
        return ImageFont.load_default()


def _text_size(text: str, font) -> Tuple[int, int]:
    from PIL import Image, ImageDraw

    if not text:
        return 0, 0
    box = ImageDraw.Draw(Image.new("RGB", (1, 1))).multiline_textbbox((0, 0), text, font=font)
    return box[2] - box[0], box[3]  # height from the origin, so lines line up on baselines


# --------------------------------------------------------------------------- #
# grids of images
# --------------------------------------------------------------------------- #
def image_grid(
    rows: Sequence[ArrayLike],
    labels: Optional[Sequence[str]] = None,
    scale: int = 1,
    pad: int = 2,
    font_size: int = 13,
):
    """One row of images per entry of ``rows``, each row optionally labelled on the left.

    Args:
        rows: tensors/arrays ``[B_i, C, H, W]``, float in [-1, 1] or uint8. All rows
            share ``H`` and ``W``; ``C`` may be 1 (grayscale, shown as grey) or 3.
            Rows may hold different numbers of images; shorter rows end early.
        labels: one string per row (e.g. the method name), drawn with Pillow's
            default font; ``None`` for no label column.
        scale: integer nearest-neighbour upscaling factor.
        pad: pixels of white between images and around the border.
    Returns:
        An RGB ``PIL.Image`` of width ``label_w + ncols * (W*scale + pad) + pad`` and
        height ``len(rows) * (H*scale + pad) + pad``, where ``ncols = max B_i`` and
        ``label_w`` is 0 without labels.
    """
    from PIL import Image, ImageDraw

    scale = _check_scale(scale)
    if isinstance(rows, (torch.Tensor, np.ndarray)):
        raise TypeError("rows must be a list of [B, C, H, W] tensors (one per row), not a single tensor")
    if len(rows) == 0:
        raise ValueError("rows is empty: nothing to draw")
    imgs = [_rgb(to_uint8_images(r)) if _ndim(r) == 4 else None for r in rows]
    for i, r in enumerate(imgs):
        if r is None:
            raise ValueError(f"rows[{i}] must be [B, C, H, W], got shape {tuple(rows[i].shape)}")
    H, W = imgs[0].shape[1:3]
    for i, r in enumerate(imgs):
        if r.shape[1:3] != (H, W):
            raise ValueError(f"rows[{i}] holds {r.shape[1]}x{r.shape[2]} images, but rows[0] holds {H}x{W}")
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"got {len(labels)} labels for {len(rows)} rows")

    font = _font(font_size)
    label_w = 0
    if labels is not None:
        label_w = max(_text_size(str(s), font)[0] for s in labels) + 2 * pad + 6
    cell_h, cell_w = H * scale, W * scale
    ncols = max(max(r.shape[0] for r in imgs), 1)
    width = label_w + ncols * (cell_w + pad) + pad
    height = len(rows) * (cell_h + pad) + pad
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    for i, r in enumerate(imgs):
        y = pad + i * (cell_h + pad)
        for j in range(r.shape[0]):
            x = label_w + pad + j * (cell_w + pad)
            canvas[y : y + cell_h, x : x + cell_w] = _upscale(r[j], scale)
    out = Image.fromarray(canvas, "RGB")
    if labels is not None:
        draw = ImageDraw.Draw(out)
        for i, s in enumerate(labels):
            tw, th = _text_size(str(s), font)
            y = pad + i * (cell_h + pad) + max(0, (cell_h - th) // 2)
            draw.multiline_text((pad + 3, y), str(s), fill=_TEXT, font=font)
    return out


def _ndim(x) -> int:
    return x.dim() if isinstance(x, torch.Tensor) else np.ndim(x)


# --------------------------------------------------------------------------- #
# colour maps
# --------------------------------------------------------------------------- #
def diverging_colormap(values: ArrayLike, vmax: Optional[float] = None) -> np.ndarray:
    """Blue-white-red colours for signed values: uint8 ``[..., 3]`` for ``values [...]``.

    The scale is symmetric: ``0`` is white, ``+vmax`` (and above) is :data:`RED`,
    ``-vmax`` (and below) is :data:`BLUE`, linear in between, so equal magnitudes
    of opposite sign get equally strong colours. ``vmax=None`` uses
    ``max |values|``; a zero or non-finite scale gives an all-white map. NaN is
    drawn white.
    """
    v = _as_tensor(values, "values").to(torch.float64).numpy()
    if vmax is None:
        finite = v[np.isfinite(v)]
        vmax = float(np.abs(finite).max()) if finite.size else 0.0
    vmax = float(vmax)
    if not np.isfinite(vmax) or vmax <= 0:
        return np.full(v.shape + (3,), 255, dtype=np.uint8)
    t = np.clip(np.nan_to_num(v / vmax, nan=0.0), -1.0, 1.0)[..., None]
    white = np.asarray(WHITE, dtype=np.float64)
    end = np.where(t >= 0, np.asarray(RED, dtype=np.float64), np.asarray(BLUE, dtype=np.float64))
    rgb = white + np.abs(t) * (end - white)
    return np.rint(rgb).astype(np.uint8)


def _fmt(v: float) -> str:
    return f"{v:.2g}" if abs(v) < 1e4 else f"{v:.1e}"


def colorbar(vmax: float, width: int = 128, height: int = 8, font_size: int = 11):
    """A horizontal colour bar for :func:`diverging_colormap` over ``[-vmax, +vmax]``.

    Returns an RGB ``PIL.Image`` of exactly ``width`` pixels: the gradient
    (``height`` pixels tall) above its range labels ``-vmax``, ``0`` and
    ``+vmax``.
    """
    from PIL import Image, ImageDraw

    if int(width) != width or width < 2 or int(height) != height or height < 1:
        raise ValueError(f"width must be >= 2 and height >= 1, got {width}x{height}")
    width, height = int(width), int(height)
    vmax = float(vmax)
    font = _font(font_size)
    ramp = np.linspace(-1.0, 1.0, width) * (vmax if vmax > 0 else 1.0)
    bar = np.repeat(diverging_colormap(ramp, vmax if vmax > 0 else 1.0)[None], height, axis=0)
    lo, hi = f"-{_fmt(abs(vmax))}", f"+{_fmt(abs(vmax))}"
    th = max(_text_size(s, font)[1] for s in (lo, "0", hi))
    img = Image.new("RGB", (width, height + 2 + th), _BACKGROUND)
    img.paste(Image.fromarray(bar, "RGB"), (0, 0))
    draw = ImageDraw.Draw(img)
    draw.text((0, height + 1), lo, fill=_TEXT, font=font)
    draw.text(((width - _text_size("0", font)[0]) // 2, height + 1), "0", fill=_TEXT, font=font)
    draw.text((width - _text_size(hi, font)[0], height + 1), hi, fill=_TEXT, font=font)
    return img


# --------------------------------------------------------------------------- #
# locality maps
# --------------------------------------------------------------------------- #
def _window_rgb(window: np.ndarray) -> np.ndarray:
    """bool ``[C, H, W]`` -> uint8 ``[H, W, 3]``: black outside, white where every channel
    is in the window, and for RGB the colour of the channels that are (red = R only ...)."""
    w = window.astype(np.uint8) * 255
    if w.shape[0] == 1:
        return np.repeat(w[0][..., None], 3, axis=-1)
    if w.shape[0] == 3:
        return np.ascontiguousarray(w.transpose(1, 2, 0))
    return np.repeat((window.any(0).astype(np.uint8) * 255)[..., None], 3, axis=-1)


def _outline(img: np.ndarray, pixel: Tuple[int, int], scale: int) -> None:
    """Draw a 1-px box around image pixel ``pixel = (h, w)`` of an upscaled ``[H*s, W*s, 3]``."""
    h, w = pixel
    y0, x0 = h * scale, w * scale
    y1, x1 = y0 + scale - 1, x0 + scale - 1
    if scale < 3:
        img[y0 : y1 + 1, x0 : x1 + 1] = _MARK  # too small for a hollow box
        return
    img[y0, x0 : x1 + 1] = _MARK
    img[y1, x0 : x1 + 1] = _MARK
    img[y0 : y1 + 1, x0] = _MARK
    img[y0 : y1 + 1, x1] = _MARK


def locality_figure(
    fields: ArrayLike,
    windows: ArrayLike,
    timesteps: Sequence[int],
    densities: Optional[Sequence[float]] = None,
    scale: int = 4,
    pixel: Optional[Tuple[int, int]] = None,
    pad: int = 6,
):
    """Sensitivity fields and mask windows of one output pixel, one column per timestep.

    Args:
        fields: float ``[T, C, H, W]``, the Wiener sensitivity field (Jacobian row,
            ``WienerFilter.sensitivity``) of the probed pixel at each timestep.
            Drawn summed over channels with :func:`diverging_colormap`, on a
            symmetric scale per timestep (the field's magnitude grows with the
            noise, ``A_t / sqrt(alpha_bar)``), with a :func:`colorbar` of its range.
        windows: bool ``[T, C, H, W]``, the pixel's mask window (column m of the
            mask reshaped to ``[C, H, W]``). Grayscale: white inside. RGB: each
            colour channel lights where that input channel is inside (white = all).
            The window size (fraction of all ``C*H*W`` inputs) is printed below.
        timesteps: ``T`` integer timesteps, for the column titles.
        densities: optional ``T`` fractions in [0, 1] (the density of the whole
            mask at each step), printed under the window size.
        scale: integer nearest-neighbour upscaling factor.
        pixel: ``(h, w)`` of the probed pixel, outlined in both panels; None for none.
    Returns:
        An RGB ``PIL.Image``.
    """
    from PIL import Image, ImageDraw

    scale = _check_scale(scale)
    f = _as_tensor(fields, "fields").to(torch.float64).numpy()
    wmask = _as_tensor(windows, "windows").numpy()
    if f.ndim != 4:
        raise ValueError(f"fields must be [T, C, H, W], got shape {f.shape}")
    if wmask.shape != f.shape:
        raise ValueError(f"windows must have the shape of fields {f.shape}, got {wmask.shape}")
    wmask = wmask.astype(bool)
    T, C, H, W = f.shape
    timesteps = [int(t) for t in timesteps]
    if len(timesteps) != T:
        raise ValueError(f"got {len(timesteps)} timesteps for {T} fields")
    if densities is not None and len(densities) != T:
        raise ValueError(f"got {len(densities)} densities for {T} fields")
    if pixel is not None and not (0 <= pixel[0] < H and 0 <= pixel[1] < W):
        raise ValueError(f"pixel {pixel} is outside the {H}x{W} image")

    font = _font(13)
    small = _font(11)
    cw, ch = W * scale, H * scale
    col_w = max(cw, 72)  # room for "window 100.0%" under tiny images
    row_names = ("t", "Wiener\nsensitivity\n(sum over C)", "mask\nwindow")
    label_w = max(_text_size(s, small)[0] for s in row_names) + 2 * pad
    title_h = _text_size("t=999", font)[1] + 4
    bars = [colorbar(float(np.abs(f[i].sum(0)).max()), width=cw) for i in range(T)]
    bar_h = max(b.height for b in bars)
    text_lines = 1 + (densities is not None)
    text_h = text_lines * (_text_size("0%", small)[1] + 2) + 2

    width = label_w + T * (col_w + pad) + pad
    y_field = pad + title_h
    y_bar = y_field + ch + 2
    y_win = y_bar + bar_h + pad
    y_text = y_win + ch + 2
    height = y_text + text_h + pad
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    for i in range(T):
        x = label_w + pad + i * (col_w + pad) + (col_w - cw) // 2
        summed = f[i].sum(0)
        field_img = _upscale(diverging_colormap(summed, float(np.abs(summed).max())), scale)
        win_img = _upscale(_window_rgb(wmask[i]), scale)
        if pixel is not None:
            _outline(field_img, pixel, scale)
            _outline(win_img, pixel, scale)
        canvas[y_field : y_field + ch, x : x + cw] = field_img
        canvas[y_win : y_win + ch, x : x + cw] = win_img
    img = Image.fromarray(canvas, "RGB")
    draw = ImageDraw.Draw(img)
    draw.multiline_text((pad, y_field), row_names[1], fill=_TEXT, font=small)
    draw.multiline_text((pad, y_win), row_names[2], fill=_TEXT, font=small)
    for i in range(T):
        x0 = label_w + pad + i * (col_w + pad)
        x = x0 + (col_w - cw) // 2
        title = f"t={timesteps[i]}"
        draw.text((x0 + (col_w - _text_size(title, font)[0]) // 2, pad), title, fill=_TEXT, font=font)
        img.paste(bars[i], (x, y_bar))
        lines = [f"window {100.0 * wmask[i].mean():.1f}%"]
        if densities is not None:
            lines.append(f"mask {100.0 * float(densities[i]):.1f}%")
        for k, s in enumerate(lines):
            tw, th = _text_size(s, small)
            draw.text((x0 + (col_w - tw) // 2, y_text + k * (th + 2)), s, fill=_TEXT, font=small)
    return img
