"""The delta rule chunkwise in plain PyTorch: the readable reference of the algorithm.

Differentiable by autograd, on the CPU and on GPUs. Within a chunk of C tokens
the state update is a product of Householder factors with a source term
(DESIGN.md): with the chunk's WY factor T (upper, H_1...H_C = I - K^T T K) the
C updates collapse to

    A = T^T o Gamma,            Gamma_ts = exp(G_t - G_s) for s <= t, else 0
    W = A V - A diag(e^G) K S_0            (the "pseudo-values")
    O = scale (diag(e^G) Q S_0 + (Q K^T o Gamma) W)
    S_C = e^{G_C} S_0 + (diag(e^{G_C - G}) K)^T W

where G is the running sum of the log-decays g inside the chunk. The gated
factor is the ungated T^T with each entry scaled by exp(G_t - G_s): the
diagonal scaling diag(e^G) commutes through the triangular inverse, so gating
needs no second factor and never forms exp(-G). Only the last line runs
sequentially over chunks.

Shapes follow flash-linear-attention: q, k (B, T, H, K); v (B, T, H, V);
beta, g (B, T, H); states (N, H, K, V).
"""

from __future__ import annotations

import torch



def accumulation_dtype(*tensors) -> torch.dtype:
    """float64 if any input is float64, else float32: half inputs accumulate in float32."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def check_available(x) -> None:
    """The torch path runs wherever torch does."""


def chunk_factor(k: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """T^T for one block: k (..., C, K), beta (..., C) -> (..., C, C), lower triangular.

    T is the core's compact WY factor of H_1 ... H_C (P = I - K^T T K, T upper,
    DESIGN.md), taken from the torch backend; the delta rule's state update runs
    the factors in the transposed order H_C ... H_1 = I - K^T T^T K.
    """
    from householder._registry import get_backend

    return get_backend("torch").wy_factor(k, beta).mT


def _to_chunks(x: torch.Tensor, C: int) -> torch.Tensor:
    """(B, T, H, ...) -> (B, H, NT, C, ...), zero padded at the end of T."""
    B, T, H = x.shape[:3]
    x = x.movedim(2, 1)  # (B, H, T, ...)
    NT = -(-T // C)
    pad = NT * C - T
    if pad:
        # zero keys, zero beta and zero log-decay are identity steps: padding changes nothing
        x = torch.cat([x, x.new_zeros((B, H, pad) + tuple(x.shape[3:]))], dim=2)
    return x.reshape((B, H, NT, C) + tuple(x.shape[3:]))


def _chunk_dense(q, k, v, beta, g, scale: float, S0, C: int):
    """The chunked algorithm on a dense batch (B, T, H, ...) in the compute dtype.

    Returns o (B, T, H, V) and the final state (B, H, K, V).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    qc, kc, vc = _to_chunks(q, C), _to_chunks(k, C), _to_chunks(v, C)
    bc = _to_chunks(beta, C)
    NT = qc.shape[2]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    A = chunk_factor(kc, bc)  # (B, H, NT, C, C)
    Aqk = (qc @ kc.mT).masked_fill(~causal, 0)
    if g is not None:
        G = _to_chunks(g, C).cumsum(-1)  # (B, H, NT, C)
        gamma = torch.exp((G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")))
        A = A * gamma
        Aqk = Aqk * gamma
        eG = torch.exp(G)[..., None]
        qc = qc * eG
        Wk = A @ (kc * eG)
        kc = kc * torch.exp(G[..., -1:] - G)[..., None]
        last = torch.exp(G[..., -1])  # (B, H, NT)
    else:
        Wk = A @ kc
        last = None
    U = A @ vc  # (B, H, NT, C, V)
    S = S0 if S0 is not None else q.new_zeros(B, H, K, V)
    outs = []
    for n in range(NT):
        W = U[:, :, n] - Wk[:, :, n] @ S
        outs.append(qc[:, :, n] @ S + Aqk[:, :, n] @ W)
        if last is not None:
            S = last[:, :, n, None, None] * S
        S = S + kc[:, :, n].mT @ W
    if not outs:  # T = 0
        return v.new_zeros(B, 0, H, V), S
    o = torch.stack(outs, dim=2).reshape(B, H, NT * C, V)[:, :, :T] * scale
    return o.movedim(1, 2), S


def _recurrent_dense(q, k, v, beta, g, scale: float, S0, n: int):
    """Token-by-token recurrence on a dense batch; k, v, beta carry n steps per token."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    S = S0 if S0 is not None else q.new_zeros(B, H, K, V)
    outs = []
    for t in range(T):
        if g is not None:
            S = torch.exp(g[:, t])[..., None, None] * S
        for j in range(n):
            kk, vv, bb = k[:, t * n + j], v[:, t * n + j], beta[:, t * n + j]
            delta = vv - torch.einsum("bhkv,bhk->bhv", S, kk)
            S = S + bb[..., None, None] * kk[..., :, None] * delta[..., None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]) * scale)
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(B, 0, H, V)
    return o, S


# -- packing of variable-length sequences --------------------------------------


def _host_offsets(offsets, cu_seqlens):
    """The offsets as a list of ints: ``offsets``, or read from ``cu_seqlens`` (None when neither is given)."""
    if offsets is None and cu_seqlens is not None:
        return [int(c) for c in cu_seqlens.tolist()]
    return offsets


def _pack_index(offsets: list[int], unit: int, device) -> tuple[torch.Tensor, int]:
    """Index (N, Lmax * unit) into a packed axis (+1 dummy row at the end) and Lmax."""
    lengths = [b - a for a, b in zip(offsets[:-1], offsets[1:])]
    L = max(lengths) if lengths else 0
    total = offsets[-1] * unit
    idx = torch.full((len(lengths), L * unit), total, dtype=torch.long)
    for i, (a, n) in enumerate(zip(offsets[:-1], lengths)):
        idx[i, : n * unit] = torch.arange(a * unit, (a + n) * unit)
    return idx.to(device), L


def _unpack(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (1, Tp, ...) packed -> (N, L, ...) zero padded, by the index of _pack_index."""
    rows = torch.cat([x[0], x.new_zeros((1,) + tuple(x.shape[2:]))], dim=0)
    return rows[idx]


def _repack(o: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    """o (N, L, ...) -> (1, sum of lengths, ...): the inverse of _unpack on the real rows."""
    parts = [o[i, : b - a] for i, (a, b) in enumerate(zip(offsets[:-1], offsets[1:]))]
    return torch.cat(parts, dim=0)[None]


def _run(dense_fn, q, k, v, beta, g, initial_state, offsets, steps: int, **kw):
    """Cast to the compute dtype, unpack varlen input, call ``dense_fn``, repack."""
    dtype = accumulation_dtype(q, k, v, beta, g, initial_state)
    out_dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    q, k, v, beta = (x.to(dtype) for x in (q, k, v, beta))
    g = None if g is None else g.to(dtype)
    S0 = None if initial_state is None else initial_state.to(dtype)
    if offsets is not None:
        idx_tok, _ = _pack_index(offsets, 1, q.device)
        idx_step, _ = _pack_index(offsets, steps, q.device)
        q = _unpack(q, idx_tok)
        g = None if g is None else _unpack(g, idx_tok)
        k, v, beta = (_unpack(x, idx_step) for x in (k, v, beta))
    o, S = dense_fn(q, k, v, beta, g, S0=S0, **kw)
    if offsets is not None:
        o = _repack(o, offsets)
    return o.to(out_dtype), S


def _expand_product(q, g, n: int):
    """DeltaProduct as a delta rule over T*n steps: decay at a token's first step, read at its last."""
    if n == 1:
        return q, g
    B, T, H, K = q.shape
    qx = q.new_zeros(B, T, n, H, K)
    qx[:, :, n - 1] = q
    qx = qx.reshape(B, T * n, H, K)
    if g is not None:
        gx = g.new_zeros(B, T, n, H)
        gx[:, :, 0] = g
        g = gx.reshape(B, T * n, H)
    return qx, g


def chunk(q, k, v, beta, g, scale: float, initial_state, offsets, chunk_size: int, num_householder: int = 1, cu_seqlens=None):
    """Chunkwise delta rule / DeltaProduct; returns o (B, T, H, V) and the final states (N, H, K, V).

    ``offsets`` is cu_seqlens as a list of ints (already checked), or None: then
    the tensor ``cu_seqlens`` is read here when given (unchecked offsets on a GPU).
    Inputs are cast to float32 (float64 if any input is float64); o comes back
    in the inputs' dtype, the state in the compute dtype.
    """
    n = num_householder

    def dense(q, k, v, beta, g, S0):
        qx, gx = _expand_product(q, g, n)
        o, S = _chunk_dense(qx, k, v, beta, gx, scale, S0, chunk_size)
        return (o[:, n - 1 :: n] if n > 1 else o), S

    # varlen input is unpacked per token first, so expansion never mixes two sequences
    return _run(dense, q, k, v, beta, g, initial_state, _host_offsets(offsets, cu_seqlens), n)


def recurrent(q, k, v, beta, g, scale: float, initial_state, offsets, num_householder: int = 1, cu_seqlens=None):
    """Token-by-token delta rule / DeltaProduct (decoding, short prompts); same contract as :func:`chunk`."""
    return _run(_recurrent_dense, q, k, v, beta, g, initial_state, _host_offsets(offsets, cu_seqlens), num_householder,
                scale=scale, n=num_householder)
