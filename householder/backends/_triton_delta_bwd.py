"""Triton kernels of the chunkwise delta rule: backward.

Per chunk (notation of torch_delta.py; S the state at the chunk's start, dS'
the gradient arriving at its end):

    Vn = U - W S,  O = scale (diag(e^G) Q S + M Vn),  S' = e^{G_C} S + Kd^T Vn
    dVn = scale M^T dO + Kd dS'
    dS  = e^{G_C} dS' + scale (diag(e^G) Q)^T dO - W^T dVn          (reverse pass)

then, chunk-parallel, the gradients through W = A diag(e^G) K, U = A V,
A = (X o Gamma) diag(beta), X = (I + L)^{-1}, L = tril(diag(beta) K K^T, -1):

    dA = dVn V^T - dVn S^T (diag(e^G) K)^T,  dV = A^T dVn
    dX = (dA diag(beta)) o Gamma,  dL = -X^T dX X^T (strictly lower)
    dbeta_s = sum_t (X o Gamma)_ts dA_ts + sum_s' dL_ss' (K K^T)_ss'
    dK += (dL_b + dL_b^T) K with dL_b = diag(beta) dL

and the log-decays through every exp(G_t - G_s): with E = dGamma o Gamma
(= dA o A + dM o M), dG = rowsum(E) - colsum(E) + the e^G, e^{G_C - G} and
e^{G_C} terms, and dg = the reverse running sum of dG inside the chunk.

Kernels: ``bwd_state_kernel`` (one program per value block, sequence and head,
sequential over chunks, writes dS' per chunk, dVn and dS_0), then two with one
program per chunk and head: ``bwd_dqk_kernel`` (everything that reads the states:
dq, partial dk and dG, dW; its grid also splits the key columns, CONFIG["bwd_dqk_split"])
and ``bwd_wy_kernel`` (through the chunk factor: dk,
dv, dbeta, dg). ``bwd_fused_kernel`` does both in one program (CONFIG["fuse_bwd"],
by default): dW then never leaves it, and dk is written once.

The per-chunk kernels' DGM picks the gate's gradient (CONFIG["dg_form"]): 0 none (no
gate); 1 the chunk-local decay terms above; 2 the rescaled form inside each chunk: with G
restarted at the chunk's start, the chunk is the plain rule on q e^G, v e^{-G} and states
S e^{-G}, so dL/dG_t = q_t . dq_t - v_t . dv_t, plus at its last step sum(S_C o dS') of the
end state S_C = e^{G_C} S + Kd^T Vn, that is e^{G_C} sum(S o dS') + sum(Kd o Vn dS'^T), both
formed anyway; dg is again the reverse running sum inside the chunk.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from householder.backends._triton_delta_fwd import _dot, chunk_gamma, chunk_scores, chunk_gates, chunk_program, chunk_rows, decay_inputs, decays_of, seq_bounds, seq_decays


@triton.jit
def bwd_state_kernel(
    q, k, w, aqk, g, gcs, do, dsT, dh, dvn, ds0, seqs, T_steps, NT, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    BC: tl.constexpr, NH: tl.constexpr, HAS_G: tl.constexpr, VARLEN: tl.constexpr, HAS_DST: tl.constexpr,
    DT: tl.constexpr, F32: tl.constexpr, PREC: tl.constexpr, GMODE: tl.constexpr, GATE_V: tl.constexpr,
    AFORM: tl.constexpr, PREFETCH: tl.constexpr, QK_IN: tl.constexpr,
):
    """Reverse pass over chunks: dS' of each chunk (into dh), dVn, and dS_0.

    GATE_V: the decays scale the (BC, BV) tiles, diag(d) (K dS) and Q^T (diag(e^G) dO), rather
    than the (BC, BK) keys and queries, which then stay in the inputs' precision.
    AFORM: ``w`` holds the chunk factors A (NT_total, H, BC, BC), and W^T dVn is taken as
    K^T diag(e^G) (A^T dVn). QK_IN: the masked scores are formed here from the loaded query and
    key tiles (and g) rather than read from ``aqk`` (``chunk_scores``)."""
    i_v = tl.program_id(0)
    i_nh = tl.program_id(1).to(tl.int64)
    i_n = i_nh // H
    i_h = i_nh % H
    bos, eos, c0 = seq_bounds(i_n, seqs, T_steps, NT, VARLEN)
    ck = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    mkv = (ck[:, None] < K) & (cv[None, :] < V)
    soff = ck[:, None] * V + cv[None, :]
    if HAS_DST:
        dS = tl.load(dsT + i_nh * K * V + soff, mask=mkv, other=0.0).to(tl.float32)
    else:
        dS = tl.zeros((BK, BV), dtype=tl.float32)
    nch = tl.cdiv(eos - bos, BC)
    if HAS_G and PREFETCH:
        jl = tl.maximum(nch - 1, 0)
        ga, gb, gc = decay_inputs(gcs, g, i_h, c0 + jl, bos + jl * BC, eos, ck, H, BC, BK, NH, GMODE)
    else:
        ga, gb, gc = tl.zeros((BC,), dtype=tl.float32), tl.zeros((BC,), dtype=tl.float32), tl.zeros((BK,), dtype=tl.float32)
    for jj in range(0, nch):
        j = nch - 1 - jj
        start = bos + j * BC
        if HAS_G and PREFETCH:
            eG, ed, egl, _ = decays_of(ga, gb, gc, BC, BK, GMODE)
            # the previous chunk's (the first one's again at the end: in bounds, unused)
            jn = tl.maximum(j - 1, 0)
            ga, gb, gc = decay_inputs(gcs, g, i_h, c0 + jn, bos + jn * BC, eos, ck, H, BC, BK, NH, GMODE)
        r, tok, first, last = chunk_rows(start, NH, BC)
        valid = r < eos - start
        mk = valid[:, None] & (ck[None, :] < K)
        qrow = valid & last
        t0 = start // NH
        offk = r[:, None] * (H * K) + ck[None, :]
        tl.store(dh + ((c0 + j) * H + i_h) * K * V + soff, dS.to(dh.dtype.element_ty), mask=mkv)
        kt = tl.load(k + (start * H + i_h) * K + offk, mask=mk, other=0.0)
        qt = tl.load(q + (t0 * H + i_h) * K + tok[:, None] * (H * K) + ck[None, :], mask=qrow[:, None] & (ck[None, :] < K), other=0.0)
        if AFORM:
            kraw = kt.to(DT)
            wt = tl.load(w + ((c0 + j) * H + i_h) * BC * BC + r[:, None] * BC + r[None, :]).to(DT)
        else:
            wt = tl.load(w + (start * H + i_h) * K + offk, mask=mk, other=0.0).to(DT)
        dot_ = tl.load(do + (t0 * H + i_h) * V + tok[:, None] * (H * V) + cv[None, :], mask=qrow[:, None] & (cv[None, :] < V), other=0.0).to(DT)
        # (before the gate scales kt and qt)
        at = chunk_scores(aqk, qt, kt, g + t0 * H + i_h, ga, r, tok, valid, first, c0 + j, i_h, H, BC, DT, F32, PREC,
                          HAS_G, QK_IN, False)
        dog = dot_
        if HAS_G:
            if not PREFETCH:
                eG, ed, egl = seq_decays(gcs, g, i_h, c0 + j, start, eos, ck, H, BC, BK, NH, GMODE)
            if GATE_V:
                dog = (dot_.to(tl.float32) * eG[:, None]).to(DT)
            else:
                kt = kt.to(tl.float32) * ed[:, None]
                qt = qt.to(tl.float32) * eG[:, None]
        kdS = _dot(kt.to(DT), dS.to(DT), F32, PREC)
        if HAS_G and GATE_V:
            kdS = kdS * ed[:, None]
        dvt = _dot(tl.trans(at), dot_, F32, PREC) * scale + kdS
        tl.store(dvn + (start * H + i_h) * V + r[:, None] * (H * V) + cv[None, :], dvt.to(dvn.dtype.element_ty), mask=valid[:, None] & (cv[None, :] < V))
        if HAS_G:
            dS = dS * egl[:, None]
        if AFORM:
            z = _dot(tl.trans(wt), dvt.to(DT), F32, PREC)
            if HAS_G:
                z = z * eG[:, None]
            dS += _dot(tl.trans(qt.to(DT)), dog, F32, PREC) * scale - _dot(tl.trans(kraw), z.to(DT), F32, PREC)
        else:
            dS += _dot(tl.trans(qt.to(DT)), dog, F32, PREC) * scale - _dot(tl.trans(wt), dvt.to(DT), F32, PREC)
    tl.store(ds0 + i_nh * K * V + soff, dS, mask=mkv)


@triton.jit
def _chunk_decays(g, t0, i_h, r, tok, valid, first, H: tl.constexpr, BC: tl.constexpr, HAS_G: tl.constexpr):
    """G at the chunk's last row, e^G, e^{G_C - G} (BC,) and Gamma (BC, BC) of one chunk (ones without a gate)."""
    if HAS_G:
        Gc = chunk_gates(g + t0 * H + i_h, tok, valid, first, H)
    else:
        Gc = tl.zeros((BC,), dtype=tl.float32)
    glast = tl.sum(tl.where(r == BC - 1, Gc, 0.0), 0)
    return glast, tl.exp(Gc), tl.exp(glast - Gc), chunk_gamma(Gc, BC, HAS_G, False)


