"""Triton: the in-block triangular factor of a product of Householder factors.

Device functions (``@triton.jit``, callable from any kernel):

- :func:`wy_factor_from_gram` turns an in-register Gram block G = K K^T
  (BT, BT) and the betas (BT,) into the compact WY factor
  T = (I + diag(beta) striu(G))^{-1} diag(beta), upper triangular, so that
  H_1 ... H_BT = I - K^T T K. The delta rule's lower factor
  (I + tril(diag(beta) K K^T, -1))^{-1} diag(beta) is ``tl.trans`` of it.
- :func:`unit_upper_inverse` gives (I + striu(N))^{-1} for any (BT, BT) N.

Both build the inverse by recursive doubling, which is the composition rule
of DESIGN.md applied to blocks of 1, 2, 4, ... factors:
``X <- X - X (N restricted to the coupling of sibling blocks) X``. Each level
is two (BT, BT) matrix products on the matrix units, and every intermediate
is itself a triangular factor of a sub-product, so entries stay bounded
(|T_ij| <= 4 for unit keys, beta in [0, 2]) -- unlike a Neumann series, whose
powers of striu(G) grow combinatorially for nearly parallel keys.

Kernels (one program per block of factors) and their backward passes, with
launchers that take contiguous (B, b, d) / (B, b) / (B, b, b) tensors:
``factor_forward(mode, ...)`` and ``factor_backward(mode, ...)`` for the modes
"wy" (K, beta -> T), "ut" (K, beta -> A = I + diag(beta) striu(K K^T)) and
"utinv" (A, beta -> T = (I + striu(A))^{-1} diag(beta)).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BT = 64  # largest block of factors held in registers

_MODES = {"wy": 0, "ut": 1, "utinv": 2}


# -- device functions ----------------------------------------------------------------


@triton.jit
def _tf32_split(a):
    """a = hi + lo with hi exactly representable in tf32 (10-bit mantissa)."""
    hi = (a.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return hi, a - hi


@triton.jit
def mm(a, b, PRECISION: tl.constexpr):
    """a @ b with fp32 accumulation; PRECISION "split" is 3xTF32 done by hand (about float32 accuracy).

    Other values go to tl.dot's input_precision ("ieee", "tf32", "tf32x3").
    """
    if PRECISION == "split":
        a_hi, a_lo = _tf32_split(a)
        b_hi, b_lo = _tf32_split(b)
        acc = tl.dot(a_lo, b_hi, input_precision="tf32")
        acc = tl.dot(a_hi, b_lo, acc, input_precision="tf32")
        return tl.dot(a_hi, b_hi, acc, input_precision="tf32")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _doubling(X, M, BT: tl.constexpr, PRECISION: tl.constexpr):
    """Merge the 1x1 diagonal blocks of X pairwise up to BT: X <- X - X M_s X at level s."""
    rows = tl.arange(0, BT)[:, None]
    cols = tl.arange(0, BT)[None, :]
    for lvl in tl.static_range(7):  # BT <= 128
        if (1 << lvl) < BT:
            # the coupling of block pairs (2q, 2q + 1) of size s = 2^lvl: rows in the first, columns in the second
            couple = ((rows >> (lvl + 1)) == (cols >> (lvl + 1))) & ((rows >> lvl) < (cols >> lvl))
            Ms = tl.where(couple, M, 0.0)
            X = X - mm(X, mm(Ms, X, PRECISION), PRECISION)
    return X


@triton.jit
def unit_upper_inverse(N, BT: tl.constexpr, PRECISION: tl.constexpr):
    """(I + striu(N))^{-1} for N (BT, BT): unit upper triangular, in N's dtype.

    ``PRECISION`` is the matrix-product precision for float32 ("ieee", "tf32",
    "tf32x3" or "split"). For "tf32x3"/"split" the doubling runs in plain tf32 and
    one Newton step X <- X + X (I - (I + N) X), with the residual in 3xTF32,
    restores float32 accuracy at a third of the cost.
    """
    rows = tl.arange(0, BT)[:, None]
    cols = tl.arange(0, BT)[None, :]
    eye = tl.where(rows == cols, 1.0, 0.0).to(N.dtype)
    N = tl.where(rows < cols, N, 0.0)
    if PRECISION == "tf32x3" or PRECISION == "split":
        X = _doubling(eye, N, BT, "tf32")
        R = (eye - X) - mm(N, X, PRECISION)
        X = X + mm(X, R, "tf32")
    else:
        X = _doubling(eye, N, BT, PRECISION)
    return X


@triton.jit
def wy_factor_from_gram(G, beta, BT: tl.constexpr, PRECISION: tl.constexpr):
    """Compact WY factor T (BT, BT) from a Gram block G (BT, BT) and betas (BT,).

    T = (I + diag(beta) striu(G))^{-1} diag(beta), upper triangular, in G's dtype
    (float32 or float64); only the strictly upper part of G is read. Padding rows
    with beta = 0 give zero rows and columns of T. ``PRECISION`` as for
    :func:`unit_upper_inverse`; the delta rule's lower factor is ``tl.trans(T)``.
    """
    return unit_upper_inverse(beta[:, None] * G, BT, PRECISION) * beta[None, :]


@triton.jit
def _gram(Kp, b, D, r, BT: tl.constexpr, BD: tl.constexpr, CDT: tl.constexpr, PRECISION: tl.constexpr):
    """K K^T (BT, BT) for the b x D row-major block at Kp, in CDT, tiled over D."""
    G = tl.zeros((BT, BT), dtype=CDT)
    for d0 in range(0, D, BD):
        dd = d0 + tl.arange(0, BD)
        k = tl.load(Kp + r[:, None] * D + dd[None, :], mask=(r[:, None] < b) & (dd[None, :] < D), other=0.0)
        k = k.to(CDT)
        G += mm(k, tl.trans(k), PRECISION)
    return G


# -- kernels -------------------------------------------------------------------------------


@triton.jit
def _factor_fwd_kernel(
    IN, beta, OUT, b, D,
    MODE: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, CDT: tl.constexpr, PRECISION: tl.constexpr,
):
    """One block per program: IN is K (b, D) for modes wy/ut, A (b, b) for utinv."""
    pid = tl.program_id(0).to(tl.int64)
    r = tl.arange(0, BT)
    rows = r[:, None]
    cols = r[None, :]
    rmask = r < b
    bv = tl.load(beta + pid * b + r, mask=rmask, other=0.0).to(CDT)
    mask2 = (rows < b) & (cols < b)
    if MODE == 2:
        A = tl.load(IN + pid * b * b + rows * b + cols, mask=mask2, other=0.0).to(CDT)
        out = unit_upper_inverse(A, BT, PRECISION) * bv[None, :]
    else:
        G = _gram(IN + pid * b * D, b, D, r, BT, BD, CDT, PRECISION)
        if MODE == 0:
            out = wy_factor_from_gram(G, bv, BT, PRECISION)
        else:
            out = tl.where(rows == cols, 1.0, tl.where(rows < cols, bv[:, None] * G, 0.0))
    tl.store(OUT + pid * b * b + rows * b + cols, out.to(OUT.dtype.element_ty), mask=mask2)


@triton.jit
def _factor_bwd_kernel(
    IN, beta, DOUT, DIN, DBETA, b, D,
    MODE: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, CDT: tl.constexpr, PRECISION: tl.constexpr,
):
    """Gradients of the factor kernel; DIN is dK (b, D) for wy/ut, dA (b, b) for utinv."""
    pid = tl.program_id(0).to(tl.int64)
    r = tl.arange(0, BT)
    rows = r[:, None]
    cols = r[None, :]
    rmask = r < b
    mask2 = (rows < b) & (cols < b)
    upper = rows < cols
    bv = tl.load(beta + pid * b + r, mask=rmask, other=0.0).to(CDT)
    dout = tl.load(DOUT + pid * b * b + rows * b + cols, mask=mask2, other=0.0).to(CDT)
    if MODE == 1:
        # A = I + diag(beta) M, M = striu(G)
        G = _gram(IN + pid * b * D, b, D, r, BT, BD, CDT, PRECISION)
        dA = tl.where(upper, dout, 0.0)
        dbeta = tl.sum(dA * G, axis=1)
        dG = bv[:, None] * dA
    else:
        # T = X diag(beta), X = (I + N)^{-1}; N = diag(beta) striu(G) (wy) or striu(A) (utinv)
        if MODE == 0:
            G = _gram(IN + pid * b * D, b, D, r, BT, BD, CDT, PRECISION)
            N = bv[:, None] * G
        else:
            N = tl.load(IN + pid * b * b + rows * b + cols, mask=mask2, other=0.0).to(CDT)
        X = unit_upper_inverse(N, BT, PRECISION)
        dT = tl.where(rows <= cols, dout, 0.0)  # T is upper triangular: its lower part is no input's
        dbeta = tl.sum(X * dT, axis=0)
        dX = dT * bv[None, :]
        Xt = tl.trans(X)
        dN = -mm(mm(Xt, dX, PRECISION), Xt, PRECISION)
        dN = tl.where(upper, dN, 0.0)
        if MODE == 0:
            dbeta += tl.sum(dN * G, axis=1)
            dG = bv[:, None] * dN
        else:
            tl.store(DIN + pid * b * b + rows * b + cols, dN.to(DIN.dtype.element_ty), mask=mask2)
    tl.store(DBETA + pid * b + r, dbeta.to(DBETA.dtype.element_ty), mask=rmask)
    if MODE != 2:
        # G = K K^T read only above the diagonal: dK = (dG + dG^T) K
        S = dG + tl.trans(dG)
        Kp = IN + pid * b * D
        for d0 in range(0, D, BD):
            dd = d0 + tl.arange(0, BD)
            m = (rows < b) & (dd[None, :] < D)
            k = tl.load(Kp + rows * D + dd[None, :], mask=m, other=0.0).to(CDT)
            dk = mm(S, k, PRECISION)
            tl.store(DIN + pid * b * D + rows * D + dd[None, :], dk.to(DIN.dtype.element_ty), mask=m)


# -- launchers -----------------------------------------------------------------------------


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def block_width(b: int) -> int:
    """The register block for b factors: a power of two, at least 16 (tl.dot's minimum)."""
    if b > MAX_BT:
        raise ValueError(f"a register block holds at most {MAX_BT} factors; got {b}")
    return max(16, triton.next_power_of_2(b))


# Launch settings; None picks the heuristic. The benchmark script sweeps them on a GPU.
CONFIG = {"BD": None, "num_warps": None, "num_stages": None}


def _d_tile(D: int) -> int:
    return CONFIG["BD"] or max(16, min(64, triton.next_power_of_2(D)))


def _launch(BT: int) -> dict:
    return {"num_warps": CONFIG["num_warps"] or (4 if BT <= 64 else 8), "num_stages": CONFIG["num_stages"] or 1}


def factor_forward(mode: str, IN: torch.Tensor, beta: torch.Tensor, cdt: torch.dtype, precision: str) -> torch.Tensor:
    """Factors of B blocks: IN (B, b, D) keys or (B, b, b) UT matrices, beta (B, b) -> (B, b, b) in ``cdt``."""
    B, b = beta.shape
    D = IN.shape[-1]
    out = torch.empty((B, b, b), dtype=cdt, device=beta.device)
    if B == 0 or b == 0:
        return out.zero_()
    BT = block_width(b)
    _factor_fwd_kernel[(B,)](
        IN, beta, out, b, D,
        MODE=_MODES[mode], BT=BT, BD=_d_tile(D), CDT=_tl_dtype(cdt), PRECISION=precision, **_launch(BT),
    )
    return out


def factor_backward(mode: str, IN, beta, dout, cdt: torch.dtype, precision: str):
    """Gradients (dIN, dbeta) of :func:`factor_forward` for the output gradient ``dout`` (B, b, b)."""
    B, b = beta.shape
    D = IN.shape[-1]
    din = torch.empty(IN.shape, dtype=cdt, device=IN.device)
    dbeta = torch.empty((B, b), dtype=cdt, device=IN.device)
    if B == 0 or b == 0:
        return din.zero_(), dbeta.zero_()
    BT = block_width(b)
    _factor_bwd_kernel[(B,)](
        IN, beta, dout, din, dbeta, b, D,
        MODE=_MODES[mode], BT=BT, BD=_d_tile(D), CDT=_tl_dtype(cdt), PRECISION=precision, **_launch(BT),
    )
    return din, dbeta
