"""Triton: apply a blocked product P = P_1 ... P_m (or P^T) to a block, and its backward.

Each block is P_j = I - K_j^T T_j K_j with K_j (b, d) and its WY factor T_j
(b, b). One program owns a batch element and a tile of BC columns of x and
runs through the m blocks in order, one pass per block:

    Z = K_j x      (b, BC)      tiled over d
    W = T_j Z      (T_j^T Z for P^T)
    x = x - K_j^T W             tiled over d

The running x lives in a float32 (float64) workspace between blocks and is
written in the output dtype after the last one; with ``identity`` the first
block reads columns of I instead of x, which gives the dense product. When
gradients are needed the forward keeps each block's input (m - 1 tiles of x),
and the backward walks the blocks in reverse:

    V = K_j g,  Zb = -T'^T V,  dT' = -V Z^T,
    dK_j = -W g^T + Zb x^T,  g <- g + K_j^T Zb        (T' = T_j or T_j^T)

Gradients of K and T are summed over the column tiles by the launcher.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from householder.backends._launch import cdiv, next_power_of_2
from householder.backends._triton_factor import _tl_dtype, block_width, mm


@triton.jit
def _load_x(X, WS, step, off_x, off_ws, dd, cc, D, C, IDENTITY: tl.constexpr, CDT: tl.constexpr):
    """The input tile (BD, BC) of a step: x (or I) at step 0, the workspace after."""
    m = (dd[:, None] < D) & (cc[None, :] < C)
    if step == 0:
        if IDENTITY:
            x = tl.where((dd[:, None] == cc[None, :]) & m, 1.0, 0.0).to(CDT)
        else:
            x = tl.load(X + off_x + dd[:, None] * C + cc[None, :], mask=m, other=0.0).to(CDT)
    else:
        x = tl.load(WS + off_ws + dd[:, None] * C + cc[None, :], mask=m, other=0.0).to(CDT)
    return x


@triton.jit
def _load_factor(F, off, r, b, TRANSPOSE: tl.constexpr, CDT: tl.constexpr):
    """T_j (BT, BT), or T_j^T when TRANSPOSE."""
    m = (r[:, None] < b) & (r[None, :] < b)
    if TRANSPOSE:
        return tl.load(F + off + r[None, :] * b + r[:, None], mask=m, other=0.0).to(CDT)
    return tl.load(F + off + r[:, None] * b + r[None, :], mask=m, other=0.0).to(CDT)


@triton.jit
def _k_times_x(Kp, X, WS, step, off_x, off_in, r, cc, b, D, C, IDENTITY: tl.constexpr,
               BT: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr, CDT: tl.constexpr, PRECISION: tl.constexpr):
    """Z = K_j x (BT, BC), tiled over d."""
    Z = tl.zeros((BT, BC), dtype=CDT)
    for d0 in range(0, D, BD):
        dd = d0 + tl.arange(0, BD)
        k = tl.load(Kp + r[:, None] * D + dd[None, :], mask=(r[:, None] < b) & (dd[None, :] < D), other=0.0).to(CDT)
        x = _load_x(X, WS, step, off_x, off_in, dd, cc, D, C, IDENTITY, CDT)
        Z += mm(k, x, PRECISION)
    return Z


@triton.jit
def _apply_fwd_kernel(
    K, F, X, Y, WS,
    m, b, D, C, ws_step,
    TRANSPOSE: tl.constexpr, IDENTITY: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr, CDT: tl.constexpr, PRECISION: tl.constexpr,
):
    pb = tl.program_id(0).to(tl.int64)
    cc = tl.program_id(1) * BC + tl.arange(0, BC)
    r = tl.arange(0, BT)
    off_x = pb * D * C
    ws_base = pb * m * ws_step  # workspace of this batch element: (m, D, C) or (1, D, C)
    if ws_step == 0:
        ws_base = pb * D * C
    for step in range(m):
        if TRANSPOSE:
            j = step
        else:
            j = m - 1 - step
        Kp = K + (pb * m + j) * b * D
        off_in = ws_base + step * ws_step
        if IDENTITY:
            if step == 0:
                # K_j I[:, cc] is a slice of K_j: no product needed
                Z = tl.load(Kp + r[:, None] * D + cc[None, :], mask=(r[:, None] < b) & (cc[None, :] < D), other=0.0)
                Z = Z.to(CDT)
            else:
                Z = _k_times_x(Kp, X, WS, step, off_x, off_in, r, cc, b, D, C, IDENTITY, BT, BD, BC, CDT, PRECISION)
        else:
            Z = _k_times_x(Kp, X, WS, step, off_x, off_in, r, cc, b, D, C, IDENTITY, BT, BD, BC, CDT, PRECISION)
        T = _load_factor(F, (pb * m + j) * b * b, r, b, TRANSPOSE, CDT)  # loaded late: fewer live registers
        W = mm(T, Z, PRECISION)
        off_out = ws_base + (step + 1) * ws_step
        for d0 in range(0, D, BD):
            dd = d0 + tl.arange(0, BD)
            k = tl.load(Kp + r[:, None] * D + dd[None, :], mask=(r[:, None] < b) & (dd[None, :] < D), other=0.0).to(CDT)
            x = _load_x(X, WS, step, off_x, off_in, dd, cc, D, C, IDENTITY, CDT)
            x = x - mm(tl.trans(k), W, PRECISION)
            mo = (dd[:, None] < D) & (cc[None, :] < C)
            if step == m - 1:
                tl.store(Y + off_x + dd[:, None] * C + cc[None, :], x.to(Y.dtype.element_ty), mask=mo)
            else:
                tl.store(WS + off_out + dd[:, None] * C + cc[None, :], x.to(WS.dtype.element_ty), mask=mo)
        # the next step reads what other threads of this program wrote
        tl.debug_barrier()


@triton.jit
def _apply_bwd_kernel(
    K, F, X, WS, DY, DX, GW, DK, DT,
    m, b, D, C, ws_step, n_ct,
    TRANSPOSE: tl.constexpr, IDENTITY: tl.constexpr, HAS_DX: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr, CDT: tl.constexpr, PRECISION: tl.constexpr,
):
    pb = tl.program_id(0).to(tl.int64)
    pc = tl.program_id(1)
    cc = pc * BC + tl.arange(0, BC)
    r = tl.arange(0, BT)
    rows = r[:, None]
    cols = r[None, :]
    off_x = pb * D * C
    ws_base = pb * m * ws_step
    off_g = pb * D * C
    # partial gradients of this column tile: DK (B, n_ct, m, b, D), DT (B, n_ct, m, b, b)
    part = pb * n_ct + pc
    for rstep in range(m):
        step = m - 1 - rstep
        if TRANSPOSE:
            j = step
        else:
            j = m - 1 - step
        Kp = K + (pb * m + j) * b * D
        Tp = _load_factor(F, (pb * m + j) * b * b, r, b, TRANSPOSE, CDT)
        off_in = ws_base + step * ws_step
        Z = tl.zeros((BT, BC), dtype=CDT)
        V = tl.zeros((BT, BC), dtype=CDT)
        for d0 in range(0, D, BD):
            dd = d0 + tl.arange(0, BD)
            mdc = (dd[:, None] < D) & (cc[None, :] < C)
            k = tl.load(Kp + rows * D + dd[None, :], mask=(rows < b) & (dd[None, :] < D), other=0.0).to(CDT)
            x = _load_x(X, WS, step, off_x, off_in, dd, cc, D, C, IDENTITY, CDT)
            if rstep == 0:
                g = tl.load(DY + off_g + dd[:, None] * C + cc[None, :], mask=mdc, other=0.0).to(CDT)
            else:
                g = tl.load(GW + off_g + dd[:, None] * C + cc[None, :], mask=mdc, other=0.0).to(CDT)
            Z += mm(k, x, PRECISION)
            V += mm(k, g, PRECISION)
        W = mm(Tp, Z, PRECISION)
        Zb = -mm(tl.trans(Tp), V, PRECISION)
        dTp = -mm(V, tl.trans(Z), PRECISION)
        off_t = (part * m + j) * b * b
        mt = (rows < b) & (cols < b)
        if TRANSPOSE:
            tl.store(DT + off_t + cols * b + rows, dTp.to(DT.dtype.element_ty), mask=mt)
        else:
            tl.store(DT + off_t + rows * b + cols, dTp.to(DT.dtype.element_ty), mask=mt)
        off_k = (part * m + j) * b * D
        for d0 in range(0, D, BD):
            dd = d0 + tl.arange(0, BD)
            mdc = (dd[:, None] < D) & (cc[None, :] < C)
            mk = (rows < b) & (dd[None, :] < D)
            k = tl.load(Kp + rows * D + dd[None, :], mask=mk, other=0.0).to(CDT)
            x = _load_x(X, WS, step, off_x, off_in, dd, cc, D, C, IDENTITY, CDT)
            if rstep == 0:
                g = tl.load(DY + off_g + dd[:, None] * C + cc[None, :], mask=mdc, other=0.0).to(CDT)
            else:
                g = tl.load(GW + off_g + dd[:, None] * C + cc[None, :], mask=mdc, other=0.0).to(CDT)
            dk = mm(Zb, tl.trans(x), PRECISION) - mm(W, tl.trans(g), PRECISION)
            tl.store(DK + off_k + rows * D + dd[None, :], dk.to(DK.dtype.element_ty), mask=mk)
            g = g + mm(tl.trans(k), Zb, PRECISION)
            if rstep == m - 1:
                if HAS_DX:
                    tl.store(DX + off_g + dd[:, None] * C + cc[None, :], g.to(DX.dtype.element_ty), mask=mdc)
            else:
                tl.store(GW + off_g + dd[:, None] * C + cc[None, :], g.to(GW.dtype.element_ty), mask=mdc)
        tl.debug_barrier()


# -- launchers -----------------------------------------------------------------------------


# Launch settings; None picks the heuristic. The benchmark script sweeps them on a GPU.
CONFIG = {"BD": None, "BC": None, "num_warps": None, "num_stages": None}


def _tiles(D: int, C: int, B: int, interpret: bool) -> tuple[int, int]:
    """(BD, BC): large tiles under the interpreter (few program steps), else enough programs to fill the GPU."""
    if interpret:
        return max(16, min(128, next_power_of_2(D))), max(16, min(64, next_power_of_2(C)))
    # fastest on an H100 (benchmarks/results/gpu_product_h100.md): 4 warps, d tiles of 64,
    # column tiles of 32, halved down to 16 while the grid would leave multiprocessors idle
    BD = CONFIG["BD"] or max(16, min(64, next_power_of_2(D)))
    BC = CONFIG["BC"] or max(16, min(32, next_power_of_2(C)))
    if CONFIG["BC"] is None:
        while BC > 16 and B * cdiv(C, BC) < 264:  # two programs per multiprocessor of an H100
            BC //= 2
    return BD, BC


def _launch(BT: int, BC: int) -> dict:
    warps = CONFIG["num_warps"] or (4 if BT * BC <= 32 * 64 else 8)
    return {"num_warps": warps, "num_stages": CONFIG["num_stages"] or 1}


def apply_forward(K, T, x, transpose: bool, out_dtype, cdt, precision: str, save: bool, interpret: bool):
    """P x (or P^T x) for K (B, m, b, D), T (B, m, b, b), x (B, D, C) or None (identity, C = D).

    Returns (y, ws): y (B, D, C) in ``out_dtype``; ws the workspace, holding each
    block's input when ``save`` (for :func:`apply_backward`).
    """
    B, m, b, D = K.shape
    C = D if x is None else x.shape[-1]
    y = torch.empty((B, D, C), dtype=out_dtype, device=K.device)
    if B == 0 or C == 0 or D == 0:
        return y.zero_(), None
    ws_step = D * C if save else 0
    ws_len = m if save else 1
    ws = torch.empty((B, ws_len, D, C) if m > 1 else (1,), dtype=cdt, device=K.device)
    BT = block_width(b)
    BD, BC = _tiles(D, C, B, interpret)
    grid = (B, cdiv(C, BC))
    _apply_fwd_kernel[grid](
        K, T, y if x is None else x, y, ws,
        m, b, D, C, ws_step,
        TRANSPOSE=transpose, IDENTITY=x is None,
        BT=BT, BD=BD, BC=BC, CDT=_tl_dtype(cdt), PRECISION=precision, **_launch(BT, BC),
    )
    return y, (ws if save else None)


def apply_backward(K, T, x, ws, dy, transpose: bool, need_dx: bool, cdt, precision: str, interpret: bool):
    """Gradients (dK, dT, dx) of :func:`apply_forward` (saved ``ws``) for the output gradient dy."""
    B, m, b, D = K.shape
    C = dy.shape[-1]
    BT = block_width(b)
    BD, BC = _tiles(D, C, B, interpret)
    n_ct = cdiv(C, BC)
    dK = torch.empty((B, n_ct, m, b, D), dtype=cdt, device=K.device)
    dT = torch.empty((B, n_ct, m, b, b), dtype=cdt, device=K.device)
    dx = torch.empty((B, D, C), dtype=x.dtype, device=K.device) if need_dx else None
    gw = torch.empty((B, D, C) if m > 1 else (1,), dtype=cdt, device=K.device)
    if ws is None:
        ws = gw  # never read: m == 1
    _apply_bwd_kernel[(B, n_ct)](
        K, T, dy if x is None else x, ws, dy, dx if need_dx else gw, gw, dK, dT,
        m, b, D, C, D * C if m > 1 else 0, n_ct,
        TRANSPOSE=transpose, IDENTITY=x is None, HAS_DX=need_dx,
        BT=BT, BD=BD, BC=BC, CDT=_tl_dtype(cdt), PRECISION=precision, **_launch(BT, BC),
    )
    return dK.sum(1), dT.sum(1), dx
