"""Dataset moments (docs/algorithms.md §2): exact uint8 sums, float accuracy, invariances, merge, resume, files, guards."""
import numpy as np
import pytest
import torch

import analytic_diffusion as ad
from analytic_diffusion.ops.patch_moments import reference as patch_reference


def numpy_int64_moments(u):
    """Exact integer sums in numpy int64, then the unbiased covariance in [-1, 1] units."""
    a = u.reshape(u.shape[0], -1).numpy().astype(np.int64)
    N = a.shape[0]
    s1 = a.sum(0)
    s2 = a.T @ a
    cov_u = (N * s2 - np.outer(s1, s1)) / (N * (N - 1))
    return s1, s2, s1 / N / 127.5 - 1, cov_u / 127.5**2


@pytest.fixture(scope="module")
def u8():
    return torch.randint(0, 256, (157, 3, 4, 5), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def test_uint8_sums_are_exact(u8):
    acc = ad.MomentAccumulator((3, 4, 5)).update(u8)
    s1, s2, mean, cov = numpy_int64_moments(u8)
    assert np.array_equal(acc._s1.numpy(), s1) and np.array_equal(np.tril(acc._s2.numpy()), np.tril(s2))
    m = acc.result()
    assert m.count == 157 and m.image_shape == (3, 4, 5)
    assert np.abs(m.mean.numpy() - mean).max() < 1e-15
    assert np.abs(m.cov.numpy() - cov).max() < 1e-15


def test_uint8_result_independent_of_batch_split_and_order(u8):
    base = ad.MomentAccumulator(60).update(u8).result()
    perm = torch.randperm(157, generator=torch.Generator().manual_seed(1))
    acc = ad.MomentAccumulator(60)
    for i in range(0, 157, 11):
        acc.update(u8[perm][i : i + 11].reshape(-1, 60))
    other = acc.result()
    assert torch.equal(base.mean, other.mean) and torch.equal(base.cov, other.cov)  # bitwise


def test_uint8_large_counts_do_not_overflow():
    # 2^17 all-255 images: sum u u^T = 2^17 * 65025 > 2^31, so int32 accumulation would wrap
    u = torch.full((1 << 17, 2), 255, dtype=torch.uint8)
    u[::2, 1] = 0
    acc = ad.MomentAccumulator(2).update(u)
    assert int(acc._s2[0, 0]) == (1 << 17) * 65025
    m = acc.result()
    assert m.cov[0, 0].item() == 0.0
    assert abs(m.cov[1, 1].item() - (4.0 * 0.25 * (1 << 17) / ((1 << 17) - 1))) < 1e-12


def test_float_path_is_accurate_despite_large_offset():
    g = torch.Generator().manual_seed(2)
    x = 0.9 + 1e-4 * torch.randn(5000, 8, generator=g, dtype=torch.float64)
    m = ad.MomentAccumulator(8)
    for i in range(0, 5000, 512):
        m.update(x[i : i + 512].float())
    ref = torch.cov(x.float().double().T)
    res = m.result()
    assert ((res.cov - ref).abs().max() / ref.abs().max()).item() < 1e-12
    assert (res.mean - x.float().double().mean(0)).abs().max().item() < 1e-15


def test_merge_equals_single_pass(u8):
    one = ad.MomentAccumulator(60).update(u8).result()
    a = ad.MomentAccumulator(60).update(u8[:50])
    b = ad.MomentAccumulator(60).update(u8[50:])
    b_before = b.state_dict()
    merged = a.merge(b).result()
    assert torch.equal(merged.cov, one.cov) and merged.count == 157
    assert torch.equal(b.state_dict()["s2"], b_before["s2"])  # other is not modified
    # float states with different shifts merge via Chan's formula
    f = u8.double().reshape(157, -1) / 127.5 - 1
    fa = ad.MomentAccumulator(60).update(f[:80])
    fb = ad.MomentAccumulator(60).update(f[80:])
    mf = fa.merge(fb).result()
    assert (mf.cov - one.cov).abs().max().item() < 1e-14
    # mixed: exact uint8 state merged with a float state
    mixed = ad.MomentAccumulator(60).update(u8[:100]).merge(ad.MomentAccumulator(60).update(f[100:])).result()
    assert (mixed.cov - one.cov).abs().max().item() < 1e-14
    assert (mixed.mean - one.mean).abs().max().item() < 1e-15


def test_resume_from_state_dict_is_bit_identical(u8, tmp_path):
    from safetensors.torch import load_file, save_file

    full = ad.MomentAccumulator((3, 4, 5)).update(u8).result()
    acc = ad.MomentAccumulator((3, 4, 5)).update(u8[:70])
    save_file(acc.state_dict(), str(tmp_path / "ckpt.safetensors"))
    resumed = ad.MomentAccumulator((3, 4, 5)).load_state_dict(load_file(str(tmp_path / "ckpt.safetensors")))
    res = resumed.update(u8[70:]).result()
    assert torch.equal(res.cov, full.cov) and torch.equal(res.mean, full.mean)


def test_estimate_moments_matches_accumulator(u8):
    m = ad.estimate_moments(u8, batch_size=32)
    ref = ad.MomentAccumulator((3, 4, 5)).update(u8).result()
    assert torch.equal(m.cov, ref.cov) and m.image_shape == (3, 4, 5)


def test_save_load_roundtrip_and_shape_check(u8, tmp_path):
    m = ad.estimate_moments(u8)
    p = tmp_path / "stats.safetensors"
    m.save(p)
    back = ad.Moments.load(p)
    assert torch.equal(back.cov, m.cov) and back.count == m.count and back.image_shape == (3, 4, 5)
    back.check_compatible((3, 4, 5))
    with pytest.raises(ValueError, match=r"computed for images of shape \(3, 4, 5\)"):
        back.check_compatible((3, 5, 4))
    with pytest.raises(ValueError, match="60 values"):
        back.check_compatible((3, 8, 8))
    with pytest.raises(ValueError, match="but the training set has shape"):
        ad.LocalityDenoiser(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), moments=back)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        m.save(tmp_path / "no" / "such" / "stats.safetensors")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["stats.safetensors"]  # no temporary left behind