@triton.jit
def _scores_decay_tile(dM, gam, paqk, pk, pq, r, tok, valid, qrow,
                       H: tl.constexpr, K: tl.constexpr, BC: tl.constexpr, BKP: tl.constexpr,
                       DT: tl.constexpr, F32: tl.constexpr, PREC: tl.constexpr, AQK: tl.constexpr, UNROLL: tl.constexpr):
    """E = dM o M (BC, BC) float32, M = tril(Q K^T) o Gamma, whose rowsum(E) - colsum(E) is the
    log-decays' gradient through the scores.

    M is the forward's Aqk at ``paqk`` (AQK, in the inputs' precision) or Q K^T formed again."""
    if AQK:
        E = dM * tl.load(paqk + r[:, None] * BC + r[None, :]).to(tl.float32)
    else:
        QK = tl.zeros((BC, BC), dtype=tl.float32)
        for k0 in tl.range(0, K, BKP, loop_unroll_factor=UNROLL):
            ck = k0 + tl.arange(0, BKP)
            kb = tl.load(pk + r[:, None] * (H * K) + ck[None, :], mask=valid[:, None] & (ck[None, :] < K), other=0.0).to(DT)
            qb = tl.load(pq + tok[:, None] * (H * K) + ck[None, :], mask=qrow[:, None] & (ck[None, :] < K), other=0.0).to(DT)
            QK += _dot(qb, tl.trans(kb), F32, PREC)
        E = dM * QK * gam
    return E


