"""NumPy + SciPy backend (CPU, float32/float64), written against an array
module ``xp`` so that array libraries with NumPy's API can reuse it."""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.linalg

from householder.backends._base import Backend

# Libraries whose arrays this backend must not silently convert.
_FOREIGN = ("torch", "cupy", "jax", "jaxlib", "tensorflow", "dask")


class ArrayModuleBackend(Backend):
    """Primitives written with NumPy's API on the array module ``xp``."""

    name = "numpy"
    xp: Any = np

    # -- plumbing -----------------------------------------------------------
    def asarray(self, x, name: str):
        root = type(x).__module__.split(".")[0]
        if root in _FOREIGN:
            raise TypeError(
                f"{name} is a {type(x).__module__}.{type(x).__name__} but backend {self.name!r} "
                f"takes {self.xp.__name__} arrays; pass backend={root!r} or convert it first"
            )
        try:
            a = self.xp.asarray(x)
        except (ValueError, TypeError) as exc:
            raise TypeError(f"{name} could not be converted to a {self.xp.__name__} array: {exc}") from exc
        return a

    def dtype_kind(self, a) -> str:
        kind = a.dtype.kind
        if kind == "f":
            return "f"
        if kind in "iub":
            return "i"
        return "c" if kind == "c" else "O"

    def dtype_name(self, a) -> str:
        return str(a.dtype)

    def result_float_dtype(self, *arrays):
        dt = np.result_type(*[a.dtype for a in arrays])
        if dt.kind in "iub" or dt == np.longdouble:
            return np.dtype(np.float64)
        if dt == np.float16:
            return np.dtype(np.float32)  # LAPACK has no half precision (SciPy does the same)
        return dt

    def astype(self, a, dtype):
        return a.astype(dtype, copy=False)

    def all_finite(self, a) -> bool:
        return bool(self.xp.isfinite(a).all())

    def broadcast_to(self, a, shape):
        return self.xp.broadcast_to(a, tuple(shape))

    def to_numpy(self, a):
        return np.asarray(a)

    def from_numpy(self, a, like=None):
        return self.xp.asarray(a)

    def describe(self) -> str:
        return f"numpy {np.__version__}, scipy {scipy.__version__} (CPU)"

    # -- shape helpers ------------------------------------------------------
    def zeros(self, shape, like):
        return self.xp.zeros(tuple(shape), dtype=like.dtype)

    def eye(self, n, like):
        return self.xp.eye(n, dtype=like.dtype)

    def concat(self, arrays, axis):
        return self.xp.concatenate(list(arrays), axis=axis)

    def reshape(self, a, shape):
        return self.xp.reshape(a, tuple(shape))

    def flip(self, a, axes):
        return self.xp.flip(a, axis=tuple(axes))

    def mT(self, a):
        return self.xp.swapaxes(a, -1, -2)

    def matmul(self, a, b):
        return self.xp.matmul(a, b)

    # -- numerics -------------------------------------------------------------
    def wy_factor(self, K, beta):
        # LAPACK xLARFT's column recurrence, generalised to any beta, run on the
        # Gram matrix so each step is one batched matrix-vector product.
        xp = self.xp
        b = K.shape[-2]
        G = K @ self.mT(K)
        T = xp.zeros(G.shape, dtype=G.dtype)
        for i in range(b):
            T[..., i, i] = beta[..., i]
            if i:
                col = T[..., :i, :i] @ G[..., :i, i, None]
                T[..., :i, i] = -beta[..., i, None] * col[..., 0]
        return T

    def ut_factor(self, K, beta):
        xp = self.xp
        b = K.shape[-2]
        G = K @ self.mT(K)
        A = beta[..., :, None] * xp.triu(G, 1)
        idx = xp.arange(b)
        A[..., idx, idx] = 1
        return A

    def solve_unit_upper(self, A, y, transpose: bool):
        """Solve A z = y (or A^T z = y) with A unit upper triangular, batched."""
        batch = np.broadcast_shapes(A.shape[:-2], y.shape[:-2])
        A = self.broadcast_to(A, batch + A.shape[-2:])
        y = self.broadcast_to(y, batch + y.shape[-2:])
        return scipy.linalg.solve_triangular(
            A, y, lower=False, trans="T" if transpose else "N", unit_diagonal=True, check_finite=False
        )

    def apply_block(self, form, K, beta, F, x, transpose: bool):
        """x - K^T (factor op) K x for one block: K (..., b, d), F (..., b, b)."""
        y = K @ x
        if form == "wy":
            y = (self.mT(F) if transpose else F) @ y
        elif transpose:
            y = beta[..., :, None] * self.solve_unit_upper(F, y, True)
        else:
            y = self.solve_unit_upper(F, beta[..., :, None] * y, False)
        return x - self.mT(K) @ y

    def apply_blocks(self, form, K, beta, F, x, transpose: bool):
        m = K.shape[-3]
        order = range(m) if transpose else range(m - 1, -1, -1)
        for j in order:
            x = self.apply_block(form, K[..., j, :, :], beta[..., j, :], F[..., j, :, :], x, transpose)
        return x

    def dense_blocks(self, form, K, beta, F):
        # The first block applied acts on I: start from I - K^T (F op) K and save a product.
        m, d = K.shape[-3], K.shape[-1]
        Kl, bl, Fl = K[..., m - 1, :, :], beta[..., m - 1, :], F[..., m - 1, :, :]
        if form == "wy":
            W = Fl @ Kl
        else:
            W = self.solve_unit_upper(Fl, bl[..., :, None] * Kl, False)
        P = self.xp.eye(d, dtype=K.dtype) - self.mT(Kl) @ W
        return self.apply_blocks(form, K[..., : m - 1, :, :], beta[..., : m - 1, :], F[..., : m - 1, :, :], P, False)


def load() -> Backend:
    """The NumPy backend (always available)."""
    return ArrayModuleBackend()
