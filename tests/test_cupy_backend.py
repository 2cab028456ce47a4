"""The CuPy backend beyond the common suite: its CUDA kernels, its cuBLAS calls,
DLPack interop with torch, and its input rules.

Two parts run without a GPU: the cuBLAS argument planning against a NumPy
emulation of cublasGemmStridedBatchedEx, and the backend's CUDA source itself,
compiled for the CPU with g++ (one std::thread per CUDA thread, a barrier for
__syncthreads, WMMA emulated on whole tiles). Everything else needs CuPy and a
CUDA GPU and skips with the reason otherwise.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import numpy as np
import pytest
import scipy.linalg

import householder as hh
from householder import reference
from householder.backends import _cupy_kernels as kern
from tests.conftest import tolerance, unit_keys

# -- cuBLAS argument planning, checked against a column-major emulation --------


def _emulate_strided_batched(args: kern.GemmArgs, alpha, A, sa, B, sb, beta, C, sc, batch):
    """cublasGemmStridedBatchedEx on flat NumPy buffers (column-major, as cuBLAS reads them)."""
    it = C.itemsize

    def view(buf, rows, cols, ld, stride):
        assert ld >= max(1, rows) and stride >= 0
        return np.lib.stride_tricks.as_strided(buf, (batch, rows, cols), (stride * it, it, ld * it))

    # cuBLAS op(A) is m x k, op(B) is k x n, C is m x n
    Av = view(A, *((args.m, args.k) if args.transa == 0 else (args.k, args.m)), args.lda, sa)
    Bv = view(B, *((args.k, args.n) if args.transb == 0 else (args.n, args.k)), args.ldb, sb)
    opA = Av if args.transa == 0 else Av.swapaxes(-1, -2)
    opB = Bv if args.transb == 0 else Bv.swapaxes(-1, -2)
    Cv = view(C, args.m, args.n, args.ldc, sc)
    Cv[...] = alpha * (opA @ opB) + beta * Cv


def _strided(a):
    """A view's base buffer, element offset, element strides."""
    base = a.base if a.base is not None else a
    while base.base is not None:
        base = base.base
    off = (a.__array_interface__["data"][0] - base.__array_interface__["data"][0]) // a.itemsize
    return base.reshape(-1), off, [s // a.itemsize for s in a.strides]


LAYOUTS = {
    "row": lambda rng, r, c, nb: rng.standard_normal((nb, r, c)),
    "transposed": lambda rng, r, c, nb: rng.standard_normal((nb, c, r)).swapaxes(-1, -2),
    "sliced": lambda rng, r, c, nb: rng.standard_normal((nb, r + 3, c + 5))[:, 1 : r + 1, 2 : c + 2],
    "broadcast": lambda rng, r, c, nb: np.broadcast_to(rng.standard_normal((1, r, c)), (nb, r, c)),
}


@pytest.mark.parametrize("la", list(LAYOUTS))
@pytest.mark.parametrize("lb", list(LAYOUTS))
@pytest.mark.parametrize("m,n,k", [(5, 3, 4), (1, 6, 2), (4, 1, 3), (3, 4, 1)])
def test_gemm_planning_matches_matmul(rng, la, lb, m, n, k):
    nb = 3
    a, b = LAYOUTS[la](rng, m, k, nb), LAYOUTS[lb](rng, k, n, nb)
    want = 0.5 * (a @ b) + 2.0
    abuf, aoff, ast = _strided(a)
    bbuf, boff, bst = _strided(b)
    lay_a = kern.matrix_layout(m, k, ast[-2], ast[-1])
    lay_b = kern.matrix_layout(k, n, bst[-2], bst[-1])
    sa, sb = kern.merged_batch_stride(a.shape[:1], ast[:1]), kern.merged_batch_stride(b.shape[:1], bst[:1])
    assert None not in (lay_a, lay_b, sa, sb)  # all these layouts go to cuBLAS without a copy
    outbuf = np.full(nb * (m + 1) * (n + 2), np.nan)
    out = np.lib.stride_tricks.as_strided(outbuf, (nb, m, n), ((m + 1) * (n + 2) * 8, (n + 2) * 8, 8))
    out[...] = 4.0  # beta = 0.5 below: C = 0.5 A B + 0.5 * 4
    args = kern.plan_gemm(m, n, k, lay_a, lay_b, n + 2)
    # cuBLAS's first operand is our B, its second our A
    _emulate_strided_batched(args, 0.5, bbuf[boff:], sb, abuf[aoff:], sa, 0.5, outbuf, (m + 1) * (n + 2), nb)
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)


