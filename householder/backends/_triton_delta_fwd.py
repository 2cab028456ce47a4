"""Triton kernels of the chunkwise delta rule: forward.

Two kernels (the algorithm is the one written out in torch_delta.py):

1. ``prep``, one program per (chunk, head), all chunks in parallel: the chunk's
   WY factor A = T^T o Gamma (the core's factor from ``_triton_factor``, gated by
   Gamma_ts = exp(G_t - G_s)), then W = A diag(e^G) K, U = A V and the masked
   scores Aqk = tril(Q K^T) o Gamma, written to memory; or (AFORM) A itself in
   place of W and U, a (C, C) tile per chunk instead of (C, K + V).
   With a gate it also writes G, the running log-decay inside each chunk, per step
   (float32), so that the sequential passes load it rather than recompute it: a
   cumulative sum is a cross-warp step on their critical path, which is what made
   the gated op slower than the plain one when few (B x H) programs run.
2. ``state``, one program per (value block, sequence, head), sequential over
   the sequence's chunks: the pseudo-values Vn = U - W S (AFORM: A (V - diag(e^G) K S),
   the same product with W and U never in memory), the output
   O = scale (diag(e^G) Q S + Aqk Vn) and the state pass
   S <- e^{G_C} S + (diag(e^{G_C - G}) K)^T Vn, with S in float32 registers.
   The backward pass runs it again to save the per-chunk states and Vn.

Rows are steps of the flat (B * T_steps) axis (B = 1 for packed sequences).
DeltaProduct (NH > 1 steps per token) is the delta rule over steps whose
queries are read at a token's last step and whose decay acts at its first:
token rows are ``step // NH``, with masks, so nothing is expanded in memory.
Plain pointer arithmetic only (Triton 3.6 on GPUs, 3.9 under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import triton
import triton.language as tl

from householder.backends._triton_factor import split_unit_upper_inverse


@triton.jit
def _dot(a, b, F32: tl.constexpr, PREC: tl.constexpr):
    """a @ b with float32 accumulation; float32 operands use ``PREC`` (interpreter: exact)."""
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)
    else:
        return tl.dot(a, b)


@triton.jit
def chunk_bounds(i_c, chunks, T_steps, NT, BC: tl.constexpr, VARLEN: tl.constexpr):
    """First row of chunk ``i_c`` and the end row of its sequence (int64)."""
    if VARLEN:
        start = tl.load(chunks + 2 * i_c).to(tl.int64)
        end = tl.load(chunks + 2 * i_c + 1).to(tl.int64)
    else:
        seq = i_c // NT
        start = seq * T_steps + (i_c % NT) * BC
        end = (seq + 1) * T_steps
    return start, end


@triton.jit
def seq_bounds(i_n, seqs, T_steps, NT, VARLEN: tl.constexpr):
    """First row, end row and first global chunk of sequence ``i_n`` (int64)."""
    if VARLEN:
        bos = tl.load(seqs + 2 * i_n).to(tl.int64)
        c0 = tl.load(seqs + 2 * i_n + 1).to(tl.int64)
        eos = tl.load(seqs + 2 * i_n + 2).to(tl.int64)
    else:
        bos = i_n * T_steps
        eos = bos + T_steps
        c0 = i_n * NT
    return bos, eos, c0


@triton.jit
def chunk_rows(start, NH: tl.constexpr, BC: tl.constexpr):
    """Row-local indices of a chunk: r (steps), the token of each step relative to the chunk's first
    token (start // NH), and the masks of a token's first and last step (int32, small tiles)."""
    r = tl.arange(0, BC)
    s0 = (start % NH).to(tl.int32)
    tok = (s0 + r) // NH
    first = (s0 + r) % NH == 0
    last = (s0 + r) % NH == NH - 1
    return r, tok, first, last


@triton.jit
def chunk_program(chunks, T_steps, NT, BC: tl.constexpr, NH: tl.constexpr, VARLEN: tl.constexpr):
    """Where a per-(chunk, head) program works: i_c, i_h, the chunk's first row and its sequence's
    end row, the rows of ``chunk_rows``, the valid rows, the query rows, and the first token t0."""
    i_c = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1)
    start, end = chunk_bounds(i_c, chunks, T_steps, NT, BC, VARLEN)
    r, tok, first, last = chunk_rows(start, NH, BC)
    valid = r < end - start
    return i_c, i_h, start, end, r, tok, first, last, valid, valid & last, start // NH