@triton.jit
def _state_grads(ph, pdh, pdo, pvn, pdvn, ck, r, tok, valid, qrow, hdh,
                 H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BC: tl.constexpr, BKP: tl.constexpr,
                 BV: tl.constexpr, HAS_G: tl.constexpr, DT: tl.constexpr, F32: tl.constexpr, PREC: tl.constexpr,
                 UNROLL: tl.constexpr):
    """For the key columns ``ck`` of a chunk, over all value blocks: dO S^T, Vn dS'^T, -D S^T
    (BC, BKP) float32 each, and ``hdh`` += S o dS' (with a gate; summed elementwise, so that the
    reduction across warps happens once). D is the tile at ``pdvn``: dVn (then -D S^T = dW), or
    dV = A^T dVn (then it is A^T dW, what dk takes from dW)."""
    dQ0 = tl.zeros((BC, BKP), dtype=tl.float32)
    dKd = tl.zeros((BC, BKP), dtype=tl.float32)
    dW = tl.zeros((BC, BKP), dtype=tl.float32)
    for v0 in tl.range(0, V, BV, loop_unroll_factor=UNROLL):
        cv = v0 + tl.arange(0, BV)
        mv = valid[:, None] & (cv[None, :] < V)
        mkv = (ck[:, None] < K) & (cv[None, :] < V)
        offv = r[:, None] * (H * V) + cv[None, :]
        hb = tl.load(ph + ck[:, None] * V + cv[None, :], mask=mkv, other=0.0)
        hT = tl.trans(hb.to(DT))
        # (dq's product straight after its loads: built for sm_90 by Triton 3.9, the gated fused
        # kernel at 4 warps spills 496 B per thread less, and takes 8 KiB less shared memory, than
        # with every tile loaded first; the plain one is unchanged. On an H200 at 1 stage this and
        # the two-step dg sums of bwd_fused_kernel took the gated forward+backward from 3.067 to
        # 2.828 ms at 16 x 2048; at 2 stages, the default, the two orders time alike)
        dob = tl.load(pdo + tok[:, None] * (H * V) + cv[None, :], mask=qrow[:, None] & (cv[None, :] < V), other=0.0).to(DT)
        dQ0 += _dot(dob, hT, F32, PREC)
        dhb = tl.load(pdh + ck[:, None] * V + cv[None, :], mask=mkv, other=0.0)
        if HAS_G:
            hdh += tl.sum(hb.to(tl.float32) * dhb.to(tl.float32), 1)
        vnb = tl.load(pvn + offv, mask=mv, other=0.0).to(DT)
        dvnb = tl.load(pdvn + offv, mask=mv, other=0.0).to(DT)
        dW -= _dot(dvnb, hT, F32, PREC)
        dKd += _dot(vnb, tl.trans(dhb.to(DT)), F32, PREC)
    return dQ0, dKd, dW, hdh


@triton.jit
def _factor_terms(dA, X, gam, b, dG, E0, HAS_G: tl.constexpr):
    """From dA: dbeta's direct term (BC,), dXg = dA diag(beta) (BC, BC) and dG with the factor's decay
    terms, rowsum(E) - colsum(E) of E = dXg o X o Gamma + E0 (E0: another such tile, or 0.0: its
    terms join the same two reductions)."""
    Xg = X * gam
    db = tl.sum(Xg * dA, 0)
    dXg = dA * b[None, :]
    if HAS_G:
        E = dXg * Xg + E0
        dG += tl.sum(E, 1) - tl.sum(E, 0)
    return db, dXg, dG


@triton.jit
def _factor_dL(dXg, X, gam, r, DT: tl.constexpr, F32: tl.constexpr, PREC: tl.constexpr):
    """dL = -X^T (dXg o Gamma) X^T, strictly lower, in the inputs' precision.

    Every product is in the inputs' precision (bf16/fp16 operands, float32 accumulation): TF32
    products beside bf16 ones in one kernel miscompiled on Triton 3.6 / Hopper."""
    Xt = tl.trans(X.to(DT))
    dL = -_dot(_dot(Xt, (dXg * gam).to(DT), F32, PREC).to(DT), Xt, F32, PREC)
    return tl.where(r[:, None] > r[None, :], dL, 0.0).to(DT)


@triton.jit
def _store_dg(dG, dg, t0, i_h, tok, valid, first, H: tl.constexpr):
    """dg of the chunk's tokens: the reverse running sum of the per-step dG (a token decays at its first step)."""
    dgs = tl.sum(dG, 0) - tl.cumsum(dG, 0) + dG
    tl.store(dg + t0 * H + i_h + tok * H, dgs.to(dg.dtype.element_ty), mask=valid & first)


@triton.jit
def _finish_dk(pk, pdkp, pdk, pdw, At, eG, dLd, b, db, r, valid,
               H: tl.constexpr, K: tl.constexpr, BKP: tl.constexpr,
               DT: tl.constexpr, F32: tl.constexpr, PREC: tl.constexpr, UNROLL: tl.constexpr):
    """dk = partial (at ``pdkp``, float32) + (diag(beta) dL + dL^T diag(beta)) K + (A^T dW) o e^G, dW
    at ``pdw``, stored at ``pdk``; returns dbeta + rowsum(dL o K K^T)."""
    dLtd = tl.trans(dLd)
    for k0 in tl.range(0, K, BKP, loop_unroll_factor=UNROLL):
        ck = k0 + tl.arange(0, BKP)
        mk = valid[:, None] & (ck[None, :] < K)
        offk = r[:, None] * (H * K) + ck[None, :]
        kb = tl.load(pk + offk, mask=mk, other=0.0).to(tl.float32)
        dWb = tl.load(pdw + offk, mask=mk, other=0.0).to(DT)
        dkb = tl.load(pdkp + offk, mask=mk, other=0.0)
        dLK = _dot(dLd, kb.to(DT), F32, PREC)
        db += tl.sum(dLK * kb, 1)
        dkb += _dot(At, dWb, F32, PREC) * eG[:, None] + dLK * b[:, None]
        dkb += _dot(dLtd, (kb * b[:, None]).to(DT), F32, PREC)
        tl.store(pdk + offk, dkb.to(pdk.dtype.element_ty), mask=mk)
    return db