def test_layout_refuses_what_cublas_cannot_read():
    assert kern.matrix_layout(3, 4, 4, 1) == kern.MatrixLayout(False, 4)
    assert kern.matrix_layout(3, 4, 1, 3) == kern.MatrixLayout(True, 3)
    assert kern.matrix_layout(3, 4, 8, 2) is None  # neither stride is 1
    assert kern.matrix_layout(3, 4, -4, 1) is None  # flipped rows
    assert kern.matrix_layout(3, 4, 0, 1) is None  # broadcast rows
    assert kern.merged_batch_stride((2, 3), (12, 4)) == 4
    assert kern.merged_batch_stride((2, 3), (0, 4)) is None
    assert kern.merged_batch_stride((2, 1, 3), (12, 99, 4)) == 4
    assert kern.merged_batch_stride((1, 1), (5, 7)) == 0


def test_block_widths_and_split_points():
    assert [kern.block_width(b) for b in (1, 16, 17, 33, 64, 65)] == [16, 16, 32, 64, 64, 64]
    for n in (65, 128, 129, 200, 3000):
        s = kern.split_point(n)
        assert s % kern.MAX_BLOCK == 0 and 0 < s < n


# -- the CUDA source, run on the CPU -------------------------------------------

_SHIM = r"""
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <type_traits>
#include <vector>
using std::fma; using std::min;
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) double2 { double x, y; };
struct hh_dim3 { unsigned x = 1, y = 1, z = 1; };
static thread_local hh_dim3 threadIdx;
static hh_dim3 blockIdx, blockDim, gridDim;
static std::barrier<>* hh_bar = nullptr;
static inline void __syncthreads() { hh_bar->arrive_and_wait(); }
static thread_local unsigned hh_lane_id;
alignas(128) static unsigned char hh_dyn_smem[1 << 18];
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __restrict__
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

// WMMA on whole tiles: every thread of a warp holds the full tile (the element
// order is opaque to kernels), lane 0 stores. Loads and stores count violations of
// CUDA's rules (256-bit aligned pointer, leading dimension a multiple of 16 bytes).
static int hh_misaligned = 0;
extern "C" int misaligned_count() { return hh_misaligned; }
template <typename P> static inline void hh_check_align(const P* p, unsigned ld) {
    if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || (ld * sizeof(P)) % 16 != 0) __atomic_add_fetch(&hh_misaligned, 1, __ATOMIC_RELAXED);
}
namespace nvcuda { namespace wmma {
struct row_major {}; struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
struct matrix_a {}; struct matrix_b {}; struct accumulator {};
namespace precision { struct tf32 {}; }
template <typename T> struct elem_of { typedef T type; };
template <> struct elem_of<precision::tf32> { typedef float type; };
template <typename Use, int M, int N, int K> struct dims;
template <int M, int N, int K> struct dims<matrix_a, M, N, K> { enum { R = M, C = K }; };
template <int M, int N, int K> struct dims<matrix_b, M, N, K> { enum { R = K, C = N }; };
template <int M, int N, int K> struct dims<accumulator, M, N, K> { enum { R = M, C = N }; };
template <typename Use, int M, int N, int K, typename T, typename L = void>
struct fragment {
    enum { R = dims<Use, M, N, K>::R, C = dims<Use, M, N, K>::C, num_elements = R * C };
    typename elem_of<T>::type x[R * C];
};
template <typename Use, int M, int N, int K, typename T, typename L, typename P>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const P* p, unsigned ld) {
    typedef fragment<Use, M, N, K, T, L> F;
    hh_check_align(p, ld);
    for (int i = 0; i < F::R; ++i)
        for (int j = 0; j < F::C; ++j)
            f.x[i * F::C + j] = std::is_same<L, row_major>::value ? p[i * ld + j] : p[j * ld + i];
}
template <typename Use, int M, int N, int K, typename T, typename L, typename V>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, V v) { for (auto& e : f.x) e = v; }
template <int M, int N, int K, typename T, typename AT, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, M, N, K, T>& d, const fragment<matrix_a, M, N, K, AT, LA>& a,
                     const fragment<matrix_b, M, N, K, AT, LB>& b, const fragment<accumulator, M, N, K, T>& c) {
    T out[M * N];
    for (int i = 0; i < M; ++i)
        for (int j = 0; j < N; ++j) {
            T s = c.x[i * N + j];
            for (int k = 0; k < K; ++k) s += T(a.x[i * K + k]) * T(b.x[k * N + j]);
            out[i * N + j] = s;
        }
    std::memcpy(d.x, out, sizeof(out));
}
template <int M, int N, int K, typename T, typename P>
inline void store_matrix_sync(P* p, const fragment<accumulator, M, N, K, T>& f, unsigned ld, layout_t l) {
    if (hh_lane_id != 0) return;
    hh_check_align(p, ld);
    for (int i = 0; i < M; ++i)
        for (int j = 0; j < N; ++j) (l == mem_row_major ? p[i * ld + j] : p[j * ld + i]) = f.x[i * N + j];
}
inline float __float_to_tf32(float v) {  // round to nearest, ties away: 10 mantissa bits
    uint32_t u; std::memcpy(&u, &v, 4);
    if ((u & 0x7f800000u) != 0x7f800000u) { u += 0x1000u; u &= 0xffffe000u; }
    std::memcpy(&v, &u, 4); return v;
}
}}

template <typename F>
static void hh_launch(unsigned gx, unsigned gy, unsigned bx, F body) {
    gridDim = {gx, gy, 1}; blockDim = {bx, 1, 1};
    for (unsigned y = 0; y < gy; ++y)
        for (unsigned x = 0; x < gx; ++x) {
            blockIdx = {x, y, 0};
            std::barrier<> bar(bx);
            hh_bar = &bar;
            std::vector<std::thread> ts;
            for (unsigned t = 0; t < bx; ++t)
                ts.emplace_back([=] { threadIdx = {t, 0, 0}; hh_lane_id = t % 32; body(); });
            for (auto& t : ts) t.join();
        }
}
"""

