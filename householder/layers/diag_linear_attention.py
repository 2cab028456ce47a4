"""Gated linear attention with a diagonal, data-dependent decay: the Mamba-like baseline.

Per head, with a per-channel log-decay g_t <= 0 (GLA's gate, Yang et al. 2024):

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,     o_t = S_t^T q_t / sqrt(K)

Every transition is diagonal with entries in (0, 1]: the positive-eigenvalue,
commuting regime that cannot track parity at any length - the contrast to the
Householder mixers. Registered as the LM mixer ``"diag_linear_attention"``.
The recurrence is computed chunkwise in plain PyTorch (autograd); every
exponent it forms is <= 0, so it cannot overflow.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from householder.layers.cache import Cache
from householder.layers.lm import register_mixer
from householder.layers.modules import (
    GatedRMSNorm,
    RMSNorm,
    ShortConvolution,
    project_qkv,
    resolve_head_dim,
    token_mask,
    upcast,
)

# GLA's normaliser: log-decays are logsigmoid(.) / 16, so the initial decay is near 1 (long memory)
GATE_NORMALIZER = 16.0


def diag_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The diagonal-decay recurrence, chunkwise: returns o (B, T, H, V) and the final state (B, H, K, V).

    q, k, g (B, T, H, K), v (B, T, H, V); g is the log-decay (<= 0); computed in
    float32 (float64 for float64 input); initial_state (B, H, K, V) or None.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    C = chunk_size
    N = -(-T // C)
    pad = N * C - T

    def chunks(x):  # (B, T, H, D) -> (B, H, N, C, D); zero padding (k = 0, g = 0) is an identity step
        x = x.to(dtype).transpose(1, 2)
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        return x.reshape(B, H, N, C, x.shape[-1])

    qc, kc, vc, gc = chunks(q) * scale, chunks(k), chunks(v), chunks(g)
    b = gc.cumsum(-2)  # (B, H, N, C, K): log-decay from the chunk start through position i
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    # intra-chunk scores A_ij = sum_d q_id k_jd exp(b_id - b_jd), j <= i (exponents <= 0 where kept)
    diff = (b[..., :, None, :] - b[..., None, :, :]).masked_fill(~causal[..., None], float("-inf"))
    A = torch.einsum("bhnid,bhnjd,bhnijd->bhnij", qc, kc, diff.exp())
    o = A @ vc  # (B, H, N, C, V)
    last = b[..., -1:, :]  # (B, H, N, 1, K)
    # each chunk's own contribution to the state at its end, and its total decay
    U = (kc * (last - b).exp()).mT @ vc  # (B, H, N, K, V)
    decay = last.squeeze(-2).exp()  # (B, H, N, K)
    S = q.new_zeros(B, H, K, V, dtype=dtype) if initial_state is None else initial_state.to(dtype)
    inter = []
    for n in range(N):  # the only sequential part: N = T / C small updates
        inter.append((qc[:, :, n] * b[:, :, n].exp()) @ S)
        S = decay[:, :, n, :, None] * S + U[:, :, n]
    o = o + torch.stack(inter, dim=2)
    o = o.reshape(B, H, N * C, V)[:, :, :T].transpose(1, 2)
    return o, S


def diag_linear_attention_recurrent(q, k, v, g, scale: float, initial_state=None):
    """The same recurrence token by token (reference and decoding); same arguments and returns."""
    B, T, H, K = q.shape
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    S = q.new_zeros(B, H, K, v.shape[-1], dtype=dtype) if initial_state is None else initial_state.to(dtype)
    out = []
    for t in range(T):
        S = g[:, t].to(dtype).exp()[..., None] * S + k[:, t].to(dtype)[..., None] * v[:, t].to(dtype)[..., None, :]
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, t].to(dtype) * scale, S))
    return torch.stack(out, dim=1), S


class DiagLinearAttention(nn.Module):
    """Gated linear attention with diagonal decay: (B, T, hidden_size) -> (B, T, hidden_size).

    q, k, v come from linear maps and short causal convolutions with SiLU (as
    in DeltaNet); the per-channel decay is exp(logsigmoid(gk_proj(x)) / 16).
    ``use_gate`` adds the SiLU output gate. Same forward contract and cache
    layout as :class:`~householder.layers.DeltaNet`.
    """

    def __init__(
        self,
        hidden_size: int = 1024,
        num_heads: int = 4,
        head_dim: int | None = None,
        use_short_conv: bool = True,
        conv_size: int = 4,
        use_gate: bool = False,
        norm_eps: float = 1e-5,
        chunk_size: int = 16,
        layer_idx: int | None = None,
        *,
        device=None,
        dtype=None,
    ):
        super().__init__()
        head_dim = resolve_head_dim(hidden_size, num_heads, head_dim)
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        self.key_dim = num_heads * head_dim
        self.use_short_conv, self.use_gate = use_short_conv, use_gate
        self.chunk_size = chunk_size
        self.layer_idx = layer_idx
        kw = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False, **kw)
        self.k_proj = nn.Linear(hidden_size, self.key_dim, bias=False, **kw)
        self.v_proj = nn.Linear(hidden_size, self.key_dim, bias=False, **kw)
        self.gk_proj = nn.Linear(hidden_size, self.key_dim, bias=True, **kw)
        if use_short_conv:
            self.q_conv1d = ShortConvolution(self.key_dim, conv_size, False, "silu", **kw)
            self.k_conv1d = ShortConvolution(self.key_dim, conv_size, False, "silu", **kw)
            self.v_conv1d = ShortConvolution(self.key_dim, conv_size, False, "silu", **kw)
        if use_gate:
            self.g_proj = nn.Linear(hidden_size, self.key_dim, bias=False, **kw)
            self.o_norm = GatedRMSNorm(head_dim, norm_eps, **kw)
        else:
            self.o_norm = RMSNorm(head_dim, norm_eps, **kw)
        self.o_proj = nn.Linear(self.key_dim, hidden_size, bias=False, **kw)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, Cache | None]:
        """hidden_states (B, T, hidden_size); attention_mask (B, T) or (B, T_past + T), 1 = token, 0 = padding."""
        B, T, _ = hidden_states.shape
        H, D = self.num_heads, self.head_dim
        idx = 0 if self.layer_idx is None else self.layer_idx
        mask = token_mask(attention_mask, B, T)
        state = cache[idx] if cache is not None else None
        x = hidden_states if mask is None else hidden_states * mask[..., None].to(hidden_states.dtype)
        q, k, v, conv_state = project_qkv(self, x, state)
        g = F.logsigmoid(upcast(self.gk_proj(x))) / GATE_NORMALIZER
        if mask is not None:
            keep = mask[..., None].to(g.dtype)
            k, g = k * keep.to(k.dtype), g * keep  # padding: no write, no decay
        q, k, v, g = (t.reshape(B, T, H, D) for t in (q, k, v, g))
        S0 = state["recurrent_state"] if state else None
        if not self.training and T <= 16:
            o, S = diag_linear_attention_recurrent(q, k, v, g, D**-0.5, S0)
        else:
            o, S = diag_linear_attention(q, k, v, g, D**-0.5, S0, self.chunk_size)
        o = o.to(v.dtype)
        o = self.o_norm(o, self.g_proj(x).reshape(B, T, H, D)) if self.use_gate else self.o_norm(o)
        o = self.o_proj(o.reshape(B, T, self.key_dim))
        if use_cache:
            cache = Cache.store(cache, idx, {"recurrent_state": S, "conv_state": conv_state})
        return o, cache

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
            f"use_gate={self.use_gate}, use_short_conv={self.use_short_conv}"
        )


register_mixer(
    "diag_linear_attention",
    lambda c, i, **kw: DiagLinearAttention(
        c.hidden_size, c.num_heads, c.head_dim, c.use_short_conv, c.conv_size, c.use_gate, c.norm_eps,
        layer_idx=i, **kw,
    ),
)