@triton.jit
def bwd_dqk_kernel(
    q, k, g, h, dh, vn, dvn, do, aqk, dq, dk, dw, dgp, chunks, T_steps, NT, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BKP: tl.constexpr, BV: tl.constexpr,
    BC: tl.constexpr, NH: tl.constexpr, HAS_G: tl.constexpr, VARLEN: tl.constexpr,
    DT: tl.constexpr, F32: tl.constexpr, PREC: tl.constexpr, AQK: tl.constexpr, UNROLL: tl.constexpr,
    KSPLIT: tl.constexpr, KPS: tl.constexpr, DGM: tl.constexpr,
):
    """Per (chunk, head, key split), the gradients through the states: dq (final), dk and dG (partial), dW.

    dM = scale tril(dO Vn^T), dq = scale e^G dO S^T + (dM o Gamma) K,
    dk = (dM o Gamma)^T Q + diag(e^{G_C - G}) Vn dS'^T, dW = -dVn S^T, and every
    log-decay term but those of the factor (the second kernel adds those; DGM 1), or q . dq
    and the chunk-end state's term (DGM 2). Program axis 2 takes the key columns
    [i_s KPS, (i_s + 1) KPS) of KSPLIT splits: each forms dM again, and writes its own dG
    terms to dgp[..., i_s] (bwd_wy sums the KSPLIT of them).
    """
    i_c, i_h, start, end, r, tok, first, last, valid, qrow, t0 = chunk_program(chunks, T_steps, NT, BC, NH, VARLEN)
    i_s = tl.program_id(2)
    causal = r[:, None] >= r[None, :]
    # the terms of G_C go to the chunk's last valid row (stored rows only are summed later)
    is_end = r == tl.minimum(end - start, BC) - 1
    # int64 only in these scalar bases; tile offsets are int32
    pk = k + (start * H + i_h) * K
    pdk = dk + (start * H + i_h) * K
    pdw = dw + (start * H + i_h) * K
    pq = q + (t0 * H + i_h) * K
    pdq = dq + (t0 * H + i_h) * K
    pvn = vn + (start * H + i_h) * V
    pdvn = dvn + (start * H + i_h) * V
    pdo = do + (t0 * H + i_h) * V
    ph = h + (i_c * H + i_h) * K * V
    pdh = dh + (i_c * H + i_h) * K * V
    glast, eG, ed, gam = _chunk_decays(g, t0, i_h, r, tok, valid, first, H, BC, HAS_G)

    dM = tl.zeros((BC, BC), dtype=tl.float32)
    for v0 in tl.range(0, V, BV, loop_unroll_factor=UNROLL):
        cv = v0 + tl.arange(0, BV)
        mv = valid[:, None] & (cv[None, :] < V)
        dob = tl.load(pdo + tok[:, None] * (H * V) + cv[None, :], mask=qrow[:, None] & (cv[None, :] < V), other=0.0).to(DT)
        vnb = tl.load(pvn + r[:, None] * (H * V) + cv[None, :], mask=mv, other=0.0).to(DT)
        dM += _dot(dob, tl.trans(vnb), F32, PREC)
    dM = tl.where(causal, dM * scale, 0.0)
    dG = tl.zeros((BC,), dtype=tl.float32)
    hdh = tl.zeros((BKP,), dtype=tl.float32)  # row sums of S o dS'
    if DGM == 1:
        # before the key loop (which reloads q and k), so that dM's other uses are all that is live;
        # one split's term (it reads every key column)
        if i_s == 0:
            E = _scores_decay_tile(dM, gam, aqk + (i_c * H + i_h) * BC * BC, pk, pq, r, tok, valid, qrow,
                                   H, K, BC, BKP, DT, F32, PREC, AQK, UNROLL)
            dG += tl.sum(E, 1) - tl.sum(E, 0)
    dMg = dM * gam

    for k0 in tl.range(i_s * KPS, tl.minimum((i_s + 1) * KPS, K), BKP, loop_unroll_factor=UNROLL):
        ck = k0 + tl.arange(0, BKP)
        mk = valid[:, None] & (ck[None, :] < K)
        mq = qrow[:, None] & (ck[None, :] < K)
        offk = r[:, None] * (H * K) + ck[None, :]
        dQ0, dKd, dW, hdh = _state_grads(ph, pdh, pdo, pvn, pdvn, ck, r, tok, valid, qrow, hdh,
                                         H, K, V, BC, BKP, BV, HAS_G, DT, F32, PREC, UNROLL)
        tl.store(pdw + offk, dW.to(dw.dtype.element_ty), mask=mk)
        kb = tl.load(pk + offk, mask=mk, other=0.0)
        qb = tl.load(pq + tok[:, None] * (H * K) + ck[None, :], mask=mq, other=0.0)
        dQ0 = dQ0 * (scale * eG[:, None])
        dqb = dQ0 + _dot(dMg.to(DT), kb.to(DT), F32, PREC)
        tl.store(pdq + tok[:, None] * (H * K) + ck[None, :], dqb.to(dq.dtype.element_ty), mask=mq)
        dKd = dKd * ed[:, None]
        dkb = _dot(tl.trans(dMg.to(DT)), qb.to(DT), F32, PREC) + dKd
        tl.store(pdk + offk, dkb, mask=mk)
        if DGM == 1:
            # e^G in Q, e^{G_C - G} in Kd (its G_C part lands on the chunk's last row)
            dKdKd = tl.sum(dKd * kb.to(tl.float32), 1)
            dG += tl.sum(dQ0 * qb.to(tl.float32), 1) - dKdKd
            dG += tl.where(is_end, tl.sum(dKdKd, 0), 0.0)
        if DGM == 2:
            dG += tl.sum(dqb * qb.to(tl.float32), 1)
            dG += tl.where(is_end, tl.sum(tl.sum(dKd * kb.to(tl.float32), 1), 0), 0.0)
    if HAS_G:
        dG += tl.where(is_end, tl.sum(hdh, 0) * tl.exp(glast), 0.0)
        tl.store(dgp + (start * H + i_h + r * H) * KSPLIT + i_s, dG, mask=valid)


