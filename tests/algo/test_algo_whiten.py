"""Masked whitening against numpy, and across 2 gloo processes against one process on the whole batch."""
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from opd_train.algo import masked_moments, whiten


def _batch(B=5, T=7, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    adv = (torch.randn(B, T, generator=g) * 3 + 1.5).to(dtype)
    mask = (torch.rand(B, T, generator=g) > 0.35).int()
    mask[:, 0] = 1
    return adv, mask


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_numpy(shift_mean):
    adv, mask = _batch(dtype=torch.float64)
    a, m = adv.numpy(), mask.numpy().astype(bool)
    mu, var = a[m].mean(), a[m].var(ddof=1)                                  # Bessel-corrected
    expected = (a - mu) / np.sqrt(var + 1e-8) + (0.0 if shift_mean else mu)
    expected[~m] = 0.0
    out = whiten(adv, mask, shift_mean=shift_mean)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-12)
    if shift_mean:
        np.testing.assert_allclose(out.numpy()[m].mean(), 0.0, atol=1e-12)
        np.testing.assert_allclose(out.numpy()[m].std(ddof=1), 1.0, rtol=1e-6)


def test_whiten_keeps_dtype_and_zeroes_padding():
    adv, mask = _batch()
    adv[mask == 0] = float("nan")                                            # padding may hold anything
    out = whiten(adv.bfloat16(), mask)
    assert out.dtype == torch.bfloat16
    assert bool((out[mask == 0] == 0).all()) and bool(torch.isfinite(out.float()).all())


def test_whiten_edge_cases():
    with pytest.raises(ValueError, match="no masked-in token"):
        whiten(torch.ones(2, 3), torch.zeros(2, 3))
    out = whiten(torch.tensor([[4.0, 9.0]]), torch.tensor([[1, 0]]))         # N = 1: variance 0, centred to 0
    assert out.tolist() == [[0.0, 0.0]]
    with pytest.raises(ValueError, match=r"mask has shape \(2, 2\)"):
        whiten(torch.ones(2, 3), torch.ones(2, 2))
    with pytest.raises(ValueError, match="only 0 and 1"):
        whiten(torch.ones(2, 3), torch.full((2, 3), 0.5))


def test_masked_moments():
    adv, mask = _batch(dtype=torch.float64)
    s = masked_moments(adv, mask)
    m = mask.bool()
    torch.testing.assert_close(s, torch.stack([adv[m].sum(), (adv[m] ** 2).sum(), m.sum().double()]))


def _rank_main(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        adv, mask = _batch(B=9, T=7, seed=7)
        # uneven shards: rank 0 gets 4 samples, rank 1 gets 5
        rows = slice(0, 4) if rank == 0 else slice(4, 9)
        out = whiten(adv[rows], mask[rows], process_group=dist.group.WORLD)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        try:  # a group with no masked-in token anywhere raises on every rank alike
            whiten(adv[rows], torch.zeros_like(mask[rows]), process_group=dist.group.WORLD)
        except ValueError as exc:
            torch.save(str(exc), os.path.join(out_dir, f"err{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_whiten_two_gloo_ranks_equals_single_process():
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_rank_main, args=(2, init_file, tmp), nprocs=2, join=True)
        got = torch.cat([torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)])
        errors = [torch.load(os.path.join(tmp, f"err{r}.pt")) for r in range(2)]
    adv, mask = _batch(B=9, T=7, seed=7)
    torch.testing.assert_close(got, whiten(adv, mask), rtol=0, atol=1e-6)
    # and not what each rank would get alone
    assert not torch.allclose(got[:4], whiten(adv[:4], mask[:4]), atol=1e-3)
    assert all("no masked-in token" in e for e in errors)
