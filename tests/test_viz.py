"""Pillow-only figure helpers: conversions, grids, colour maps, locality figure."""
import numpy as np
import pytest
import torch

import analytic_diffusion as ad
from analytic_diffusion import viz


def test_to_uint8_round_trips_every_level():
    u = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    for dt in (torch.float32, torch.float64):
        x = ad.data.to_unit_range(u, dt)
        out = viz.to_uint8_images(x)
        assert out.dtype == np.uint8 and out.shape == (1, 16, 16, 1)
        np.testing.assert_array_equal(out[0, :, :, 0], u[0, 0].numpy())


def test_to_uint8_clips_and_layout():
    x = torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0]).reshape(1, 5, 1, 1).repeat(2, 1, 2, 3)[:, :3]
    out = viz.to_uint8_images(x)
    assert out.shape == (2, 2, 3, 3)  # HWC
    np.testing.assert_array_equal(out[0, 0, 0], [0, 0, 128])  # -3 clipped; 0 -> 127.5 -> 128 (half to even)
    one = viz.to_uint8_images(torch.ones(3, 4, 5))
    assert one.shape == (4, 5, 3) and (one == 255).all()
    with pytest.raises(ValueError):
        viz.to_uint8_images(torch.zeros(4, 4))


def test_grid_size_without_labels():
    rows = [torch.zeros(3, 3, 5, 7), torch.zeros(1, 3, 5, 7)]
    g = viz.image_grid(rows, scale=3, pad=2)
    assert g.mode == "RGB"
    assert g.size == (3 * (7 * 3 + 2) + 2, 2 * (5 * 3 + 2) + 2)
    a = np.asarray(g)
    assert (a[2 : 2 + 15, 2 : 2 + 21] == 128).all()  # image 0: 0.0 -> grey 128, upscaled 3x
    assert (a[2 + 17 : 2 + 17 + 15, 2 + 23 : 2 + 23 + 21] == 255).all()  # the short row ends early: background


def test_grid_labels_add_a_column_and_pixels_are_nearest_upscaled():
    x = torch.rand(2, 3, 4, 4) * 2 - 1
    plain = viz.image_grid([x], scale=5)
    lab = viz.image_grid([x], ["locality"], scale=5)
    assert lab.height == plain.height and lab.width > plain.width
    a = np.asarray(lab)
    lw = lab.width - plain.width
    block = a[2 : 2 + 20, lw + 2 : lw + 2 + 20].reshape(4, 5, 4, 5, 3)
    expect = viz.to_uint8_images(x)[0]
    assert (block == expect[:, None, :, None, :]).all()
    assert (a[:, :lw] < 128).any()  # the label was drawn in dark ink


def test_grid_grayscale_and_uint8():
    g = viz.image_grid([torch.full((2, 1, 3, 3), 200, dtype=torch.uint8), torch.zeros(2, 3, 3, 3)], ["gray", "rgb"], scale=2)
    a = np.asarray(g)
    assert g.mode == "RGB"
    lw = g.width - (2 * (6 + 2) + 2)
    assert (a[2 : 8, lw + 2 : lw + 8] == 200).all()


def test_grid_rejects_bad_input():
    with pytest.raises(ValueError, match="4x4"):
        viz.image_grid([torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 5, 5)])
    with pytest.raises(ValueError, match="labels"):
        viz.image_grid([torch.zeros(1, 3, 4, 4)], ["a", "b"])
    with pytest.raises(TypeError):
        viz.image_grid(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="channels"):
        viz.image_grid([torch.zeros(1, 2, 4, 4)])


def test_diverging_colormap_is_symmetric():
    vmax = 2.5
    v = torch.tensor([0.0, vmax, -vmax, 10.0, -10.0, 1.0, -1.0])
    c = viz.diverging_colormap(v, vmax).astype(int)
    assert c.shape == (7, 3)
    assert tuple(c[0]) == viz.WHITE
    assert tuple(c[1]) == viz.RED and tuple(c[3]) == viz.RED  # clipped above +vmax
    assert tuple(c[2]) == viz.BLUE and tuple(c[4]) == viz.BLUE
    assert c[1, 0] > c[1, 2] and c[2, 2] > c[2, 0]  # red is red, blue is blue
    # equal magnitudes move equally far from white towards their end colour
    white = np.array(viz.WHITE)
    frac_pos = (white - c[5]) / (white - np.array(viz.RED))
    frac_neg = (white - c[6]) / (white - np.array(viz.BLUE))
    np.testing.assert_allclose(frac_pos, 1.0 / vmax, atol=0.02)
    np.testing.assert_allclose(frac_neg, 1.0 / vmax, atol=0.02)


def test_diverging_colormap_default_scale_and_degenerate():
    c = viz.diverging_colormap(np.array([[-1.0, 4.0]]))  # vmax = max |v| = 4
    assert c.shape == (1, 2, 3) and tuple(c[0, 1]) == viz.RED and tuple(c[0, 0]) != viz.BLUE
    assert (viz.diverging_colormap(torch.zeros(3, 3)) == 255).all()
    assert (viz.diverging_colormap(torch.tensor([float("nan")]), 1.0) == 255).all()


def test_colorbar_ends():
    bar = viz.colorbar(0.5, width=101, height=6)
    a = np.asarray(bar).astype(int)
    assert bar.width == 101 and bar.height > 6  # gradient plus its range labels
    assert tuple(a[0, 0]) == viz.BLUE and tuple(a[0, -1]) == viz.RED and tuple(a[0, 50]) == viz.WHITE


@pytest.mark.parametrize("C", [1, 3])
def test_locality_figure(C):
    T, H, W = 3, 6, 5
    fields = torch.randn(T, C, H, W, dtype=torch.float64)
    windows = torch.rand(T, C, H, W) > 0.5
    fig = viz.locality_figure(fields, windows, [666, 333, 0], [0.9, 0.5, 0.1], scale=4, pixel=(3, 2))
    assert fig.mode == "RGB"
    assert fig.width > T * W * 4 and fig.height > 2 * H * 4
    no_density = viz.locality_figure(fields, windows, [666, 333, 0], scale=4)
    assert no_density.width == fig.width and no_density.height < fig.height  # one text line fewer


def test_locality_figure_rejects_mismatches():
    f = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match="windows"):
        viz.locality_figure(f, torch.zeros(2, 1, 4, 5, dtype=torch.bool), [1, 0])
    with pytest.raises(ValueError, match="timesteps"):
        viz.locality_figure(f, torch.zeros(2, 1, 4, 4, dtype=torch.bool), [0])
    with pytest.raises(ValueError, match="pixel"):
        viz.locality_figure(f, torch.zeros(2, 1, 4, 4, dtype=torch.bool), [1, 0], pixel=(4, 0))
