"""Triton: the in-block triangular factor of a product of Householder factors.

Device functions (``@triton.jit``, callable from any kernel):

- :func:`wy_factor_from_gram` turns an in-register Gram block G = K K^T
  (BT, BT) and the betas (BT,) into the compact WY factor
  T = (I + diag(beta) striu(G))^{-1} diag(beta), upper triangular, so that
  H_1 ... H_BT = I - K^T T K. The delta rule's lower factor
  (I + tril(diag(beta) K K^T, -1))^{-1} diag(beta) is ``tl.trans`` of it.
- :func:`unit_upper_inverse` gives (I + striu(N))^{-1} for any (BT, BT) N;
  :func:`quadrant_inverse` the same from the four (BT/2) quadrants of N, and
  :func:`split_unit_upper_inverse` from quadrants split once or twice.
- :func:`mm` is the matrix product at a chosen precision; "split" (3xTF32
  with rounded splits) keeps float32 accuracy on the tensor cores.

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

from householder.backends._launch import next_power_of_2

MAX_BT = 64  # largest block of factors held in registers

_MODES = {"wy": 0, "ut": 1, "utinv": 2}


# -- device functions ----------------------------------------------------------------


@triton.jit
def _tf32_round(a):
    """a rounded to the nearest tf32 number (10-bit mantissa), still stored as float32."""
    return ((a.to(tl.uint32, bitcast=True) + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def mm(a, b, PRECISION: tl.constexpr):
    """a @ b with float32 (or float64) accumulation, at matrix-unit precision ``PRECISION``.

    "split": 3xTF32 with round-to-nearest splits a = hi + lo (hi and lo both tf32):
    hi b_hi + hi b_lo + lo b_hi, about float32 accuracy at three tf32 passes.
    (tl.dot's own "tf32x3" truncates the splits and is about 8x less accurate.)
    Other values are tl.dot's input_precision: "ieee" (float32 FMA), "tf32", "tf32x3".
    """
    if PRECISION == "split":
        a_hi = _tf32_round(a)
        b_hi = _tf32_round(b)
        a_lo = _tf32_round(a - a_hi)
        b_lo = _tf32_round(b - b_hi)
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

    ``PRECISION`` is the matrix-product precision of float32 blocks (see :func:`mm`);
    float64 blocks use "ieee".
    """
    rows = tl.arange(0, BT)[:, None]
    cols = tl.arange(0, BT)[None, :]
    eye = tl.where(rows == cols, 1.0, 0.0).to(N.dtype)
    return _doubling(eye, N, BT, PRECISION)


@triton.jit
def quadrant_inverse(N11, N12, N22, H: tl.constexpr, PRECISION: tl.constexpr):
    """Quadrants X11, X12, X22 of (I + striu(N))^{-1} for N = [[N11, N12], [., N22]] of size 2H.

    N12 is used whole (it lies above the diagonal). Two inverses of size H and
    one merge X12 = -X11 N12 X22: a quarter of the matrix-unit work of doubling
    at size 2H.
    """
    X11 = unit_upper_inverse(N11, H, PRECISION)
    X22 = unit_upper_inverse(N22, H, PRECISION)
    X12 = -mm(X11, mm(N12, X22, PRECISION), PRECISION)
    return X11, X12, X22


@triton.jit
def _quadrants(A, BT: tl.constexpr):
    """A (BT, BT) in registers -> A11, A12, A21, A22, each (BT/2, BT/2)."""
    a = tl.permute(tl.reshape(A, (2, BT // 2, 2, BT // 2)), (1, 3, 0, 2))  # (i_lo, j_lo, i_hi, j_hi)
    left, right = tl.split(a)  # j_hi = 0, 1
    A11, A21 = tl.split(left)
    A12, A22 = tl.split(right)
    return A11, A12, A21, A22


@triton.jit
def _halves(v, BT: tl.constexpr):
    """v (BT,) -> v[:BT/2], v[BT/2:]."""
    return tl.split(tl.permute(tl.reshape(v, (2, BT // 2)), (1, 0)))


@triton.jit
def _assemble(A11, A12, A21, A22, BT: tl.constexpr):
    """The inverse of :func:`_quadrants`."""
    a = tl.join(tl.join(A11, A21), tl.join(A12, A22))  # (i_lo, j_lo, i_hi, j_hi)
    return tl.reshape(tl.permute(a, (2, 0, 3, 1)), (BT, BT))


@triton.jit
def _inverse_one_split(N, BT: tl.constexpr, PRECISION: tl.constexpr):
    """(I + striu(N))^{-1} through its quadrants once, the halves by doubling."""
    N11, N12, N21, N22 = _quadrants(N, BT)
    X11, X12, X22 = quadrant_inverse(N11, N12, N22, BT // 2, PRECISION)
    return _assemble(X11, X12, tl.zeros_like(N21), X22, BT)


@triton.jit
def _inverse_two_splits(N, BT: tl.constexpr, PRECISION: tl.constexpr):
    """(I + striu(N))^{-1} through its quadrants and theirs, the quarters by doubling."""
    N11, N12, N21, N22 = _quadrants(N, BT)
    X11 = _inverse_one_split(N11, BT // 2, PRECISION)
    X22 = _inverse_one_split(N22, BT // 2, PRECISION)
    X12 = -mm(X11, mm(N12, X22, PRECISION), PRECISION)
    return _assemble(X11, X12, tl.zeros_like(N21), X22, BT)


@triton.jit
def split_unit_upper_inverse(N, BT: tl.constexpr, PRECISION: tl.constexpr, SPLITS: tl.constexpr):
    """(I + striu(N))^{-1} as :func:`unit_upper_inverse`, after ``SPLITS`` (0, 1, 2) quadrant splits.

    Each split replaces doubling at size BT by two inverses of size BT/2 and one merge
    X12 = -X11 N12 X22. At BT = 64 that is 12 products of 64^3 (doubling), against 2 x 10 of 32^3
    plus 2 of 32^3 (one split), or 4 x 8 of 16^3 plus 4 of 16^3 and 2 of 32^3 (two): 4.3x and 15x
    fewer multiply-adds, in smaller products. The halves must stay at least 16 wide (tl.dot).
    """
    if SPLITS >= 2 and BT >= 64:
        return _inverse_two_splits(N, BT, PRECISION)
    elif SPLITS >= 1 and BT >= 32:
        return _inverse_one_split(N, BT, PRECISION)
    else:
        return unit_upper_inverse(N, BT, PRECISION)


@triton.jit
def wy_factor_from_gram(G, beta, BT: tl.constexpr, PRECISION: tl.constexpr):
    """Compact WY factor T (BT, BT) from a Gram block G (BT, BT) and betas (BT,).

    T = (I + diag(beta) striu(G))^{-1} diag(beta), upper triangular, in G's dtype
    (float32 or float64); only the strictly upper part of G is read. Padding rows
    with beta = 0 give zero rows and columns of T. ``PRECISION`` as for :func:`mm`
    ("split" for float32 accuracy on the tensor cores, "ieee" for float64). The
    delta rule's lower factor (I + tril(diag(beta) K K^T, -1))^{-1} diag(beta) is
    ``tl.trans(T)``. BT >= 32 goes through two half-size inverses.
    """
    if BT >= 32:
        G11, G12, G21, G22 = _quadrants(G, BT)
        b1, b2 = _halves(beta, BT)
        X11, X12, X22 = quadrant_inverse(b1[:, None] * G11, b1[:, None] * G12, b2[:, None] * G22, BT // 2, PRECISION)
        zero = tl.zeros_like(G21)
        return _assemble(X11 * b1[None, :], X12 * b2[None, :], zero, X22 * b2[None, :], BT)
    else:
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


@triton.jit
def _gram_halves(Kp, b, D, r1, r2, H: tl.constexpr, BD: tl.constexpr, CDT: tl.constexpr, PRECISION: tl.constexpr):
    """Quadrants G11, G12, G22 of K K^T for rows r1 and r2 of the b x D block at Kp."""
    G11 = tl.zeros((H, H), dtype=CDT)
    G12 = tl.zeros((H, H), dtype=CDT)
    G22 = tl.zeros((H, H), dtype=CDT)
    for d0 in range(0, D, BD):
        dd = d0 + tl.arange(0, BD)
        k1 = tl.load(Kp + r1[:, None] * D + dd[None, :], mask=(r1[:, None] < b) & (dd[None, :] < D), other=0.0).to(CDT)
        k2 = tl.load(Kp + r2[:, None] * D + dd[None, :], mask=(r2[:, None] < b) & (dd[None, :] < D), other=0.0).to(CDT)
        G11 += mm(k1, tl.trans(k1), PRECISION)
        G12 += mm(k1, tl.trans(k2), PRECISION)
        G22 += mm(k2, tl.trans(k2), PRECISION)
    return G11, G12, G22


# -- kernels -------------------------------------------------------------------------------


@triton.jit
def _store_block(OUT, off, Q, ra, rb, b):
    tl.store(OUT + off + ra[:, None] * b + rb[None, :], Q.to(OUT.dtype.element_ty), mask=(ra[:, None] < b) & (rb[None, :] < b))


@triton.jit
def _factor_fwd_kernel(
    IN, beta, OUT, b, D,
    MODE: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, CDT: tl.constexpr, PRECISION: tl.constexpr,
    QUAD: tl.constexpr,
):
    """One block per program: IN is K (b, D) for modes wy/ut, A (b, b) for utinv; BT >= 32.

    QUAD: the block is handled as 2 x 2 quadrants of size H = BT / 2 (rows r1, r2):
    three Gram quadrants, two half-size inverses and one merge. Otherwise one
    (BT, BT) tile and doubling at full size.
    """
    if QUAD:
        _factor_fwd_quadrants(IN, beta, OUT, b, D, MODE, BT, BD, CDT, PRECISION)
    else:
        _factor_fwd_tile(IN, beta, OUT, b, D, MODE, BT, BD, CDT, PRECISION)


@triton.jit
def _factor_fwd_tile(IN, beta, OUT, b, D, MODE: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, CDT: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    r = tl.arange(0, BT)
    rows = r[:, None]
    cols = r[None, :]
    bv = tl.load(beta + pid * b + r, mask=r < b, other=0.0).to(CDT)
    if MODE == 2:
        A = tl.load(IN + pid * b * b + rows * b + cols, mask=(rows < b) & (cols < b), other=0.0).to(CDT)
        out = unit_upper_inverse(A, BT, PRECISION) * bv[None, :]
    else:
        G = _gram(IN + pid * b * D, b, D, r, BT, BD, CDT, PRECISION)
        if MODE == 0:
            out = unit_upper_inverse(bv[:, None] * G, BT, PRECISION) * bv[None, :]
        else:
            out = tl.where(rows == cols, 1.0, tl.where(rows < cols, bv[:, None] * G, 0.0))
    _store_block(OUT, pid * b * b, out, r, r, b)


@triton.jit
def _factor_fwd_quadrants(IN, beta, OUT, b, D, MODE: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, CDT: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    H: tl.constexpr = BT // 2
    r1 = tl.arange(0, H)
    r2 = H + r1
    b1 = tl.load(beta + pid * b + r1, mask=r1 < b, other=0.0).to(CDT)
    b2 = tl.load(beta + pid * b + r2, mask=r2 < b, other=0.0).to(CDT)
    rows = r1[:, None]
    cols = r1[None, :]
    off = pid * b * b
    if MODE == 2:
        A11 = tl.load(IN + off + r1[:, None] * b + r1[None, :], mask=(r1[:, None] < b) & (r1[None, :] < b), other=0.0).to(CDT)
        A12 = tl.load(IN + off + r1[:, None] * b + r2[None, :], mask=(r1[:, None] < b) & (r2[None, :] < b), other=0.0).to(CDT)
        A22 = tl.load(IN + off + r2[:, None] * b + r2[None, :], mask=(r2[:, None] < b) & (r2[None, :] < b), other=0.0).to(CDT)
        X11, X12, X22 = quadrant_inverse(A11, A12, A22, H, PRECISION)
        Q11, Q12, Q22 = X11 * b1[None, :], X12 * b2[None, :], X22 * b2[None, :]
    else:
        G11, G12, G22 = _gram_halves(IN + pid * b * D, b, D, r1, r2, H, BD, CDT, PRECISION)
        if MODE == 0:
            X11, X12, X22 = quadrant_inverse(b1[:, None] * G11, b1[:, None] * G12, b2[:, None] * G22, H, PRECISION)
            Q11, Q12, Q22 = X11 * b1[None, :], X12 * b2[None, :], X22 * b2[None, :]
        else:
            Q11 = tl.where(rows == cols, 1.0, tl.where(rows < cols, b1[:, None] * G11, 0.0))
            Q12 = b1[:, None] * G12
            Q22 = tl.where(rows == cols, 1.0, tl.where(rows < cols, b2[:, None] * G22, 0.0))
    _store_block(OUT, off, Q11, r1, r1, b)
    _store_block(OUT, off, Q12, r1, r2, b)
    _store_block(OUT, off, tl.zeros_like(Q11), r2, r1, b)
    _store_block(OUT, off, Q22, r2, r2, b)


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
    """The register block for b factors: a power of two, at least 32 (two halves of tl.dot's minimum 16)."""
    if b > MAX_BT:
        raise ValueError(f"a register block holds at most {MAX_BT} factors; got {b}")
    return max(32, next_power_of_2(b))


# Launch settings; None picks the default. The benchmark script sweeps them on a GPU: on an
# H100 one (BT, BT) tile with 4 warps was fastest for blocks of 64 (the quadrant path, which
# does a quarter of the matrix-unit work on 32 x 32 tiles, was not; see gpu_product_h100.md).
CONFIG = {"BD": None, "num_warps": None, "num_stages": None, "quadrants": None}


def _d_tile(D: int) -> int:
    return CONFIG["BD"] or max(16, min(64, next_power_of_2(D)))


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
        MODE=_MODES[mode], BT=BT, BD=_d_tile(D), CDT=_tl_dtype(cdt), PRECISION=precision,
        QUAD=bool(CONFIG["quadrants"]), **_launch(BT),
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