_ENTRIES = r"""
#define HH_TRI(real, BS) \
extern "C" void tri_##real##_##BS(unsigned gx, unsigned gy, const real* M, long long mb, int ldm, \
    const real* beta, long long bb, real* out, long long ob, int ldo, int n, int sr, int rb, real alpha) { \
    hh_launch(gx, gy, BS, [=] { hh_tri_solve<real, BS>(M, mb, ldm, beta, bb, out, ob, ldo, n, sr, rb, alpha); }); }
HH_TRI(float, 16) HH_TRI(float, 32) HH_TRI(float, 64) HH_TRI(double, 16) HH_TRI(double, 32) HH_TRI(double, 64)
#define HH_UT(real) \
extern "C" void ut_##real(unsigned gx, unsigned bx, const real* G, const real* beta, real* A, int b, long long total) { \
    hh_launch(gx, 1, bx, [=] { hh_ut_from_gram<real>(G, beta, A, b, total); }); }
HH_UT(float) HH_UT(double)
"""

_FUSED_ENTRIES = r"""
#define HH_DENSE(real) \
extern "C" void dense_##real(unsigned gx, unsigned gy, const real* K, long long kb, int ldk, const real* T, \
    long long tb, int ldt, real* P, long long pb, int ldp, int b, int d) { \
    hh_launch(gx, gy, 128, [=] { hh_dense_fused<real>(K, kb, ldk, T, tb, ldt, P, pb, ldp, b, d); }); }
#define HH_FACTOR(real) \
extern "C" void factor_##real(unsigned gx, const real* K, long long kb, int ldk, const real* beta, long long bb, \
    real* out, long long ob, int ldo, int b, int d, int mode) { \
    hh_launch(gx, 1, 128, [=] { hh_factor_fused<real>(K, kb, ldk, beta, bb, out, ob, ldo, b, d, mode); }); }
HH_DENSE(float) HH_DENSE(double) HH_FACTOR(float) HH_FACTOR(double)
"""


