"""The "triton" backend: its kernels against the float64 reference and the torch backend.

On a machine without a GPU the kernels run in Triton's interpreter
(TRITON_INTERPRET=1, set by conftest) on CPU tensors: shapes stay tiny.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the triton backend needs torch")
pytest.importorskip("triton", reason="the triton backend needs triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import householder as hh  # noqa: E402
from householder.backends._triton_factor import unit_upper_inverse, wy_factor_from_gram  # noqa: E402
from householder import reference  # noqa: E402
from tests.conftest import tolerance, unit_keys  # noqa: E402

pytestmark = pytest.mark.interpret

try:
    BE = hh.get_backend("triton")
except hh.BackendUnavailableError as exc:  # no GPU and no interpreter
    pytest.skip(f"backend 'triton' unavailable here: {exc}", allow_module_level=True)

DEVICE = "cpu" if BE.interpret else "cuda"
FORMS = ["wy", "ut"]


def tensors(rng, batch, n, d, dtype=torch.float64, betas=None):
    keys = torch.tensor(unit_keys(rng, batch + (n, d)), dtype=dtype, device=DEVICE)
    if betas is None:
        b = rng.uniform(0.0, 2.0, batch + (n,))
    else:
        b = np.full(batch + (n,), float(betas))
    return keys, torch.tensor(b, dtype=dtype, device=DEVICE)


def err(got, want) -> float:
    return float(np.abs(reference.to_float64(got) - want).max())


def fp32_tol(n, d) -> float:
    # tf32x3 on the GPU is a little less accurate than exact float32 dots
    return tolerance(np.float32, n, d) * (1 if BE.interpret else 4)


# -- forward against the reference ----------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(
    "batch,n,d,block",
    [((), 1, 5, 64), ((2,), 21, 6, 8), ((3,), 9, 4, 64), ((), 40, 24, 16)],
    ids=["n=1", "n%block!=0,n>d", "n>d,one block", "d>16"],
)
def test_float64_dense_apply_transpose(rng, form, batch, n, d, block):
    keys, betas = tensors(rng, batch, n, d)
    P = hh.product(keys, betas, form=form, block_size=block, backend="triton")
    ref = reference.dense(keys, betas)
    x = rng.standard_normal(batch + (d, 3))
    xt = torch.tensor(x, device=DEVICE)
    assert err(P.dense(), ref) < 1e-13
    assert err(P.apply(xt), ref @ x) < 1e-13
    assert err(P.apply(xt, transpose=True), np.swapaxes(ref, -1, -2) @ x) < 1e-13
    assert err(P.T.dense(), np.swapaxes(ref, -1, -2)) < 1e-13


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("beta", [0.0, 2.0])
def test_special_betas(rng, form, beta):
    keys, betas = tensors(rng, (2,), 19, 5, betas=beta)
    P = hh.product(keys, betas, form=form, block_size=16, backend="triton")
    D = reference.to_float64(P.dense())
    assert np.abs(D - reference.dense(keys, betas)).max() < 1e-13
    if beta == 0.0:
        assert np.abs(D - np.eye(5)).max() == 0.0
    else:
        assert np.abs(D @ np.swapaxes(D, -1, -2) - np.eye(5)).max() < 1e-13


@pytest.mark.parametrize("form", FORMS)
def test_float32_with_zero_betas_and_parallel_keys(rng, form):
    n, d = 37, 8
    keys, betas = tensors(rng, (2,), n, d, dtype=torch.float32)
    betas[:, ::4] = 0.0
    base = keys[:, :1, :]
    keys[:, 10:20] = base + 1e-4 * keys[:, 10:20]  # nearly parallel
    keys[:, 10:20] /= keys[:, 10:20].norm(dim=-1, keepdim=True)
    betas[:, 10:20] = 2.0
    P = hh.product(keys, betas, form=form, block_size=16, backend="triton")
    ref = reference.dense(keys, betas)
    assert err(P.dense(), ref) <= fp32_tol(n, d)
    x = rng.standard_normal((2, d, 20))
    assert err(P.apply(torch.tensor(x, dtype=torch.float32, device=DEVICE)), ref @ x) <= fp32_tol(n, d) * 4


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(rng, form, dtype):
    n, d = 20, 16
    keys, betas = tensors(rng, (2,), n, d, dtype=dtype)
    ref = reference.dense(keys, betas)  # of the rounded inputs
    P = hh.product(keys, betas, form=form, block_size=8, backend="triton")
    assert P.factor.dtype == torch.float32
    D = P.dense()
    assert D.dtype == dtype
    assert err(D, ref) <= 2.0**-7
    x = torch.tensor(rng.standard_normal((2, d, 5)), dtype=dtype, device=DEVICE)
    y = P.apply(x, transpose=True)
    assert y.dtype == dtype
    assert err(y, np.swapaxes(ref, -1, -2) @ reference.to_float64(x)) <= 2.0**-5


def test_wide_blocks_and_long_factor(rng):
    # blocks wider than the 64 factors held in registers, and the n x n factor of a long product
    n, d = 150, 6
    keys, betas = tensors(rng, (), n, d)
    ref = reference.dense(keys, betas)
    for form in FORMS:
        P = hh.product(keys, betas, form=form, block_size=100, backend="triton")
        assert err(P.dense(), ref) < 1e-12
        F = reference.to_float64(P.factor)
        K = keys.double().numpy() if DEVICE == "cpu" else keys.double().cpu().numpy()
        b = reference.to_float64(betas)
        if form == "wy":
            dense = np.eye(d) - K.T @ F @ K
        else:
            dense = np.eye(d) - K.T @ np.linalg.solve(F, b[:, None] * K)
        assert np.abs(dense - ref).max() < 1e-10


@triton.jit
def _device_function_kernel(G, beta, T, X, BT: tl.constexpr, PRECISION: tl.constexpr):
    r = tl.arange(0, BT)
    g = tl.load(G + r[:, None] * BT + r[None, :])
    b = tl.load(beta + r)
    tl.store(T + r[:, None] * BT + r[None, :], wy_factor_from_gram(g, b, BT, PRECISION))
    tl.store(X + r[:, None] * BT + r[None, :], unit_upper_inverse(b[:, None] * g, BT, PRECISION))


@pytest.mark.parametrize("BT", [16, 32, 64])
def test_in_register_factor_device_functions(rng, BT):
    # the @triton.jit functions the delta-rule kernels share: Gram block + betas -> T
    keys, betas = tensors(rng, (), BT, 24, dtype=torch.float32)
    betas[3] = 0.0
    G = (keys @ keys.mT).contiguous()
    T = torch.empty(BT, BT, device=DEVICE)
    X = torch.empty(BT, BT, device=DEVICE)
    _device_function_kernel[(1,)](G, betas, T, X, BT=BT, PRECISION="ieee" if BE.interpret else "split")
    A = torch.eye(BT, dtype=torch.float64) + betas.double().cpu()[:, None] * torch.triu(G.double().cpu(), 1)
    Xref = torch.linalg.inv(A)
    assert float((X.double().cpu() - Xref).abs().max()) < 1e-5
    assert float((T.double().cpu() - Xref * betas.double().cpu()[None, :]).abs().max()) < 1e-5


@pytest.mark.parametrize("quadrants", [False, True], ids=["one tile", "quadrants"])
@pytest.mark.parametrize("n", [23, 64])
def test_factor_kernels(rng, quadrants, n):
    # the factor kernels of _triton_factor (both code paths) against the torch backend's factors
    from householder.backends import _triton_factor as tf

    keys, betas = tensors(rng, (3,), n, 10)
    betas[:, 5] = 0.0
    torch_be = hh.get_backend("torch")
    old = tf.CONFIG["quadrants"]
    tf.CONFIG["quadrants"] = quadrants
    try:
        T = tf.factor_forward("wy", keys, betas, torch.float64, "ieee")
        A = tf.factor_forward("ut", keys, betas, torch.float64, "ieee")
        Tu = tf.factor_forward("utinv", A, betas, torch.float64, "ieee")
    finally:
        tf.CONFIG["quadrants"] = old
    assert err(T, reference.to_float64(torch_be.wy_factor(keys, betas))) < 1e-13
    assert err(A, reference.to_float64(torch_be.ut_factor(keys, betas))) < 1e-15
    assert err(Tu, reference.to_float64(T)) < 1e-13


def test_block_width_limit():
    from householder.backends import _triton_factor as tf

    with pytest.raises(ValueError, match="at most 64 factors; got 65"):
        tf.block_width(65)


@pytest.mark.parametrize("precision", ["tf32x3", "split"])
def test_float32_precision_modes(rng, precision):
    # the 3xTF32 paths (tf32 doubling + a Newton step; the hand-made split), forward and backward
    n, d = 40, 20
    keys, betas = tensors(rng, (2,), n, d, dtype=torch.float32)
    x = torch.tensor(rng.standard_normal((2, d, 6)), dtype=torch.float32, device=DEVICE)
    ref = reference.dense(keys, betas)
    want = _grads("torch", "ut", "apply", keys.double(), betas.double(), x.double(), 3)
    old = BE.fp32_precision
    BE.fp32_precision = precision
    try:
        for form in FORMS:
            P = hh.product(keys, betas, form=form, block_size=32, backend="triton")
            assert err(P.dense(), ref) <= fp32_tol(n, d)
            assert err(P.apply(x, transpose=True), np.swapaxes(ref, -1, -2) @ reference.to_float64(x)) <= 4 * fp32_tol(n, d)
        got = _grads("triton", "ut", "apply", keys, betas, x, 3)
    finally:
        BE.fp32_precision = old
    for g, w in zip(got, want):
        assert float((g - w).abs().max()) <= 1e-4 * float(w.abs().max())


# -- backward: Triton kernels against the torch backend's autograd ----------------------


def _grads(backend, form, what, keys, betas, x, cot_seed):
    k, b, xx = (t.detach().clone().requires_grad_() for t in (keys, betas, x))
    P = hh.product(k, b, form=form, block_size=8, backend=backend)
    out = {
        "dense": lambda: P.dense(),
        "apply": lambda: P.apply(xx),
        "applyT": lambda: P.apply(xx, transpose=True),
        "rmatmul": lambda: xx.mT @ P,
        "compose": lambda: (P @ P.T).apply(xx),
        "factor": lambda: P.factor,
    }[what]()
    cot = torch.tensor(np.random.default_rng(cot_seed).standard_normal(tuple(out.shape)), dtype=out.dtype, device=DEVICE)
    grads = torch.autograd.grad(out, (k, b, xx), cot, allow_unused=True)
    return [torch.zeros(()) if g is None else g.double().cpu() for g in grads]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("what", ["dense", "apply", "applyT", "rmatmul", "compose", "factor"])
def test_backward_matches_torch_backend(rng, form, what):
    keys, betas = tensors(rng, (2,), 13, 5)
    betas[:, 3] = 0.0
    x = torch.tensor(rng.standard_normal((2, 5, 3)), device=DEVICE)
    seed = int(rng.integers(1 << 31))
    want = _grads("torch", form, what, keys, betas, x, seed)
    got = _grads("triton", form, what, keys, betas, x, seed)
    for g, w, name in zip(got, want, ("keys", "betas", "x")):
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-12, msg=f"gradient of {name}")


def test_backward_float32_and_bf16(rng):
    keys, betas = tensors(rng, (2,), 21, 16)
    x = torch.tensor(rng.standard_normal((2, 16, 4)), device=DEVICE)
    want = _grads("torch", "wy", "apply", keys, betas, x, 7)
    for dtype, rtol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
        got = _grads("triton", "wy", "apply", keys.to(dtype), betas.to(dtype), x.to(dtype), 7)
        for g, w in zip(got, want):
            assert float((g - w).abs().max()) <= rtol * float(w.abs().max())


@pytest.mark.parametrize("form", FORMS)
def test_gradcheck_float64(rng, form):
    keys, betas = tensors(rng, (), 3, 4)
    x = torch.tensor(rng.standard_normal((4, 2)), device=DEVICE)
    args = tuple(t.clone().requires_grad_() for t in (keys, betas, x))

    def f(k, b, x):
        P = hh.product(k, b, form=form, block_size=2, backend="triton")
        return P.dense(), P.apply(x, transpose=True)

    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7)


# -- devices and errors ----------------------------------------------------------------------


def test_from_numpy_device_and_describe():
    t = BE.from_numpy(np.ones(3))
    assert t.device.type == DEVICE
    assert BE.describe().startswith("triton ")


def test_cpu_tensor_refused_without_interpreter():
    from householder.backends.triton import TritonBackend

    with pytest.raises(ValueError, match=r"keys is a tensor on cpu, but backend 'triton' runs on CUDA tensors.*TRITON_INTERPRET=1"):
        TritonBackend(interpret=False).asarray(torch.ones(3, 2), "keys")


def test_cpu_tensor_without_interpreter_in_a_fresh_process():
    # TRITON_INTERPRET is read when kernels are defined: a fresh process without it
    # must refuse CPU tensors with a clear message (no GPU: the backend is unavailable).
    code = (
        "import torch, householder as hh\n"
        "try:\n"
        "    hh.product(torch.ones(3, 2), torch.ones(3), backend='triton')\n"
        "except (ValueError, hh.BackendUnavailableError) as exc:\n"
        "    print(type(exc).__name__, exc)\n"
        "else:\n"
        "    print('no error')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    if torch.cuda.is_available():
        assert "ValueError keys is a tensor on cpu, but backend 'triton' runs on CUDA tensors" in out.stdout
    else:
        assert "BackendUnavailableError backend 'triton' is not available: no CUDA device" in out.stdout
        assert "TRITON_INTERPRET=1" in out.stdout


def test_mixed_dtypes_named(rng):
    keys, betas = tensors(rng, (), 4, 3)
    with pytest.raises(TypeError, match="keys and betas must have the same floating dtype"):
        hh.product(keys, betas.float(), backend="triton")