@triton.jit
def bwd_wy_kernel(
    k, v, beta, g, xs, dw, dvn, dkp, dgp, dk, dv, dbeta, dg, chunks, T_steps, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BKP: tl.constexpr, BV: tl.constexpr,
    BC: tl.constexpr, NH: tl.constexpr, HAS_G: tl.constexpr, VARLEN: tl.constexpr,
    DT: tl.constexpr, F32: tl.constexpr, PREC: tl.constexpr, UNROLL: tl.constexpr, KSPLIT: tl.constexpr,
    DGM: tl.constexpr,
):
    """Per (chunk, head), the gradients through W = A diag(e^G) K and U = A V: dk, dv, dbeta, and
    dg.

    A = (X o Gamma) diag(beta), X = (I + L)^{-1}, L = tril(diag(beta) K K^T, -1); X is
    read (saved by the recomputing prep kernel). dkp and dgp hold the first kernel's
    partial dk (float32) and per-step dG (KSPLIT partial sums per step, one per key split).
    """
    i_c, i_h, start, end, r, tok, first, last, valid, qrow, t0 = chunk_program(chunks, T_steps, NT, BC, NH, VARLEN)
    pk = k + (start * H + i_h) * K
    pdk = dk + (start * H + i_h) * K
    pdkp = dkp + (start * H + i_h) * K
    pdw = dw + (start * H + i_h) * K
    pv = v + (start * H + i_h) * V
    pdv = dv + (start * H + i_h) * V
    pdvn = dvn + (start * H + i_h) * V
    b = tl.load(beta + start * H + i_h + r * H, mask=valid, other=0.0).to(tl.float32)
    _, eG, _, gam = _chunk_decays(g, t0, i_h, r, tok, valid, first, H, BC, HAS_G)
    X = tl.load(xs + (i_c * H + i_h) * BC * BC + r[:, None] * BC + r[None, :]).to(tl.float32)
    Xg = X * gam
    At = tl.trans((Xg * b[None, :]).to(DT))

    # dA = dU V^T + dW (diag(e^G) K)^T with dU = dVn; dV = A^T dU on the way
    dA = tl.zeros((BC, BC), dtype=tl.float32)
    dG = tl.zeros((BC,), dtype=tl.float32)
    for v0 in tl.range(0, V, BV, loop_unroll_factor=UNROLL):
        cv = v0 + tl.arange(0, BV)
        mv = valid[:, None] & (cv[None, :] < V)
        offv = r[:, None] * (H * V) + cv[None, :]
        dvnb = tl.load(pdvn + offv, mask=mv, other=0.0).to(DT)
        vb = tl.load(pv + offv, mask=mv, other=0.0).to(DT)
        dA += _dot(dvnb, tl.trans(vb), F32, PREC)
        dvb = _dot(At, dvnb, F32, PREC)
        tl.store(pdv + offv, dvb.to(dv.dtype.element_ty), mask=mv)
        if DGM == 2:
            dG -= tl.sum(dvb * vb.to(tl.float32), 1)
    if DGM == 1:
        # the decay term of dk's (A^T dW) o e^G part, rowsum((A^T dW) o diag(e^G) K), is
        # colsum(A o dW (diag(e^G) K)^T): what the key loop adds to dA, weighted by A. Its value
        # part is taken off here and the whole added after the loop (from _factor_terms' dbeta
        # term), so that A^T dW is not formed here as well as in the last loop
        dG -= tl.sum(Xg * dA, 0) * b
    for k0 in tl.range(0, K, BKP, loop_unroll_factor=UNROLL):
        ck = k0 + tl.arange(0, BKP)
        mk = valid[:, None] & (ck[None, :] < K)
        offk = r[:, None] * (H * K) + ck[None, :]
        kb = tl.load(pk + offk, mask=mk, other=0.0)
        dWb = tl.load(pdw + offk, mask=mk, other=0.0).to(DT)
        Kg = kb.to(tl.float32) * eG[:, None]
        dA += _dot(dWb, tl.trans(Kg.to(DT)), F32, PREC)

    # through the factor: dX = (dA diag(beta)) o Gamma, dL = -X^T dX X^T (strictly lower)
    db, dXg, dG = _factor_terms(dA, X, gam, b, dG, 0.0, DGM == 1)
    if DGM == 1:
        dG += db * b  # db is colsum((X o Gamma) o dA) here
    if HAS_G:
        for s in tl.static_range(KSPLIT):  # the first kernel's terms, from each key split
            dG += tl.load(dgp + (start * H + i_h + r * H) * KSPLIT + s, mask=valid, other=0.0)
        _store_dg(dG, dg, t0, i_h, tok, valid, first, H)
    dLd = _factor_dL(dXg, X, gam, r, DT, F32, PREC)
    db = _finish_dk(pk, pdkp, pdk, pdw, At, eG, dLd, b, db, r, valid, H, K, BKP, DT, F32, PREC, UNROLL)
    tl.store(dbeta + start * H + i_h + r * H, db.to(dbeta.dtype.element_ty), mask=valid)


