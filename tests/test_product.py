"""The common suite: every backend against the float64 sequential reference."""

from __future__ import annotations

import numpy as np
import pytest

import householder as hh
from householder import reference
from tests.conftest import tolerance, unit_keys

FORMS = ["wy", "ut"]


def make(rng, batch, n, d, beta="uniform"):
    keys = unit_keys(rng, batch + (n, d))
    if beta == "uniform":
        betas = rng.uniform(0.0, 2.0, batch + (n,))
    else:
        betas = np.full(batch + (n,), float(beta))
    return keys, betas


def check_close(bk, got, want, dtype, n, d):
    got = bk.to_numpy(got).astype(np.float64)
    assert got.shape == want.shape
    err = np.abs(got - want).max() if want.size else 0.0
    assert err <= tolerance(dtype, n, d), f"max error {err:.3e} > {tolerance(dtype, n, d):.3e}"


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(
    "batch,n,d", [((), 0, 5), ((), 1, 6), ((3,), 5, 8), ((2,), 8, 8), ((2, 3), 13, 6), ((2,), 70, 9)]
)
def test_dense_apply_transpose(bk, rng, form, dtype, batch, n, d):
    keys, betas = make(rng, batch, n, d)
    P = hh.product(bk.asarray(keys.astype(dtype)), bk.asarray(betas.astype(dtype)), form=form, block_size=16)
    ref = reference.dense(keys, betas)
    assert P.form == form and P.backend == bk.name and P.n == n and P.d == d
    assert P.shape == batch + (d, d)
    check_close(bk, P.dense(), ref, dtype, n, d)
    x = rng.standard_normal(batch + (d, 4))
    check_close(bk, P.apply(bk.asarray(x.astype(dtype))), ref @ x, dtype, n, d)
    check_close(bk, P @ bk.asarray(x.astype(dtype)), ref @ x, dtype, n, d)
    check_close(bk, P.apply(bk.asarray(x.astype(dtype)), transpose=True), np.swapaxes(ref, -1, -2) @ x, dtype, n, d)
    check_close(bk, P.T.dense(), np.swapaxes(ref, -1, -2), dtype, n, d)
    xr = np.swapaxes(x, -1, -2)
    check_close(bk, bk.asarray(xr.astype(dtype)) @ P, xr @ ref, dtype, n, d)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("beta", [0.0, 1.0, 2.0])
def test_special_betas(bk, rng, form, beta):
    keys, betas = make(rng, (3,), 11, 7, beta=beta)
    P = hh.product(bk.asarray(keys), bk.asarray(betas), form=form, block_size=4)
    check_close(bk, P.dense(), reference.dense(keys, betas), np.float64, 11, 7)
    if beta == 0.0:
        check_close(bk, P.dense(), np.broadcast_to(np.eye(7), (3, 7, 7)), np.float64, 11, 7)
    if beta == 2.0:  # a product of reflections is orthogonal
        D = bk.to_numpy(P.dense())
        assert np.abs(D @ np.swapaxes(D, -1, -2) - np.eye(7)).max() < 1e-12


@pytest.mark.parametrize("form", FORMS)
def test_mixed_zero_betas(bk, rng, form):
    # beta = 0 factors are identities inside a product, also in the UT form (S has 1/beta).
    keys, betas = make(rng, (4,), 9, 5)
    betas[:, ::3] = 0.0
    P = hh.product(bk.asarray(keys), bk.asarray(betas), form=form)
    check_close(bk, P.dense(), reference.dense(keys, betas), np.float64, 9, 5)
    kept = betas[0] != 0
    check_close(bk, P.dense()[0], reference.dense(keys[0, kept], betas[0, kept]), np.float64, 9, 5)


@pytest.mark.parametrize("form", FORMS)
def test_unnormalised_and_nearly_parallel_keys(bk, rng, form):
    d, n = 6, 10
    base = unit_keys(rng, (d,))
    keys = base + 1e-6 * rng.standard_normal((n, d))  # nearly parallel
    keys *= rng.uniform(0.5, 2.0, (n, 1))  # unnormalised
    betas = 2.0 / np.sum(keys**2, axis=-1)  # exact reflections
    P = hh.product(bk.asarray(keys), bk.asarray(betas), form=form, block_size=4)
    ref = reference.dense(keys, betas)
    check_close(bk, P.dense(), ref, np.float64, n, d)
    keys2 = rng.standard_normal((n, d)) * 3.0
    betas2 = rng.uniform(0, 0.1, n)
    P2 = hh.product(bk.asarray(keys2), bk.asarray(betas2), form=form)
    got = bk.to_numpy(P2.dense())
    want = reference.dense(keys2, betas2)
    assert np.abs(got - want).max() <= 1e-11 * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("form", FORMS)
def test_broadcasting_batch_dims(bk, rng, form):
    keys = unit_keys(rng, (1, 3, 6, 5))
    betas = rng.uniform(0, 2, (4, 1, 6))
    P = hh.product(bk.asarray(keys), bk.asarray(betas), form=form)
    assert P.batch_shape == (4, 3)
    ref = reference.dense(keys, betas)
    check_close(bk, P.dense(), ref, np.float64, 6, 5)
    scalar_beta = hh.product(bk.asarray(keys), bk.asarray(np.array([2.0])), form=form)
    check_close(bk, scalar_beta.dense(), reference.dense(keys, np.full((1, 3, 6), 2.0)), np.float64, 6, 5)
    x = rng.standard_normal((2, 1, 1, 5, 3))  # x batch broadcasts against P's
    check_close(bk, P @ bk.asarray(x), ref @ x, np.float64, 6, 5)


