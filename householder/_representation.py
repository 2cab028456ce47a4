"""The product P = H_1 H_2 ... H_n as a compact representation.

Keys are split into blocks of at most ``block_size`` factors; each block keeps
its own triangular factor, and P is applied as the product of the block
reflectors (as LAPACK's xORGQR does). This keeps float32 orthogonality close
to the sequential product for n in the thousands, and makes composition free:
the product of two products is the concatenation of their block lists.
"""

from __future__ import annotations

from typing import Any

from householder import _checks

DEFAULT_BLOCK_SIZE = 64


class _Segment:
    """m blocks of b factors: K (..., m, b, d), beta (..., m, b), F (..., m, b, b)."""

    __slots__ = ("K", "beta", "F", "n")

    def __init__(self, K, beta, F, n: int):
        self.K, self.beta, self.F, self.n = K, beta, F, n


def _build_segment(be, form: str, keys, betas, block_size: int) -> _Segment:
    n, d = keys.shape[-2], keys.shape[-1]
    batch = tuple(keys.shape[:-2])
    b = min(block_size, n)
    m = -(-n // b)
    pad = m * b - n
    if pad:
        # Zero keys with zero beta are identity factors: padding changes nothing.
        keys = be.concat([keys, be.zeros(batch + (pad, d), like=keys)], axis=-2)
        betas = be.concat([betas, be.zeros(batch + (pad,), like=betas)], axis=-1)
    K = be.reshape(keys, batch + (m, b, d))
    beta = be.reshape(betas, batch + (m, b))
    F = be.wy_factor(K, beta) if form == "wy" else be.ut_factor(K, beta)
    return _Segment(K, beta, F, n)


class HouseholderProduct:
    """P = H_1 H_2 ... H_n with H_i = I - beta_i k_i k_i^T, never formed densely.

    Create it with :func:`householder.product`. ``keys`` has shape (..., n, d),
    ``betas`` (..., n); ``P @ x`` applies P to x of shape (..., d, m),
    ``P @ Q`` composes two products, ``P.T`` is the transposed product.
    """

    __array_priority__ = 1000  # make ndarray @ P call our __rmatmul__

    def __init__(self, backend, form: str, keys, betas, segments, block_size: int, check_finite: bool = True):
        self._be = backend
        self._check_finite = check_finite
        self._form = form
        self._keys = keys
        self._betas = betas
        self._segments = segments
        self._block_size = block_size
        self._factor = None

    # -- attributes ---------------------------------------------------------
    @property
    def form(self) -> str:
        """"wy" (compact WY, P = I - K^T T K) or "ut" (UT transform)."""
        return self._form

    @property
    def backend(self) -> str:
        """Name of the backend that holds the arrays."""
        return self._be.name

    @property
    def keys(self):
        """Keys K, (..., n, d), one key a row."""
        return self._keys

    @property
    def betas(self):
        """Betas, (..., n)."""
        return self._betas

    @property
    def block_size(self) -> int:
        """Most factors per block of the blocked representation."""
        return self._block_size

    @property
    def n(self) -> int:
        """Number of factors."""
        return self._keys.shape[-2]

    @property
    def d(self) -> int:
        """Dimension of the space P acts on."""
        return self._keys.shape[-1]

    @property
    def batch_shape(self) -> tuple:
        """Leading batch dimensions."""
        return tuple(self._keys.shape[:-2])

    @property
    def shape(self) -> tuple:
        """Shape of the dense P: (..., d, d)."""
        return self.batch_shape + (self.d, self.d)

    @property
    def dtype(self):
        """Floating dtype of keys, betas and factors."""
        return self._keys.dtype

    @property
    def factor(self):
        """The triangular factor of the whole product, (..., n, n).

        "wy": T, upper triangular, with P = I - K^T T K.
        "ut": A = I + diag(beta) striu(K K^T), unit upper triangular, with
        P = I - K^T A^{-1} diag(beta) K. When no beta is zero, A = diag(beta) S
        for the UT transform's S = diag(1/beta) + striu(K K^T), so A^{-1} diag(beta)
        = S^{-1}; A stays finite where beta = 0 (identity factors).
        """
        if self._factor is None:
            self._factor = self._full_factor()
        return self._factor

    def _full_factor(self):
        be = self._be
        if self._form == "ut":
            return be.ut_factor(self._keys, self._betas)
        if not self._segments:
            return be.zeros(self.batch_shape + (0, 0), like=self._keys)
        # Compose the blocks' T pairwise (a tree) by the composition rule.
        parts = [
            (be.astype(seg.K[..., j, :, :], seg.F.dtype), seg.F[..., j, :, :])
            for seg in self._segments
            for j in range(seg.K.shape[-3])
        ]
        while len(parts) > 1:
            merged = [compose_wy_factors(be, *parts[i], *parts[i + 1]) for i in range(0, len(parts) - 1, 2)]
            parts = merged + parts[len(parts) - len(parts) % 2:]
        T = parts[0][1]
        # Drop the rows and columns of padding factors (they are exactly zero).
        spans, offset = [], 0
        for seg in self._segments:
            spans.append((offset, offset + seg.n))
            offset += seg.K.shape[-3] * seg.K.shape[-2]
        if offset == self.n:
            return T
        T = be.concat([T[..., a:b, :] for a, b in spans], axis=-2)
        return be.concat([T[..., :, a:b] for a, b in spans], axis=-1)

    # -- operations ---------------------------------------------------------
    def apply(self, x, transpose: bool = False, *, check_finite: bool | None = None):
        """P @ x (or P^T @ x if ``transpose``) for x (..., d, m), without forming P."""
        be = self._be
        if check_finite is None:
            check_finite = self._check_finite
        x = _checks.check_operand(be, x, self.d, "x", check_finite, self.batch_shape)
        be.check_compatible(("keys", self._keys), ("x", x))
        dtype = be.result_float_dtype(self._keys, x)
        x = be.astype(x, dtype)
        segments = self._segments if transpose else self._segments[::-1]
        for seg in segments:
            K, beta = be.astype(seg.K, dtype), be.astype(seg.beta, dtype)
            # factors stay in at least float32 (see Backend.factor_dtype)
            F = be.astype(seg.F, be.factor_dtype(dtype))
            x = be.apply_blocks(self._form, K, beta, F, x, transpose)
        if not self._segments:
            x = x + 0  # a new array, as for n > 0
        elif check_finite:
            _checks.check_result_finite(be, x, "P @ x")
        return x

    def dense(self, *, check_finite: bool | None = None):
        """The dense product P, (..., d, d), as an array of the input's library.

        With ``check_finite`` (default: the flag the product was built with), a
        non-finite result of finite input raises FloatingPointError instead of
        being returned.
        """
        be = self._be
        if check_finite is None:
            check_finite = self._check_finite
        if not self._segments:
            return be.broadcast_to(be.eye(self.d, like=self._keys), self.shape) + 0
        last = self._segments[-1]
        P = be.dense_blocks(self._form, last.K, last.beta, last.F)
        for seg in self._segments[-2::-1]:
            P = be.apply_blocks(self._form, seg.K, seg.beta, seg.F, P, False)
        if check_finite:
            _checks.check_result_finite(be, P, "P")
        return P

    @property
    def T(self) -> "HouseholderProduct":
        """The transposed product P^T = H_n ... H_1 (keys reversed)."""
        be = self._be
        segments = []
        for seg in self._segments[::-1]:
            K = be.flip(seg.K, (-3, -2))
            beta = be.flip(seg.beta, (-2, -1))
            if self._form == "wy":
                # reversing the order maps T to J T^T J (J the exchange matrix)
                F = be.flip(be.mT(seg.F), (-3, -2, -1))
            else:
                F = be.ut_factor(K, beta)
            segments.append(_Segment(K, beta, F, seg.n))
        keys = be.flip(self._keys, (-2,))
        betas = be.flip(self._betas, (-1,))
        return HouseholderProduct(be, self._form, keys, betas, segments, self._block_size, self._check_finite)

    def to(self, form: str) -> "HouseholderProduct":
        """The same product in representation ``form`` ("wy" or "ut")."""
        form = _checks.check_form(form)
        if form == self._form:
            return self
        be = self._be
        segments = [
            _Segment(s.K, s.beta, be.wy_factor(s.K, s.beta) if form == "wy" else be.ut_factor(s.K, s.beta), s.n)
            for s in self._segments
        ]
        return HouseholderProduct(be, form, self._keys, self._betas, segments, self._block_size, self._check_finite)

    def compose(self, other: "HouseholderProduct") -> "HouseholderProduct":
        """P @ Q as a product: concatenated keys, blocks of both, no dense matrix."""
        if not isinstance(other, HouseholderProduct):
            raise TypeError(f"other must be a HouseholderProduct; got {type(other).__name__}")
        if other._be is not self._be:
            raise ValueError(
                f"cannot compose products of different backends: {self.backend!r} and {other.backend!r}"
            )
        if other.d != self.d:
            raise ValueError(f"cannot compose products of d = {self.d} and d = {other.d}")
        if other._form != self._form:
            other = other.to(self._form)
        be = self._be
        batch = _checks.broadcast_batch("P", self.batch_shape, "Q", other.batch_shape)
        dtype = be.result_float_dtype(self._keys, other._keys)

        def cast(a, tail):
            return be.broadcast_to(be.astype(a, dtype), batch + tuple(a.shape[len(a.shape) - tail:]))

        fdtype = be.factor_dtype(dtype)

        def cast_factor(a):
            return be.broadcast_to(be.astype(a, fdtype), batch + tuple(a.shape[len(a.shape) - 3:]))

        segments = [
            _Segment(cast(s.K, 3), cast(s.beta, 2), cast_factor(s.F), s.n)
            for s in self._segments + other._segments
        ]
        keys = be.concat([cast(self._keys, 2), cast(other._keys, 2)], axis=-2)
        betas = be.concat([cast(self._betas, 1), cast(other._betas, 1)], axis=-1)
        return HouseholderProduct(be, self._form, keys, betas, segments, self._block_size, self._check_finite and other._check_finite)

    def __matmul__(self, other: Any):
        if isinstance(other, HouseholderProduct):
            return self.compose(other)
        return self.apply(other)

    def __rmatmul__(self, other: Any):
        # x @ P = (P^T x^T)^T for x (..., m, d)
        be = self._be
        x = be.asarray(other, "x")
        if len(x.shape) < 2:
            raise ValueError(f"x must have shape (..., m, d) with at least 2 dimensions; got shape {tuple(x.shape)}")
        return be.mT(self.apply(be.mT(x), transpose=True))

    def __repr__(self) -> str:
        return (
            f"HouseholderProduct(form={self._form!r}, backend={self.backend!r}, "
            f"batch_shape={self.batch_shape}, n={self.n}, d={self.d}, dtype={self.dtype})"
        )


def compose_wy_factors(be, K1, T1, K2, T2):
    """Composition rule: T of [K1; K2] is [[T1, -T1 K1 K2^T T2], [0, T2]]."""
    off = -(T1 @ (K1 @ be.mT(K2)) @ T2)
    n1, n2 = T1.shape[-1], T2.shape[-1]
    batch = tuple(off.shape[:-2])
    T1 = be.broadcast_to(T1, batch + (n1, n1))
    T2 = be.broadcast_to(T2, batch + (n2, n2))
    top = be.concat([T1, off], axis=-1)
    bottom = be.concat([be.zeros(batch + (n2, n1), like=T1), T2], axis=-1)
    K = be.concat([be.broadcast_to(K1, batch + tuple(K1.shape[-2:])), be.broadcast_to(K2, batch + tuple(K2.shape[-2:]))], axis=-2)
    return K, be.concat([top, bottom], axis=-2)


def product(
    keys,
    betas,
    *,
    form: str = "wy",
    backend: str | None = None,
    check_finite: bool = True,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> HouseholderProduct:
    """The product P = H_1 H_2 ... H_n, H_i = I - beta_i k_i k_i^T, in compact form.

    Parameters
    ----------
    keys : array, (..., n, d)
        One key a row; not normalised by the library. Integer input is promoted
        to float64; float32 stays float32.
    betas : array, (..., n)
        Broadcasts against ``keys.shape[:-1]``. beta in [0, 2] with unit keys
        keeps every factor non-expansive (0: identity, 2: reflection).
    form : {"wy", "ut"}
        Compact WY (P = I - K^T T K) or UT transform (P = I - K^T S^{-1} K).
    backend : str, optional
        "numpy", "torch", "triton" or "cupy"; default from the context, then
        ``HOUSEHOLDER_BACKEND``, then the array's library.
    check_finite : bool
        Raise ValueError on NaN or Inf in the inputs (SciPy's convention), and
        FloatingPointError if finite input overflows. It is also the default of
        ``dense``/``apply`` on the product: False skips every check (and the
        device synchronisation the checks need on a GPU).
    block_size : int
        Factors per block of the blocked representation.

    Returns
    -------
    HouseholderProduct
    """
    be = _resolve(backend, keys)
    form = _checks.check_form(form)
    block_size = _checks.check_block_size(block_size)
    keys, betas = _checks.check_keys_betas(be, keys, betas, check_finite)
    segments = [] if keys.shape[-2] == 0 else [_build_segment(be, form, keys, betas, block_size)]
    if check_finite and segments:
        _checks.check_result_finite(be, segments[0].F, "the triangular factor")
    return HouseholderProduct(be, form, keys, betas, segments, block_size, check_finite)


def _resolve(backend, x):
    from householder._registry import resolve

    return resolve(backend, x)
