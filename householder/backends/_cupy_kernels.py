"""CUDA source and cuBLAS argument planning for the CuPy backend.

This module imports no CuPy: the CUDA C++ below is compiled at run time by
CuPy (NVRTC, ``cupy.RawModule``), and the layout planning is plain Python, so
both can be checked on a machine without a GPU.

Kernels (templates over the real type and the block width BS in {16, 32, 64}):

- ``hh_tri_solve<real, BS>``: for every diagonal block of at most BS rows of a
  batch of matrices M (B, n, n), the back substitution
      X = (I + diag(s) striu(M))^{-1} diag(r)
  with s = beta or 1 and r = beta or 1. With s = r = beta and M = K K^T, X is
  the compact WY factor T (LAPACK xLARFT's T, generalised to any beta); with
  s = 1 and M = A, the UT factor, X = A^{-1} diag(r). One thread block per
  (matrix, diagonal block); thread c solves column c in registers, all threads
  in lockstep, reading the triangle from shared memory as broadcasts.
- ``hh_ut_from_gram<real>``: A = I + diag(beta) striu(G), one pass.
"""

from __future__ import annotations

from typing import NamedTuple

# Widest block the triangular kernel solves on chip; wider blocks are composed
# from these by the composition rule (matrix products).
MAX_BLOCK = 64
BLOCK_WIDTHS = (16, 32, 64)

COMMON = r"""
template <typename real> struct vec_of;
template <> struct vec_of<float>  { typedef float4  type; enum { width = 4 }; };
template <> struct vec_of<double> { typedef double2 type; enum { width = 2 }; };

__device__ __forceinline__ float  hh_lane(const float4& v, int i)  { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }
__device__ __forceinline__ double hh_lane(const double2& v, int i) { return i == 0 ? v.x : v.y; }

// Column c of X = (I + diag(s) striu(U))^{-1} (r e_c), for one thread, in registers:
//   x[i] = r [i == c] - s_i sum_{j > i} U[i][j] x[j],  bottom up.
// Rows of U (row stride ldu, 16-byte aligned) are read from shared memory; all
// threads run the same fully unrolled loops, so the reads are broadcasts. Entries
// on and below the diagonal of U are multiplied by x[j] = 0 (not yet computed),
// so they may hold anything finite, and the vector loads may start at the aligned
// column below i + 1.  Entries below row c come out exactly 0.
template <typename real, int BS>
__device__ __forceinline__ void hh_solve_column(const real* U, int ldu, const real* s, real r, int c, real (&x)[BS])
{
    typedef typename vec_of<real>::type vec;
    const int W = vec_of<real>::width;
#pragma unroll
    for (int i = 0; i < BS; ++i) x[i] = real(0);
#pragma unroll
    for (int i = BS - 1; i >= 0; --i) {
        real acc[W];
#pragma unroll
        for (int l = 0; l < W; ++l) acc[l] = real(0);
#pragma unroll
        for (int j = 0; j < BS; j += W) {
            if (j + W > i + 1) {  // a compile-time test once both loops are unrolled
                const vec u = *reinterpret_cast<const vec*>(U + i * ldu + j);
#pragma unroll
                for (int l = 0; l < W; ++l) acc[l] = fma(hh_lane(u, l), x[j + l], acc[l]);
            }
        }
        real sum = acc[0];
#pragma unroll
        for (int l = 1; l < W; ++l) sum += acc[l];
        if (s) sum *= s[i];
        x[i] = ((i == c) ? r : real(0)) - sum;
    }
}
"""