@triton.jit
def chunk_gates(gp, tok, valid, first, H: tl.constexpr):
    """Running sum G of the log-decays inside a chunk (BC,), float32; a token decays at its first step.

    ``gp`` points at the chunk's first token of this head."""
    gr = tl.load(gp + tok * H, mask=valid & first, other=0.0).to(tl.float32)
    return tl.cumsum(gr, 0)


@triton.jit
def load_gates(gcs, start, r, valid, end, H: tl.constexpr, BC: tl.constexpr, GMODE: tl.constexpr):
    """The running log-decay G of a chunk (BC,) and G at its last row, as ``prep_kernel`` wrote them.

    ``gcs`` points at this head's column. GMODE 1: the last row's value by a scalar load; 2: by a
    reduction. Rows past the sequence's end get the last row's value, as the running sum would."""
    Gc = tl.load(gcs + start * H + r * H, mask=valid, other=0.0)
    if GMODE == 1:
        glast = tl.load(gcs + (start + tl.minimum(end - start, BC) - 1) * H)
    else:
        nv = tl.minimum(end - start, BC).to(tl.int32)
        glast = tl.sum(tl.where(r == nv - 1, Gc, 0.0), 0)
    return tl.where(valid, Gc, glast), glast


@triton.jit
def decays_from(Gc, glast, BK: tl.constexpr):
    """e^G, e^{G_C - G} (BC,) and e^{G_C} repeated along the state's BK key rows (BK,), float32, of
    a chunk's running log-decays G and G_C = ``glast`` of its last row."""
    return tl.exp(Gc), tl.exp(glast - Gc), tl.zeros((BK,), dtype=tl.float32) + tl.exp(glast)


