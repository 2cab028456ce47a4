"""The delta rule on the torch backend (chunkwise, autograd) against the float64 recurrence."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import householder as hh  # noqa: E402
from householder import reference as ref  # noqa: E402
from householder.backends import torch_delta  # noqa: E402


def make_inputs(rng, B, T, H, K, V, *, n=1, gated=False, state=None, beta_range=(0.0, 2.0), dtype=torch.float64):
    """Unit keys, beta uniform in ``beta_range``, log-decays in [-1, 0]; all as torch tensors."""
    k = rng.standard_normal((B, T * n, H, K))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    out = dict(
        q=rng.standard_normal((B, T, H, K)),
        k=k,
        v=rng.standard_normal((B, T * n, H, V)),
        beta=rng.uniform(*beta_range, (B, T * n, H)),
    )
    if gated:
        out["g"] = -rng.uniform(0.0, 1.0, (B, T, H))
    if state is not None:
        out["initial_state"] = rng.standard_normal((state, H, K, V))
    return {name: torch.tensor(a, dtype=dtype) for name, a in out.items()}


def assert_close(actual, expected, tol):
    a = actual.detach().double().cpu().numpy() if hasattr(actual, "detach") else np.asarray(actual)
    err = np.abs(a - expected).max() if a.size else 0.0
    assert a.shape == expected.shape
    assert np.all(np.isfinite(a))
    assert err <= tol * max(1.0, np.abs(expected).max()), f"max error {err:.3e} > {tol:.1e}"


def run_ref(inp, **kw):
    rest = {k: v for k, v in inp.items() if k not in ("q", "k", "v", "beta")}
    return ref.delta_product(inp["q"], inp["k"], inp["v"], inp["beta"], kw.pop("n", 1), **rest, **kw)


# -- the reference itself ----------------------------------------------------------------


def test_reference_matches_dense_matrices(rng):
    # Explicit d x d matrices, one token at a time: S_t = e^g (I - b k k^T) S + b k v^T.
    inp = make_inputs(rng, 1, 9, 2, 4, 3, gated=True, state=1)
    o, S = run_ref(inp, scale=0.7)
    q, k, v, b, g, S0 = (inp[x].numpy() for x in ("q", "k", "v", "beta", "g", "initial_state"))
    for h in range(2):
        M = S0[0, h]
        for t in range(9):
            kk = k[0, t, h][:, None]
            M = np.exp(g[0, t, h]) * (np.eye(4) - b[0, t, h] * kk @ kk.T) @ M + b[0, t, h] * kk @ v[0, t, h][None]
            np.testing.assert_allclose(o[0, t, h], 0.7 * M.T @ q[0, t, h], atol=1e-12)
        np.testing.assert_allclose(S[0, h], M, atol=1e-12)


def test_reference_state_is_the_core_product(rng):
    # With v = 0 and no gate the state after T steps is H_T ... H_1 S_0 = P^T S_0.
    inp = make_inputs(rng, 2, 11, 1, 5, 3, state=2)
    inp["v"] = torch.zeros_like(inp["v"])
    _, S = run_ref(inp)
    keys = inp["k"][:, :, 0].numpy()
    P = hh.product(keys, inp["beta"][:, :, 0].numpy())
    np.testing.assert_allclose(S[:, 0], P.apply(inp["initial_state"][:, 0].numpy(), transpose=True), atol=1e-12)


# -- chunkwise against the reference -----------------------------------------------------


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("T, chunk", [(1, 64), (37, 16), (64, 64), (50, 7)])
def test_delta_rule_matches_reference(rng, gated, with_state, T, chunk):
    B, H, K, V = 2, 3, 8, 5
    inp = make_inputs(rng, B, T, H, K, V, gated=gated, state=B if with_state else None)
    o, S = hh.delta_rule(**inp, output_final_state=True, chunk_size=chunk, backend="torch")
    ro, rS = run_ref(inp)
    assert o.dtype == torch.float64 and S.dtype == torch.float64
    assert_close(o, ro, 1e-11)
    assert_close(S, rS, 1e-11)


@pytest.mark.parametrize("beta_value", [0.0, 2.0])
def test_beta_edges(rng, beta_value):
    # beta = 0: identity steps (o reads S_0 only); beta = 2: reflections (eigenvalue -1).
    inp = make_inputs(rng, 1, 40, 2, 6, 4, gated=True, state=1)
    inp["beta"] = torch.full_like(inp["beta"], beta_value)
    o, S = hh.delta_rule(**inp, output_final_state=True, chunk_size=16, backend="torch")
    ro, rS = run_ref(inp)
    assert_close(o, ro, 1e-11)
    assert_close(S, rS, 1e-11)


def test_more_tokens_than_dimensions_and_nearly_parallel_keys(rng):
    # T >> K, keys all within 1e-4 of one direction: the chunk factor's Gram matrix is nearly singular.
    B, T, H, K, V = 1, 96, 2, 4, 3
    inp = make_inputs(rng, B, T, H, K, V, state=1)
    base = rng.standard_normal((1, 1, H, K))
    k = base + 1e-4 * rng.standard_normal((B, T, H, K))
    inp["k"] = torch.tensor(k / np.linalg.norm(k, axis=-1, keepdims=True))
    o, S = hh.delta_rule(**inp, output_final_state=True, chunk_size=32, backend="torch")
    ro, rS = run_ref(inp)
    assert_close(o, ro, 1e-10)
    assert_close(S, rS, 1e-10)


def test_non_contiguous_inputs(rng):
    inp = make_inputs(rng, 2, 21, 3, 6, 4, gated=True, state=2)
    # the same numbers behind transposed strides
    nc = {}
    for name, x in inp.items():
        y = x.transpose(0, -1).contiguous().transpose(0, -1)
        assert not y.is_contiguous() or y.dim() < 2
        nc[name] = y
    nc["q"] = torch.stack([inp["q"], -inp["q"]], dim=-1)[..., 0]  # a strided view with stride 2 in K
    assert nc["q"].stride(-1) == 2
    o, S = hh.delta_rule(**nc, output_final_state=True, chunk_size=8, backend="torch")
    ro, rS = run_ref(inp)
    assert_close(o, ro, 1e-11)
    assert_close(S, rS, 1e-11)


def test_chunk_size_does_not_change_the_result(rng):
    inp = make_inputs(rng, 1, 45, 2, 6, 6, gated=True, state=1)
    outs = [hh.delta_rule(**inp, output_final_state=True, chunk_size=c, backend="torch") for c in (1, 5, 64)]
    for o, S in outs[1:]:
        torch.testing.assert_close(o, outs[0][0], atol=1e-12, rtol=0)
        torch.testing.assert_close(S, outs[0][1], atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_low_precision_inputs_accumulate_in_float32(rng, dtype, tol):
    inp = make_inputs(rng, 2, 70, 2, 16, 8, gated=True, state=2)
    low = {name: x.to(dtype) for name, x in inp.items()}
    low["initial_state"] = inp["initial_state"].float()
    o, S = hh.delta_rule(**low, output_final_state=True, backend="torch")
    assert o.dtype == dtype and S.dtype == torch.float32
    # the reference sees the rounded inputs: what is left is the kernel's own error
    ro, rS = run_ref({name: x.double() for name, x in low.items()})
    assert_close(o, ro, tol)
    assert_close(S, rS, tol)


def test_empty_sequence(rng):
    inp = make_inputs(rng, 2, 0, 2, 4, 3, state=2)
    o, S = hh.delta_rule(**inp, output_final_state=True, backend="torch")
    assert o.shape == (2, 0, 2, 3)
    torch.testing.assert_close(S, inp["initial_state"])


# -- varlen -------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2])
def test_varlen_matches_reference_and_separate_calls(rng, n):
    lengths = [5, 0, 19, 1, 33]
    cu = np.concatenate([[0], np.cumsum(lengths)])
    H, K, V = 2, 6, 5
    inp = make_inputs(rng, 1, int(cu[-1]), H, K, V, n=n, gated=True, state=len(lengths))
    cu_t = torch.tensor(cu, dtype=torch.int32)
    o, S = hh.delta_product(**inp, num_householder=n, cu_seqlens=cu_t, output_final_state=True, chunk_size=8, backend="torch")
    ro, rS = run_ref(inp, n=n, cu_seqlens=cu)
    assert_close(o, ro, 1e-11)
    assert_close(S, rS, 1e-11)
    for i, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        part = {name: x[:, a * n : b * n] if name in ("k", "v", "beta") else x[:, a:b] for name, x in inp.items() if name != "initial_state"}
        oi, Si = hh.delta_product(**part, num_householder=n, initial_state=inp["initial_state"][i : i + 1], output_final_state=True, backend="torch")
        torch.testing.assert_close(o[:, a:b], oi, atol=1e-12, rtol=0)
        torch.testing.assert_close(S[i : i + 1], Si, atol=1e-12, rtol=0)


# -- DeltaProduct -------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("gated", [False, True])
def test_delta_product_matches_reference(rng, n, gated):
    inp = make_inputs(rng, 2, 23, 2, 6, 5, n=n, gated=gated, state=2)
    o, S = hh.delta_product(**inp, num_householder=n, output_final_state=True, chunk_size=16, backend="torch")
    ro, rS = run_ref(inp, n=n)
    assert_close(o, ro, 1e-11)
    assert_close(S, rS, 1e-11)


def test_delta_product_with_one_factor_is_delta_rule(rng):
    inp = make_inputs(rng, 1, 30, 2, 4, 4, gated=True)
    o1, _ = hh.delta_product(**inp, num_householder=1, backend="torch")
    o2, _ = hh.delta_rule(**inp, backend="torch")
    torch.testing.assert_close(o1, o2, atol=0, rtol=0)


# -- recurrent (decoding) -------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3])
def test_recurrent_matches_reference(rng, n):
    inp = make_inputs(rng, 2, 7, 3, 5, 4, n=n, gated=True, state=2)
    o, S = hh.delta_rule_recurrent(**inp, num_householder=n, backend="torch")
    ro, rS = run_ref(inp, n=n)
    assert_close(o, ro, 1e-12)
    assert_close(S, rS, 1e-12)


def test_prefill_then_decode_matches_one_pass(rng):
    # chunkwise prompt, then T = 1 steps carrying the state: the generation cache's use
    n, T0, T = 2, 13, 17
    inp = make_inputs(rng, 2, T, 2, 6, 4, n=n, gated=True)
    full, _ = run_ref(inp, n=n)

    def part(a, b):
        return {name: x[:, a * n : b * n] if name in ("k", "v", "beta") else x[:, a:b] for name, x in inp.items()}

    o, S = hh.delta_product(**part(0, T0), num_householder=n, output_final_state=True, backend="torch")
    outs = [o]
    for t in range(T0, T):
        o, S = hh.delta_rule_recurrent(**part(t, t + 1), num_householder=n, initial_state=S, backend="torch")
        assert o.shape == (2, 1, 2, 4)
        outs.append(o)
    assert_close(torch.cat(outs, dim=1), full, 1e-11)


def test_recurrent_varlen(rng):
    cu = np.array([0, 3, 4, 9])
    inp = make_inputs(rng, 1, 9, 2, 4, 3, gated=True, state=3)
    o, S = hh.delta_rule_recurrent(**inp, cu_seqlens=torch.tensor(cu), backend="torch")
    ro, rS = run_ref(inp, cu_seqlens=cu)
    assert_close(o, ro, 1e-12)
    assert_close(S, rS, 1e-12)


# -- gradients ------------------------------------------------------------------------------


def _grad_inputs(rng, n=1, B=1, T=11, cu=None):
    inp = make_inputs(rng, B, T, 2, 3, 2, n=n, gated=True, state=B if cu is None else len(cu) - 1)
    inp["beta"] = inp["beta"].clamp(0.1, 1.9)  # away from nothing in particular; all of [0, 2] is smooth
    return {name: x.requires_grad_() for name, x in inp.items()}


def test_gradcheck_delta_rule(rng):
    inp = _grad_inputs(rng, B=2)
    names = list(inp)

    def f(*xs):
        o, S = hh.delta_rule(**dict(zip(names, xs)), output_final_state=True, chunk_size=4, backend="torch")
        return o, S

    assert torch.autograd.gradcheck(f, tuple(inp.values()))


def test_gradcheck_delta_product_varlen(rng):
    cu = [0, 4, 9]
    inp = _grad_inputs(rng, n=2, T=9, cu=cu)
    names = list(inp)
    cu_t = torch.tensor(cu)

    def f(*xs):
        return hh.delta_product(**dict(zip(names, xs)), num_householder=2, cu_seqlens=cu_t, output_final_state=True, chunk_size=4, backend="torch")

    assert torch.autograd.gradcheck(f, tuple(inp.values()))


def test_gradcheck_recurrent(rng):
    inp = _grad_inputs(rng, n=2, T=3)
    names = list(inp)

    def f(*xs):
        return hh.delta_rule_recurrent(**dict(zip(names, xs)), num_householder=2, backend="torch")

    assert torch.autograd.gradcheck(f, tuple(inp.values()))


def test_chunk_factor_is_the_core_wy_factor(rng):
    # T^T of the chunk = transpose of the core's compact WY factor (NumPy backend)
    k = rng.standard_normal((3, 9, 5))
    b = rng.uniform(0, 2, (3, 9))
    A = torch_delta.chunk_factor(torch.tensor(k), torch.tensor(b)).numpy()
    T = hh.product(k, b, block_size=9).factor
    np.testing.assert_allclose(A, np.swapaxes(T, -1, -2), atol=1e-12)


# -- errors ---------------------------------------------------------------------------------


def _small(rng, **kw):
    return make_inputs(rng, 1, 6, 2, 4, 3, **kw)


@pytest.mark.parametrize(
    "change, err, match",
    [
        (lambda d: d.update(k=d["k"][:, :5]), ValueError, r"k must have shape \(B, T, H, K\) = \(1, 6, 2, 4\)"),
        (lambda d: d.update(v=d["v"][:, :, :1]), ValueError, "v must have shape"),
        (lambda d: d.update(beta=d["beta"][..., None]), ValueError, "beta must have shape"),
        (lambda d: d.update(g=d["beta"][:, :3]), ValueError, "g must have shape"),
        (lambda d: d.update(q=d["q"][0]), ValueError, r"q must have shape \(B, T, H, K\)"),
        (lambda d: d.update(initial_state=torch.zeros(1, 2, 3, 4, dtype=torch.float64)), ValueError, r"initial_state must have shape \(N, H, K, V\) = \(1, 2, 4, 3\)"),
        (lambda d: d.update(q=d["q"].numpy()), TypeError, "q must be a torch.Tensor"),
        (lambda d: d.update(v=d["v"].long()), TypeError, "v must be a floating tensor"),
        (lambda d: d.update(scale=float("nan")), ValueError, "scale must be a finite float"),
        (lambda d: d.update(chunk_size=0), ValueError, "chunk_size must be >= 1"),
        (lambda d: d.update(backend="numpy"), ValueError, "backend must be one of"),
        (lambda d: d.update(backend="jax"), ValueError, "backend must be one of"),
    ],
)
def test_bad_input_raises(rng, change, err, match):
    d = _small(rng)
    d["backend"] = "torch"
    change(d)
    with pytest.raises(err, match=match):
        hh.delta_rule(**d)


@pytest.mark.parametrize("name", ["q", "k", "v", "beta", "g", "initial_state"])
def test_nan_input_raises(rng, name):
    d = _small(rng, gated=True, state=1)
    d[name] = d[name].clone()
    d[name].view(-1)[3] = float("nan")
    with pytest.raises(ValueError, match=f"{name} must contain only finite numbers"):
        hh.delta_rule(**d, backend="torch")


@pytest.mark.parametrize(
    "cu, B, match",
    [
        ([0, 3, 6], 2, "batch of size 1"),
        ([0, 4, 3, 6], 1, "non-decreasing"),
        ([0, 3, 7], 1, "must end at the packed length T = 6"),
        ([1, 3, 6], 1, "must start at 0"),
        ([6], 1, "N >= 1"),
    ],
)
@pytest.mark.parametrize("check_finite", [True, False])
def test_bad_cu_seqlens_raises(rng, cu, B, match, check_finite):
    # offsets on the CPU are checked even under check_finite=False (only a GPU's are left unread)
    d = make_inputs(rng, B, 6, 2, 4, 3)
    with pytest.raises(ValueError, match=match):
        hh.delta_rule(**d, cu_seqlens=torch.tensor(cu), backend="torch", check_finite=check_finite)


def test_float_cu_seqlens_raises(rng):
    with pytest.raises(TypeError, match="cu_seqlens must be an integer"):
        hh.delta_rule(**_small(rng), cu_seqlens=torch.tensor([0.0, 6.0]), backend="torch")


def test_delta_product_shapes_checked(rng):
    d = make_inputs(rng, 1, 6, 2, 4, 3, n=2)
    with pytest.raises(ValueError, match=r"T \* num_householder = 6 \* 3"):
        hh.delta_product(**d, num_householder=3, backend="torch")
    with pytest.raises(ValueError, match="num_householder must be >= 1"):
        hh.delta_product(**d, num_householder=0, backend="torch")


def test_overflow_is_reported_not_returned(rng):
    # ||k||^2 = 9 with beta = 2: each step has eigenvalue -17, so float32 overflows in ~32 steps
    d = make_inputs(rng, 1, 64, 1, 4, 2, dtype=torch.float32)
    d["k"] = d["k"] * 3
    d["beta"] = torch.full_like(d["beta"], 2.0)
    with pytest.raises(FloatingPointError, match="normalise the keys"):
        hh.delta_rule(**d, backend="torch")