SOURCE = COMMON + r"""
// X = (I + diag(s) striu(M))^{-1} diag(r) on each diagonal block of width <= BS.
//   grid (B, number of diagonal blocks), BS threads; s = beta if scale_rows else 1,
//   r = beta if rhs_beta else 1; out (B, n, n) gets alpha * X on the diagonal blocks
//   (zeros below their diagonal) and is not touched elsewhere.
template <typename real, int BS>
__global__ void __launch_bounds__(BS) hh_tri_solve(
    const real* __restrict__ M, long long m_bstride, int ldm,
    const real* __restrict__ beta, long long beta_bstride,
    real* __restrict__ out, long long o_bstride, int ldo,
    int n, int scale_rows, int rhs_beta, real alpha)
{
    __shared__ __align__(16) real U[BS][BS];
    __shared__ real S[BS];

    const long long item = blockIdx.x;
    const int c0 = blockIdx.y * BS;
    const int bs = min(BS, n - c0);
    const int c = threadIdx.x;
    const real* Mb = M + item * m_bstride + (long long)c0 * ldm + c0;
    const real* bb = beta + item * beta_bstride + c0;

    // The strict upper triangle of this block, zero elsewhere (also past bs), so
    // the solve needs no bounds.  Rows are read along j: coalesced.
    for (int idx = c; idx < BS * BS; idx += BS) {
        const int i = idx / BS, j = idx % BS;
        U[i][j] = (i < j && j < bs) ? Mb[(long long)i * ldm + j] : real(0);
    }
    S[c] = (c < bs && scale_rows) ? bb[c] : real(c < bs);
    const real r = (c < bs) ? (rhs_beta ? bb[c] : real(1)) : real(0);
    __syncthreads();

    real x[BS];
    hh_solve_column<real, BS>(&U[0][0], BS, S, r, c, x);

    if (c < bs) {
        real* ob = out + item * o_bstride + (long long)c0 * ldo + c0;
#pragma unroll
        for (int i = 0; i < BS; ++i)
            if (i < bs) ob[(long long)i * ldo + c] = alpha * x[i];
    }
}

// A = I + diag(beta) striu(G) for G (B, b, b) and beta (B, b), both contiguous.
template <typename real>
__global__ void hh_ut_from_gram(const real* __restrict__ G, const real* __restrict__ beta,
                                real* __restrict__ A, int b, long long total)
{
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < total;
         t += (long long)gridDim.x * blockDim.x) {
        const long long bb = (long long)b * b;
        const long long item = t / bb;
        const int i = (int)((t % bb) / b), j = (int)(t % b);
        A[t] = j > i ? beta[item * b + i] * G[t] : (j == i ? real(1) : real(0));
    }
}
"""


