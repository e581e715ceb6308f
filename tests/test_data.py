"""Tests for analytic_diffusion.data: built-in datasets, loaders, conversions."""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from analytic_diffusion import data as D


def _neighbour_corr(x: torch.Tensor, dim: int) -> float:
    x = x.double()
    a = x.narrow(dim, 0, x.shape[dim] - 1).flatten()
    b = x.narrow(dim, 1, x.shape[dim] - 1).flatten()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def _cat(batches):
    return torch.cat(list(batches))


# --------------------------------------------------------------------------- #
# natural_crops
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def crops32():
    return D.natural_crops(400, size=32, seed=0)


def test_crops_shape_dtype(crops32):
    assert crops32.shape == (400, 3, 32, 32)
    assert crops32.dtype == torch.uint8
    assert crops32.is_contiguous()
    small = D.natural_crops(3, size=2, seed=5)
    assert small.shape == (3, 3, 2, 2)


def test_crops_deterministic(crops32):
    again = D.natural_crops(400, size=32, seed=0)
    assert torch.equal(crops32, again)
    other = D.natural_crops(400, size=32, seed=1)
    assert not torch.equal(crops32, other)
    # different seeds give different crops almost everywhere, not a shifted copy
    same = (crops32.flatten(1) == other.flatten(1)).all(1)
    assert int(same.sum()) <= 2
    # each crop has its own random numbers: fewer crops are a prefix
    assert torch.equal(D.natural_crops(50, size=32, seed=0), crops32[:50])


def test_crops_are_fresh_tensors():
    a = D.natural_crops(4, size=8, seed=3)
    a.zero_()
    b = D.natural_crops(4, size=8, seed=3)
    assert int(b.sum()) > 0


def test_crops_natural_statistics(crops32):
    x = crops32.double()
    per_crop_std = x.flatten(1).std(1)
    assert float(per_crop_std.min()) >= 2.0  # flat crops are redrawn
    assert float(x.std()) > 30.0  # spread over the 0..255 range
    assert 40.0 < float(x.mean()) < 215.0
    # neighbouring pixels of natural images are strongly correlated ...
    assert _neighbour_corr(x, 3) > 0.8
    assert _neighbour_corr(x, 2) > 0.8
    # ... but not identical, and colour (channels differ)
    assert float((x[..., 1:] - x[..., :-1]).abs().mean()) > 1.0
    assert float((x[:, 0] - x[:, 2]).abs().mean()) > 5.0
    # many distinct crops
    assert len({bytes(c.numpy().tobytes()) for c in crops32}) == 400


def test_crops_max_size():
    x = D.natural_crops(2, size=300, seed=0)
    assert x.shape == (2, 3, 300, 300)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(n=0), ValueError, "n must"),
        (dict(n=-3), ValueError, "n must"),
        (dict(n=2.0), TypeError, "n must"),
        (dict(n=True), TypeError, "n must"),
        (dict(n=2, size=1), ValueError, "size must"),
        (dict(n=2, size=301), ValueError, "size must be <= 300"),
        (dict(n=2, size="32"), TypeError, "size must"),
        (dict(n=2, seed=-1), ValueError, "seed must"),
    ],
)
def test_crops_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        D.natural_crops(**kwargs)


# --------------------------------------------------------------------------- #
# faces
# --------------------------------------------------------------------------- #
def test_faces():
    import skimage.data

    f = D.faces()
    assert f.shape == (100, 1, 25, 25)
    assert f.dtype == torch.uint8
    lfw = skimage.data.lfw_subset()
    assert lfw.shape == (200, 25, 25)
    expect = torch.from_numpy(np.rint(lfw[:100] * 255).astype(np.uint8))[:, None]
    assert torch.equal(f, expect)
    nonfaces = torch.from_numpy(np.rint(lfw[100:] * 255).astype(np.uint8))[:, None]
    # the non-faces are background patches: black padding, darker, flatter
    assert not any(torch.equal(f[i], nonfaces[j]) for i in range(100) for j in range(100))
    assert float((nonfaces == 0).double().mean()) > 0.05 > float((f == 0).double().mean())
    assert float(f.double().mean()) > float(nonfaces.double().mean()) + 20
    assert 0 <= int(f.min()) and int(f.max()) == 255


