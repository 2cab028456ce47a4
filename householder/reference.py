"""Float64 sequential references: the ground truth every backend is tested against.

They apply one rank-one update per factor, in order, in float64 NumPy, with no
blocking and no triangular factor. Inputs of any array library are copied to
NumPy first; outputs are NumPy float64 arrays.
"""

from __future__ import annotations

import numpy as np


def to_float64(a) -> np.ndarray:
    """A float64 NumPy copy of a NumPy, torch or CuPy array (or nested list)."""
    if hasattr(a, "detach"):  # torch
        a = a.detach().to("cpu").double().numpy()
    elif hasattr(a, "get") and type(a).__module__.startswith("cupy"):
        a = a.get()
    return np.array(a, dtype=np.float64)


def apply(keys, betas, x, transpose: bool = False) -> np.ndarray:
    """P @ x (or P^T @ x) for P = H_1 ... H_n, H_i = I - beta_i k_i k_i^T.

    keys (..., n, d), betas (..., n), x (..., d, m); batch dims broadcast.
    """
    K, b, X = to_float64(keys), to_float64(betas), to_float64(x)
    n = K.shape[-2]
    b = np.broadcast_to(b, np.broadcast_shapes(b.shape, K.shape[:-1]))
    order = range(n) if transpose else range(n - 1, -1, -1)
    for i in order:
        k = K[..., i, :]  # (..., d)
        coef = np.einsum("...d,...dm->...m", k, X)  # k^T X
        X = X - b[..., i, None, None] * k[..., :, None] * coef[..., None, :]
    return X


def dense(keys, betas) -> np.ndarray:
    """The d x d product P = H_1 ... H_n, by n sequential rank-one updates."""
    K = to_float64(keys)
    d = K.shape[-1]
    batch = np.broadcast_shapes(K.shape[:-2], np.shape(betas)[:-1])
    eye = np.broadcast_to(np.eye(d), batch + (d, d))
    return apply(K, betas, eye)


def _sequence_bounds(T: int, batch: int, cu_seqlens) -> list[tuple[int, int, int]]:
    """(batch row, start, end) of every sequence: one per row, or the packed ones."""
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(batch)]
    cu = [int(c) for c in to_float64(cu_seqlens)]
    return [(0, cu[i], cu[i + 1]) for i in range(len(cu) - 1)]


def delta_product(
    q, k, v, beta, num_householder: int, g=None, scale=None, initial_state=None, cu_seqlens=None
) -> tuple[np.ndarray, np.ndarray]:
    """DeltaProduct by the token-by-token recurrence, in float64.

    q (B, T, H, K); k (B, T*n, H, K); v (B, T*n, H, V); beta (B, T*n, H) with
    n = num_householder factors per token, token t's j-th at index t*n + j;
    g (B, T, H) log-decay or None; initial_state (N, H, K, V) or None;
    cu_seqlens (N+1,) offsets of packed sequences in a B = 1 batch (in tokens)
    or None. For each token: S <- exp(g_t) S, then for j = 1..n
    S <- (I - beta k k^T) S + beta k v^T, then o_t = scale S^T q_t.
    Returns o (B, T, H, V) and the final states (N, H, K, V).
    """
    Q, Kx, Vx, Bx = (to_float64(a) for a in (q, k, v, beta))
    n = int(num_householder)
    batch, T, H, dk = Q.shape
    dv = Vx.shape[-1]
    G = np.zeros((batch, T, H)) if g is None else to_float64(g)
    scale = dk**-0.5 if scale is None else float(scale)
    bounds = _sequence_bounds(T, batch, cu_seqlens)
    O = np.zeros((batch, T, H, dv))
    finals = np.zeros((len(bounds), H, dk, dv))
    for i, (b, start, end) in enumerate(bounds):
        S = np.zeros((H, dk, dv)) if initial_state is None else to_float64(initial_state)[i].copy()
        for t in range(start, end):
            S = np.exp(G[b, t])[:, None, None] * S
            for j in range(n):
                kk, vv, bb = Kx[b, t * n + j], Vx[b, t * n + j], Bx[b, t * n + j]  # (H, K), (H, V), (H,)
                delta = vv - np.einsum("hkv,hk->hv", S, kk)  # v - S^T k
                S = S + bb[:, None, None] * kk[:, :, None] * delta[:, None, :]
            O[b, t] = scale * np.einsum("hkv,hk->hv", S, Q[b, t])
        finals[i] = S
    return O, finals


def delta_rule(q, k, v, beta, g=None, scale=None, initial_state=None, cu_seqlens=None) -> tuple[np.ndarray, np.ndarray]:
    """The (gated) delta rule by the token-by-token recurrence, in float64.

    q, k (B, T, H, K); v (B, T, H, V); beta (B, T, H); g (B, T, H) or None;
    initial_state (N, H, K, V) or None; cu_seqlens (N+1,) or None.
    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,
    o_t = scale S_t^T q_t (scale defaults to K**-0.5).
    Returns o (B, T, H, V) and the final states (N, H, K, V).
    """
    return delta_product(q, k, v, beta, 1, g=g, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens)
