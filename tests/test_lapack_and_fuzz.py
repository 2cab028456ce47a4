"""LAPACK agreement (xGEQRF reflectors give xORGQR's Q) and hypothesis fuzzing."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg.lapack as lapack
from hypothesis import given, settings
from hypothesis import strategies as st

import householder as hh
from householder import reference


def reflectors(a: np.ndarray):
    """Keys (unit-diagonal Householder vectors as rows) and tau from xGEQRF."""
    geqrf = lapack.dgeqrf if a.dtype == np.float64 else lapack.sgeqrf
    qr, tau, _, info = geqrf(a)
    assert info == 0
    k = tau.shape[0]
    v = np.tril(qr[:, :k], -1)
    v[np.arange(k), np.arange(k)] = 1.0
    return qr, v.T.copy(), tau


@pytest.mark.parametrize("form", ["wy", "ut"])
@pytest.mark.parametrize("m,n", [(8, 8), (12, 5), (40, 40), (130, 70)])
def test_geqrf_reflectors_give_orgqr_q(bk, form, m, n):
    rng = np.random.default_rng(m * 1000 + n)
    a = rng.standard_normal((m, n))
    qr, keys, tau = reflectors(a)
    orgqr = lapack.dorgqr
    q, _, info = orgqr(qr, tau)
    assert info == 0
    P = hh.product(bk.asarray(keys), bk.asarray(tau), form=form, block_size=32)
    dense = bk.to_numpy(P.dense())
    assert np.abs(dense[:, :n] - q).max() < 1e-12
    # and Q R reproduces a
    r = np.triu(qr[:n, :])
    assert np.abs(dense[:, :n] @ r - a).max() < 1e-12 * np.abs(a).max() * m


@settings(max_examples=60, deadline=None)
@given(
    batch=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    n=st.integers(0, 40),
    d=st.integers(1, 12),
    block=st.integers(1, 17),
    form=st.sampled_from(["wy", "ut"]),
    seed=st.integers(0, 2**32 - 1),
    beta_mode=st.sampled_from(["uniform", "zeros", "twos", "mixed"]),
    broadcast_betas=st.booleans(),
)
def test_fuzz_numpy_matches_reference(batch, n, d, block, form, seed, beta_mode, broadcast_betas):
    rng = np.random.default_rng(seed)
    batch = tuple(batch)
    keys = rng.standard_normal(batch + (n, d))
    keys /= np.maximum(np.linalg.norm(keys, axis=-1, keepdims=True), 1e-300)
    bbatch = (1,) * len(batch) if broadcast_betas else batch
    betas = {
        "uniform": rng.uniform(0, 2, bbatch + (n,)),
        "zeros": np.zeros(bbatch + (n,)),
        "twos": np.full(bbatch + (n,), 2.0),
        "mixed": rng.choice([0.0, 1.0, 2.0], bbatch + (n,)),
    }[beta_mode]
    P = hh.product(keys, betas, form=form, block_size=block)
    want = reference.dense(keys, betas)
    assert np.abs(P.dense() - want).max() < 1e-12 * max(n, 1)
    x = rng.standard_normal(batch + (d, 2))
    assert np.abs(P.T @ x - np.swapaxes(want, -1, -2) @ x).max() < 1e-11 * max(n, 1)