@pytest.fixture(scope="module")
def cpu_kernels(tmp_path_factory):
    """The backend's CUDA source built for the CPU, as a ctypes library."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("no g++ here to build the CUDA source for the CPU")
    fused = kern.FUSED_SOURCE.replace("#include <mma.h>", "").replace(
        "extern __shared__ __align__(128) unsigned char hh_smem[];", "unsigned char* hh_smem = hh_dyn_smem;"
    )
    # both sources start with the shared device code: keep one copy of it
    code = _SHIM + kern.SOURCE + fused[len(kern.COMMON) :] + _ENTRIES + _FUSED_ENTRIES
    src = tmp_path_factory.mktemp("cuda_on_cpu") / "kernels.cpp"
    src.write_text(code)
    lib = src.with_suffix(".so")
    proc = subprocess.run(
        [cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", str(src), "-o", str(lib)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0 and "barrier" in proc.stderr and "No such file" in proc.stderr:
        pytest.skip("g++ here lacks C++20 <barrier>, needed to run the CUDA source on the CPU")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ctypes.CDLL(str(lib))


_V, _LL, _I, _U = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int, ctypes.c_uint


def _real(a):
    return ("float", ctypes.c_float) if a.dtype == np.float32 else ("double", ctypes.c_double)


def _run_tri(lib, M, beta, out, bs, scale_rows, rhs_beta, alpha=1.0):
    real, ct = _real(M)
    fn = getattr(lib, f"tri_{real}_{bs}")
    fn.argtypes = [_U, _U, _V, _LL, _I, _V, _LL, _V, _LL, _I, _I, _I, _I, ct]
    it, n = M.itemsize, M.shape[-1]
    fn(M.shape[0], -(-n // bs), M.ctypes.data, M.strides[0] // it, M.strides[1] // it, beta.ctypes.data,
       beta.strides[0] // it, out.ctypes.data, out.strides[0] // it, out.strides[1] // it, n,
       int(scale_rows), int(rhs_beta), alpha)


def _wy_reference(keys, betas):
    """T = (I + diag(beta) striu(K K^T))^{-1} diag(beta) in float64, and that A."""
    K, b = reference.to_float64(keys), reference.to_float64(betas)
    n = K.shape[-2]
    A = np.eye(n) + b[..., :, None] * np.triu(K @ np.swapaxes(K, -1, -2), 1)
    T = np.stack([scipy.linalg.solve_triangular(a, np.diag(bb), unit_diagonal=True) for a, bb in
                  zip(A.reshape(-1, n, n), b.reshape(-1, n))]).reshape(A.shape)
    return np.ascontiguousarray(T), A


def _per_block(n, bs, f):
    """An (..., n, n) array holding f(s, e) on each diagonal block [s, e) of width bs, 0 elsewhere."""
    parts = [(s, min(n, s + bs)) for s in range(0, n, bs)]
    first = f(*parts[0])
    out = np.zeros(first.shape[:-2] + (n, n))
    for s, e in parts:
        out[..., s:e, s:e] = f(s, e)
    return out


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("n,bs", [(1, 16), (7, 16), (16, 16), (29, 32), (64, 64), (70, 64), (40, 16)])
def test_tri_solve_kernel_on_cpu(cpu_kernels, rng, dtype, n, bs):
    keys = unit_keys(rng, (2, n, 5))
    betas = rng.uniform(0, 2, (2, n))
    betas[:, ::4] = 0.0
    T, A = _wy_reference(keys, betas)
    on_block = _per_block(n, bs, lambda s, e: np.ones((e - s, e - s))) > 0
    want_T = _per_block(n, bs, lambda s, e: _wy_reference(keys[:, s:e], betas[:, s:e])[0])
    want_inv = _per_block(n, bs, lambda s, e: np.linalg.inv(A[:, s:e, s:e]))
    if n <= bs:
        assert np.abs(want_T - T).max() < 1e-12
    tol = tolerance(dtype, n, n)
    bx = betas.astype(dtype)
    # T from the Gram matrix, into an out with a padded row stride: nothing off the
    # diagonal blocks may be touched
    G = np.ascontiguousarray((keys @ np.swapaxes(keys, -1, -2)).astype(dtype))
    buf = np.full((2, n, n + 3), 7.0, dtype)
    out = buf[:, :, :n]
    _run_tri(cpu_kernels, G, bx, out, bs, True, True)
    assert np.all(buf[:, :, n:] == 7.0) and np.all(out[:, ~on_block] == 7.0)
    assert np.abs(np.where(on_block, out, 0) - want_T).max() <= tol
    # the UT form's solve from A itself: A^{-1} diag(beta), and -A^{-1} (alpha = -1)
    Ax = np.ascontiguousarray(A.astype(dtype))
    out = np.full((2, n, n), np.nan, dtype)
    _run_tri(cpu_kernels, Ax, bx, out, bs, False, True)
    assert np.abs(np.where(on_block, out, 0) - want_T).max() <= tol
    out = np.full((2, n, n), np.nan, dtype)
    _run_tri(cpu_kernels, Ax, bx, out, bs, False, False, -1.0)
    assert np.abs(np.where(on_block, out, 0) + want_inv).max() <= tol


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_ut_from_gram_kernel_on_cpu(cpu_kernels, rng, dtype):
    keys = unit_keys(rng, (3, 9, 4))
    betas = rng.uniform(0, 2, (3, 9))
    G = np.ascontiguousarray((keys @ np.swapaxes(keys, -1, -2)).astype(dtype))
    A = np.full_like(G, np.nan)
    real, _ = _real(G)
    fn = getattr(cpu_kernels, f"ut_{real}")
    fn.argtypes = [_U, _U, _V, _V, _V, _I, _LL]
    fn(2, 32, G.ctypes.data, np.ascontiguousarray(betas.astype(dtype)).ctypes.data, A.ctypes.data, 9, A.size)  # grid-stride loop
    assert np.abs(A - _wy_reference(keys, betas)[1]).max() <= tolerance(dtype, 9, 4)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("n,d", [(1, 3), (5, 70), (64, 128), (33, 16)])
def test_fused_kernels_on_cpu(cpu_kernels, rng, dtype, n, d):
    keys = unit_keys(rng, (2, n, d))
    betas = rng.uniform(0, 2, (2, n))
    betas[:, ::3] = 0.0
    T, A = _wy_reference(keys, betas)
    real, _ = _real(keys.astype(dtype))
    kx = np.zeros((2, n, d + 2), dtype)[:, :, 1 : d + 1]  # rows with a padded stride
    kx[...] = keys
    bx = betas.astype(dtype)
    it = kx.itemsize
    fac = getattr(cpu_kernels, f"factor_{real}")
    fac.argtypes = [_U, _V, _LL, _I, _V, _LL, _V, _LL, _I, _I, _I, _I]
    tol = tolerance(dtype, n, d)
    for mode, want in ((0, T), (1, A)):
        out = np.full((2, n, n), np.nan, dtype)
        fac(2, kx.ctypes.data, kx.strides[0] // it, kx.strides[1] // it, bx.ctypes.data, n, out.ctypes.data,
            n * n, n, n, d, mode)
        assert np.abs(out - want).max() <= tol, f"mode {mode}"
    dense = getattr(cpu_kernels, f"dense_{real}")
    dense.argtypes = [_U, _U, _V, _LL, _I, _V, _LL, _I, _V, _LL, _I, _I, _I]
    Tx = np.ascontiguousarray(T.astype(dtype))
    P = np.full((2, d, d), np.nan, dtype)
    dense(-(-d // 64), 2, kx.ctypes.data, kx.strides[0] // it, kx.strides[1] // it, Tx.ctypes.data, n * n, n,
          P.ctypes.data, d * d, d, n, d)
    assert np.abs(P - reference.dense(keys, betas)).max() <= tol
    assert cpu_kernels.misaligned_count() == 0, "a WMMA load or store broke CUDA's alignment rules"


# -- on the GPU ------------------------------------------------------------------


@pytest.fixture
def be():
    try:
        return hh.get_backend("cupy")
    except hh.BackendUnavailableError as exc:
        pytest.skip(f"backend 'cupy' unavailable here: {exc}")


@pytest.fixture(params=[True, False], ids=["fused", "cublas"])
def fused_be(be, request):
    """The backend with the tensor-core kernels on, then off (cuBLAS and the solve kernel only)."""
    saved = be.fused
    be.fused = request.param
    yield be
    be.fused = saved


def _cupy():
    import cupy

    return cupy


def _torch_cuda():
    torch = pytest.importorskip("torch", reason="needs torch for DLPack interop")
    if not torch.cuda.is_available():
        pytest.skip("needs torch with CUDA for DLPack interop")
    return torch


def test_unavailable_backend_says_why():
    try:
        hh.get_backend("cupy")
    except hh.BackendUnavailableError as exc:
        msg = str(exc)
        assert "backend 'cupy' is not available" in msg
        assert "householder[cuda]" in msg or "CUDA device" in msg or "cuBLAS" in msg
        assert "cupy" not in hh.available_backends()
    else:
        assert "cupy" in hh.available_backends()


def test_describe_names_device(be):
    text = be.describe()
    assert text.startswith("cupy ") and "CUDA runtime" in text


def test_gemm_matches_matmul(be, rng):
    cp = _cupy()
    from householder.backends.cupy import gemm

    for dtype in (np.float32, np.float64):
        a = cp.asarray(rng.standard_normal((3, 5, 4)).astype(dtype))
        b = cp.asarray(rng.standard_normal((3, 6, 4)).astype(dtype))
        want = cp.asnumpy(a).astype(np.float64) @ np.swapaxes(cp.asnumpy(b), -1, -2)
        tol = tolerance(dtype, 4, 4)
        assert np.abs(cp.asnumpy(gemm(a, be.mT(b))) - want).max() <= tol
        want1 = cp.asnumpy(a[:1]).astype(np.float64) @ np.swapaxes(cp.asnumpy(b), -1, -2)
        assert np.abs(cp.asnumpy(gemm(a[:1], be.mT(b))) - want1).max() <= tol  # broadcast batch
        assert np.abs(cp.asnumpy(gemm(cp.flip(a, 1), be.mT(b))) - want[:, ::-1]).max() <= tol  # copied
        out = cp.asarray(rng.standard_normal((3, 5, 9)).astype(dtype))
        before = cp.asnumpy(out)
        gemm(a, be.mT(b), out=out[:, :, 2:8], alpha=-1.0, beta=1.0)
        after = cp.asnumpy(out)
        assert np.abs(after[:, :, 2:8] - (before[:, :, 2:8] - want)).max() <= tol
        assert np.array_equal(after[:, :, :2], before[:, :, :2]) and np.array_equal(after[:, :, 8:], before[:, :, 8:])
        assert float(cp.abs(gemm(a[:, :, :0], b[:, :0, :])).max()) == 0.0  # k = 0
    # more matrices than one cuBLAS call takes
    a = cp.asarray(rng.standard_normal((70000, 2, 3)))
    b = cp.asarray(rng.standard_normal((70000, 3, 2)))
    assert np.abs(cp.asnumpy(gemm(a, b)) - cp.asnumpy(a) @ cp.asnumpy(b)).max() < 1e-12


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("n", [1, 17, 64, 65, 200, 2100])
def test_tri_factor_matches_reference(be, rng, dtype, n):
    cp = _cupy()
    keys = unit_keys(rng, (2, n, 24))
    betas = rng.uniform(0, 2, (2, n))
    betas[:, 1::5] = 0.0
    T, A = _wy_reference(keys, betas)
    kc, bc = cp.asarray(keys.astype(dtype)), cp.asarray(betas.astype(dtype))
    tol = tolerance(dtype, n, n)
    for got in (be.wy_factor(kc, bc), be.tri_factor(cp.asarray(A.astype(dtype)), bc, "ut")):
        err = np.abs(cp.asnumpy(got) - T).max()
        assert err <= tol, f"{err:.2e} > {tol:.2e}"
    assert np.abs(cp.asnumpy(be.ut_factor(kc, bc)) - A).max() <= tolerance(dtype, 24, 24)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("form", ["wy", "ut"])
@pytest.mark.parametrize("block_size", [64, 1000, 3000])
def test_long_product(fused_be, rng, dtype, form, block_size):
    # n in the thousands, one block or many; reflections keep P orthogonal and O(1)
    cp = _cupy()
    n, d = 3000, 48
    keys = unit_keys(rng, (n, d))
    betas = np.full(n, 2.0)
    P = hh.product(cp.asarray(keys.astype(dtype)), cp.asarray(betas.astype(dtype)), form=form, block_size=block_size)
    ref = reference.dense(keys, betas)
    tol = tolerance(dtype, n, d)
    assert np.abs(cp.asnumpy(P.dense()) - ref).max() <= tol
    x = rng.standard_normal((d, 5))
    assert np.abs(cp.asnumpy(P.apply(cp.asarray(x.astype(dtype)), transpose=True)) - ref.T @ x).max() <= tol


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("form", ["wy", "ut"])
@pytest.mark.parametrize("n,d", [(64, 128), (37, 200), (5, 3), (100, 64)])
def test_fused_and_cublas_paths(fused_be, rng, dtype, form, n, d):
    cp = _cupy()
    keys = unit_keys(rng, (3, n, d))
    betas = rng.uniform(0, 2, (3, n))
    P = hh.product(cp.asarray(keys.astype(dtype)), cp.asarray(betas.astype(dtype)), form=form)
    ref = reference.dense(keys, betas)
    tol = tolerance(dtype, n, d)
    D = P.dense()
    assert D.dtype == dtype and isinstance(D, cp.ndarray)
    assert np.abs(cp.asnumpy(D) - ref).max() <= tol
    x = rng.standard_normal((3, d, 7))
    assert np.abs(cp.asnumpy(P @ cp.asarray(x.astype(dtype))) - ref @ x).max() <= tol
    if fused_be.fused:
        assert not fused_be.fused_unavailable, fused_be.fused_unavailable


def test_large_batch_runs_in_grid_chunks(be, rng):
    cp = _cupy()
    keys = unit_keys(rng, (70000, 3, 4))
    betas = rng.uniform(0, 2, (70000, 3))
    P = hh.product(cp.asarray(keys), cp.asarray(betas)).dense()
    assert np.abs(cp.asnumpy(P[-5:]) - reference.dense(keys[-5:], betas[-5:])).max() < 1e-12


def test_numpy_input_is_copied_to_the_device(be, rng):
    cp = _cupy()
    keys, betas = unit_keys(rng, (4, 6)), rng.uniform(0, 2, 4)
    P = hh.product(keys, betas, backend="cupy")
    assert isinstance(P.keys, cp.ndarray) and P.backend == "cupy"
    D = P.dense()
    assert isinstance(D, cp.ndarray)
    assert np.abs(cp.asnumpy(D) - reference.dense(keys, betas)).max() < 1e-12
    assert isinstance(P @ np.ones((6, 2)), cp.ndarray)  # host operands too
    assert hh.product(cp.asarray(keys), cp.asarray(betas)).backend == "cupy"  # inferred


def test_float16_and_integers_promote(be, rng):
    cp = _cupy()
    keys = unit_keys(rng, (4, 6))
    P = hh.product(cp.asarray(keys.astype(np.float16)), cp.asarray(np.ones(4, np.float16)))
    assert P.dtype == np.float32
    Q = hh.product(cp.asarray(rng.integers(-2, 3, (4, 6))), cp.asarray(np.array([0, 1, 0, 1])))
    assert Q.dtype == np.float64


def test_bad_input_on_the_gpu(be):
    cp = _cupy()
    k = cp.ones((4, 3))
    with pytest.raises(TypeError, match="keys must be real; got complex dtype complex128"):
        hh.product(k + 1j, cp.ones(4))
    with pytest.raises(ValueError, match="betas must contain only finite numbers"):
        hh.product(k, cp.asarray([1.0, np.nan, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"keys must have shape \(\.\.\., n, d\)"):
        hh.product(cp.ones(3), cp.ones(3))
    P = hh.product(k, cp.ones(4))
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 3, m\) to match d = 3"):
        P @ cp.ones((4, 2))
    with pytest.raises(TypeError, match="keys could not be converted to a cupy array"):
        hh.product([[1.0, 2.0], [3.0]], [1.0, 1.0], backend="cupy")


def test_host_torch_tensors_are_refused(be):
    torch = pytest.importorskip("torch", reason="needs torch to build a host tensor")
    with pytest.raises(TypeError, match=r"keys is a torch.Tensor in host memory but backend 'cupy'"):
        hh.product(torch.ones(3, 2), torch.ones(3), backend="cupy")


def test_tensor_that_requires_grad_is_refused_by_name(be):
    torch = _torch_cuda()
    k = torch.ones(3, 2, device="cuda", requires_grad=True)
    with pytest.raises(TypeError, match="keys .* could not be shared with CuPy through DLPack"):
        hh.product(k, torch.ones(3, device="cuda"), backend="cupy")


def test_dlpack_torch_tensors_into_a_cupy_product(be, rng):
    torch = _torch_cuda()
    cp = _cupy()
    keys, betas = unit_keys(rng, (2, 9, 16)), rng.uniform(0, 2, (2, 9))
    kt = torch.from_numpy(keys).cuda()
    bt = torch.from_numpy(betas).cuda()
    shared = be.asarray(kt, "keys")
    assert isinstance(shared, cp.ndarray) and shared.data.ptr == kt.data_ptr()  # no copy
    P = hh.product(kt, bt, backend="cupy")
    ref = reference.dense(keys, betas)
    assert np.abs(cp.asnumpy(P.dense()) - ref).max() < 1e-12
    x = torch.from_numpy(rng.standard_normal((2, 16, 3))).cuda()
    y = P @ x  # a torch operand of a CuPy product: the result is CuPy's
    assert isinstance(y, cp.ndarray)
    back = torch.from_dlpack(y)  # and back to torch without a copy
    assert back.data_ptr() == y.data.ptr
    assert np.abs(back.cpu().numpy() - ref @ x.cpu().numpy()).max() < 1e-12


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dlpack_cupy_arrays_into_a_torch_product(be, rng, backend):
    torch = _torch_cuda()
    cp = _cupy()
    try:
        hh.get_backend(backend)
    except hh.BackendUnavailableError as exc:
        pytest.skip(f"backend {backend!r} unavailable here: {exc}")
    keys, betas = unit_keys(rng, (2, 9, 16)), rng.uniform(0, 2, (2, 9))
    P = hh.product(torch.from_numpy(keys).cuda(), torch.from_numpy(betas).cuda(), backend=backend)
    x = rng.standard_normal((2, 16, 3))
    y = P @ cp.asarray(x)  # a CuPy operand of a torch product: the result is torch's
    assert isinstance(y, torch.Tensor) and y.is_cuda
    tol = tolerance(np.float64, 9, 16) if backend == "torch" else tolerance(np.float32, 9, 16)
    assert np.abs(y.cpu().numpy() - reference.dense(keys, betas) @ x).max() <= tol
    Q = hh.product(cp.asarray(keys), cp.asarray(betas), backend=backend)  # CuPy keys, torch product
    assert Q.backend == backend and isinstance(Q.keys, torch.Tensor)


def test_arrays_on_two_gpus_are_refused(be):
    cp = _cupy()
    if cp.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two GPUs")
    k = cp.ones((4, 3))
    with cp.cuda.Device(1):
        b = cp.ones(4)
    with pytest.raises(ValueError, match="keys and betas must be on the same GPU"):
        hh.product(k, b)
