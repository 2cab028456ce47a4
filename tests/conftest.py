"""One suite, every backend: the ``bk`` fixture runs a test body on each backend
that works here and skips the rest with the reason."""

from __future__ import annotations

import os

import numpy as np
import pytest


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# Triton kernels run on the CPU under the interpreter when no GPU is present.
# The variable must be set before any kernel module is imported.
if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import householder  # noqa: E402  (after TRITON_INTERPRET)

BACKENDS = householder.backend_names()


class BackendCase:
    """A backend plus conversions between NumPy and its arrays, for tests."""

    def __init__(self, name: str):
        self.name = name
        self.be = householder.get_backend(name)

    def asarray(self, a):
        return self.be.from_numpy(np.asarray(a))

    def to_numpy(self, a) -> np.ndarray:
        return np.asarray(self.be.to_numpy(a))

    def __repr__(self) -> str:
        return self.name


def backend_case(name: str) -> BackendCase:
    try:
        return BackendCase(name)
    except householder.BackendUnavailableError as exc:
        pytest.skip(f"backend {name!r} unavailable here: {exc}")


@pytest.fixture(params=BACKENDS)
def bk(request) -> BackendCase:
    # Select the backend explicitly: inference would send CPU tensors to "torch"
    # also when "triton" runs them in the interpreter.
    case = backend_case(request.param)
    with householder.use_backend(request.param):
        yield case


@pytest.fixture
def rng(request) -> np.random.Generator:
    # Fresh inputs each run; the seed is printed on failure through the test id.
    seed = int.from_bytes(os.urandom(4), "little")
    request.node.user_properties.append(("seed", seed))
    print(f"rng seed {seed}")
    return np.random.default_rng(seed)


def tolerance(dtype, n: int = 1, d: int = 1) -> float:
    """Max-abs error bound for an O(n) product in ``dtype`` (unit keys, beta in [0, 2])."""
    eps = np.finfo(np.float32 if np.dtype(dtype).itemsize <= 4 else np.float64).eps
    if np.dtype(dtype).itemsize == 2:
        eps = 2.0**-8 if np.dtype(dtype) == np.float16 else 2.0**-7
    return 50 * eps * max(n, 1) ** 0.5 * max(d, 1) ** 0.5 + 10 * eps


def unit_keys(rng, shape) -> np.ndarray:
    k = rng.standard_normal(shape)
    return k / np.linalg.norm(k, axis=-1, keepdims=True)