@triton.jit
def bwd_fused_kernel(
    q, k, v, beta, g, xs, h, dh, vn, vr, dvn, do, aqk, dq, dk, dv, dbeta, dg, chunks, T_steps, NT, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BKP: tl.constexpr, BV: tl.constexpr,
    BC: tl.constexpr, NH: tl.constexpr, HAS_G: tl.constexpr, VARLEN: tl.constexpr,
    DT: tl.constexpr, F32: tl.constexpr, PREC: tl.constexpr, AQK: tl.constexpr, UNROLL: tl.constexpr,
    DGM: tl.constexpr, HAS_R: tl.constexpr, DW_FROM_DV: tl.constexpr, DG_MMA: tl.constexpr,
):
    """Per (chunk, head), ``bwd_dqk_kernel`` and ``bwd_wy_kernel`` in one program: dq, dk, dv, dbeta,
    and dg.

    dW never leaves the program, and each dk block is finished in registers: dA's state term comes
    first, from dW (diag(e^G) K)^T = -dVn (diag(e^G) K S)^T with K S formed per value block
    (C x K x V multiply-adds more, S read twice, mostly from L2), so that dL is known before the
    key loop. (An earlier form took that term per key block as dW was formed and parked dk's other
    terms in memory as float32 until dA was complete: 5% slower on an H200, 256 MiB more peak.)
    HAS_R: the state pass wrote the residuals R = V - diag(e^G) K S at ``vr``, and the two terms
    are one product, dA = dVn R^T, with neither V nor S read in the first loop.
    DW_FROM_DV: dk's term A^T dW is taken as -dV S^T from the dV = A^T dVn written in the first
    loop (read back after a barrier), one (C, C) x (C, BKP) product per key block fewer.
    DG_MMA (DGM 1): the key loop's dg row sums take K and Q as products with the identity (exact),
    which leave them in the matrix units' layout: with the loaded tiles, Triton (sm_90 TTGIR) first
    converts each (C, BKP) float32 product to the tiles' layout through shared memory, three per key
    block; for two (C, C) x (C, BKP) products more.
    """
    i_c, i_h, start, end, r, tok, first, last, valid, qrow, t0 = chunk_program(chunks, T_steps, NT, BC, NH, VARLEN)
    causal = r[:, None] >= r[None, :]
    is_end = r == tl.minimum(end - start, BC) - 1
    pk = k + (start * H + i_h) * K
    pdk = dk + (start * H + i_h) * K
    pq = q + (t0 * H + i_h) * K
    pdq = dq + (t0 * H + i_h) * K
    pv = v + (start * H + i_h) * V
    pdv = dv + (start * H + i_h) * V
    pvn = vn + (start * H + i_h) * V
    pvr = vr + (start * H + i_h) * V
    pdvn = dvn + (start * H + i_h) * V
    pdo = do + (t0 * H + i_h) * V
    ph = h + (i_c * H + i_h) * K * V
    pdh = dh + (i_c * H + i_h) * K * V
    px = xs + (i_c * H + i_h) * BC * BC + r[:, None] * BC + r[None, :]
    b = tl.load(beta + start * H + i_h + r * H, mask=valid, other=0.0).to(tl.float32)
    glast, eG, ed, gam = _chunk_decays(g, t0, i_h, r, tok, valid, first, H, BC, HAS_G)
    At = tl.trans((tl.load(px).to(tl.float32) * gam * b[None, :]).to(DT))

    # dM = scale tril(dO Vn^T), dA = dVn V^T - dVn (diag(e^G) K S)^T, dV = A^T dVn
    dM = tl.zeros((BC, BC), dtype=tl.float32)
    dA = tl.zeros((BC, BC), dtype=tl.float32)
    dG = tl.zeros((BC,), dtype=tl.float32)
    for v0 in tl.range(0, V, BV, loop_unroll_factor=UNROLL):
        cv = v0 + tl.arange(0, BV)
        mv = valid[:, None] & (cv[None, :] < V)
        offv = r[:, None] * (H * V) + cv[None, :]
        dob = tl.load(pdo + tok[:, None] * (H * V) + cv[None, :], mask=qrow[:, None] & (cv[None, :] < V), other=0.0).to(DT)
        vnb = tl.load(pvn + offv, mask=mv, other=0.0).to(DT)
        dvnb = tl.load(pdvn + offv, mask=mv, other=0.0).to(DT)
        dM += _dot(dob, tl.trans(vnb), F32, PREC)
        dvb = _dot(At, dvnb, F32, PREC)
        tl.store(pdv + offv, dvb.to(dv.dtype.element_ty), mask=mv)
        if HAS_R:
            rb = tl.load(pvr + offv, mask=mv, other=0.0).to(DT)
            dA += _dot(dvnb, tl.trans(rb), F32, PREC)
        if DGM == 2 or not HAS_R:
            vb = tl.load(pv + offv, mask=mv, other=0.0).to(DT)
        if DGM == 2:
            dG -= tl.sum(dvb * vb.to(tl.float32), 1)
        if not HAS_R:
            dA += _dot(dvnb, tl.trans(vb), F32, PREC)
            KS = tl.zeros((BC, BV), dtype=tl.float32)
            for k0 in tl.range(0, K, BKP, loop_unroll_factor=UNROLL):
                ck = k0 + tl.arange(0, BKP)
                kb = tl.load(pk + r[:, None] * (H * K) + ck[None, :], mask=valid[:, None] & (ck[None, :] < K), other=0.0)
                hb = tl.load(ph + ck[:, None] * V + cv[None, :], mask=(ck[:, None] < K) & (cv[None, :] < V), other=0.0)
                KS += _dot(kb.to(DT), hb.to(DT), F32, PREC)
            if HAS_G:
                KS = KS * eG[:, None]  # diag(e^G) K S, scaled once per value block rather than K per key block
            # K S in the inputs' precision, as the other kernels take dW
            dA -= _dot(dvnb, tl.trans(KS.to(DT)), F32, PREC)
    dM = tl.where(causal, dM * scale, 0.0)
    hdh = tl.zeros((BKP,), dtype=tl.float32)  # row sums of S o dS'
    dMg = dM * gam
    # through the factor, before the key loop: dX = (dA diag(beta)) o Gamma, dL = -X^T dX X^T; the
    # scores' decay terms join the factor's in one pair of reductions (on an H200 at 8 warps the
    # kernel went from 2.096 to 2.031 ms at 16 x 2048 against two pairs)
    if DGM == 1:
        Es = _scores_decay_tile(dM, gam, aqk + (i_c * H + i_h) * BC * BC, pk, pq, r, tok, valid, qrow,
                                H, K, BC, BKP, DT, F32, PREC, AQK, UNROLL)
    else:
        Es = 0.0
    db, dXg, dG = _factor_terms(dA, tl.load(px).to(tl.float32), gam, b, dG, Es, DGM == 1)
    dLd = _factor_dL(dXg, tl.load(px).to(tl.float32), gam, r, DT, F32, PREC)
    dLtd = tl.trans(dLd)
    if DW_FROM_DV:
        tl.debug_barrier()  # dV's stores above are read below by other threads of this program
    if DGM == 1 and DG_MMA:
        eye = tl.where(r[:, None] == r[None, :], 1.0, 0.0).to(DT)

    for k0 in tl.range(0, K, BKP, loop_unroll_factor=UNROLL):
        ck = k0 + tl.arange(0, BKP)
        mk = valid[:, None] & (ck[None, :] < K)
        mq = qrow[:, None] & (ck[None, :] < K)
        offk = r[:, None] * (H * K) + ck[None, :]
        if DW_FROM_DV:
            # A^T dW = -A^T dVn S^T = -dV S^T, from the dV this program wrote above
            dQ0, dKd, AtdW, hdh = _state_grads(ph, pdh, pdo, pvn, pdv, ck, r, tok, valid, qrow, hdh,
                                               H, K, V, BC, BKP, BV, HAS_G, DT, F32, PREC, UNROLL)
        else:
            dQ0, dKd, dW, hdh = _state_grads(ph, pdh, pdo, pvn, pdvn, ck, r, tok, valid, qrow, hdh,
                                             H, K, V, BC, BKP, BV, HAS_G, DT, F32, PREC, UNROLL)
            AtdW = _dot(At, dW.to(DT), F32, PREC)
        # (loaded after the value loop: live across it, they cost spills)
        kb = tl.load(pk + offk, mask=mk, other=0.0)
        qb = tl.load(pq + tok[:, None] * (H * K) + ck[None, :], mask=mq, other=0.0)
        kf = kb.to(tl.float32)
        dQ0 = dQ0 * (scale * eG[:, None])
        dqb = dQ0 + _dot(dMg.to(DT), kb.to(DT), F32, PREC)
        tl.store(pdq + tok[:, None] * (H * K) + ck[None, :], dqb.to(dq.dtype.element_ty), mask=mq)
        dKd = dKd * ed[:, None]
        dLK = _dot(dLd, kb.to(DT), F32, PREC)
        db += tl.sum(dLK * kf, 1)
        dkb = _dot(tl.trans(dMg.to(DT)), qb.to(DT), F32, PREC) + dKd + AtdW * eG[:, None] + dLK * b[:, None]
        dkb += _dot(dLtd, (kf * b[:, None]).to(DT), F32, PREC)
        tl.store(pdk + offk, dkb.to(dk.dtype.element_ty), mask=mk)
        if DGM == 1:
            if DG_MMA:
                km = _dot(eye, kb.to(DT), F32, PREC)
            else:
                km = kf
            dKdKd = tl.sum(dKd * km, 1)
            if DG_MMA:
                qm = _dot(eye, qb.to(DT), F32, PREC)
            else:
                qm = qb.to(tl.float32)
            # (in two steps: as one expression the build spills 72 B more)
            dG += tl.sum(dQ0 * qm, 1)
            dG += tl.sum(AtdW * (km * eG[:, None]), 1) - dKdKd
            dG += tl.where(is_end, tl.sum(dKdKd, 0), 0.0)
        if DGM == 2:
            dG += tl.sum(dqb * qb.to(tl.float32), 1)
            dG += tl.where(is_end, tl.sum(tl.sum(dKd * kf, 1), 0), 0.0)
    if HAS_G:
        dG += tl.where(is_end, tl.sum(hdh, 0) * tl.exp(glast), 0.0)
        _store_dg(dG, dg, t0, i_h, tok, valid, first, H)
    tl.store(dbeta + start * H + i_h + r * H, db.to(dbeta.dtype.element_ty), mask=valid)


