"""Input validation shared by every public entry point.

One place for the rules: argument names in messages, SciPy's ``check_finite``
convention, NumPy broadcasting of batch dimensions, dtype promotion.
"""

from __future__ import annotations

from typing import Any

FORMS = ("wy", "ut")


def check_form(form: Any) -> str:
    """Return ``form`` if it names a representation, else raise ValueError."""
    if not isinstance(form, str) or form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}; got {form!r}")
    return form


def check_block_size(block_size: Any) -> int:
    """Return ``block_size`` as a positive int, else raise."""
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be an int; got {type(block_size).__name__}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1; got {block_size}")
    return block_size


def broadcast_batch(name_a: str, shape_a: tuple, name_b: str, shape_b: tuple) -> tuple:
    """NumPy broadcasting of two batch shapes, with an error that names both arguments."""
    out = []
    la, lb = len(shape_a), len(shape_b)
    for i in range(max(la, lb)):
        a = shape_a[la - 1 - i] if i < la else 1
        b = shape_b[lb - 1 - i] if i < lb else 1
        if a != b and a != 1 and b != 1:
            raise ValueError(
                f"batch dimensions of {name_a} {tuple(shape_a)} and {name_b} {tuple(shape_b)} "
                f"do not broadcast (NumPy rules)"
            )
        out.append(max(a, b) if a != 0 and b != 0 else 0)
    return tuple(reversed(out))


def _check_kind(backend, a, name: str) -> None:
    kind = backend.dtype_kind(a)
    if kind == "c":
        raise TypeError(f"{name} must be real; got complex dtype {backend.dtype_name(a)}")
    if kind not in ("f", "i"):
        raise TypeError(
            f"{name} must be a real floating or integer array; got dtype {backend.dtype_name(a)}"
        )


def _check_finite(backend, a, name: str) -> None:
    if not backend.all_finite(a):
        raise ValueError(
            f"{name} must contain only finite numbers (got NaN or Inf); "
            f"pass check_finite=False to skip this check"
        )


def check_keys_betas(backend, keys, betas, check_finite: bool):
    """Validate and promote ``keys`` (..., n, d) and ``betas`` (..., n).

    Returns ``(keys, betas)`` as floating arrays of one dtype, broadcast to a
    common batch shape (views where the library allows).
    """
    keys = backend.asarray(keys, "keys")
    betas = backend.asarray(betas, "betas")
    _check_kind(backend, keys, "keys")
    _check_kind(backend, betas, "betas")
    backend.check_compatible(("keys", keys), ("betas", betas))
    kshape, bshape = tuple(keys.shape), tuple(betas.shape)
    if len(kshape) < 2:
        raise ValueError(f"keys must have shape (..., n, d) with at least 2 dimensions; got shape {kshape}")
    if len(bshape) < 1:
        raise ValueError(f"betas must have shape (..., n) with at least 1 dimension; got shape {bshape}")
    n = kshape[-2]
    if bshape[-1] not in (n, 1):
        raise ValueError(
            f"betas must have shape (..., n) matching keys.shape[:-1] = {kshape[:-1]} "
            f"after broadcasting; got shape {bshape} (last dimension {bshape[-1]}, expected {n})"
        )
    batch = broadcast_batch("keys", kshape[:-2], "betas", bshape[:-1])
    dtype = backend.result_float_dtype(keys, betas)
    keys = backend.astype(keys, dtype)
    betas = backend.astype(betas, dtype)
    if check_finite:
        _check_finite(backend, keys, "keys")
        _check_finite(backend, betas, "betas")
    keys = backend.broadcast_to(keys, batch + kshape[-2:])
    betas = backend.broadcast_to(betas, batch + (n,))
    return keys, betas


def check_operand(backend, x, d: int, name: str, check_finite: bool, batch: tuple = ()):
    """Validate a block ``x`` of shape (..., d, m) that a product of batch shape ``batch`` is applied to."""
    x = backend.asarray(x, name)
    _check_kind(backend, x, name)
    shape = tuple(x.shape)
    if len(shape) < 2:
        raise ValueError(
            f"{name} must have shape (..., d, m) with at least 2 dimensions (use x[..., None] "
            f"for a vector); got shape {shape}"
        )
    if shape[-2] != d:
        raise ValueError(f"{name} must have shape (..., {d}, m) to match d = {d}; got shape {shape}")
    broadcast_batch("the product", tuple(batch), name, shape[:-2])
    if check_finite:
        _check_finite(backend, x, name)
    return x