def test_faces_fresh():
    f = D.faces()
    f.zero_()
    assert int(D.faces().sum()) > 0


# --------------------------------------------------------------------------- #
# to_unit_range
# --------------------------------------------------------------------------- #
def test_to_unit_range_uint8_exact():
    u = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    before = u.clone()
    for dtype in (torch.float32, torch.float64, torch.float16):
        y = D.to_unit_range(u, dtype=dtype)
        assert y.dtype == dtype and y.shape == u.shape
        # correctly rounded u / 127.5 - 1: (2u - 255) / 255 in float64 has a single
        # rounding, and none of these values sits near a float32/float16 midpoint
        ref = ((2 * u.double() - 255) / 255).to(dtype)
        assert torch.equal(y, ref)
        # the naive formula is at most one rounding step away
        naive = u.to(dtype) / 127.5 - 1
        assert torch.allclose(naive.double(), ref.double(), rtol=0, atol=float(torch.finfo(dtype).eps))
    assert float(D.to_unit_range(u).min()) == -1.0 and float(D.to_unit_range(u).max()) == 1.0
    assert torch.equal(u, before)
    assert torch.equal(D.to_unit_range(u.numpy()), D.to_unit_range(u))


def test_to_unit_range_float_passthrough():
    x = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(1, 3, 2, 2)
    before = x.clone()
    assert D.to_unit_range(x, dtype=torch.float64) is x
    y = D.to_unit_range(x)
    assert y.dtype == torch.float32
    assert torch.allclose(y.double(), x, atol=1e-7)
    y.fill_(5)
    assert torch.equal(x, before)


@pytest.mark.parametrize(
    "x, kwargs, match",
    [
        (torch.zeros(2, dtype=torch.bool), {}, "x has dtype"),
        (torch.zeros(2, dtype=torch.int64), {}, "x has dtype"),
        (np.zeros(2, dtype=np.int32), {}, "x has dtype"),
        ([1, 2], {}, "x must be"),
        (torch.zeros(2, dtype=torch.uint8), {"dtype": torch.int32}, "dtype must"),
        (torch.zeros(2, dtype=torch.uint8), {"dtype": "float32"}, "dtype must"),
    ],
)
def test_to_unit_range_errors(x, kwargs, match):
    with pytest.raises(TypeError, match=match):
        D.to_unit_range(x, **kwargs)


# --------------------------------------------------------------------------- #
# loaders: in-memory sources
# --------------------------------------------------------------------------- #
def _u8(n=10, c=3, h=5, w=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)


def test_load_tensor_as_is():
    x = _u8()
    before = x.clone()
    y = D.load_images(x)
    assert torch.equal(y, x) and y.dtype == torch.uint8
    flat = x.flatten(1).double() / 127.5 - 1
    assert torch.equal(D.load_images(flat), flat)
    gray = x[:, 0]
    assert torch.equal(D.load_images(gray), gray[:, None])
    assert torch.equal(D.load_images(x, limit=4), x[:4])
    assert torch.equal(D.load_images(x, limit=100), x)
    assert torch.equal(x, before)


@pytest.mark.parametrize("dtype", [np.uint8, np.float16, np.float32, np.float64])
def test_load_numpy_layouts(dtype):
    x = _u8(n=7, c=3, h=5, w=6).numpy()
    x = x.astype(dtype) / 255 if dtype != np.uint8 else x
    x = x.astype(dtype)
    nchw = D.load_images(x)
    assert nchw.dtype == torch.from_numpy(x).dtype
    assert np.array_equal(nchw.numpy(), x)
    nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    before = nhwc.copy()
    y = D.load_images(nhwc)
    assert y.shape == (7, 3, 5, 6)
    assert np.array_equal(y.numpy(), x)
    assert np.array_equal(nhwc, before)
    gray = D.load_images(x[:, 0])
    assert gray.shape == (7, 1, 5, 6) and np.array_equal(gray[:, 0].numpy(), x[:, 0])
    assert D.load_images(x.reshape(7, -1)).shape == (7, 90)


