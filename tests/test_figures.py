"""Figures on matplotlib: exact pixel layout of image panels, colours, file formats, errors,
and no pyplot / import-time matplotlib."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import analytic_diffusion as ad
from analytic_diffusion import figures


def _rgb(fig):
    a = figures.to_array(fig)
    assert a.dtype == np.uint8 and a.shape[2] == 3
    return a


def _colours(a):
    return {tuple(c) for c in a.reshape(-1, 3)}


# --------------------------------------------------------------------------- scale
def test_display_scale():
    assert figures.display_scale(32, 32) == 4 and figures.display_scale(25, 25) == 5
    assert figures.display_scale(8, 6) == 16 and figures.display_scale(256, 300) == 1


# --------------------------------------------------------------------------- image grids
def test_grid_size_and_pixels_without_labels():
    rows = [torch.zeros(3, 3, 5, 7), torch.zeros(1, 3, 5, 7)]
    a = _rgb(figures.image_grid(rows, scale=3, pad=2))
    assert a.shape == (2 * (5 * 3 + 2) + 2, 3 * (7 * 3 + 2) + 2, 3)
    assert (a[2 : 2 + 15, 2 : 2 + 21] == 128).all()  # image 0: 0.0 -> grey 128, upscaled 3x
    assert (a[2 + 17 : 2 + 17 + 15, 2 + 23 : 2 + 23 + 21] == 255).all()  # the short row ends early
    assert (a[:2] == 255).all() and (a[:, :2] == 255).all()  # white border


def test_grid_labels_add_a_column_and_pixels_are_nearest_upscaled():
    x = torch.rand(2, 3, 4, 4) * 2 - 1
    plain = _rgb(figures.image_grid([x], scale=5))
    lab = _rgb(figures.image_grid([x], ["locality"], scale=5))
    assert lab.shape[0] == plain.shape[0] and lab.shape[1] > plain.shape[1]
    lw = lab.shape[1] - plain.shape[1]
    expect = ad.data.to_uint8(x).permute(0, 2, 3, 1).numpy()
    for j in range(2):  # every image pixel is an exact 5x5 square, in both figures
        x0 = 2 + j * (20 + 2)
        block = lab[2 : 2 + 20, lw + x0 : lw + x0 + 20].reshape(4, 5, 4, 5, 3)
        assert (block == expect[j][:, None, :, None, :]).all()
        assert (plain[2 : 2 + 20, x0 : x0 + 20] == lab[2 : 2 + 20, lw + x0 : lw + x0 + 20]).all()
    assert (lab[:, :lw] < 100).all(-1).any()  # the label was drawn in dark ink


def test_grid_default_scale_grayscale_and_uint8():
    g = figures.image_grid([torch.full((2, 1, 8, 8), 200, dtype=torch.uint8), torch.zeros(2, 3, 8, 8)], ["gray", "rgb"])
    a = _rgb(g)
    assert a.shape[0] == 2 * (128 + 2) + 2  # 8x8 shown at 16x by default
    lw = a.shape[1] - (2 * (128 + 2) + 2)
    assert (a[2:130, lw + 2 : lw + 130] == 200).all()


def test_grid_rejects_bad_input():
    with pytest.raises(ValueError, match="4x4"):
        figures.image_grid([torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 5, 5)])
    with pytest.raises(ValueError, match="labels"):
        figures.image_grid([torch.zeros(1, 3, 4, 4)], ["a", "b"])
    with pytest.raises(TypeError, match="list"):
        figures.image_grid(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="channels"):
        figures.image_grid([torch.zeros(1, 2, 4, 4)])
    with pytest.raises(ValueError, match="empty"):
        figures.image_grid([])
    with pytest.raises(ValueError, match=r"rows\[0\]"):
        figures.image_grid([torch.zeros(3, 4, 4)])
    with pytest.raises(ValueError, match="scale"):
        figures.image_grid([torch.zeros(1, 3, 4, 4)], scale=0)


# --------------------------------------------------------------------------- colours
def test_diverging_colormap_is_symmetric_and_clips():
    vmax = 2.5
    c = figures.diverging_colormap(torch.tensor([0.0, vmax, -vmax, 10.0, -10.0, 1.0, -1.0]), vmax).astype(int)
    assert c.shape == (7, 3)
    assert (c[0] > 240).all()  # the centre is (near) white
    assert (c[1] == c[3]).all() and (c[2] == c[4]).all()  # clipped beyond +-vmax
    assert c[1, 0] > 2 * c[1, 2] and c[2, 2] > 2 * c[2, 0]  # +vmax dark red, -vmax dark blue
    # equal magnitudes lie about equally far from white
    d_pos, d_neg = np.abs(255 - c[5]).sum(), np.abs(255 - c[6]).sum()
    assert 0.6 < d_pos / d_neg < 1.6


def test_diverging_colormap_default_scale_and_degenerate():
    c = figures.diverging_colormap(np.array([[-1.0, 4.0]]))  # vmax = max |v| = 4
    top = figures.diverging_colormap(np.array([1.0]), 1.0)[0]
    assert c.shape == (1, 2, 3) and (c[0, 1] == top).all() and not (c[0, 0] == figures.diverging_colormap(np.array([-1.0]), 1.0)[0]).all()
    centre = figures.diverging_colormap(np.zeros(1), 1.0)[0]
    assert (figures.diverging_colormap(torch.zeros(3, 3)) == centre).all()
    assert (figures.diverging_colormap(torch.tensor([float("nan")]), 1.0) == centre).all()


# --------------------------------------------------------------------------- fields and windows
@pytest.mark.parametrize("C", [1, 3])
def test_locality_figure_draws_fields_windows_and_colour(C):
    T, H, W = 3, 6, 5
    fields = torch.zeros(T, C, H, W, dtype=torch.float64)
    fields[:, 0, 1, 1] = 1.0  # one positive spike per field: its cell is the darkest red
    windows = torch.zeros(T, C, H, W, dtype=torch.bool)
    windows[:, :, :3] = True
    fig = figures.locality_figure(fields, windows, [666, 333, 0], [0.9, 0.5, 0.1], scale=4, pixel=(3, 2))
    a = _rgb(fig)
    assert a.shape[1] > T * W * 4 and a.shape[0] > 2 * H * 4
    red = tuple(figures.diverging_colormap(np.array([1.0]), 1.0)[0])
    assert red in _colours(a)
    assert (0, 0, 0) in _colours(a)  # outside the windows
    texts = " ".join(t.get_text() for t in fig.texts)
    assert "t=666" in texts and "window 50.0%" in texts and "mask 90.0%" in texts
    no_density = _rgb(figures.locality_figure(fields, windows, [666, 333, 0], scale=4))
    assert no_density.shape[1] == a.shape[1] and no_density.shape[0] < a.shape[0]  # one caption line fewer
    with_model = _rgb(figures.locality_figure(fields, windows, [666, 333, 0], scale=4, model_fields=-fields))
    assert with_model.shape[1] == no_density.shape[1] and with_model.shape[0] > no_density.shape[0] + H * 4


def test_locality_figure_rejects_mismatches():
    f = torch.zeros(2, 1, 4, 4)
    w = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="windows"):
        figures.locality_figure(f, torch.zeros(2, 1, 4, 5, dtype=torch.bool), [1, 0])
    with pytest.raises(ValueError, match="timesteps"):
        figures.locality_figure(f, w, [0])
    with pytest.raises(ValueError, match="densities"):
        figures.locality_figure(f, w, [1, 0], [0.5])
    with pytest.raises(ValueError, match="pixel"):
        figures.locality_figure(f, w, [1, 0], pixel=(4, 0))
    with pytest.raises(ValueError, match="model_fields"):
        figures.locality_figure(f, w, [1, 0], model_fields=f[:1])


def test_fields_figure_layout_and_errors():
    f = torch.randn(3, 3, 5, 5)
    fig = figures.fields_figure({"a": f, "b": f > 0}, [900, 500, 0], captions={"a": ["x", "y", "z"]}, pixel=(2, 2), scale=4)
    # 3 field cells with a colour bar each, 3 window cells without
    assert len(fig.axes) == 3 * 2 + 3
    assert {"x", "y", "z", "t=900", "a", "b"} <= {t.get_text() for t in fig.texts}
    assert len(figures.fields_figure({"a": f}, [1, 2, 3], colorbars=False).axes) == 3
    with pytest.raises(ValueError, match="one shape"):
        figures.fields_figure({"a": f, "b": f[:2]}, [1, 2, 3])
    with pytest.raises(ValueError, match="timesteps"):
        figures.fields_figure({"a": f}, [1, 2])
    with pytest.raises(ValueError, match="captions"):
        figures.fields_figure({"a": f}, [1, 2, 3], captions={"c": ["x", "y", "z"]})
    with pytest.raises(TypeError, match="non-empty dict"):
        figures.fields_figure({}, [])


# --------------------------------------------------------------------------- agreement plot
def _agreement(**kw):
    ts = [900, 500, 100, 0]
    r2 = {"wiener": [0.1, 0.5, -3.0, 0.99], "optimal": [0.2, 0.3, 0.4, 0.5]}
    mse = {"wiener": [1e-1, 1e-3, 1e-4, 1e-6], "optimal": [0.2, 0.1, 0.05, 0.01]}
    return ad.Agreement("single_step", ts, kw.get("r2", r2), kw.get("mse", mse), 8, 0, 10, ["wiener", "optimal"])


def test_agreement_figure_axes():
    fig = figures.agreement_figure(_agreement(), size=(300, 200))
    r2_ax, mse_ax = fig.axes[:2]
    assert figures.to_array(fig).shape[1] == 600
    assert mse_ax.get_yscale() == "log"  # MSE spans five decades
    assert r2_ax.get_ylim()[0] == -1.0 and "clipped at -1" in r2_ax.get_title()
    assert r2_ax.xaxis_inverted()  # high noise on the left, as sampling runs
    flat = _agreement(mse={"wiener": [0.1, 0.2, 0.3, 0.4], "optimal": [0.1, 0.1, 0.1, 0.1]})
    assert figures.agreement_figure(flat).axes[1].get_yscale() == "linear"
    with pytest.raises(ValueError, match="size"):
        figures.agreement_figure(_agreement(), size=(50, 50))


# --------------------------------------------------------------------------- files
@pytest.mark.parametrize("suffix, magic", [(".png", b"\x89PNG\r\n\x1a\n"), (".pdf", b"%PDF-"), (".svg", b"<?xml")])
def test_save_by_suffix(tmp_path, suffix, magic):
    fig = figures.image_grid([torch.zeros(2, 3, 4, 4)], ["x"], scale=8)
    path = tmp_path / f"grid{suffix.upper() if suffix == '.pdf' else suffix}"
    assert figures.save(fig, path) is fig
    data = path.read_bytes()
    assert data.startswith(magic)
    if suffix == ".svg":
        assert b"<svg" in data[:1000]
    if suffix == ".png":
        with Image.open(path) as im:
            assert im.mode == "RGB" and im.size == figures.to_array(fig).shape[1::-1]


def test_builders_save_through_path(tmp_path):
    f = torch.randn(2, 1, 4, 4)
    figures.locality_figure(f, f > 0, [1, 0], path=tmp_path / "loc.svg")
    figures.image_grid([torch.zeros(1, 1, 4, 4)], path=str(tmp_path / "g.pdf"))
    _agreement().plot(tmp_path / "a.png")
    assert (tmp_path / "loc.svg").read_bytes().startswith(b"<?xml")
    assert (tmp_path / "g.pdf").read_bytes().startswith(b"%PDF")
    assert (tmp_path / "a.png").read_bytes().startswith(b"\x89PNG")


def test_save_rejects_unknown_suffix(tmp_path):
    fig = figures.image_grid([torch.zeros(1, 1, 4, 4)])
    for name in ("grid.jpg", "grid"):
        with pytest.raises(ValueError, match=r"\.png, \.pdf, \.svg"):
            figures.save(fig, tmp_path / name)
    assert not list(tmp_path.iterdir())


def test_no_matplotlib_at_import_and_no_pyplot():
    """`import analytic_diffusion` stays free of matplotlib; figures never touch pyplot
    (no global figure list to leak into) nor the user's backend."""
    src = str(Path(ad.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "MPLBACKEND": "svg"}
    code = (
        "import sys, torch, analytic_diffusion as ad\n"
        "assert 'matplotlib' not in sys.modules\n"
        "ad.figures.image_grid([torch.zeros(1, 1, 4, 4)])\n"
        "ad.Agreement('single_step', [1, 0], {'a': [0.5, 1.0]}, {'a': [0.1, 0.0]}, 1, 0).plot()\n"
        "import matplotlib\n"
        "assert 'matplotlib.pyplot' not in sys.modules and matplotlib.get_backend() == 'svg'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