def test_load_rejects_foreign_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(3)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match="not an analytic-diffusion moments file"):
        ad.Moments.load(tmp_path / "w.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(ValueError, match="could not read"):
        ad.Moments.load(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError):
        ad.Moments.load(tmp_path / "missing.safetensors")


def _patch_moments_by_loops(x, k):
    """docs/algorithms.md §2.7's patch definition, literally: every window position of every image."""
    B, C, H, W = x.shape
    rows = [x[b, :, i : i + k, j : j + k].reshape(-1) for b in range(B) for i in range(H - k + 1) for j in range(W - k + 1)]
    P = torch.stack(rows).double()
    P = P / 127.5 - 1 if x.dtype == torch.uint8 else P
    return P.mean(0), torch.cov(P.T), P.shape[0]


@pytest.mark.parametrize("k", [1, 3, 5])
def test_patch_moments_match_definition(k):
    x = torch.randint(0, 256, (6, 2, 7, 9), generator=torch.Generator().manual_seed(k), dtype=torch.uint8)
    acc = ad.PatchMomentAccumulator(2, k)
    m = acc.update(x[:4]).update(x[4:]).result()
    mean, cov, count = _patch_moments_by_loops(x, k)
    assert m.kind == "patch" and m.image_shape == (2, k, k) and m.count == count
    assert (m.mean - mean).abs().max().item() < 1e-14
    assert (m.cov - cov).abs().max().item() < 1e-14
    m2 = ad.estimate_patch_moments(x.double() / 127.5 - 1, k, batch_size=4)
    assert (m2.cov - cov).abs().max().item() < 1e-13


def test_guards():
    with pytest.raises(MemoryError, match="patch moments"):
        ad.MomentAccumulator(4_000_000).update(torch.zeros(1, 4_000_000, dtype=torch.uint8))
    acc = ad.MomentAccumulator((3, 4, 5))
    with pytest.raises(ValueError, match="NaN/Inf"):
        acc.update(torch.full((2, 60), float("inf")))
    with pytest.raises(ValueError, match="mixed image shapes"):
        acc.update(torch.zeros(2, 3, 5, 4, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8 or float"):
        acc.update(torch.zeros(2, 60, dtype=torch.int32))
    with pytest.raises(ValueError, match="at least 2 images"):
        acc.result()
    with pytest.raises(ValueError, match="empty"):
        ad.estimate_moments(torch.zeros(0, 3, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="patch_size must be a positive odd"):
        ad.PatchMomentAccumulator(3, 4)
    with pytest.raises(ValueError, match="smaller than the"):
        ad.PatchMomentAccumulator(1, 5).update(torch.zeros(1, 1, 4, 8))


def test_patch_moments_float_merge_and_mixed():
    g = torch.Generator().manual_seed(9)
    u = torch.randint(0, 256, (5, 3, 9, 8), generator=g, dtype=torch.uint8)
    mean, cov, count = _patch_moments_by_loops(u, 3)
    f = (u.double() - 127.5) / 127.5
    a = ad.PatchMomentAccumulator(3, 3).update(f[:2])
    b = ad.PatchMomentAccumulator(3, 3).update(u[2:])
    m = a.merge(b).result()
    assert m.count == count
    assert (m.cov - cov).abs().max().item() < 1e-14 and (m.mean - mean).abs().max().item() < 1e-15
    # after a merge the shift is no longer per-channel constant; later updates fold the difference in
    m2 = a.update(f[:1]).result()
    ref_mean, ref_cov, _ = _patch_moments_by_loops(torch.cat([u, u[:1]]), 3)
    assert (m2.cov - ref_cov).abs().max().item() < 1e-14


@pytest.mark.parametrize("k", [7, 9])
def test_patch_moments_large_windows_match_unfold(k, monkeypatch):
    monkeypatch.setattr(patch_reference, "_PATCH_GEMM_BUDGET", 2000)  # several row blocks per lag
    u = torch.randint(0, 256, (3, 2, 12, 11), generator=torch.Generator().manual_seed(k), dtype=torch.uint8)
    P = u.unfold(2, k, 1).unfold(3, k, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 2 * k * k)
    ref = ad.MomentAccumulator(2 * k * k).update(P).result()
    m = ad.estimate_patch_moments(u, k, batch_size=2)
    assert torch.equal(m.cov, ref.cov) and torch.equal(m.mean, ref.mean)  # exact integer sums both ways


class _Flaky(torch.utils.data.Dataset):
    """A dataset whose reads fail from index ``fail_at`` on: an interrupted run."""

    def __init__(self, data, fail_at=None):
        self.data, self.fail_at = data, fail_at

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        if self.fail_at is not None and i >= self.fail_at:
            raise RuntimeError("disk went away")
        return self.data[i]


def test_interrupted_run_resumes_bit_identical(u8, tmp_path):
    ckpt = tmp_path / "moments.ckpt.safetensors"
    full = ad.estimate_moments(u8, batch_size=16)
    with pytest.raises(RuntimeError, match="disk went away"):
        ad.estimate_moments(_Flaky(u8, fail_at=100), batch_size=16, checkpoint=ckpt, checkpoint_every=2)
    held = ad.MomentAccumulator.load(ckpt)
    assert 0 < held.count < 100 and held.count % 32 == 0  # checkpoints land every 2 batches of 16
    resumed = ad.estimate_moments(_Flaky(u8), batch_size=16, checkpoint=ckpt, checkpoint_every=2)
    assert torch.equal(resumed.cov, full.cov) and torch.equal(resumed.mean, full.mean)
    # a finished checkpoint is complete: running again reads nothing new and agrees
    again = ad.estimate_moments(_Flaky(u8, fail_at=0), batch_size=16, checkpoint=ckpt)
    assert torch.equal(again.cov, full.cov)


def test_dataloader_workers(u8):
    ds = _Flaky(u8)
    m = ad.estimate_moments(ds, batch_size=32, num_workers=2)
    assert torch.equal(m.cov, ad.estimate_moments(u8).cov)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_saved_files_get_the_umask_mode(u8, tmp_path, umask):
    """Review: Moments.save / checkpoints were left with the temporary file's 0600 whatever
    the umask; they get 0666 & ~umask like any new file, and no temporary is left behind."""
    import os
    import stat

    old = os.umask(umask)
    try:
        m = ad.estimate_moments(u8, checkpoint=tmp_path / "ckpt.safetensors", checkpoint_every=1, batch_size=16)
        m.save(tmp_path / "stats.safetensors")
        m.save(tmp_path / "stats.safetensors")  # overwriting keeps the mode rule too
    finally:
        os.umask(old)
    for name in ("ckpt.safetensors", "stats.safetensors"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o666 & ~umask, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors", "stats.safetensors"]
    assert torch.equal(ad.Moments.load(tmp_path / "stats.safetensors").cov, m.cov)