def test_numpy_layout_heuristic():
    # second dim in {1,3,4} wins: [N, 3, 5, 3] is channels-first
    a = np.zeros((2, 3, 5, 3), np.uint8)
    assert D.load_images(a).shape == (2, 3, 5, 3)
    assert D.image_shape(a) == (3, 5, 3)
    b = np.zeros((2, 8, 8, 1), np.uint8)
    assert D.load_images(b).shape == (2, 1, 8, 8)
    assert D.image_shape(b) == (1, 8, 8)


def test_load_numpy_readonly_and_big_endian():
    x = _u8(n=4).numpy()
    ro = x.copy()
    ro.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = D.load_images(ro)
    assert np.array_equal(y.numpy(), x)
    be = (x.astype(np.float64) / 127.5 - 1).astype(">f8")
    z = D.load_images(be)
    assert z.dtype == torch.float64
    assert np.array_equal(z.numpy(), x / 127.5 - 1)


# --------------------------------------------------------------------------- #
# loaders: files
# --------------------------------------------------------------------------- #
def test_npy(tmp_path):
    x = _u8(n=11).numpy()
    p = tmp_path / "imgs.npy"
    np.save(p, x.transpose(0, 2, 3, 1))  # channels-last on disk
    y = D.load_images(p)
    assert y.shape == (11, 3, 5, 6) and np.array_equal(y.numpy(), x)
    assert torch.equal(D.load_images(str(p), limit=3), y[:3])
    bs = list(D.iter_batches(p, batch_size=4))
    assert [b.shape[0] for b in bs] == [4, 4, 3]
    assert torch.equal(torch.cat(bs), y)
    assert D.image_shape(p) == (3, 5, 6)


def test_npy_object_refused(tmp_path):
    p = tmp_path / "obj.npy"
    np.save(p, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickle"):
        D.load_images(p)
    with pytest.raises(ValueError, match="pickle"):
        D.iter_batches(p)
    garbage = tmp_path / "garbage.npy"
    garbage.write_bytes(b"not an array at all")
    with pytest.raises(ValueError, match="refused"):
        D.load_images(garbage)


def test_npz(tmp_path):
    x = _u8(n=6).numpy()
    p1 = tmp_path / "one.npz"
    np.savez(p1, whatever=x)
    assert np.array_equal(D.load_images(p1).numpy(), x)
    p2 = tmp_path / "named.npz"
    np.savez_compressed(p2, labels=np.arange(6), images=x)
    assert np.array_equal(D.load_images(p2).numpy(), x)
    assert torch.equal(_cat(D.iter_batches(p2, batch_size=4)), D.load_images(p2))
    p3 = tmp_path / "ambiguous.npz"
    np.savez(p3, a=x, b=x)
    with pytest.raises(ValueError, match=r"several arrays.*'images'"):
        D.load_images(p3)
    p4 = tmp_path / "obj.npz"
    np.savez(p4, images=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="pickle"):
        D.load_images(p4)
    p5 = tmp_path / "empty.npz"
    np.savez(p5)
    with pytest.raises(ValueError, match="no arrays"):
        D.load_images(p5)


def _write_pngs(folder, arrays, names, mode=None):
    folder.mkdir(parents=True, exist_ok=True)
    for a, name in zip(arrays, names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a, mode=mode).save(path) if mode else Image.fromarray(a).save(path)


def test_folder_rgb(tmp_path):
    x = _u8(n=5, h=7, w=9).numpy().transpose(0, 2, 3, 1)  # HWC for Pillow
    root = tmp_path / "imgs"
    names = ["b/03.png", "a/02.bmp", "00.png", "a/01.webp", "b/04.PNG"]
    root.mkdir()
    for a, name in zip(x, names):
        path = root / name
        path.parent.mkdir(exist_ok=True)
        kw = {"lossless": True} if name.endswith(".webp") else {}
        Image.fromarray(a).save(path, **kw)
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"junk that must be skipped")
    y = D.load_images(root, progress=True)
    # sorted by relative path: 00.png, a/01.webp, a/02.bmp, b/03.png, b/04.PNG
    order = [2, 3, 1, 0, 4]
    assert y.shape == (5, 3, 7, 9) and y.dtype == torch.uint8
    assert np.array_equal(y.numpy(), x[order].transpose(0, 3, 1, 2))
    assert D.image_shape(str(root)) == (3, 7, 9)
    bs = list(D.iter_batches(root, batch_size=2, progress=True, desc="pngs"))
    assert [b.shape[0] for b in bs] == [2, 2, 1]
    assert torch.equal(torch.cat(bs), y)
    assert torch.equal(D.load_images(root, limit=2), y[:2])