@pytest.mark.parametrize("form", FORMS)
def test_non_contiguous_inputs(bk, rng, form):
    big = unit_keys(rng, (3, 12, 10))
    keys = big[:, ::2, ::2]  # strided views
    betas = rng.uniform(0, 2, (6, 3)).T
    x = rng.standard_normal((3, 7, 5)).transpose(0, 2, 1)  # (3, 5, 7), not contiguous
    kt, bt, xt = bk.asarray(keys), bk.asarray(betas), bk.asarray(x)
    P = hh.product(kt, bt, form=form, block_size=4)
    ref = reference.dense(keys, betas)
    check_close(bk, P.dense(), ref, np.float64, 6, 5)
    check_close(bk, P @ xt, ref @ x, np.float64, 6, 5)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("n1,n2", [(0, 3), (5, 0), (5, 7), (20, 13)])
def test_composition(bk, rng, form, n1, n2):
    k1, b1 = make(rng, (2,), n1, 6)
    k2, b2 = make(rng, (2,), n2, 6)
    P = hh.product(bk.asarray(k1), bk.asarray(b1), form=form, block_size=8)
    Q = hh.product(bk.asarray(k2), bk.asarray(b2), form=form, block_size=8)
    PQ = P @ Q
    assert isinstance(PQ, hh.HouseholderProduct) and PQ.n == n1 + n2
    want = reference.dense(np.concatenate([k1, k2], -2), np.concatenate([b1, b2], -1))
    check_close(bk, PQ.dense(), want, np.float64, n1 + n2, 6)
    check_close(bk, PQ.keys, np.concatenate([k1, k2], -2), np.float64, 1, 1)
    check_close(bk, (PQ @ P.T).dense(), want @ np.swapaxes(reference.dense(k1, b1), -1, -2), np.float64, 40, 6)
    # a composition of mixed forms takes the left operand's form
    mixed = P @ Q.to("ut" if form == "wy" else "wy")
    assert mixed.form == form
    check_close(bk, mixed.dense(), want, np.float64, n1 + n2, 6)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("n,block", [(1, 64), (7, 64), (30, 8), (33, 8)])
def test_factor_represents_product(bk, rng, form, n, block):
    keys, betas = make(rng, (2,), n, 5)
    betas[:, 1::4] = 0.0
    P = hh.product(bk.asarray(keys), bk.asarray(betas), form=form, block_size=block)
    F = bk.to_numpy(P.factor)
    assert F.shape == (2, n, n)
    assert np.allclose(np.tril(F, -1), 0.0)
    Kt = np.swapaxes(keys, -1, -2)
    if form == "wy":
        assert np.allclose(np.diagonal(F, axis1=-2, axis2=-1), betas)
        dense = np.eye(5) - Kt @ F @ keys
    else:
        assert np.allclose(np.diagonal(F, axis1=-2, axis2=-1), 1.0)
        dense = np.eye(5) - Kt @ np.linalg.solve(F, betas[..., :, None] * keys)
    assert np.abs(dense - reference.dense(keys, betas)).max() < 1e-12
    # the two forms are linked by T = A^{-1} diag(beta)
    T = bk.to_numpy(P.to("wy").factor)
    A = bk.to_numpy(P.to("ut").factor)
    assert np.abs(A @ T - betas[..., None, :] * np.eye(n)).max() < 1e-12


@pytest.mark.parametrize("form", FORMS)
def test_integer_inputs_promote_to_float64(bk, rng, form):
    keys = rng.integers(-3, 4, (4, 5))
    betas = np.array([0, 1, 0, 1])
    P = hh.product(bk.asarray(keys), bk.asarray(betas), form=form)
    assert "float64" in str(P.dtype)
    check_close(bk, P.dense(), reference.dense(keys, betas), np.float64, 4, 5)


@pytest.mark.parametrize("form", FORMS)
def test_float32_stays_float32(bk, rng, form):
    keys, betas = make(rng, (2,), 5, 4)
    P = hh.product(bk.asarray(keys.astype(np.float32)), bk.asarray(betas.astype(np.float32)), form=form)
    assert "float32" in str(P.dtype)
    assert "float32" in str(P.dense().dtype)
    assert "float32" in str(P.apply(bk.asarray(np.ones((2, 4, 3), np.float32))).dtype)


@pytest.mark.parametrize("form", FORMS)
def test_long_product_float32_stays_orthogonal(bk, rng, form):
    # n >> d in float32: the blocked representation keeps ||P^T P - I|| near n u
    n, d = 512, 16
    keys, betas = make(rng, (), n, d, beta=2.0)
    P = hh.product(bk.asarray(keys.astype(np.float32)), bk.asarray(betas.astype(np.float32)), form=form)
    D = bk.to_numpy(P.dense()).astype(np.float64)
    err = np.linalg.norm(D.T @ D - np.eye(d), 2) / np.finfo(np.float32).eps
    assert err < 10 * n, f"||P^T P - I|| = {err:.0f} u"
