"""Moments across processes: 2 gloo ranks on localhost, each streaming its shard."""
import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import analytic_diffusion as ad


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


KINDS = ("uint8", "float", "empty", "patch")
TIMESTEPS = (900, 300, 10)


def _denoiser_data():
    crops = ad.data.natural_crops(105, size=4, seed=5)
    ab = ad.alpha_bar_at(10)
    g = torch.Generator().manual_seed(0)
    held = crops[100:].double() / 127.5 - 1
    x = ab**0.5 * held + (1 - ab) ** 0.5 * torch.randn(held.shape, generator=g, dtype=torch.float64)
    return crops[:100], x


def _worker(rank, world, port, data, out_dir):
    # One process group for every case: spawning ranks costs seconds (each imports torch).
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )
    try:
        for kind in KINDS:
            shard = data[rank::world]  # interleaved shards: a different order than one pass
            if kind == "patch":
                acc = ad.PatchMomentAccumulator(data.shape[1], 3).update(shard)
            else:
                acc = ad.MomentAccumulator(tuple(data.shape[1:]))
                if kind == "float" and rank == 1:
                    shard = (shard.double() - 127.5) / 127.5  # one float rank forces the Chan path
                if kind == "empty" and rank == 1:
                    shard = shard[:0]
                acc.update(shard)
            m = acc.all_reduce().result()
            torch.save({"mean": m.mean, "cov": m.cov, "count": m.count}, os.path.join(out_dir, f"{kind}{rank}.pt"))
        # Denoisers over a sharded training set: contiguous shards of unequal size, the
        # moments all-reduced inside the locality denoiser, every step merged across ranks.
        train, x = _denoiser_data()
        shard = train[:40] if rank == 0 else train[40:]
        dens = {
            "locality": ad.LocalityDenoiser(shard, threshold=0.05, process_group=True),
            "optimal": ad.OptimalDenoiser(shard, process_group=dist.group.WORLD),
            "nearest": ad.NearestDenoiser(shard, process_group=True),
            "nearest-reference": ad.NearestDenoiser(shard, backend="reference", process_group=dist.group.WORLD),
        }
        outs = {(name, t): den(x, t) for name, den in dens.items() for t in TIMESTEPS}
        # ties across ranks: the query's nearest image is in both shards (global indices 7
        # and 40 + 2); the lowest global index, rank 0's, wins
        tied = shard.clone()
        tied[7 if rank == 0 else 2] = train[99]
        ab = ad.alpha_bar_at(10)
        q = (ab**0.5 * (train[99:100].double() / 127.5 - 1)).expand(3, -1, -1, -1).clone()
        for backend in ("cpu", "reference"):
            st = ad.ops.nearest_denoise(q, tied, ab, backend=backend, return_state=True)
            merged = ad.ops.all_reduce_nearest(st, tied.shape[0])
            outs[("tie", backend)] = (merged.index, merged.dist, merged.image)
        torch.save(outs, os.path.join(out_dir, f"denoisers{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    # spawn, not fork: a forked child inherits the parent's OpenMP pool in a broken state and hangs
    mp.start_processes(_worker, args=(2, _free_port(), data, str(out)), nprocs=2, join=True, start_method="spawn")
    res = {k: [torch.load(out / f"{k}{r}.pt", weights_only=True) for r in range(2)] for k in KINDS + ("denoisers",)}
    return res


@pytest.fixture(scope="module")
def data():
    return torch.randint(0, 256, (41, 2, 5, 5), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def test_all_reduce_uint8_is_bit_identical_to_one_process(data, results):
    one = ad.estimate_moments(data)
    for res in results["uint8"]:
        assert res["count"] == 41
        assert torch.equal(res["cov"], one.cov) and torch.equal(res["mean"], one.mean)


def test_all_reduce_float_rank_uses_chan_merge(data, results):
    one = ad.estimate_moments(data)
    for res in results["float"]:
        assert res["count"] == 41
        assert (res["cov"] - one.cov).abs().max().item() < 1e-13


def test_all_reduce_with_an_empty_rank(data, results):
    one = ad.estimate_moments(data[0::2])
    for res in results["empty"]:
        assert res["count"] == 21 and torch.equal(res["cov"], one.cov)


def test_all_reduce_patch_moments(data, results):
    one = ad.estimate_patch_moments(data, 3)
    for res in results["patch"]:
        assert res["count"] == one.count and torch.equal(res["cov"], one.cov)


@pytest.mark.parametrize("name", ["locality", "optimal", "nearest", "nearest-reference"])
def test_sharded_denoisers_equal_one_process(results, name):
    """Review: NearestDenoiser(process_group=...) returned each rank's own nearest image."""
    train, x = _denoiser_data()
    one = {
        "locality": lambda: ad.LocalityDenoiser(train, threshold=0.05),
        "optimal": lambda: ad.OptimalDenoiser(train),
        "nearest": lambda: ad.NearestDenoiser(train),
        "nearest-reference": lambda: ad.NearestDenoiser(train, backend="reference"),
    }[name]()
    for rank_out in results["denoisers"]:
        for t in TIMESTEPS:
            ref = one(x, t)
            got = rank_out[(name, t)]
            assert got.shape == ref.shape and got.dtype == ref.dtype
            assert (got - ref).abs().max().item() < 1e-10 * max(1.0, ref.abs().max().item()), (name, t)


def test_all_reduce_state_without_processes_is_merge_states():
    # the collective merge equals merge_states; checked in-process with a 1-rank group
    import tempfile

    train, x = _denoiser_data()
    ab = ad.alpha_bar_at(300)
    s1 = ad.ops.optimal_denoise(x, train[:30], ab, return_state=True)
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{d}/pg", rank=0, world_size=1)
        try:
            merged = ad.ops.all_reduce_state(s1)
        finally:
            dist.destroy_process_group()
    assert torch.equal(merged.mx, s1.mx) and torch.allclose(merged.result(), s1.result(), rtol=0, atol=1e-15)


def test_sharded_nearest_ties_go_to_the_lowest_global_index(results):
    train, _ = _denoiser_data()
    for rank_out in results["denoisers"]:
        for backend in ("cpu", "reference"):
            index, d, image = rank_out[("tie", backend)]
            assert index.tolist() == [7, 7, 7], backend
            assert d.max().item() < 1e-12
            assert torch.equal(image, ((train[99:100].double() - 127.5) / 127.5).reshape(1, -1).expand(3, -1))


def test_merge_nearest_in_process():
    """merge_nearest over consecutive shards equals one pass, indices renumbered."""
    train, x = _denoiser_data()
    ab = ad.alpha_bar_at(300)
    one = ad.ops.nearest_denoise(x, train, ab, return_state=True)
    parts = [train[:13], train[13:50], train[50:]]
    states = [ad.ops.nearest_denoise(x, p, ab, return_state=True) for p in parts]
    merged = ad.ops.merge_nearest(*states, sizes=[p.shape[0] for p in parts])
    assert torch.equal(merged.index, one.index) and torch.equal(merged.image, one.image)
    assert torch.equal(merged.dist, one.dist)
    dup = torch.cat([train[:5], train[:5]])  # every image twice: the first copy wins
    st = ad.ops.merge_nearest(*[ad.ops.nearest_denoise(x, p, ab, return_state=True) for p in (dup[:5], dup[5:])], sizes=[5, 5])
    assert (st.index < 5).all()


def test_all_reduce_nearest_one_rank():
    import tempfile

    train, x = _denoiser_data()
    ab = ad.alpha_bar_at(300)
    s1 = ad.ops.nearest_denoise(x, train[:30], ab, return_state=True)
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{d}/pg", rank=0, world_size=1)
        try:
            merged = ad.ops.all_reduce_nearest(s1, 30)
        finally:
            dist.destroy_process_group()
    assert all(torch.equal(a, b) for a, b in zip(merged, s1))
