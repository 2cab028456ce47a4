"""The "torch" backend beyond the common suite: autograd, half precision, devices, dtypes."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch backend needs torch")

import householder as hh  # noqa: E402
from householder import reference  # noqa: E402
from tests.conftest import tolerance, unit_keys  # noqa: E402

FORMS = ["wy", "ut"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tensors(rng, shape, n, d, device="cpu", dtype=torch.float64, beta_lo=0.0, beta_hi=2.0):
    keys = torch.tensor(unit_keys(rng, shape + (n, d)), dtype=dtype, device=device)
    betas = torch.tensor(rng.uniform(beta_lo, beta_hi, shape + (n,)), dtype=dtype, device=device)
    return keys, betas


def rel_err(got, want) -> float:
    got = reference.to_float64(got)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-300))


# -- autograd ---------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("n,block", [(5, 64), (7, 3)])
def test_gradcheck_dense_apply_transpose(rng, device, form, n, block):
    d = 4
    keys, betas = tensors(rng, (2,), n, d, device)
    betas[:, 1] = 0.0  # an identity factor inside
    betas[:, -1] = 2.0  # and a reflection
    x = torch.tensor(rng.standard_normal((2, d, 3)), device=device)
    keys.requires_grad_(), betas.requires_grad_(), x.requires_grad_()

    def f(k, b, x):
        P = hh.product(k, b, form=form, block_size=block, backend="torch")
        return P.dense(), P.apply(x), P.apply(x, transpose=True), P.T.dense(), x.mT @ P

    assert torch.autograd.gradcheck(f, (keys, betas, x))


@pytest.mark.parametrize("form", FORMS)
def test_gradcheck_composition_and_factor(rng, form):
    d = 5
    k1, b1 = tensors(rng, (), 4, d)
    k2, b2 = tensors(rng, (2,), 3, d)
    for t in (k1, b1, k2, b2):
        t.requires_grad_()

    def f(k1, b1, k2, b2):
        P = hh.product(k1, b1, form=form, block_size=2, backend="torch")
        Q = hh.product(k2, b2, form="ut" if form == "wy" else "wy", backend="torch")
        PQ = P @ Q
        return PQ.dense(), PQ.factor, P.to("ut" if form == "wy" else "wy").factor

    assert torch.autograd.gradcheck(f, (k1, b1, k2, b2))


def test_gradients_match_reference_product(rng):
    # The gradient of <C, P> is the same whichever form builds P: compare with a
    # product of dense factors written directly in torch.
    n, d = 9, 6
    keys, betas = tensors(rng, (), n, d)
    C = torch.tensor(rng.standard_normal((d, d)))
    grads = []
    for form in FORMS:
        k, b = keys.clone().requires_grad_(), betas.clone().requires_grad_()
        (hh.product(k, b, form=form, block_size=4, backend="torch").dense() * C).sum().backward()
        grads.append((k.grad, b.grad))
    k, b = keys.clone().requires_grad_(), betas.clone().requires_grad_()
    P = torch.eye(d, dtype=torch.float64)
    for i in range(n):
        P = P @ (torch.eye(d, dtype=torch.float64) - b[i] * torch.outer(k[i], k[i]))
    (P * C).sum().backward()
    for gk, gb in grads:
        torch.testing.assert_close(gk, k.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gb, b.grad, rtol=1e-10, atol=1e-12)


def test_no_grad_inputs_give_plain_tensors(rng):
    keys, betas = tensors(rng, (), 5, 4)
    D = hh.product(keys, betas, backend="torch").dense()
    assert not D.requires_grad and D.grad_fn is None


# -- precision --------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(rng, device, form, dtype):
    n, d = 70, 16  # two blocks of the default size
    keys, betas = tensors(rng, (3,), n, d, device, dtype=dtype)
    ref = reference.dense(keys, betas)  # the rounded inputs, in float64
    P = hh.product(keys, betas, form=form, backend="torch")
    assert P.dtype == dtype and P.factor.dtype == torch.float32  # factors stay float32
    D = P.dense()
    assert D.dtype == dtype and D.device.type == device
    # one rounding of the output dominates: float32 accumulation inside
    assert rel_err(D, ref) <= 2.0 ** -7
    x = torch.tensor(rng.standard_normal((3, d, 5)), dtype=dtype, device=device)
    y = P.apply(x, transpose=True)
    assert y.dtype == dtype
    want = np.swapaxes(ref, -1, -2) @ reference.to_float64(x)
    assert rel_err(y, want) <= 2.0 ** -6
    PQ = P @ P.T  # composition keeps float32 factors
    assert PQ.dtype == dtype
    assert rel_err(PQ.dense(), ref @ np.swapaxes(ref, -1, -2)) <= 2.0 ** -6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", FORMS)
def test_float32_batch_against_reference(rng, device, form):
    keys, betas = tensors(rng, (2, 3), 40, 12, device, dtype=torch.float32)
    betas[..., ::5] = 0.0
    betas[..., 1::5] = 2.0
    P = hh.product(keys, betas, form=form, block_size=16, backend="torch")
    ref = reference.dense(keys, betas)
    got = reference.to_float64(P.dense())
    assert np.abs(got - ref).max() <= tolerance(np.float32, 40, 12)


def test_float32_low_precision_gradients(rng):
    keys, betas = tensors(rng, (2,), 6, 5, dtype=torch.bfloat16)
    keys.requires_grad_(), betas.requires_grad_()
    hh.product(keys, betas, backend="torch").dense().float().square().sum().backward()
    assert keys.grad.dtype == torch.bfloat16 and betas.grad.dtype == torch.bfloat16
    assert torch.isfinite(keys.grad.float()).all()


# -- bad input ----------------------------------------------------------------------


def test_mixed_dtypes_refused(rng):
    keys, betas = tensors(rng, (), 4, 3)
    with pytest.raises(TypeError, match=r"keys and betas must have the same floating dtype; got keys float64 and betas float32"):
        hh.product(keys, betas.float(), backend="torch")
    P = hh.product(keys, betas, backend="torch")
    with pytest.raises(TypeError, match=r"keys and x must have the same floating dtype; got keys float64 and x bfloat16"):
        P.apply(torch.ones(3, 2, dtype=torch.bfloat16))
    # integer tensors take the floating dtype of the other argument
    assert hh.product(keys.float(), torch.tensor([1, 0, 1, 2]), backend="torch").dtype == torch.float32


def test_mixed_devices_refused(rng):
    keys, betas = tensors(rng, (), 4, 3)
    meta = torch.empty(4, device="meta", dtype=torch.float64)
    with pytest.raises(ValueError, match=r"keys and betas must be on the same device; got keys on cpu and betas on meta"):
        hh.product(keys, meta, check_finite=False, backend="torch")
    P = hh.product(keys, betas, backend="torch")
    with pytest.raises(ValueError, match=r"keys and x must be on the same device; got keys on cpu and x on meta"):
        P.apply(torch.empty(3, 2, device="meta", dtype=torch.float64), check_finite=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mixed_cpu_cuda_refused(rng):
    keys, betas = tensors(rng, (), 4, 3)
    with pytest.raises(ValueError, match=r"keys and betas must be on the same device; got keys on cpu and betas on cuda"):
        hh.product(keys, betas.cuda(), backend="torch")


def test_foreign_and_ragged_inputs(rng):
    with pytest.raises(TypeError, match="keys could not be converted to a torch tensor"):
        hh.product([[1.0, 2.0], [3.0]], torch.ones(2), backend="torch")
    with pytest.raises(TypeError, match="keys must be real; got complex dtype complex128"):
        hh.product(torch.ones(2, 3, dtype=torch.complex128), torch.ones(2), backend="torch")
    # NumPy input is taken (as a CPU tensor) when the torch backend is asked for
    P = hh.product(np.eye(3), np.ones(3), backend="torch")
    assert isinstance(P.dense(), torch.Tensor)


def test_nonfinite_inputs_named(rng):
    keys, betas = tensors(rng, (), 4, 3)
    betas[2] = float("nan")
    with pytest.raises(ValueError, match="betas must contain only finite numbers"):
        hh.product(keys, betas, backend="torch")


# -- plumbing -----------------------------------------------------------------------


def test_describe_and_conversions():
    be = hh.get_backend("torch")
    assert be.describe().startswith(f"torch {torch.__version__}")
    t = be.from_numpy(np.arange(3.0))
    assert t.device.type == "cpu" and t.dtype == torch.float64
    np.testing.assert_array_equal(be.to_numpy(t.to(torch.bfloat16)), [0.0, 1.0, 2.0])
    be.synchronize()


def test_inference_picks_torch_for_cpu_tensors(rng):
    keys, betas = tensors(rng, (), 3, 3)
    assert hh.product(keys, betas).backend == "torch"
