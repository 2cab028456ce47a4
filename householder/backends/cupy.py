"""CuPy backend: the NumPy backend's semantics on ``cupy.ndarray``, on one CUDA GPU.

- Matrix products run through cuBLAS (cublasGemmStridedBatchedEx, called
  directly): transposed views and broadcast batch dimensions are passed as
  strides instead of copies, and ``x - K^T y`` is one product with alpha = -1
  and beta = 1 accumulating into the output.
- Triangular factors come from our own CUDA kernels (``_cupy_kernels``, compiled
  at run time by CuPy): the WY factor T from the Gram matrix, and the UT form's
  triangular solve A^{-1} diag(beta); blocks wider than 64 factors are composed
  from 64-wide ones by the composition rule.
- Optionally (``CupyBackend.fused = True``; off by default because cuBLAS was
  faster on an H100), blocks of at most 64 factors take fused tensor-core
  kernels: the factor straight from the keys (Gram matrix and solve in one
  kernel) and the dense product P = I - K^T T K in one pass over K. float32
  products there use 3xTF32 (about float32 accuracy, see ``_cupy_kernels``);
  float64 uses the float64 tensor cores. By default (and on GPUs older than
  sm_80) everything stays on cuBLAS in float32/float64 arithmetic.
- float32 and float64 (float16 input is promoted to float32, integers to
  float64, as on the NumPy backend).

Input: CuPy arrays are used as they are. Host data (NumPy arrays, lists,
scalars) is copied to the current device, so ``backend="cupy"`` on NumPy input
returns CuPy arrays. GPU arrays of other libraries (torch CUDA tensors, anything
with ``__dlpack__`` on a CUDA device or ``__cuda_array_interface__``) are taken
without a copy through DLPack; results are CuPy arrays, and
``torch.from_dlpack(result)`` hands them back without a copy. Host tensors of
other libraries (torch CPU tensors) are refused: convert them to NumPy first.
"""

from __future__ import annotations

from typing import Any

import warnings

import numpy as np

from householder.backends import _cupy_kernels as _k
from householder.backends.numpy import ArrayModuleBackend

cp: Any = None  # the cupy module, set by load()
_cublas: Any = None
_runtime: Any = None

# DLPack device types (dlpack.h) of GPU memory: kDLCUDA, kDLCUDAManaged
_DLPACK_CUDA = (2, 13)
# Libraries whose host arrays this backend refuses rather than converting silently.
_FOREIGN = ("torch", "jax", "jaxlib", "tensorflow", "dask")



def _crt_include_dirs() -> list[str]:
    """Folders holding ``crt/mma.h``, which NVRTC's ``<mma.h>`` includes.

    Some CUDA wheel layouts ship ``mma.h`` without its ``crt/`` part (that comes
    with the full toolkit), so look in the usual toolkit places too.
    """
    import glob
    import os
    import sys

    candidates = []
    for var in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "include"))
    try:
        candidates.append(os.path.join(cp.cuda.get_cuda_path() or "", "include"))
    except Exception:  # get_cuda_path may be missing or fail; the others remain
        pass
    candidates += sorted(glob.glob("/usr/local/cuda*/include")) + sorted(glob.glob("/usr/local/cuda*/targets/*/include"))
    for root in sys.path:
        candidates += sorted(glob.glob(os.path.join(root, "nvidia", "*", "include")))
    seen, out = set(), []
    for d in candidates:
        if d and d not in seen and os.path.isfile(os.path.join(d, "crt", "mma.h")):
            seen.add(d)
            out.append(d)
    return out[:1]

