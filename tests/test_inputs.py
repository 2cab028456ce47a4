"""Bad input: every case raises with a message that names the argument."""

from __future__ import annotations

import numpy as np
import pytest

import householder as hh


def keys_betas(n=4, d=3, batch=()):
    rng = np.random.default_rng(0)
    return rng.standard_normal(batch + (n, d)), rng.uniform(0, 2, batch + (n,))


def test_keys_need_two_dims():
    with pytest.raises(ValueError, match=r"keys must have shape \(\.\.\., n, d\).*got shape \(3,\)"):
        hh.product(np.ones(3), np.ones(3))


def test_betas_need_one_dim():
    with pytest.raises(ValueError, match=r"betas must have shape \(\.\.\., n\).*got shape \(\)"):
        hh.product(np.ones((3, 2)), np.float64(1.0))


@pytest.mark.parametrize("bshape", [(5,), (2, 4, 5)])
def test_betas_shape_mismatch(bshape):
    k, _ = keys_betas(4, 3, (2,))
    with pytest.raises(ValueError, match="betas|batch dimensions of keys"):
        hh.product(k, np.ones(bshape))


def test_betas_wrong_n_message():
    k, _ = keys_betas(4, 3)
    with pytest.raises(ValueError, match=r"betas must have shape .*got shape \(5,\).*expected 4"):
        hh.product(k, np.ones(5))


def test_batch_dims_do_not_broadcast():
    k, _ = keys_betas(4, 3, (2,))
    with pytest.raises(ValueError, match=r"batch dimensions of keys \(2,\) and betas \(3,\)"):
        hh.product(k, np.ones((3, 4)))


@pytest.mark.parametrize("form", ["WY", "qr", None, 3])
def test_unknown_form(form):
    k, b = keys_betas()
    with pytest.raises(ValueError, match=r"form must be one of \('wy', 'ut'\)"):
        hh.product(k, b, form=form)


def test_to_unknown_form():
    k, b = keys_betas()
    with pytest.raises(ValueError, match="form must be one of"):
        hh.product(k, b).to("dense")


def test_unknown_backend():
    k, b = keys_betas()
    with pytest.raises(ValueError, match=r"backend must be one of .*got 'jax'"):
        hh.product(k, b, backend="jax")


def test_bad_block_size():
    k, b = keys_betas()
    with pytest.raises(ValueError, match="block_size must be >= 1; got 0"):
        hh.product(k, b, block_size=0)
    with pytest.raises(TypeError, match="block_size must be an int"):
        hh.product(k, b, block_size=2.0)


def test_complex_keys():
    k, b = keys_betas()
    with pytest.raises(TypeError, match="keys must be real; got complex dtype complex128"):
        hh.product(k + 1j, b)


def test_complex_betas():
    k, b = keys_betas()
    with pytest.raises(TypeError, match="betas must be real"):
        hh.product(k, b.astype(np.complex64))


def test_object_arrays():
    k, b = keys_betas()
    with pytest.raises(TypeError, match="keys must be a real floating or integer array; got dtype object"):
        hh.product(k.astype(object), b)
    with pytest.raises(TypeError, match="keys could not be converted"):
        hh.product([[1.0, 2.0], [3.0]], [1.0, 1.0])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["keys", "betas"])
def test_check_finite(bad, where):
    k, b = keys_betas()
    (k if where == "keys" else b).flat[2] = bad
    with pytest.raises(ValueError, match=f"{where} must contain only finite numbers"):
        hh.product(k, b)
    hh.product(k, b, check_finite=False)  # the caller's choice, as in SciPy


def test_operand_checks():
    k, b = keys_betas(4, 3)
    P = hh.product(k, b)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., d, m\).*got shape \(3,\)"):
        P.apply(np.ones(3))
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 3, m\) to match d = 3; got shape \(4, 2\)"):
        P @ np.ones((4, 2))
    with pytest.raises(ValueError, match="x must contain only finite numbers"):
        P @ np.full((3, 2), np.nan)
    with pytest.raises(TypeError, match="x must be real"):
        P @ np.ones((3, 2), complex)
    with pytest.raises(ValueError, match=r"batch dimensions"):
        hh.product(*keys_betas(4, 3, (2,))) @ np.ones((3, 3, 2))


def test_compose_checks():
    P = hh.product(*keys_betas(4, 3))
    with pytest.raises(ValueError, match="cannot compose products of d = 3 and d = 5"):
        P @ hh.product(*keys_betas(2, 5))
    with pytest.raises(TypeError, match="other must be a HouseholderProduct"):
        P.compose(np.eye(3))


def test_foreign_array_refused_by_numpy_backend():
    torch = pytest.importorskip("torch", reason="needs torch to build a foreign array")
    with pytest.raises(TypeError, match=r"keys is a torch.Tensor but backend 'numpy' takes numpy arrays"):
        hh.product(torch.ones(3, 2), torch.ones(3), backend="numpy")


def test_float16_promotes_to_float32_on_numpy():
    k, b = keys_betas()
    P = hh.product(k.astype(np.float16), b.astype(np.float16))
    assert P.dtype == np.float32


@pytest.mark.parametrize("form", ["wy", "ut"])
def test_overflow_is_an_error_not_a_silent_nan(bk, form):
    # beta ||k||^2 = 100: each factor has eigenvalue -99, and 30 of them overflow float32.
    rng = np.random.default_rng(3)
    keys = rng.standard_normal((30, 4))
    keys = 10 * keys / np.linalg.norm(keys, axis=-1, keepdims=True)
    keys[1::2] = keys[::2]  # repeat directions so the growth compounds
    betas = np.ones(30)
    k32, b32 = bk.asarray(keys.astype(np.float32)), bk.asarray(betas.astype(np.float32))
    with pytest.raises(FloatingPointError, match="overflowed"):
        P = hh.product(k32, b32, form=form)
        P.dense()
    # float64 has the range for it, and the answer is right
    P = hh.product(bk.asarray(keys), bk.asarray(betas), form=form)
    want = hh.reference.dense(keys, betas)
    got = bk.to_numpy(P.dense())
    assert np.isfinite(got).all()
    assert np.abs(got - want).max() <= 1e-9 * np.abs(want).max()


def test_check_finite_false_carries_to_dense_and_apply():
    keys = np.full((30, 4), 10.0 / 2)  # ||k||^2 = 100, beta 1: expansive factors
    betas = np.ones(30, np.float32)
    P = hh.product(keys.astype(np.float32), betas, check_finite=False)
    with np.errstate(all="ignore"):
        assert not np.isfinite(P.dense()).all()  # the caller asked for no checks
        with pytest.raises(FloatingPointError):
            P.dense(check_finite=True)
        x = np.ones((4, 2), np.float32)
        assert not np.isfinite(P @ x).all()
        with pytest.raises(FloatingPointError):
            P.apply(x, check_finite=True)
