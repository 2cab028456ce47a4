"""PyTorch backend: every primitive in plain torch, on the CPU and on CUDA.

Differentiable end to end: every op is out of place, so autograd carries
gradients with respect to keys, betas and x through the factors, ``apply``,
``dense``, composition and transposition. Half-precision inputs (bfloat16,
float16) are computed in float32 (factors, accumulation) and returned in the
input dtype.
"""

from __future__ import annotations

import numpy as np
import torch

from householder.backends._base import Backend

_HALF = (torch.bfloat16, torch.float16)
# Array libraries whose arrays must not be converted silently.
_FOREIGN = ("cupy", "jax", "jaxlib", "tensorflow", "dask")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the numerics run in for inputs of ``dtype``: float32 for half types."""
    return torch.float32 if dtype in _HALF else dtype


def _device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device})"
    return str(device).upper()


class TorchBackend(Backend):
    """Primitives written in PyTorch; tensors stay on their device."""

    name = "torch"

    # -- plumbing -----------------------------------------------------------
    def asarray(self, x, name: str) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            return x
        root = type(x).__module__.split(".")[0]
        if root in _FOREIGN:
            if _dlpack_on_cuda(x):  # another library's GPU array (CuPy): shared without a copy
                return torch.from_dlpack(x)
            raise TypeError(
                f"{name} is a {type(x).__module__}.{type(x).__name__} but backend {self.name!r} takes "
                f"torch tensors; convert it first (e.g. torch.from_dlpack)"
            )
        try:
            a = np.array(x)  # a copy: torch.from_numpy needs a writable array
            if a.dtype == object:
                raise TypeError("object arrays have no torch dtype")
            return torch.from_numpy(a)
        except (ValueError, TypeError) as exc:
            raise TypeError(f"{name} could not be converted to a torch tensor: {exc}") from exc

    def dtype_kind(self, a) -> str:
        dt = a.dtype
        if dt.is_complex:
            return "c"
        if dt.is_floating_point:
            return "f"
        return "i"  # bool and integer dtypes

    def dtype_name(self, a) -> str:
        return str(a.dtype).replace("torch.", "")

    def result_float_dtype(self, *arrays) -> torch.dtype:
        floats = [a.dtype for a in arrays if a.dtype.is_floating_point]
        if not floats:
            return torch.float64  # integer input is promoted to float64, as SciPy does
        dtype = floats[0]
        for dt in floats[1:]:
            dtype = torch.promote_types(dtype, dt)
        return dtype

    def factor_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return compute_dtype(dtype)

    def check_compatible(self, *named) -> None:
        """Same device for all, same floating dtype for the floating ones; errors name both arguments."""
        (first, a), rest = named[0], named[1:]
        for name, b in rest:
            if b.device != a.device:
                raise ValueError(
                    f"{first} and {name} must be on the same device; got {first} on {a.device} and {name} on {b.device}"
                )
            if a.dtype.is_floating_point and b.dtype.is_floating_point and a.dtype != b.dtype:
                raise TypeError(
                    f"{first} and {name} must have the same floating dtype; got {first} {self.dtype_name(a)} "
                    f"and {name} {self.dtype_name(b)} (convert one with .to(dtype))"
                )

    def astype(self, a, dtype):
        return a if a.dtype == dtype else a.to(dtype)

    def all_finite(self, a) -> bool:
        return bool(torch.isfinite(a).all())

    def broadcast_to(self, a, shape):
        return torch.broadcast_to(a, tuple(shape))

    def to_numpy(self, a) -> np.ndarray:
        """A NumPy copy on the host; bfloat16 (which NumPy lacks) comes back as float32."""
        a = a.detach().to("cpu")
        if a.dtype == torch.bfloat16:
            a = a.float()
        return a.numpy()

    def from_numpy(self, a, like=None) -> torch.Tensor:
        """A tensor on the CPU (or on ``like``'s device) with ``a``'s dtype."""
        t = torch.from_numpy(np.array(a))
        return t if like is None else t.to(like.device)

    def describe(self) -> str:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        return f"torch {torch.__version__} on {_device_label(device)}"

    def synchronize(self) -> None:
        """Wait for queued CUDA work (a no-op without CUDA)."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    # -- shape helpers ------------------------------------------------------
    def zeros(self, shape, like):
        return torch.zeros(tuple(shape), dtype=like.dtype, device=like.device)

    def eye(self, n, like):
        return torch.eye(n, dtype=like.dtype, device=like.device)

    def concat(self, arrays, axis):
        return torch.cat(list(arrays), dim=axis)

    def reshape(self, a, shape):
        return torch.reshape(a, tuple(shape))

    def flip(self, a, axes):
        return torch.flip(a, dims=tuple(axes))

    def mT(self, a):
        return a.transpose(-1, -2)

    def matmul(self, a, b):
        return torch.matmul(a, b)

    # -- numerics -------------------------------------------------------------
    @staticmethod
    def _gram_upper(K: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """A = I + diag(beta) striu(K K^T) in the compute dtype, (..., b, b)."""
        cdt = compute_dtype(K.dtype)
        K, beta = K.to(cdt), beta.to(cdt)
        b = K.shape[-2]
        eye = torch.eye(b, dtype=cdt, device=K.device)
        return eye + beta[..., :, None] * torch.triu(K @ K.mT, 1)

    def wy_factor(self, K, beta):
        # T = A^{-1} diag(beta): one triangular solve instead of xLARFT's column
        # recurrence, the same numbers and out of place (autograd-friendly).
        A = self._gram_upper(K, beta)
        B = torch.diag_embed(beta.to(A.dtype))
        A, B = _broadcast_pair(A, B)
        return torch.linalg.solve_triangular(A, B, upper=True, unitriangular=True)

    def ut_factor(self, K, beta):
        return self._gram_upper(K, beta)

    @staticmethod
    def _solve_unit_upper(A, y, transpose: bool):
        A, y = _broadcast_pair(A, y)
        if transpose:
            return torch.linalg.solve_triangular(A.mT, y, upper=False, unitriangular=True)
        return torch.linalg.solve_triangular(A, y, upper=True, unitriangular=True)

    def _apply_block(self, form, K, beta, F, x, transpose: bool):
        """x - K^T (factor op) K x for one block: K (..., b, d), F (..., b, b), compute dtype."""
        y = K @ x
        if form == "wy":
            y = (F.mT if transpose else F) @ y
        elif transpose:
            y = beta[..., :, None] * self._solve_unit_upper(F, y, True)
        else:
            y = self._solve_unit_upper(F, beta[..., :, None] * y, False)
        return x - K.mT @ y

    def apply_blocks(self, form, K, beta, F, x, transpose: bool):
        out_dtype = x.dtype
        cdt = compute_dtype(out_dtype)
        K, beta, F, x = K.to(cdt), beta.to(cdt), F.to(cdt), x.to(cdt)
        m = K.shape[-3]
        order = range(m) if transpose else range(m - 1, -1, -1)
        for j in order:
            x = self._apply_block(form, K[..., j, :, :], beta[..., j, :], F[..., j, :, :], x, transpose)
        return x.to(out_dtype)

    def dense_blocks(self, form, K, beta, F):
        # The first block applied acts on I: start from I - K^T (F op) K, saving a product.
        out_dtype = K.dtype
        cdt = compute_dtype(out_dtype)
        K, beta, F = K.to(cdt), beta.to(cdt), F.to(cdt)
        m, d = K.shape[-3], K.shape[-1]
        Kl, bl, Fl = K[..., m - 1, :, :], beta[..., m - 1, :], F[..., m - 1, :, :]
        if form == "wy":
            W = Fl @ Kl
        else:
            W = self._solve_unit_upper(Fl, bl[..., :, None] * Kl, False)
        P = torch.eye(d, dtype=cdt, device=K.device) - Kl.mT @ W
        if m > 1:
            P = self.apply_blocks(form, K[..., : m - 1, :, :], beta[..., : m - 1, :], F[..., : m - 1, :, :], P, False)
        return P.to(out_dtype)


def _dlpack_on_cuda(x) -> bool:
    """True for arrays that export CUDA memory through DLPack (device type kDLCUDA or kDLCUDAManaged)."""
    try:
        return int(x.__dlpack_device__()[0]) in (2, 13)
    except Exception:
        return False


def _broadcast_pair(A: torch.Tensor, y: torch.Tensor):
    """Broadcast the batch dims of a (..., b, b) matrix and a (..., b, c) block (solve_triangular needs it)."""
    batch = torch.broadcast_shapes(A.shape[:-2], y.shape[:-2])
    return A.expand(batch + A.shape[-2:]), y.expand(batch + y.shape[-2:])


def load() -> Backend:
    """The torch backend (CPU and CUDA)."""
    return TorchBackend()