def backward(q, k, v, beta, g, S0, scale, plan, do, dsT, prepped=None, dgm=None):
    """Gradients (dq, dk, dv, dbeta, dg, dS0) of the chunkwise delta rule for output gradients do, dsT.

    ``prepped``: the forward's ``triton_delta.Kept`` on this plan's chunks, or None to recompute
    them; its per-chunk states h and pseudo-values Vn may be None on their own. ``dgm``: the form of
    the gate's gradient (``triton_delta.dg_mode``; None: CONFIG's now).
    """
    from householder.backends import triton_delta as tdelta  # the launchers (imported here: no cycle)

    H, K, V = plan.H, plan.K, plan.V
    dev = q.device
    do = do.contiguous() if do is not None else torch.zeros((plan.B, plan.T, H, V), dtype=q.dtype, device=dev)
    # the forward's chunk quantities and per-chunk states: kept by the forward, or recomputed
    if prepped is not None:
        pp, hs, vn, vr = prepped
        del prepped  # so that the dels below free each buffer after its last reader
    else:
        pp = tdelta.prep(q, k, v, beta, g, plan, save_x=True)
        hs = vn = vr = None
    a_form = pp.a is not None
    # the gate's gradient: by each chunk's decay terms (1) or from q . dq - v . dv (2)
    if dgm is None:
        dgm = tdelta.dg_mode(g)
    w, aqk, xs, gcs = (pp.a if a_form else pp.w), pp.aqk, pp.xs, pp.gcs
    dhs = torch.empty((plan.NT_total, H, K, V), dtype=q.dtype, device=dev)
    dvn = torch.empty_like(v)
    ds0 = torch.empty((plan.N, H, K, V), dtype=torch.float32, device=dev)
    dst = dsT.contiguous() if dsT is not None else None
    dummy = do  # stands for absent optional tensors; never read
    # The reverse pass reads none of the rerun's states, so where the forward's pass runs again the
    # two sequential passes may run side by side (CONFIG["overlap_passes"]): the reverse pass on a
    # second stream, forked after every buffer it touches was made and joined before any is freed.
    side = tdelta.side_stream(dev) if hs is None else None
    BV, stages = plan.reverse_launch(g is not None, beside=side is not None)
    with tdelta.forked(side):
        tdelta.launch(tdelta.setting_name("bwd_state", g is not None), bwd_state_kernel, plan.seq_grid(BV),
            q, k, w, aqk if aqk is not None else dummy, g if g is not None else dummy, gcs if gcs is not None else dummy, do,
            dst if dst is not None else dummy, dhs, dvn, ds0, plan.seqs, plan.T_steps, plan.NT, scale,
            BK=plan.BK, BV=BV, HAS_G=g is not None, HAS_DST=dsT is not None, GMODE=tdelta.gate_mode(pp),
            GATE_V=bool(tdelta.CONFIG["gate_values"]), AFORM=a_form, PREFETCH=tdelta.prefetch_gates(tdelta.gate_mode(pp), "reverse"),
            QK_IN=aqk is None, max_stages=stages, **plan.common(),
        )
    if hs is None:
        _, _, hs, vn, vr = tdelta.state_pass(q, k, v, pp, g, scale, S0, plan, want_o=False, want_final=False, save_h=True,
                                             save_r=a_form and tdelta.residuals_wanted(dgm))
    tdelta.join(side)
    del pp, dst  # U (and the rest, below) freed after its last reader
    # each buffer is dropped after its last reader and each output made just before its
    # writer, so the caching allocator reuses the memory and the peak stays low
    del w, gcs
    grid = (plan.NT_total, H)
    # the gate's gradient through the scores' decays reads the forward's scores (where prep wrote
    # them and dg_from_aqk asks for them), or forms Q K^T again
    meta = dict(BKP=plan.BKP, BV=plan.BVB, HAS_G=g is not None, UNROLL=int(tdelta.CONFIG["bwd_unroll"]), **plan.common())
    aqk_meta = dict(meta, AQK=bool(tdelta.CONFIG["dg_from_aqk"]) and aqk is not None)
    # Triton 3.6 on an H200: bwd_dqk and bwd_wy at 8 warps hit an illegal memory access with key or
    # value blocks under 64 wide at chunk 64 (float32, K = V = 16 and 32 seen); 4 warps run right.
    # The fused kernel is held to the same cap.
    small = dict(max_warps=4) if min(plan.BKP, plan.BVB) < 64 else {}
    if tdelta.fused_backward(dgm) and plan.NT_total:
        dq = torch.empty_like(q)
        dk = torch.empty_like(k)
        dv = torch.empty_like(v)
        dbeta = torch.empty(beta.shape, dtype=torch.float32, device=dev)
        dg = torch.empty(g.shape, dtype=torch.float32, device=dev) if g is not None else None
        tdelta.launch(tdelta.setting_name("bwd_fused", g is not None), bwd_fused_kernel, grid,
            q, k, v, beta, g if g is not None else dummy, xs, hs, dhs, vn, vr if vr is not None else dummy, dvn, do,
            aqk if aqk is not None else dummy, dq, dk, dv, dbeta, dg if g is not None else dummy, plan.chunks, plan.T_steps, plan.NT, scale,
            **dict(aqk_meta, UNROLL=int(tdelta.CONFIG["fused_unroll"])), DGM=dgm, HAS_R=vr is not None,
            DW_FROM_DV=bool(tdelta.CONFIG["dw_from_dv"]), DG_MMA=bool(tdelta.CONFIG["dg_rows_mma"]), **small,
        )
        return _grads_out(dq, dk, dv, dbeta, dg, ds0, beta, g, S0)
    dq = torch.empty_like(q)  # every token row is written once: at its last step
    dkp = torch.empty(k.shape, dtype=torch.float32, device=dev)
    dw = torch.empty_like(k)  # only ever read as a matrix-product operand in k's dtype
    splits, KPS = plan.key_splits(tdelta.CONFIG["bwd_dqk_split"])
    dgp = torch.empty((*beta.shape, splits), dtype=torch.float32, device=dev) if g is not None else None
    if plan.NT_total:
        tdelta.launch("bwd_dqk", bwd_dqk_kernel, (*grid, splits),
            q, k, g if g is not None else dummy, hs, dhs, vn, dvn, do, aqk if aqk is not None else dummy, dq, dkp, dw,
            dgp if g is not None else dummy, plan.chunks, plan.T_steps, plan.NT, scale,
            **aqk_meta, KSPLIT=splits, KPS=KPS, DGM=dgm, **small,
        )
    del hs, dhs, vn, vr, aqk
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    dbeta = torch.empty(beta.shape, dtype=torch.float32, device=dev)
    dg = torch.empty(g.shape, dtype=torch.float32, device=dev) if g is not None else None
    if plan.NT_total:
        tdelta.launch("bwd_wy", bwd_wy_kernel, grid,
            k, v, beta, g if g is not None else dummy, xs, dw, dvn, dkp, dgp if g is not None else dummy,
            dk, dv, dbeta, dg if g is not None else dummy, plan.chunks, plan.T_steps, plan.NT,
            **meta, KSPLIT=splits, DGM=dgm, **small,
        )
    else:
        dk.zero_(), dv.zero_(), dbeta.zero_()
        if dg is not None:
            dg.zero_()
    return _grads_out(dq, dk, dv, dbeta, dg, ds0, beta, g, S0)


def _grads_out(dq, dk, dv, dbeta, dg, ds0, beta, g, S0):
    """The gradients in the dtypes of their inputs (None for absent g and S0)."""
    return (
        dq,
        dk,
        dv,
        dbeta.to(beta.dtype),
        None if g is None else dg.to(g.dtype),
        None if S0 is None else ds0.to(S0.dtype),
    )