FUSED_SOURCE = "#include <mma.h>\n" + COMMON + r"""
// Tensor-core kernels for one block of at most 64 factors (WMMA, sm_80+).
// float32 products use 3xTF32: a b ~ a_hi b_hi + a_hi b_lo + a_lo b_hi with
// a = a_hi + a_lo split into TF32 parts, about float32 accuracy; float64 uses
// the float64 tensor cores (DMMA).  A block-level product C (64 x 64) = A B is
// done by 4 warps, each owning a 32 x 32 quarter of C; operands live in shared
// memory with row stride LD (16-byte multiple, padded against bank conflicts).
using namespace nvcuda;

template <typename L> struct hh_off;  // offset of element (i, k) of an operand in layout L
template <> struct hh_off<wmma::row_major> { static __device__ __forceinline__ int at(int i, int k, int ld) { return i * ld + k; } };
template <> struct hh_off<wmma::col_major> { static __device__ __forceinline__ int at(int i, int k, int ld) { return k * ld + i; } };

template <typename real> struct hh_tc;

template <> struct hh_tc<float> {
    enum { LD = 68, FM = 16, FN = 16, FK = 8, TM = 2, TN = 2 };
    typedef wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc_t;

    template <typename F> static __device__ __forceinline__ void split(F& hi, F& lo) {
#pragma unroll
        for (int t = 0; t < hi.num_elements; ++t) {
            const float v = hi.x[t];
            const float h = wmma::__float_to_tf32(v);
            hi.x[t] = h;
            lo.x[t] = wmma::__float_to_tf32(v - h);
        }
    }

    // acc += A (32 x kk) B (kk x 32); element (i, k) of A at A[hh_off<LA>::at(i, k, lda)], (k, j) of B likewise.
    template <typename LA, typename LB>
    static __device__ __forceinline__ void mma(acc_t (&acc)[TM][TN], const float* A, int lda, const float* B, int ldb, int kk) {
        for (int k = 0; k < kk; k += FK) {
            wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, LA> ah[TM], al[TM];
            wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, LB> bh[TN], bl[TN];
#pragma unroll
            for (int i = 0; i < TM; ++i) {
                wmma::load_matrix_sync(ah[i], A + hh_off<LA>::at(i * FM, k, lda), lda);
                split(ah[i], al[i]);
            }
#pragma unroll
            for (int j = 0; j < TN; ++j) {
                wmma::load_matrix_sync(bh[j], B + hh_off<LB>::at(k, j * FN, ldb), ldb);
                split(bh[j], bl[j]);
            }
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int j = 0; j < TN; ++j) {
                    wmma::mma_sync(acc[i][j], al[i], bh[j], acc[i][j]);  // small terms first
                    wmma::mma_sync(acc[i][j], ah[i], bl[j], acc[i][j]);
                    wmma::mma_sync(acc[i][j], ah[i], bh[j], acc[i][j]);
                }
        }
    }
};

template <> struct hh_tc<double> {
    enum { LD = 66, FM = 8, FN = 8, FK = 4, TM = 4, TN = 4 };
    typedef wmma::fragment<wmma::accumulator, 8, 8, 4, double> acc_t;

    template <typename LA, typename LB>
    static __device__ __forceinline__ void mma(acc_t (&acc)[TM][TN], const double* A, int lda, const double* B, int ldb, int kk) {
        for (int k = 0; k < kk; k += FK) {
            wmma::fragment<wmma::matrix_a, 8, 8, 4, double, LA> a[TM];
            wmma::fragment<wmma::matrix_b, 8, 8, 4, double, LB> b[TN];
#pragma unroll
            for (int i = 0; i < TM; ++i) wmma::load_matrix_sync(a[i], A + hh_off<LA>::at(i * FM, k, lda), lda);
#pragma unroll
            for (int j = 0; j < TN; ++j) wmma::load_matrix_sync(b[j], B + hh_off<LB>::at(k, j * FN, ldb), ldb);
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int j = 0; j < TN; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
        }
    }
};

template <typename real, typename Acc>
__device__ __forceinline__ void hh_zero(Acc& acc) {
    for (int i = 0; i < hh_tc<real>::TM; ++i)
        for (int j = 0; j < hh_tc<real>::TN; ++j) wmma::fill_fragment(acc[i][j], real(0));
}

// Store this warp's 32 x 32 quarter, scaled by alpha, at C (row stride ldc).
template <typename real, typename Acc>
__device__ __forceinline__ void hh_store(Acc& acc, real* C, int ldc, real alpha) {
    typedef hh_tc<real> tc;
    for (int i = 0; i < tc::TM; ++i)
        for (int j = 0; j < tc::TN; ++j) {
            for (int t = 0; t < acc[i][j].num_elements; ++t) acc[i][j].x[t] *= alpha;
            wmma::store_matrix_sync(C + i * tc::FM * ldc + j * tc::FN, acc[i][j], ldc, wmma::mem_row_major);
        }
}

// 64 x 64 tile: dst[i][j] = src[(r0 + i) * ld + c0 + j] inside rows x cols, 0 outside.
template <typename real>
__device__ __forceinline__ void hh_load_tile(real* dst, const real* src, long long ld, int r0, int rows, int c0, int cols) {
    for (int idx = threadIdx.x; idx < 64 * 64; idx += blockDim.x) {
        const int i = idx >> 6, j = idx & 63;
        dst[i * hh_tc<real>::LD + j] = (r0 + i < rows && c0 + j < cols) ? src[(long long)(r0 + i) * ld + c0 + j] : real(0);
    }
}

// P = I - K^T T K for one block of b <= 64 factors per matrix.
//   grid (ceil(d / 64), B), 128 threads; CTA (x, item) writes columns [64 x, 64 x + 64) of P.
//   Shared memory: 3 tiles of 64 x LD: T then W = -T K_c; K_c = K[:, c0:c0+64]; K_r, then the output tile.
template <typename real>
__global__ void __launch_bounds__(128) hh_dense_fused(
    const real* __restrict__ K, long long k_bstride, int ldk,
    const real* __restrict__ T, long long t_bstride, int ldt,
    real* __restrict__ P, long long p_bstride, int ldp, int b, int d)
{
    typedef hh_tc<real> tc;
    extern __shared__ __align__(128) unsigned char hh_smem[];
    real* sT = reinterpret_cast<real*>(hh_smem);
    real* sKc = sT + 64 * tc::LD;
    real* sKr = sKc + 64 * tc::LD;

    const long long item = blockIdx.y;
    const int c0 = blockIdx.x * 64;
    const int warp = threadIdx.x >> 5, row0 = (warp >> 1) * 32, col0 = (warp & 1) * 32;
    const real* Kb = K + item * k_bstride;
    real* Pb = P + item * p_bstride;

    hh_load_tile(sT, T + item * t_bstride, ldt, 0, b, 0, b);
    hh_load_tile(sKc, Kb, ldk, 0, b, c0, d);
    __syncthreads();

    typename tc::acc_t acc[tc::TM][tc::TN];
    hh_zero<real>(acc);
    tc::template mma<wmma::row_major, wmma::row_major>(acc, sT + row0 * tc::LD, tc::LD, sKc + col0, tc::LD, 64);
    __syncthreads();  // every warp has read T
    hh_store(acc, sT + row0 * tc::LD + col0, tc::LD, real(-1));  // W = -T K_c over T

    for (int r0 = 0; r0 < d; r0 += 64) {
        const real* A = sKc;
        if (r0 != c0) {
            hh_load_tile(sKr, Kb, ldk, 0, b, r0, d);
            A = sKr;
        }
        __syncthreads();
        // C = K_r^T W: element (i, l) of K_r^T is A[l][i], a column-major operand.
        hh_zero<real>(acc);
        tc::template mma<wmma::col_major, wmma::row_major>(acc, A + row0, tc::LD, sT + col0, tc::LD, 64);
        __syncthreads();  // every warp has read K_r
        hh_store(acc, sKr + row0 * tc::LD + col0, tc::LD, real(1));
        __syncthreads();
        for (int idx = threadIdx.x; idx < 64 * 64; idx += blockDim.x) {
            const int i = idx >> 6, j = idx & 63;
            if (r0 + i < d && c0 + j < d)
                Pb[(long long)(r0 + i) * ldp + c0 + j] = sKr[i * tc::LD + j] + real(r0 + i == c0 + j);
        }
        __syncthreads();
    }
}

// The factor of one block of b <= 64 factors per matrix, from the keys: the Gram
// matrix G = K K^T on the tensor cores (d in chunks of 64), then
//   mode 0: T = (I + diag(beta) striu(G))^{-1} diag(beta) (the compact WY factor),
//   mode 1: A = I + diag(beta) striu(G) (the UT factor).
//   grid (B), 128 threads; out (B, b, b) with row stride ldo.
template <typename real>
__global__ void __launch_bounds__(128) hh_factor_fused(
    const real* __restrict__ K, long long k_bstride, int ldk,
    const real* __restrict__ beta, long long beta_bstride,
    real* __restrict__ out, long long o_bstride, int ldo, int b, int d, int mode)
{
    typedef hh_tc<real> tc;
    extern __shared__ __align__(128) unsigned char hh_smem[];
    real* sG = reinterpret_cast<real*>(hh_smem);
    real* sK = sG + 64 * tc::LD;
    real* sS = sK + 64 * tc::LD;  // beta, zero past b

    const long long item = blockIdx.x;
    const int warp = threadIdx.x >> 5, row0 = (warp >> 1) * 32, col0 = (warp & 1) * 32;
    const real* Kb = K + item * k_bstride;
    const real* bb = beta + item * beta_bstride;
    real* ob = out + item * o_bstride;
    if (threadIdx.x < 64) sS[threadIdx.x] = threadIdx.x < b ? bb[threadIdx.x] : real(0);

    typename tc::acc_t acc[tc::TM][tc::TN];
    hh_zero<real>(acc);
    for (int k0 = 0; k0 < d; k0 += 64) {
        hh_load_tile(sK, Kb, ldk, 0, b, k0, d);
        __syncthreads();
        // G += K_k K_k^T: element (l, j) of K_k^T is sK[j][l], a column-major operand.
        tc::template mma<wmma::row_major, wmma::col_major>(acc, sK + row0 * tc::LD, tc::LD, sK + col0 * tc::LD, tc::LD, 64);
        __syncthreads();
    }
    hh_store(acc, sG + row0 * tc::LD + col0, tc::LD, real(1));
    __syncthreads();

    if (mode == 1) {
        for (int idx = threadIdx.x; idx < b * b; idx += blockDim.x) {
            const int i = idx / b, j = idx % b;
            ob[(long long)i * ldo + j] = j > i ? sS[i] * sG[i * tc::LD + j] : real(i == j);
        }
        return;
    }
    const int c = threadIdx.x;
    if (c < 64) {
        real x[64];
        hh_solve_column<real, 64>(sG, tc::LD, sS, sS[c], c, x);
        if (c < b) {
#pragma unroll
            for (int i = 0; i < 64; ++i)
                if (i < b) ob[(long long)i * ldo + c] = x[i];
        }
    }
}
"""