@triton.jit
def decay_inputs(gcs, g, i_h, i_c, st, end, ck, H: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                 NH: tl.constexpr, GMODE: tl.constexpr):
    """What ``decays_of`` needs of the chunk ``i_c`` that starts at row ``st``, as loaded (GMODE 0
    or 3): under 3 the decays prep wrote; under 0 the log-decays g of its rows (0 past ``end``) and
    two unused zero tiles.

    The sequential passes may load these one chunk ahead (CONFIG["prefetch_gates"]): the loads'
    latency is then spent beside a whole chunk step rather than on the step that uses them."""
    r, tok, first, last = chunk_rows(st, NH, BC)
    valid = r < end - st  # none in an empty sequence, whose i_c may be past the last chunk
    if GMODE == 3:
        pe = gcs + (i_c * H + i_h) * (2 * BC + BK)
        some = tl.zeros((BK,), dtype=tl.int32) < end - st
        return (tl.load(pe + r, mask=valid, other=0.0), tl.load(pe + BC + r, mask=valid, other=0.0),
                tl.load(pe + 2 * BC + ck, mask=some, other=0.0))
    else:
        gr = tl.load(g + i_h + (st // NH + tok) * H, mask=valid & first, other=0.0).to(tl.float32)
        return gr, tl.zeros((BC,), dtype=tl.float32), tl.zeros((BK,), dtype=tl.float32)


@triton.jit
def decays_of(a, b, c, BC: tl.constexpr, BK: tl.constexpr, GMODE: tl.constexpr):
    """e^G, e^{G_C - G} (BC,) and e^{G_C} (BK,) of a chunk from its ``decay_inputs``, and G (BC,),
    its running log-decays, under GMODE 0 (under 3, ``a`` again: not a log-decay)."""
    if GMODE == 3:
        return a, b, c, a
    else:
        Gc = tl.cumsum(a, 0)
        eG, ed, egl = decays_from(Gc, tl.sum(tl.where(tl.arange(0, BC) == BC - 1, Gc, 0.0), 0), BK)
        return eG, ed, egl, Gc


@triton.jit
def seq_decays(gcs, g, i_h, i_c, start, end, ck, H: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
               NH: tl.constexpr, GMODE: tl.constexpr):
    """The decays (``decays_from``) of chunk ``i_c``, starting at row ``start``, for the sequential
    passes. GMODE 0: summed here from g; 1, 2: from the running log-decays prep wrote
    (``load_gates``); 3: loaded as prep wrote them (no scan, reduction or exponential here)."""
    if GMODE == 1 or GMODE == 2:
        r = tl.arange(0, BC)
        Gc, glast = load_gates(gcs + i_h, start, r, r < end - start, end, H, BC, GMODE)
        return decays_from(Gc, glast, BK)
    else:
        a, b, c = decay_inputs(gcs, g, i_h, i_c, start, end, ck, H, BC, BK, NH, GMODE)
        eG, ed, egl, _ = decays_of(a, b, c, BC, BK, GMODE)
        return eG, ed, egl


@triton.jit
def chunk_gamma(Gc, BC: tl.constexpr, HAS_G: tl.constexpr, EXP_MASK: tl.constexpr):
    """Gamma_ts = exp(G_t - G_s) on and below the diagonal, 0 above (all ones there without a gate).

    EXP_MASK: the mask goes into the exponent (exp(-inf) = 0), one select per entry instead of two.
    On an H200 (forward alone, four trees alternating) it took the gated forward from 0.504 / 0.501 /
    0.633 / 0.741 to 0.493 / 0.492 / 0.628 / 0.735 ms at the four benchmark shapes, so the forward's
    kernels take it; the backward's keep the two selects: with the mask in the exponent there too,
    the gated forward+backward was 0.7-1.3% slower (two trees alternating, 386e321)."""
    r = tl.arange(0, BC)
    causal = r[:, None] >= r[None, :]
    if HAS_G and EXP_MASK:
        return tl.exp(tl.where(causal, Gc[:, None] - Gc[None, :], float("-inf")))
    elif HAS_G:
        return tl.where(causal, tl.exp(tl.where(causal, Gc[:, None] - Gc[None, :], 0.0)), 0.0)
    else:
        return tl.where(causal, 1.0, 0.0)


@triton.jit
def chunk_scores(aqk, qt, kt, gp, gr, r, tok, valid, first, i_c, i_h, H: tl.constexpr, BC: tl.constexpr, DT: tl.constexpr,
                 F32: tl.constexpr, PREC: tl.constexpr, HAS_G: tl.constexpr, QK_IN: tl.constexpr, G_IN: tl.constexpr):
    """The masked scores (BC, BC) of chunk ``i_c`` in the inputs' precision, as prep writes them:
    tril(Q K^T) o Gamma of its query and key tiles qt, kt and (HAS_G) the log-decays at ``gp`` (the
    chunk's first token of this head) under QK_IN, else prep's Aqk read from ``aqk``. G_IN: the
    log-decays' running sum G is ``gr`` (BC,), as the caller formed it (``decays_of``): g is
    neither read nor summed again."""
    if QK_IN:
        if HAS_G and G_IN:
            Gc = gr
        elif HAS_G:
            Gc = chunk_gates(gp, tok, valid, first, H)
        else:
            Gc = tl.zeros((BC,), dtype=tl.float32)
        return (_dot(qt.to(DT), tl.trans(kt.to(DT)), F32, PREC) * chunk_gamma(Gc, BC, HAS_G, True)).to(DT)
    else:
        return tl.load(aqk + (i_c * H + i_h) * BC * BC + r[:, None] * BC + r[None, :]).to(DT)


@triton.jit
def store_scores(aqk, QK, Gc, i_c, i_h, r, H: tl.constexpr, BC: tl.constexpr, HAS_G: tl.constexpr):
    """Store the chunk's masked scores tril(Q K^T) o Gamma (``QK`` = Q K^T, (BC, BC) float32; Gc
    the running log-decays) at ``aqk`` (NT_total, H, BC, BC), in its dtype."""
    tl.store(aqk + (i_c * H + i_h) * BC * BC + r[:, None] * BC + r[None, :],
             (QK * chunk_gamma(Gc, BC, HAS_G, True)).to(aqk.dtype.element_ty))


@triton.jit
def scores_kernel(
    q, k, g, aqk, chunks, T_steps, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BKS: tl.constexpr, BC: tl.constexpr, NH: tl.constexpr,
    HAS_G: tl.constexpr, VARLEN: tl.constexpr, DT: tl.constexpr, F32: tl.constexpr, PREC: tl.constexpr,
):
    """Per (chunk, head): the masked scores Aqk = tril(Q K^T) o Gamma alone, in key blocks of BKS
    columns (CONFIG["scores_kernel"]: prep then writes none and runs as prep_no_scores)."""
    i_c, i_h, start, end, r, tok, first, last, valid, qrow, t0 = chunk_program(chunks, T_steps, NT, BC, NH, VARLEN)
    pk = k + (start * H + i_h) * K
    pq = q + (t0 * H + i_h) * K
    if HAS_G:
        Gc = chunk_gates(g + t0 * H + i_h, tok, valid, first, H)
    else:
        Gc = tl.zeros((BC,), dtype=tl.float32)
    QK = tl.zeros((BC, BC), dtype=tl.float32)
    for k0 in tl.static_range(0, K, BKS):
        ck = k0 + tl.arange(0, BKS)
        mk = ck[None, :] < K
        kb = tl.load(pk + r[:, None] * (H * K) + ck[None, :], mask=valid[:, None] & mk, other=0.0).to(DT)
        qb = tl.load(pq + tok[:, None] * (H * K) + ck[None, :], mask=qrow[:, None] & mk, other=0.0).to(DT)
        QK += _dot(qb, tl.trans(kb), F32, PREC)
    store_scores(aqk, QK, Gc, i_c, i_h, r, H, BC, HAS_G)


@triton.jit
def chunk_factor(Gm, b, Gc, BC: tl.constexpr, HAS_G: tl.constexpr, FPREC: tl.constexpr, SPLITS: tl.constexpr):
    """The gated chunk factor A = (X o Gamma) diag(beta), X = (I + tril(diag(beta) K K^T, -1))^{-1}.

    Gm = K K^T (BC, BC) float32, b = beta (BC,), Gc = running log-decay (BC,); SPLITS: quadrant
    splits of the inverse (``split_unit_upper_inverse``).
    Returns (A, X, Gamma).
    """
    # X^T = (I + striu(K K^T diag(beta)))^{-1}, and X diag(beta) = T^T for the core's factor T
    X = tl.trans(split_unit_upper_inverse(Gm * b[None, :], BC, FPREC, SPLITS))
    gam = chunk_gamma(Gc, BC, HAS_G, True)
    return X * gam * b[None, :], X, gam


@triton.jit
def prep_kernel(
    q, k, v, beta, g, w, u, af, aqk, xs, gcs, chunks, T_steps, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BKP: tl.constexpr, BV: tl.constexpr,
    BC: tl.constexpr, NH: tl.constexpr, HAS_G: tl.constexpr, VARLEN: tl.constexpr, SAVE_X: tl.constexpr,
    SAVE_G: tl.constexpr, SAVE_E: tl.constexpr, DT: tl.constexpr, F32: tl.constexpr, PREC: tl.constexpr, FPREC: tl.constexpr,
    SPLITS: tl.constexpr, AFORM: tl.constexpr, QK_OUT: tl.constexpr,
):
    """Per (chunk, head): W = A diag(e^G) K, U = A V (AFORM: A, in the inputs' precision, at ``af``)
    and Aqk = tril(Q K^T) o Gamma (QK_OUT; else q is not read) (and X and G, float32).

    SAVE_G: G per step at ``gcs`` (B, T_steps, H); SAVE_E: instead the decays of ``seq_decays``
    per chunk at ``gcs`` (NT_total, H, 2 BC + BK): e^G, e^{G_C - G}, and e^{G_C} BK times."""
    i_c, i_h, start, end, r, tok, first, last, valid, qrow, t0 = chunk_program(chunks, T_steps, NT, BC, NH, VARLEN)
    # int64 only in these scalar bases; tile offsets below are int32
    pk = k + (start * H + i_h) * K
    pq = q + (t0 * H + i_h) * K
    pv = v + (start * H + i_h) * V
    pw = w + (start * H + i_h) * K
    pu = u + (start * H + i_h) * V
    b = tl.load(beta + start * H + i_h + r * H, mask=valid, other=0.0).to(tl.float32)
    if HAS_G:
        Gc = chunk_gates(g + t0 * H + i_h, tok, valid, first, H)
    else:
        Gc = tl.zeros((BC,), dtype=tl.float32)
    Gm = tl.zeros((BC, BC), dtype=tl.float32)
    QK = tl.zeros((BC, BC), dtype=tl.float32)
    for k0 in tl.static_range(0, K, BKP):
        ck = k0 + tl.arange(0, BKP)
        mk = ck[None, :] < K
        kb = tl.load(pk + r[:, None] * (H * K) + ck[None, :], mask=valid[:, None] & mk, other=0.0).to(DT)
        # (both loads before the products: with q's load after K K^T the gated build for sm_90
        # spilled 528 B per thread against 376, Triton 3.9)
        if QK_OUT:
            qb = tl.load(pq + tok[:, None] * (H * K) + ck[None, :], mask=qrow[:, None] & mk, other=0.0).to(DT)
        Gm += _dot(kb, tl.trans(kb), F32, PREC)
        if QK_OUT:
            QK += _dot(qb, tl.trans(kb), F32, PREC)
    if QK_OUT:
        # stored before the inverse, so that Q K^T is not live through it: the gated build for
        # sm_90 (Triton 3.9) spills 232 B per thread against 384 with the store after it (Gamma
        # is formed here and again in chunk_factor rather than held through the inverse)
        store_scores(aqk, QK, Gc, i_c, i_h, r, H, BC, HAS_G)
    if HAS_G:
        if SAVE_G:
            tl.store(gcs + start * H + i_h + r * H, Gc, mask=valid)
        if SAVE_E:
            # rows past the sequence's end hold G_C (the running sum adds nothing there): e^{G_C}, 1
            eG, ed, egl = decays_from(Gc, tl.sum(tl.where(r == BC - 1, Gc, 0.0), 0), BK)
            pe = gcs + (i_c * H + i_h) * (2 * BC + BK)
            tl.store(pe + r, eG)
            tl.store(pe + BC + r, ed)
            tl.store(pe + 2 * BC + tl.arange(0, BK), egl)
    A, X, gam = chunk_factor(Gm, b, Gc, BC, HAS_G, FPREC, SPLITS)
    if SAVE_X:
        tl.store(xs + (i_c * H + i_h) * BC * BC + r[:, None] * BC + r[None, :], X.to(xs.dtype.element_ty))
    Ad = A.to(DT)
    if AFORM:
        tl.store(af + (i_c * H + i_h) * BC * BC + r[:, None] * BC + r[None, :], Ad)
    else:
        for k0 in tl.static_range(0, K, BKP):
            ck = k0 + tl.arange(0, BKP)
            m = valid[:, None] & (ck[None, :] < K)
            kb = tl.load(pk + r[:, None] * (H * K) + ck[None, :], mask=m, other=0.0)
            if HAS_G:
                kb = kb.to(tl.float32) * tl.exp(Gc)[:, None]
            wb = _dot(Ad, kb.to(DT), F32, PREC)
            tl.store(pw + r[:, None] * (H * K) + ck[None, :], wb.to(w.dtype.element_ty), mask=m)
        for v0 in tl.static_range(0, V, BV):
            cv = v0 + tl.arange(0, BV)
            m = valid[:, None] & (cv[None, :] < V)
            vb = tl.load(pv + r[:, None] * (H * V) + cv[None, :], mask=m, other=0.0).to(DT)
            ub = _dot(Ad, vb, F32, PREC)
            tl.store(pu + r[:, None] * (H * V) + cv[None, :], ub.to(u.dtype.element_ty), mask=m)


@triton.jit
def state_kernel(
    q, k, w, u, aqk, g, gcs, o, s0, sT, h, vn, vr, seqs, T_steps, NT, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    BC: tl.constexpr, NH: tl.constexpr, HAS_G: tl.constexpr, VARLEN: tl.constexpr,
    HAS_S0: tl.constexpr, STORE_ST: tl.constexpr, WRITE_O: tl.constexpr, SAVE_H: tl.constexpr,
    DT: tl.constexpr, F32: tl.constexpr, PREC: tl.constexpr, GMODE: tl.constexpr, GATE_V: tl.constexpr,
    AFORM: tl.constexpr, SAVE_R: tl.constexpr, PREFETCH: tl.constexpr, QK_IN: tl.constexpr,
    SCORES_OUT: tl.constexpr,
):
    """Per (value block, sequence, head): the sequential pass over chunks, with the output.

    QK_IN: the masked scores tril(Q K^T) o Gamma are formed here from the loaded tiles (and g)
    rather than read from ``aqk`` (``chunk_scores``); SCORES_OUT (with QK_IN and WRITE_O): the
    first value block's programs also store them at ``aqk``, as prep would have, for the backward.

    GATE_V: the state update's decays scale the (BC, BV) pseudo-values, K^T (diag(d) Vn), rather
    than the (BC, BK) keys, (diag(d) K)^T Vn: the same product on a smaller tile.
    AFORM: ``w`` holds the chunk factors A (NT_total, H, BC, BC) and ``u`` the values V, and
    Vn = A (V - diag(e^G) K S): one (BC, BC) x (BC, BV) product more per chunk, on the sequential
    path, for no W and U in memory. SAVE_R (with AFORM): also store the residuals
    R = V - diag(e^G) K S (the operand of that product, in the inputs' precision) at ``vr``, from
    which the backward takes dA's state term as dVn R^T rather than forming K S again."""
    i_v = tl.program_id(0)
    i_nh = tl.program_id(1).to(tl.int64)
    i_n = i_nh // H
    i_h = i_nh % H
    bos, eos, c0 = seq_bounds(i_n, seqs, T_steps, NT, VARLEN)
    ck = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    mkv = (ck[:, None] < K) & (cv[None, :] < V)
    soff = ck[:, None] * V + cv[None, :]
    if HAS_S0:
        S = tl.load(s0 + i_nh * K * V + soff, mask=mkv, other=0.0).to(tl.float32)
    else:
        S = tl.zeros((BK, BV), dtype=tl.float32)
    nch = tl.cdiv(eos - bos, BC)
    if HAS_G and PREFETCH:
        ga, gb, gc = decay_inputs(gcs, g, i_h, c0, bos, eos, ck, H, BC, BK, NH, GMODE)
    else:
        ga, gb, gc = tl.zeros((BC,), dtype=tl.float32), tl.zeros((BC,), dtype=tl.float32), tl.zeros((BK,), dtype=tl.float32)
    for j in range(0, nch):
        start = bos + j * BC
        Gnow = ga  # (unused unless set below)
        if HAS_G and PREFETCH:
            # Gnow: this chunk's running log-decays under GMODE 0, which its scores take (QK_IN):
            # summed once for both (a cumulative sum is a cross-warp step on the chain)
            eG, ed, egl, Gnow = decays_of(ga, gb, gc, BC, BK, GMODE)
            # the next chunk's (the last one's again at the end: in bounds, unused)
            jn = tl.minimum(j + 1, nch - 1)
            ga, gb, gc = decay_inputs(gcs, g, i_h, c0 + jn, bos + jn * BC, eos, ck, H, BC, BK, NH, GMODE)
        r, tok, first, last = chunk_rows(start, NH, BC)
        valid = r < eos - start
        mk = valid[:, None] & (ck[None, :] < K)
        mv = valid[:, None] & (cv[None, :] < V)
        t0 = start // NH
        offk = r[:, None] * (H * K) + ck[None, :]
        offv = r[:, None] * (H * V) + cv[None, :]
        kt = tl.load(k + (start * H + i_h) * K + offk, mask=mk, other=0.0)
        ut = tl.load(u + (start * H + i_h) * V + offv, mask=mv, other=0.0).to(tl.float32)
        Sd = S.to(DT)
        if SAVE_H:
            tl.store(h + ((c0 + j) * H + i_h) * K * V + soff, S.to(h.dtype.element_ty), mask=mkv)
        if HAS_G and not PREFETCH:
            eG, ed, egl = seq_decays(gcs, g, i_h, c0 + j, start, eos, ck, H, BC, BK, NH, GMODE)
        if AFORM:
            at_ = tl.load(w + ((c0 + j) * H + i_h) * BC * BC + r[:, None] * BC + r[None, :]).to(DT)
            ks = _dot(kt.to(DT), Sd, F32, PREC)
            if HAS_G:
                ks = ks * eG[:, None]
            rt = (ut - ks).to(DT)
            if SAVE_R:
                tl.store(vr + (start * H + i_h) * V + offv, rt.to(vr.dtype.element_ty), mask=mv)
            vnew = _dot(at_, rt, F32, PREC)
        else:
            wt = tl.load(w + (start * H + i_h) * K + offk, mask=mk, other=0.0).to(DT)
            vnew = ut - _dot(wt, Sd, F32, PREC)
        if SAVE_H:
            tl.store(vn + (start * H + i_h) * V + offv, vnew.to(vn.dtype.element_ty), mask=mv)
        vd = vnew.to(DT)
        if WRITE_O:
            qrow = valid & last
            qt = tl.load(q + (t0 * H + i_h) * K + tok[:, None] * (H * K) + ck[None, :], mask=qrow[:, None] & (ck[None, :] < K), other=0.0).to(DT)
            at = chunk_scores(aqk, qt, kt, g + t0 * H + i_h, Gnow, r, tok, valid, first, c0 + j, i_h, H, BC, DT, F32,
                              PREC, HAS_G, QK_IN, PREFETCH and GMODE == 0)
            if SCORES_OUT:
                if i_v == 0:
                    tl.store(aqk + ((c0 + j) * H + i_h) * BC * BC + r[:, None] * BC + r[None, :], at.to(aqk.dtype.element_ty))
            ot = _dot(qt, Sd, F32, PREC)
            if HAS_G:
                ot = ot * eG[:, None]
            ot = (ot + _dot(at, vd, F32, PREC)) * scale
            tl.store(o + (t0 * H + i_h) * V + tok[:, None] * (H * V) + cv[None, :], ot.to(o.dtype.element_ty), mask=qrow[:, None] & (cv[None, :] < V))
        if HAS_G:
            S = S * egl[:, None]
            if GATE_V:
                vd = (vnew * ed[:, None]).to(DT)
            else:
                kt = kt.to(tl.float32) * ed[:, None]
        S += _dot(tl.trans(kt.to(DT)), vd, F32, PREC)
    if STORE_ST:
        tl.store(sT + i_nh * K * V + soff, S, mask=mkv)