def test_folder_gray_and_mixed_modes(tmp_path):
    g = _u8(n=3, c=1, h=4, w=4).numpy()[:, 0]
    gray = tmp_path / "gray"
    _write_pngs(gray, g, [f"{i}.png" for i in range(3)])
    y = D.load_images(gray)
    assert y.shape == (3, 1, 4, 4) and np.array_equal(y[:, 0].numpy(), g)
    # one RGB file turns the whole folder RGB; gray files are replicated
    Image.fromarray(np.full((4, 4, 3), 7, np.uint8)).save(gray / "9.png")
    z = D.load_images(gray)
    assert z.shape == (4, 3, 4, 4)
    assert all(np.array_equal(z[:3, c].numpy(), g) for c in range(3))
    assert int(z[3].min()) == int(z[3].max()) == 7


def test_folder_mixed_size_error(tmp_path):
    folder = tmp_path / "mixed"
    _write_pngs(folder, [np.zeros((4, 5, 3), np.uint8)], ["a.png"])
    _write_pngs(folder, [np.zeros((6, 5, 3), np.uint8)], ["b.png"])
    with pytest.raises(ValueError, match=r"a\.png.*5x4.*b\.png.*5x6"):
        D.load_images(folder)
    with pytest.raises(ValueError, match="one size"):
        D.iter_batches(folder)


def test_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("hi")
    with pytest.raises(ValueError, match="no images"):
        D.load_images(empty)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"definitely not a png")
    with pytest.raises(ValueError, match=r"cannot read image .*x\.png"):
        D.load_images(bad)


def test_path_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.load_images(missing)
    with pytest.raises(ValueError, match="does not exist"):
        D.iter_batches(str(missing))
    txt = tmp_path / "a.txt"
    txt.write_text("x")
    with pytest.raises(ValueError, match="neither a folder nor a .npy/.npz"):
        D.load_images(txt)