# -- the delta rule's arguments (layout of flash-linear-attention) -------------


def check_positive_int(value: Any, name: str) -> int:
    """Return ``value`` as a positive int, else raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1; got {value}")
    return value


def check_delta_shapes(q: tuple, k: tuple, v: tuple, beta: tuple, g: tuple | None, num_householder: int = 1):
    """Shapes of a delta-rule call; returns (B, T, H, K, V), T counted in tokens.

    q (B, T, H, K); k (B, T*n, H, K); v (B, T*n, H, V); beta (B, T*n, H);
    g (B, T, H) or None, with n = ``num_householder``.
    """
    n = num_householder
    if len(q) != 4:
        raise ValueError(f"q must have shape (B, T, H, K); got shape {tuple(q)}")
    B, T, H, K = q
    steps = T * n
    per = f" (T * num_householder = {T} * {n})" if n > 1 else ""
    if tuple(k) != (B, steps, H, K):
        raise ValueError(f"k must have shape (B, T{'*n' if n > 1 else ''}, H, K) = {(B, steps, H, K)}{per} to match q {tuple(q)}; got shape {tuple(k)}")
    if len(v) != 4 or tuple(v[:3]) != (B, steps, H):
        raise ValueError(f"v must have shape (B, T{'*n' if n > 1 else ''}, H, V) = {(B, steps, H)} + (V,){per}; got shape {tuple(v)}")
    if tuple(beta) != (B, steps, H):
        raise ValueError(f"beta must have shape (B, T{'*n' if n > 1 else ''}, H) = {(B, steps, H)}{per}; got shape {tuple(beta)}")
    if g is not None and tuple(g) != (B, T, H):
        raise ValueError(f"g must have shape (B, T, H) = {(B, T, H)}, one log-decay per token; got shape {tuple(g)}")
    if K == 0 or v[3] == 0 or H == 0:
        raise ValueError(f"q, k and v need H, K and V >= 1; got H = {H}, K = {K}, V = {v[3]}")
    return B, T, H, K, v[3]


def check_packed_batch(entries: int, batch: int) -> int:
    """Validate what the shapes say of packed sequences: batch size 1 and N + 1 >= 2 offsets; returns N."""
    if batch != 1:
        raise ValueError(f"with cu_seqlens the inputs must be packed in a batch of size 1 (B = 1); got B = {batch}")
    if entries < 2:
        raise ValueError(f"cu_seqlens must have shape (N + 1,) with N >= 1 sequences; got {entries} entries")
    return entries - 1


def check_cu_seqlens(offsets: list, batch: int, total: int) -> int:
    """Validate packed-sequence offsets (FlashAttention's cu_seqlens); returns N.

    ``offsets`` is the list of ints [0, t_1, ..., T]: non-decreasing, starting at
    0 and ending at the packed length ``total``, with batch size 1.
    """
    check_packed_batch(len(offsets), batch)
    if offsets[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0; got cu_seqlens[0] = {offsets[0]}")
    if offsets[-1] != total:
        raise ValueError(f"cu_seqlens must end at the packed length T = {total}; got cu_seqlens[-1] = {offsets[-1]}")
    for i in range(len(offsets) - 1):
        if offsets[i + 1] < offsets[i]:
            raise ValueError(
                f"cu_seqlens must be non-decreasing; got cu_seqlens[{i}] = {offsets[i]} > cu_seqlens[{i + 1}] = {offsets[i + 1]}"
            )
    return len(offsets) - 1


def check_state_shape(shape: tuple, expected: tuple, name: str = "initial_state") -> None:
    """Raise unless a recurrent state has shape (N, H, K, V) = ``expected``."""
    if tuple(shape) != tuple(expected):
        raise ValueError(f"{name} must have shape (N, H, K, V) = {tuple(expected)}; got shape {tuple(shape)}")


def check_result_finite(backend, a, what: str) -> None:
    """Raise FloatingPointError if a result of finite input is not finite.

    Factors expand when beta_i ||k_i||^2 lies outside [0, 2]; a long product of
    such factors overflows, and we refuse to return that NaN/Inf silently.
    """
    if not backend.all_finite(a):
        raise FloatingPointError(
            f"{what} overflowed to Inf/NaN from finite input: some factors are expansive "
            f"(beta * ||k||^2 outside [0, 2]) and their product exceeds the dtype's range; "
            f"normalise the keys, keep beta in [0, 2], or use float64"
        )