class CupyBackend(ArrayModuleBackend):
    """Primitives on CuPy arrays: cuBLAS products and our triangular kernel."""

    name = "cupy"
    #: use the fused tensor-core kernels where they apply (blocks of <= 64 factors);
    #: off by default: on an H100 they were slower than cuBLAS (docs/cupy.md)
    fused: bool = False

    def __init__(self, cupy_module):
        self.xp = cupy_module
        self._modules: dict[tuple, Any] = {}
        #: why the fused kernels are off on a device, if they are (device id -> reason)
        self.fused_unavailable: dict[int, str] = {}

    # -- plumbing -----------------------------------------------------------
    def asarray(self, x, name: str):
        if isinstance(x, cp.ndarray):
            return x
        device_type = _dlpack_device_type(x)
        if device_type in _DLPACK_CUDA:
            try:
                return cp.from_dlpack(x)  # zero-copy; DLPack orders the producer's stream before ours
            except Exception as exc:  # e.g. a tensor that requires grad, or a dtype CuPy lacks (bfloat16)
                raise TypeError(
                    f"{name} ({type(x).__module__}.{type(x).__name__}) could not be shared with CuPy "
                    f"through DLPack: {exc}"
                ) from exc
        if device_type is None and _has_cuda_array_interface(x):
            return cp.asarray(x)  # zero-copy view of another library's GPU memory
        root = type(x).__module__.split(".")[0]
        if root in _FOREIGN:
            raise TypeError(
                f"{name} is a {type(x).__module__}.{type(x).__name__} in host memory but backend 'cupy' "
                f"takes CuPy arrays, GPU arrays (DLPack) or NumPy arrays; move it to the GPU or convert "
                f"it to NumPy first"
            )
        try:
            a = np.asarray(x)
        except (ValueError, TypeError) as exc:
            raise TypeError(f"{name} could not be converted to a cupy array: {exc}") from exc
        if a.dtype == object:
            return a  # the common checks reject it by its dtype, naming the argument
        return cp.asarray(a)  # host data: one copy to the current device

    def check_compatible(self, *named) -> None:
        """All arrays on one GPU; the error names both arguments and devices."""
        (first, a), rest = named[0], named[1:]
        for name, b in rest:
            if a.device.id != b.device.id:
                raise ValueError(
                    f"{first} and {name} must be on the same GPU; got {first} on device {a.device.id} "
                    f"and {name} on device {b.device.id} (copy one with cupy.asarray under "
                    f"`with cupy.cuda.Device(i):`)"
                )

    def to_numpy(self, a):
        return cp.asnumpy(a)

    def from_numpy(self, a, like=None):
        """A CuPy array on the current device (or on ``like``'s device)."""
        if like is not None:
            with like.device:
                return cp.asarray(a)
        return cp.asarray(a)

    def describe(self) -> str:
        dev = cp.cuda.Device()
        props = _runtime.getDeviceProperties(dev.id)
        gpu = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        rt = _runtime.runtimeGetVersion()
        return f"cupy {cp.__version__}, CUDA runtime {rt // 1000}.{rt % 1000 // 10} on {gpu} (device {dev.id})"

    def synchronize(self) -> None:
        """Wait for the work queued on the current stream."""
        cp.cuda.get_current_stream().synchronize()

    # -- shape helpers ------------------------------------------------------
    def zeros(self, shape, like):
        with like.device:
            return cp.zeros(tuple(shape), dtype=like.dtype)

    def eye(self, n, like):
        with like.device:
            return cp.eye(n, dtype=like.dtype)

    def matmul(self, a, b):
        if a.dtype == b.dtype and a.dtype in (np.float32, np.float64):
            return gemm(a, b)
        return cp.matmul(a, b)

    # -- numerics -------------------------------------------------------------
    def _module(self, dtype, fused: bool = False):
        real = "float" if dtype == np.float32 else "double"
        key = (cp.cuda.Device().id, real, fused)
        mod = self._modules.get(key)
        if mod is None:
            source, names = (_k.FUSED_SOURCE, _k.fused_kernel_names(real)) if fused else (_k.SOURCE, _k.kernel_names(real))
            try:
                options = ("-std=c++17",) + tuple(f"-I{d}" for d in _crt_include_dirs()) if fused else ("-std=c++17",)
                mod = cp.RawModule(code=source, options=options, name_expressions=names)
                mod.compile()
            except Exception as exc:
                raise RuntimeError(f"the CuPy backend's CUDA kernels failed to compile (NVRTC): {exc}") from exc
            self._modules[key] = mod
        return mod, real

    def _fused_kernel(self, kind: str, dtype):
        """The fused kernel ``kind`` ("dense" or "factor") for dtype, or None where it cannot run."""
        if not self.fused or dtype not in (np.float32, np.float64):
            return None
        dev = cp.cuda.Device()
        if dev.id in self.fused_unavailable:
            return None
        if int(dev.compute_capability) < 80:
            self.fused_unavailable[dev.id] = f"compute capability {dev.compute_capability} < 8.0 (no TF32/DMMA WMMA)"
            return None
        try:
            mod, real = self._module(dtype, fused=True)
            fn = mod.get_function(f"hh_{kind}_fused<{real}>")
            fn.max_dynamic_shared_size_bytes = _k.fused_smem_bytes(kind, np.dtype(dtype).itemsize)
        except Exception as exc:  # keep working on cuBLAS, and say why once
            self.fused_unavailable[dev.id] = str(exc)
            warnings.warn(f"householder cupy backend: fused kernels unavailable, using cuBLAS: {exc}", RuntimeWarning)
            return None
        return fn

    def _tri_leaf(self, M, beta, out, scale_rows: bool, rhs_beta: bool, alpha: float, bs: int) -> None:
        """The kernel on the diagonal blocks of width <= bs of M (B, n, n) into out (B, n, n)."""
        B, n = M.shape[0], M.shape[-1]
        if B == 0 or n == 0:
            return
        mod, real = self._module(M.dtype)
        fn = mod.get_function(f"hh_tri_solve<{real}, {bs}>")
        it = M.itemsize
        scalar = np.float32 if M.dtype == np.float32 else np.float64
        grid_y = -(-n // bs)
        for start in range(0, B, 2**31 - 1):
            stop = min(B, start + 2**31 - 1)
            fn(
                (stop - start, grid_y),
                (bs,),
                (
                    M[start:stop], np.int64(M.strides[0] // it), np.int32(M.strides[1] // it),
                    beta[start:stop], np.int64(beta.strides[0] // it),
                    out[start:stop], np.int64(out.strides[0] // it), np.int32(out.strides[1] // it),
                    np.int32(n), np.int32(scale_rows), np.int32(rhs_beta), scalar(alpha),
                ),
            )

    def tri_factor(self, M, beta, mode: str):
        """Triangular factor from M (..., b, b) and beta (..., b).

        mode "gram": M = K K^T, returns T = (I + diag(beta) striu(M))^{-1} diag(beta),
        the compact WY factor. mode "ut": M = A unit upper triangular, returns
        A^{-1} diag(beta) (the UT form's solve with right-hand side diag(beta)).
        """
        b = M.shape[-1]
        batch = np.broadcast_shapes(M.shape[:-2], beta.shape[:-1])
        with M.device:
            Mf = _as_rows(cp.broadcast_to(M, batch + (b, b)).reshape((-1, b, b)))
            bf = _as_rows(cp.broadcast_to(beta, batch + (b,)).reshape((-1, b)))
            if b <= _k.MAX_BLOCK:
                out = cp.empty(Mf.shape, dtype=Mf.dtype)
                self._tri_leaf(Mf, bf, out, mode == "gram", True, 1.0, _k.block_width(b))
            else:
                # Diagonal 64-blocks by the kernel, the rest by X12 = -X11 M12 X22,
                # where X is T ("gram") or A^{-1} ("ut", scaled by beta at the end).
                out = cp.zeros(Mf.shape, dtype=Mf.dtype)
                self._tri_leaf(Mf, bf, out, mode == "gram", mode == "gram", 1.0, _k.MAX_BLOCK)
                _compose(Mf, out, 0, b)
                if mode != "gram":
                    out *= bf[:, None, :]
        return out.reshape(batch + (b, b))

    def _factor_fused(self, K, beta, mode: int):
        """T (mode 0) or A (mode 1) of blocks of b <= 64 factors by the fused kernel, or None."""
        b, d = K.shape[-2:]
        fn = self._fused_kernel("factor", K.dtype) if 0 < b <= _k.MAX_BLOCK else None
        if fn is None or K.dtype != beta.dtype:
            return None
        batch = tuple(np.broadcast_shapes(K.shape[:-2], beta.shape[:-1]))
        with K.device:
            Kf = _as_rows(cp.broadcast_to(K, batch + (b, d)).reshape((-1, b, d)))
            bf = _as_rows(cp.broadcast_to(beta, batch + (b,)).reshape((-1, b)))
            out = cp.empty(Kf.shape[:1] + (b, b), dtype=K.dtype)
            if out.size:
                it = K.itemsize
                fn(
                    (out.shape[0],), (_k.FUSED_THREADS,),
                    (
                        Kf, np.int64(Kf.strides[0] // it), np.int32(Kf.strides[1] // it),
                        bf, np.int64(bf.strides[0] // it),
                        out, np.int64(b * b), np.int32(b), np.int32(b), np.int32(d), np.int32(mode),
                    ),
                    shared_mem=_k.fused_smem_bytes("factor", it),
                )
        return out.reshape(batch + (b, b))

    def wy_factor(self, K, beta):
        T = self._factor_fused(K, beta, 0)
        if T is not None:
            return T
        return self.tri_factor(gemm(K, self.mT(K)), beta, "gram")

    def ut_factor(self, K, beta):
        A = self._factor_fused(K, beta, 1)
        if A is not None:
            return A
        b = K.shape[-2]
        G = gemm(K, self.mT(K))
        batch = tuple(G.shape[:-2])
        with G.device:
            bf = cp.ascontiguousarray(cp.broadcast_to(beta, batch + (b,)))
            A = cp.empty(G.shape, dtype=G.dtype)
            total = A.size
            if total:
                mod, real = self._module(G.dtype)
                threads = 256
                blocks = min(-(-total // threads), 65535 * 16)
                mod.get_function(f"hh_ut_from_gram<{real}>")(
                    (blocks,), (threads,), (G, bf, A, np.int32(b), np.int64(total))
                )
        return A

    def solve_unit_upper(self, A, y, transpose: bool):
        """Solve A z = y (or A^T z = y), A (..., b, b) unit upper triangular: z = A^{-1} y by our kernel."""
        b = A.shape[-1]
        ones = cp.ones(A.shape[:-2] + (b,), dtype=A.dtype)
        Ainv = self.tri_factor(A, ones, "ut")
        return gemm(self.mT(Ainv) if transpose else Ainv, y)

    def _wy_factors(self, form, beta, F):
        """The blocks' WY factors T (..., m, b, b): F itself, or A^{-1} diag(beta) for the UT form."""
        return F if form == "wy" else self.tri_factor(F, beta, "ut")

    def apply_blocks(self, form, K, beta, F, x, transpose: bool):
        T = self._wy_factors(form, beta, F)
        m, d, c = K.shape[-3], K.shape[-1], x.shape[-1]
        batch = np.broadcast_shapes(K.shape[:-3], T.shape[:-3], x.shape[:-2])
        with x.device:
            out = cp.empty(batch + (d, c), dtype=x.dtype)
            out[...] = x
        self._apply_in_place(K, T, out, range(m) if transpose else range(m - 1, -1, -1), transpose)
        return out

    def _apply_in_place(self, K, T, out, order, transpose: bool) -> None:
        """out <- (I - K_j^T T_j K_j) out (or with T_j^T) for the blocks j in ``order``."""
        for j in order:
            Kj, Tj = K[..., j, :, :], T[..., j, :, :]
            y = gemm(Kj, out)
            y = gemm(self.mT(Tj) if transpose else Tj, y)
            gemm(self.mT(Kj), y, out=out, alpha=-1.0, beta=1.0)

    def dense_blocks(self, form, K, beta, F):
        # The last block acts on I: P = I - K^T (T K), then the other blocks in place.
        T = self._wy_factors(form, beta, F)
        m, b, d = K.shape[-3:]
        Kl, Tl = K[..., m - 1, :, :], T[..., m - 1, :, :]
        P = self._dense_fused(Kl, Tl)
        if P is None:
            W = gemm(Tl, Kl, alpha=-1.0)
            P = gemm(self.mT(Kl), W)
            with P.device:
                flat = P.reshape((-1, d * d))
                flat[:, :: d + 1] += 1
        self._apply_in_place(K, T, P, range(m - 2, -1, -1), False)
        return P

    def _dense_fused(self, K, T):
        """P = I - K^T T K for one block of b <= 64 factors by the fused kernel, or None."""
        b, d = K.shape[-2:]
        fn = self._fused_kernel("dense", K.dtype) if 0 < b <= _k.MAX_BLOCK and d > 0 else None
        if fn is None or K.dtype != T.dtype:
            return None
        batch = tuple(np.broadcast_shapes(K.shape[:-2], T.shape[:-2]))
        with K.device:
            Kf = _as_rows(cp.broadcast_to(K, batch + (b, d)).reshape((-1, b, d)))
            Tf = _as_rows(cp.broadcast_to(T, batch + (b, b)).reshape((-1, b, b)))
            P = cp.empty(Kf.shape[:1] + (d, d), dtype=K.dtype)
            it, nb = K.itemsize, P.shape[0]
            for start in range(0, nb, 65535):  # the batch runs along grid y
                stop = min(nb, start + 65535)
                fn(
                    (-(-d // 64), stop - start), (_k.FUSED_THREADS,),
                    (
                        Kf[start:stop], np.int64(Kf.strides[0] // it), np.int32(Kf.strides[1] // it),
                        Tf[start:stop], np.int64(Tf.strides[0] // it), np.int32(Tf.strides[1] // it),
                        P[start:stop], np.int64(d * d), np.int32(d), np.int32(b), np.int32(d),
                    ),
                    shared_mem=_k.fused_smem_bytes("dense", it),
                )
        return P.reshape(batch + (d, d))


def _dlpack_device_type(x) -> int | None:
    """The DLPack device type of ``x``, or None if it does not speak DLPack."""
    if not (hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__")):
        return None
    try:
        return int(x.__dlpack_device__()[0])
    except Exception:
        return None


def _has_cuda_array_interface(x) -> bool:
    try:
        return hasattr(x, "__cuda_array_interface__")
    except Exception:  # torch raises RuntimeError for tensors that require grad
        return False


def _as_rows(a):
    """``a`` with unit stride along its last axis and non-negative strides (a copy only if needed)."""
    if a.ndim and (a.strides[-1] != a.itemsize or any(s < 0 for s in a.strides)):
        return cp.ascontiguousarray(a)
    return a


def _compose(M, X, lo: int, hi: int) -> None:
    """Fill the off-diagonal blocks of X[:, lo:hi, lo:hi] = -X11 M12 X22, recursively."""
    if hi - lo <= _k.MAX_BLOCK:
        return
    mid = lo + _k.split_point(hi - lo)
    _compose(M, X, lo, mid)
    _compose(M, X, mid, hi)
    tmp = gemm(M[:, lo:mid, mid:hi], X[:, mid:hi, mid:hi])
    gemm(X[:, lo:mid, lo:mid], tmp, out=X[:, lo:mid, mid:hi], alpha=-1.0)


# -- cuBLAS strided batched products -------------------------------------------


def _operand(a, batch: tuple):
    """(array, batch stride, layout) of a broadcast operand cuBLAS can read, copying only if needed."""
    r, c = a.shape[-2:]
    a = cp.broadcast_to(a, batch + (r, c))
    it = a.itemsize
    st = [s // it for s in a.strides]
    lay = _k.matrix_layout(r, c, st[-2], st[-1])
    bstride = _k.merged_batch_stride(a.shape[:-2], st[:-2])
    if lay is None or bstride is None or any(s < 0 for s in st):
        a = cp.ascontiguousarray(a)
        st = [s // it for s in a.strides]
        lay = _k.matrix_layout(r, c, st[-2], st[-1])
        bstride = _k.merged_batch_stride(a.shape[:-2], st[:-2])
    return a, bstride, lay


def gemm(a, b, out=None, alpha: float = 1.0, beta: float = 0.0):
    """out = alpha a @ b + beta out for stacks of matrices, one cuBLAS call per 65535 matrices.

    a (..., m, k), b (..., k, n) of one dtype (float32 or float64) on one device;
    batch dimensions broadcast. ``out`` (batch..., m, n), if given, must have unit
    column stride and a single batch stride (a slice of a contiguous array does);
    without it a new contiguous array is returned. float32 uses float32 compute
    (CUBLAS_COMPUTE_32F: no TF32).
    """
    if a.dtype != b.dtype or a.dtype not in (np.float32, np.float64):
        raise TypeError(f"gemm needs two float32 or two float64 arrays; got {a.dtype} and {b.dtype}")
    m, k = a.shape[-2:]
    k2, n = b.shape[-2:]
    if k != k2:
        raise ValueError(f"gemm: inner dimensions differ, a {tuple(a.shape)} and b {tuple(b.shape)}")
    batch = tuple(np.broadcast_shapes(a.shape[:-2], b.shape[:-2]))
    with a.device:
        if out is None:
            out = cp.empty(batch + (m, n), dtype=a.dtype)
            beta = 0.0
        elif tuple(out.shape) != batch + (m, n) or out.dtype != a.dtype:
            raise ValueError(f"gemm: out has shape {tuple(out.shape)} {out.dtype}, expected {batch + (m, n)} {a.dtype}")
        nb = int(np.prod(batch, dtype=np.int64))
        if nb == 0 or m == 0 or n == 0:
            return out
        if k == 0:
            if beta == 0.0:
                out.fill(0)
            else:
                out *= beta
            return out
        it = a.itemsize
        ost = [s // it for s in out.strides]
        out_lay = _k.matrix_layout(m, n, ost[-2], ost[-1])
        out_bstride = _k.merged_batch_stride(out.shape[:-2], ost[:-2])
        if out_lay is None or out_lay.col_major or (not out_bstride and nb > 1):
            raise ValueError("gemm: out must be row-major with one positive batch stride")
        a, sa, la = _operand(a, batch)
        b, sb, lb = _operand(b, batch)
        args = _k.plan_gemm(m, n, k, la, lb, out_lay.ld)
        if a.dtype == np.float32:
            dt, ct = _runtime.CUDA_R_32F, _cublas.CUBLAS_COMPUTE_32F
        else:
            dt, ct = _runtime.CUDA_R_64F, _cublas.CUBLAS_COMPUTE_64F
        scal = np.array([alpha, beta], dtype=a.dtype)
        handle = cp.cuda.device.get_cublas_handle()
        chunk = 65535
        for start in range(0, nb, chunk):
            count = min(chunk, nb - start)
            _cublas.gemmStridedBatchedEx(
                handle, args.transa, args.transb, args.m, args.n, args.k,
                scal.ctypes.data,
                b.data.ptr + start * sb * it, dt, args.lda, sb,
                a.data.ptr + start * sa * it, dt, args.ldb, sa,
                scal.ctypes.data + it,
                out.data.ptr + start * out_bstride * it, dt, args.ldc, out_bstride,
                count, ct, _cublas.CUBLAS_GEMM_DEFAULT,
            )
    return out


def load() -> CupyBackend:
    """The CuPy backend; BackendUnavailableError without CuPy, a GPU or cuBLAS."""
    global cp, _cublas, _runtime
    from householder._registry import BackendUnavailableError

    try:
        import cupy
    except ImportError as exc:
        raise BackendUnavailableError(
            f"backend 'cupy' is not available: CuPy is not installed ({exc}). Install it with: "
            f"pip install 'householder[cuda]' (CUDA 13) or 'householder[cuda12]' (CUDA 12)"
        ) from exc
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError: no driver, or a driver too old for this CuPy wheel
        raise BackendUnavailableError(f"backend 'cupy' is not available: CuPy finds no usable CUDA device ({exc})") from exc
    if count < 1:
        raise BackendUnavailableError("backend 'cupy' is not available: CuPy finds no CUDA device")
    try:
        from cupy_backends.cuda.api import runtime
        from cupy_backends.cuda.libs import cublas
    except Exception as exc:  # the wheel loads cuBLAS on first use; a missing library shows here
        raise BackendUnavailableError(f"backend 'cupy' is not available: cuBLAS could not be loaded ({exc})") from exc
    cp, _cublas, _runtime = cupy, cublas, runtime
    return CupyBackend(cupy)