# --------------------------------------------------------------------------- #
# loaders: Dataset / DataLoader
# --------------------------------------------------------------------------- #
class _Items(Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class _Stream(IterableDataset):
    def __init__(self, items):
        self.items = items

    def __iter__(self):
        return iter(self.items)


def test_dataset_tuple_items():
    x = _u8(n=9)
    ds = _Items([(x[i], i) for i in range(9)])
    y = D.load_images(ds)
    assert torch.equal(y, x)
    bs = list(D.iter_batches(ds, batch_size=4))
    assert [b.shape[0] for b in bs] == [4, 4, 1]
    assert torch.equal(torch.cat(bs), x)
    assert torch.equal(D.load_images(ds, limit=5), x[:5])
    assert D.image_shape(ds) == (3, 5, 6)


def test_dataset_pil_numpy_dict_and_list_items():
    x = _u8(n=4, h=6, w=7)
    hwc = x.permute(0, 2, 3, 1).numpy()
    pil = _Items([[Image.fromarray(a), "label"] for a in hwc])
    assert torch.equal(D.load_images(pil), x)
    # palette images are converted to RGB
    pal = _Items([Image.fromarray(a).convert("P") for a in hwc])
    assert D.load_images(pal).shape == (4, 3, 6, 7)
    gray = _Items([Image.fromarray(a[..., 0]) for a in hwc])
    assert torch.equal(D.load_images(gray), x[:, :1])
    assert torch.equal(D.load_images(_Items([{"image": a, "y": 0} for a in hwc])), x)
    assert torch.equal(D.load_images([a for a in hwc]), x)  # a plain list works too
    assert torch.equal(D.load_images([t[0] for t in x]), x[:, :1])  # [H, W] tensors
    assert torch.equal(D.load_images(_Stream(list(x))), x)
    assert torch.equal(_cat(D.iter_batches(_Stream(list(x)), batch_size=3)), x)
    assert torch.equal(D.load_images(_Stream(list(x)), limit=2), x[:2])


def test_dataloader_rechunked():
    x = _u8(n=10)
    labels = torch.arange(10)
    dl = DataLoader(TensorDataset(x, labels), batch_size=3)
    y = D.load_images(dl, progress=True)
    assert torch.equal(y, x)
    bs = list(D.iter_batches(dl, batch_size=4))
    assert [b.shape[0] for b in bs] == [4, 4, 2]
    assert torch.equal(torch.cat(bs), x)
    assert [b.shape[0] for b in D.iter_batches(dl, batch_size=3)] == [3, 3, 3, 1]
    assert torch.equal(D.load_images(dl, limit=5), x[:5])
    # plain tensor batches, and a custom collate giving a list of PIL images
    assert torch.equal(D.load_images(DataLoader(x, batch_size=4)), x)
    pils = [Image.fromarray(a) for a in x.permute(0, 2, 3, 1).numpy()]
    dl_pil = DataLoader(_Items(pils), batch_size=4, collate_fn=lambda items: items)
    assert torch.equal(D.load_images(dl_pil), x)


@pytest.mark.parametrize("bs", [1, 3, 64])
def test_iter_batches_equals_load_images_everywhere(tmp_path, bs):
    x = _u8(n=7)
    np.save(tmp_path / "x.npy", x.numpy())
    np.savez(tmp_path / "x.npz", images=x.numpy())
    _write_pngs(tmp_path / "png", x.permute(0, 2, 3, 1).numpy(), [f"{i}.png" for i in range(7)])
    sources = [
        x,
        x.numpy(),
        tmp_path / "x.npy",
        tmp_path / "x.npz",
        tmp_path / "png",
        _Items(list(x)),
        DataLoader(TensorDataset(x), batch_size=2),
    ]
    for src in sources:
        whole = D.load_images(src)
        assert torch.equal(whole, x), type(src)
        bs_list = list(D.iter_batches(src, batch_size=bs))
        assert all(b.shape[0] == bs for b in bs_list[:-1])
        assert torch.equal(torch.cat(bs_list), whole), type(src)
        for start in (0, 3, 7):  # resuming: the same images from ``start`` on, in order
            tail = list(D.iter_batches(src, batch_size=bs, start=start))
            assert torch.equal(torch.cat(tail) if tail else x[:0], x[start:]), (type(src), start)
        with pytest.raises(ValueError, match="fewer than start=8"):
            list(D.iter_batches(src, batch_size=bs, start=8))


# --------------------------------------------------------------------------- #
# loaders: validation
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "source, exc, match",
    [
        (torch.zeros(2, 3, 4, 4, dtype=torch.bool), TypeError, "dtype torch.bool"),
        (torch.zeros(2, 3, 4, 4, dtype=torch.int64), TypeError, "dtype torch.int64"),
        (np.zeros((2, 3, 4, 4), np.int32), TypeError, "dtype int32"),
        (np.array([{"a": 1}, None], dtype=object), TypeError, "dtype object"),
        (torch.zeros(5, dtype=torch.uint8), ValueError, "2-D .* got shape \\[5\\]"),
        (torch.zeros(1, 2, 3, 4, 5, dtype=torch.uint8), ValueError, "got shape"),
        (np.zeros((), np.uint8), ValueError, "got shape \\[\\]"),
        (torch.zeros(0, 3, 4, 4), ValueError, "empty"),
        (np.zeros((0, 4, 4, 3), np.uint8), ValueError, "empty"),
        (torch.zeros(3, 0), ValueError, "empty"),
        (_Items([]), ValueError, "empty"),
        ([], ValueError, "empty"),
        (123, TypeError, "source must be"),
        ({"images": torch.zeros(2, 3)}, TypeError, "source must be"),
    ],
)
def test_source_errors(source, exc, match):
    with pytest.raises(exc, match=match):
        D.load_images(source)
    with pytest.raises(exc, match=match):
        list(D.iter_batches(source))


def test_argument_errors():
    x = _u8(n=2)
    with pytest.raises(ValueError, match="batch_size must"):
        D.iter_batches(x, batch_size=0)
    with pytest.raises(TypeError, match="batch_size must"):
        D.iter_batches(x, batch_size=2.5)
    with pytest.raises(ValueError, match="limit must"):
        D.load_images(x, limit=0)
    with pytest.raises(TypeError, match="limit must"):
        D.iter_batches(x, limit="3")