FUSED_THREADS = 128


def fused_kernel_names(real: str) -> list[str]:
    """Template instances of the tensor-core kernels for ``real``."""
    return [f"hh_dense_fused<{real}>", f"hh_factor_fused<{real}>"]


def fused_smem_bytes(kernel: str, itemsize: int) -> int:
    """Dynamic shared memory of a fused kernel ("dense" or "factor") in bytes."""
    ld = 68 if itemsize == 4 else 66
    tile = 64 * ld * itemsize
    return 3 * tile if kernel == "dense" else 2 * tile + 64 * itemsize


def kernel_names(real: str) -> list[str]:
    """Template instances CuPy must compile for ``real`` ("float" or "double")."""
    return [f"hh_tri_solve<{real}, {bs}>" for bs in BLOCK_WIDTHS] + [f"hh_ut_from_gram<{real}>"]


def block_width(b: int) -> int:
    """The narrowest compiled block width that holds ``b`` rows (at most MAX_BLOCK)."""
    for bs in BLOCK_WIDTHS:
        if b <= bs:
            return bs
    return MAX_BLOCK


def split_point(n: int) -> int:
    """Where the recursive composition splits n > MAX_BLOCK rows: a multiple of MAX_BLOCK near n/2."""
    blocks = -(-n // MAX_BLOCK)
    return MAX_BLOCK * (blocks // 2 + blocks % 2)


# -- cuBLAS argument planning (column-major library, row-major arrays) ----------


class MatrixLayout(NamedTuple):
    """How cuBLAS sees one row-major matrix operand: stored transposed or not, and its ld."""

    col_major: bool  # the matrix is stored column by column (a transposed view)
    ld: int


def matrix_layout(rows: int, cols: int, s_row: int, s_col: int) -> MatrixLayout | None:
    """Layout of a (rows, cols) matrix with element strides, or None if cuBLAS cannot read it.

    Row-major: unit column stride, row stride >= cols. Column-major: unit row stride,
    column stride >= rows. Negative or overlapping strides need a copy.
    """
    if (cols == 1 or s_col == 1) and (rows == 1 or s_row >= max(cols, 1)):
        return MatrixLayout(False, s_row if rows > 1 else max(cols, 1))
    if (rows == 1 or s_row == 1) and (cols == 1 or s_col >= max(rows, 1)):
        return MatrixLayout(True, s_col if cols > 1 else max(rows, 1))
    return None


def merged_batch_stride(shape: tuple, strides: tuple) -> int | None:
    """One element stride that walks all batch dimensions in order, or None.

    Dimensions of size 1 are ignored; broadcast dimensions (stride 0) merge only
    when every batch dimension is broadcast.
    """
    dims = [(n, s) for n, s in zip(shape, strides) if n != 1]
    if not dims:
        return 0
    for (n0, s0), (n1, s1) in zip(dims, dims[1:]):
        if s0 != s1 * n1:
            return None
    stride = dims[-1][1]
    return stride if stride >= 0 else None


class GemmArgs(NamedTuple):
    """Arguments of cublasGemmStridedBatchedEx for C = alpha A B + beta C (row-major A, B, C).

    cuBLAS is column-major: the row-major C (m x n) is the column-major C^T
    (n x m) = B^T A^T, so cuBLAS's first operand is our B and its second our A.
    """

    transa: int  # op on our B
    transb: int  # op on our A
    m: int  # cuBLAS m = our n
    n: int  # cuBLAS n = our m
    k: int
    lda: int  # ld of our B
    ldb: int  # ld of our A
    ldc: int


def plan_gemm(m: int, n: int, k: int, a: MatrixLayout, b: MatrixLayout, c_ld: int) -> GemmArgs:
    """cuBLAS arguments for C (m x n) = A (m x k) @ B (k x n) given the operands' layouts.

    A row-major matrix is, to cuBLAS, its transpose stored column-major, so a
    row-major operand is passed with op N and a column-major one with op T.
    """
    transa = 1 if b.col_major else 0
    transb = 1 if a.col_major else 0
    return GemmArgs(transa, transb, n, m, k, b.ld, a.ld, c_ld)
