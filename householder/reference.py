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