def test_nan_inf_rejected_per_batch():
    x = torch.zeros(6, 1, 2, 2)
    x[4, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        D.load_images(x)
    it = D.iter_batches(x, batch_size=3)
    assert next(it).shape == (3, 1, 2, 2)  # clean first batch goes through
    with pytest.raises(ValueError, match=r"images 3\.\.5.*NaN/Inf"):
        next(it)
    y = np.zeros((2, 4), np.float32)
    y[1, 2] = np.inf
    with pytest.raises(ValueError, match="NaN/Inf"):
        D.load_images(y)
    ds = _Items([torch.zeros(1, 2, 2), torch.full((1, 2, 2), float("-inf"))])
    with pytest.raises(ValueError, match="NaN/Inf"):
        D.load_images(ds)


def test_mixed_shapes_and_dtypes():
    # within a batch of Dataset items
    ds = _Items([torch.zeros(3, 4, 4), torch.zeros(3, 5, 4)])
    with pytest.raises(ValueError, match=r"item 0 is \[3, 4, 4\] but item 1 is \[3, 5, 4\]"):
        D.load_images(ds)
    # across batches
    with pytest.raises(ValueError, match=r"mixed image shapes.*\[3, 4, 4\].*\[3, 5, 4\]"):
        list(D.iter_batches(ds, batch_size=1))
    dl = DataLoader(ds, batch_size=1)
    with pytest.raises(ValueError, match="mixed image shapes"):
        D.load_images(dl)
    mixed = _Items([torch.zeros(1, 2, 2, dtype=torch.uint8), torch.zeros(1, 2, 2)])
    with pytest.raises(TypeError, match="differ in dtype"):
        D.load_images(mixed)
    with pytest.raises(TypeError, match="mixed dtypes"):
        list(D.iter_batches(mixed, batch_size=1))


def test_bad_items():
    with pytest.raises(TypeError, match=r"item 0 is a str"):
        D.load_images(_Items(["hello"]))
    with pytest.raises(ValueError, match="without any of the keys"):
        D.load_images(_Items([{"label": 1}]))
    with pytest.raises(TypeError, match="item 0 has dtype torch.int64"):
        D.load_images(_Items([torch.zeros(1, 2, 2, dtype=torch.int64)]))
    with pytest.raises(ValueError, match="item 0 must be"):
        D.load_images(_Items([torch.zeros(1, 1, 2, 2)]))
    with pytest.raises(ValueError, match="empty tuple"):
        D.load_images(_Items([()]))


def test_empty_dataloader():
    dl = DataLoader(TensorDataset(torch.zeros(0, 1, 2, 2)), batch_size=2)
    with pytest.raises(ValueError, match="no images"):
        D.load_images(dl)


def test_inputs_never_modified(tmp_path):
    x = torch.rand(5, 3, 4, 4, dtype=torch.float64) * 2 - 1
    before = x.clone()
    for b in D.iter_batches(x, batch_size=2):
        D.to_unit_range(b).mul_(3)
    D.to_unit_range(D.load_images(x)).add_(1)
    assert torch.equal(x, before)
    a = (torch.rand(2, 6, 5, 3, dtype=torch.float64) * 2 - 1).numpy()  # channels-last
    a_before = a.copy()
    y = D.load_images(a)
    assert y.shape == (2, 3, 6, 5)
    y.add_(1)  # the transpose made a copy
    assert np.array_equal(a, a_before)


def test_to_uint8_round_trips_every_level():
    u = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    for dt in (torch.float16, torch.float32, torch.float64):
        out = D.to_uint8(D.to_unit_range(u, dt))
        assert out.dtype == torch.uint8 and out.shape == u.shape
        assert torch.equal(out, u)
    assert D.to_uint8(u) is u


def test_to_uint8_clips_and_refuses_other_dtypes():
    x = torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0, float("nan")])
    assert D.to_uint8(x).tolist() == [0, 0, 128, 255, 255, 0]  # 0 -> 127.5 -> 128 (half to even)
    assert D.to_uint8(x.numpy()).tolist() == [0, 0, 128, 255, 255, 0]
    with pytest.raises(TypeError, match="dtype"):
        D.to_uint8(torch.zeros(2, dtype=torch.int32))
    with pytest.raises(TypeError, match="numpy array"):
        D.to_uint8([0.0])

