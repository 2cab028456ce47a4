"""The primitives every backend provides, and defaults built from them."""

from __future__ import annotations


class Backend:
    """Interface of a backend. Arrays are the backend library's own type.

    Plumbing: ``asarray``, ``dtype_kind``, ``dtype_name``, ``result_float_dtype``,
    ``astype``, ``all_finite``, ``broadcast_to``, ``to_numpy``, ``from_numpy``.
    Shape helpers: ``zeros``, ``eye``, ``concat``, ``reshape``, ``flip``, ``mT``, ``matmul``.
    Numerics (the part worth a kernel):

    - ``wy_factor(K, beta)``: K (..., b, d), beta (..., b) -> T (..., b, b), upper
      triangular, with H_1...H_b = I - K^T T K.
    - ``ut_factor(K, beta)``: -> A = I + diag(beta) striu(K K^T) (..., b, b), unit
      upper triangular, with H_1...H_b = I - K^T A^{-1} diag(beta) K.
    - ``apply_blocks(form, K, beta, F, x, transpose)``: K (..., m, b, d), beta
      (..., m, b), F (..., m, b, b) the blocks' factors, x (..., d, c) -> P x or
      P^T x where P = P_1 ... P_m is the product of the m blocks.
    - ``dense_blocks(form, K, beta, F)`` -> P (..., d, d).
    """

    name: str = "base"

    # -- hooks with permissive defaults ----------------------------------------
    def factor_dtype(self, dtype):
        """dtype in which triangular factors are kept for inputs of ``dtype``.

        Backends that accept half precision return float32 here: factors built or
        stored in bfloat16/float16 lose the product's orthogonality.
        """
        return dtype

    def check_compatible(self, *named) -> None:
        """Raise if ``(name, array)`` pairs cannot be combined (device, dtype); default: no check."""

    # -- numerics with defaults built from the primitives -----------------
    def dense_blocks(self, form: str, K, beta, F):
        d = K.shape[-1]
        eye = self.broadcast_to(self.eye(d, like=K), tuple(K.shape[:-3]) + (d, d))
        return self.apply_blocks(form, K, beta, F, eye, False)

    def __repr__(self) -> str:
        return f"<householder backend {self.name!r}>"

    def describe(self) -> str:
        """One line naming the library versions and the device in use."""
        return self.name
