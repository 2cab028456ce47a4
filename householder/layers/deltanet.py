"""DeltaNet (and Gated DeltaNet) token mixer over the core's delta-rule op.

Per head, with L2-normalised q_t, k_t and beta_t in [0, 1] (or [0, 2] with
``allow_neg_eigval``):

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = S_t^T q_t / sqrt(K)

g_t = 0 unless ``use_forget_gate`` (Gated DeltaNet's data-dependent decay).
The recurrence itself is :func:`householder.delta_rule`; this module only
makes its inputs (projections, short convolutions, norms, gates) and its output.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import householder
from householder.layers.cache import Cache
from householder.layers.modules import (
    GatedRMSNorm,
    RMSNorm,
    ShortConvolution,
    l2_normalize,
    project_qkv,
    resolve_head_dim,
    token_mask,
    upcast,
)

MODES = ("chunk", "fused_recurrent")

# In "chunk" mode, eval-time calls of at most this many tokens (decoding) take
# the token-by-token recurrence, which has no chunk overhead.
RECURRENT_MAX_TOKENS = 16


def _check_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
    return value


class _DeltaMixer(nn.Module):
    """Shared body of DeltaNet and DeltaProduct: ``num_householder`` delta steps per token."""

    _num_householder = 1

    def __init__(
        self,
        hidden_size: int = 1024,
        num_heads: int = 4,
        head_dim: int | None = None,
        expand_v: float = 1.0,
        mode: str = "chunk",
        use_beta: bool = True,
        use_short_conv: bool = True,
        conv_size: int = 4,
        conv_bias: bool = False,
        allow_neg_eigval: bool = False,
        use_gate: bool = False,
        use_forget_gate: bool = False,
        qk_norm: str = "l2",
        norm_eps: float = 1e-5,
        chunk_size: int = 64,
        layer_idx: int | None = None,
        *,
        device=None,
        dtype=None,
    ):
        super().__init__()
        _check_int(hidden_size, "hidden_size")
        _check_int(num_heads, "num_heads")
        head_dim = resolve_head_dim(hidden_size, num_heads, head_dim)
        _check_int(head_dim, "head_dim")
        head_v_dim = head_dim * expand_v
        if head_v_dim != int(head_v_dim) or head_v_dim < 1:
            raise ValueError(f"head_dim * expand_v must be a positive integer; got {head_dim} * {expand_v} = {head_v_dim}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
        if qk_norm != "l2":
            # unnormalised keys make steps expansive and the state overflows (DESIGN.md)
            raise ValueError(f"qk_norm must be 'l2' (the delta rule needs unit keys to stay stable); got {qk_norm!r}")
        _check_int(conv_size, "conv_size")
        _check_int(chunk_size, "chunk_size")
        n = self._num_householder
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.head_v_dim = int(head_v_dim)
        self.key_dim = num_heads * head_dim
        self.value_dim = num_heads * self.head_v_dim
        self.mode = mode
        self.use_beta = use_beta
        self.use_short_conv = use_short_conv
        self.conv_size = conv_size
        self.allow_neg_eigval = allow_neg_eigval
        self.use_gate = use_gate
        self.use_forget_gate = use_forget_gate
        self.qk_norm = qk_norm
        self.chunk_size = chunk_size
        self.layer_idx = layer_idx

        kw = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False, **kw)
        # n keys, values and betas per token, step-major: (T, n, H, .) flattens to the op's T*n steps
        self.k_proj = nn.Linear(hidden_size, n * self.key_dim, bias=False, **kw)
        self.v_proj = nn.Linear(hidden_size, n * self.value_dim, bias=False, **kw)
        if use_beta:
            self.b_proj = nn.Linear(hidden_size, n * num_heads, bias=False, **kw)
        if use_forget_gate:
            # Mamba-2's parametrisation: g = -exp(A_log) * softplus(a + dt_bias) < 0
            self.a_proj = nn.Linear(hidden_size, num_heads, bias=False, **kw)
            A = torch.empty(num_heads, device=device, dtype=torch.float32).uniform_(1, 16)
            self.A_log = nn.Parameter(torch.log(A))
            dt = torch.exp(torch.rand(num_heads, device=device) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            dt = dt.clamp_min(1e-4)
            self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            self.A_log._no_weight_decay = True
            self.dt_bias._no_weight_decay = True
        if use_short_conv:
            self.q_conv1d = ShortConvolution(self.key_dim, conv_size, conv_bias, "silu", **kw)
            self.k_conv1d = ShortConvolution(n * self.key_dim, conv_size, conv_bias, "silu", **kw)
            self.v_conv1d = ShortConvolution(n * self.value_dim, conv_size, conv_bias, "silu", **kw)
        if use_gate:
            self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False, **kw)
            self.o_norm = GatedRMSNorm(self.head_v_dim, norm_eps, **kw)
        else:
            self.o_norm = RMSNorm(self.head_v_dim, norm_eps, **kw)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False, **kw)

    def _op(self, q, k, v, beta, g, initial_state, recurrent: bool, use_cache: bool):
        """Run the core op; returns (o (B, T, H, V), final state or None)."""
        n = self._num_householder
        # check_finite=False: keys are unit vectors and beta * ||k||^2 <= 2 by construction,
        # so each step is non-expansive; the per-call finiteness checks would synchronise
        # the device on every layer (the training loop stops on a non-finite loss instead).
        common = dict(g=g, initial_state=initial_state, output_final_state=use_cache, check_finite=False)
        if recurrent:
            return householder.delta_rule_recurrent(q, k, v, beta, num_householder=n, **common)
        if n == 1:
            return householder.delta_rule(q, k, v, beta, chunk_size=self.chunk_size, **common)
        return householder.delta_product(q, k, v, beta, num_householder=n, chunk_size=self.chunk_size, **common)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, Cache | None]:
        """hidden_states (B, T, hidden_size); attention_mask (B, T) or (B, T_past + T), 1 = token, 0 = padding.

        Returns (output (B, T, hidden_size), cache). With ``use_cache`` the cache
        (created if None) receives this layer's state (B, H, K, V) and the
        tails of its short convolutions; padding is an identity step (beta = 0,
        g = 0), so left-padded rows give the outputs of the unpadded ones.
        """
        B, T, _ = hidden_states.shape
        n, H = self._num_householder, self.num_heads
        idx = 0 if self.layer_idx is None else self.layer_idx
        mask = token_mask(attention_mask, B, T)
        state = cache[idx] if cache is not None else None
        x = hidden_states if mask is None else hidden_states * mask[..., None].to(hidden_states.dtype)

        q, k, v, conv_state = project_qkv(self, x, state)
        q = l2_normalize(q.reshape(B, T, H, self.head_dim))
        k = l2_normalize(k.reshape(B, T * n, H, self.head_dim))
        v = v.reshape(B, T * n, H, self.head_v_dim)

        if self.use_beta:
            beta = torch.sigmoid(upcast(self.b_proj(x)))
        else:
            beta = torch.ones(B, T, n * H, device=x.device, dtype=upcast(x).dtype)
        if self.allow_neg_eigval:
            beta = 2 * beta  # beta in [0, 2]: eigenvalue 1 - beta reaches -1 (reflections)
        g = None
        if self.use_forget_gate:
            a = upcast(self.a_proj(x))
            g = -self.A_log.to(a.dtype).exp() * F.softplus(a + self.dt_bias.to(a.dtype))
        if mask is not None:
            keep = mask[..., None].to(beta.dtype)
            beta = beta * keep  # padding: identity step
            g = None if g is None else g * keep  # and no decay
        beta = beta.view(B, T * n, H)

        recurrent = self.mode == "fused_recurrent" or (not self.training and T <= RECURRENT_MAX_TOKENS)
        S0 = state["recurrent_state"] if state else None
        o, S = self._op(q, k, v, beta, g, S0, recurrent, use_cache)

        if self.use_gate:
            o = self.o_norm(o, self.g_proj(x).reshape(B, T, H, self.head_v_dim))
        else:
            o = self.o_norm(o)
        o = self.o_proj(o.reshape(B, T, self.value_dim))

        if use_cache:
            cache = Cache.store(cache, idx, {"recurrent_state": S, "conv_state": conv_state})
        return o, cache

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
            f"head_v_dim={self.head_v_dim}, num_householder={self._num_householder}, mode={self.mode!r}, "
            f"allow_neg_eigval={self.allow_neg_eigval}, use_gate={self.use_gate}, "
            f"use_forget_gate={self.use_forget_gate}, use_short_conv={self.use_short_conv}"
        )


class DeltaNet(_DeltaMixer):
    """DeltaNet token mixer (Yang et al. 2024); Gated DeltaNet with ``use_forget_gate=True``.

    hidden_states (B, T, hidden_size) -> (B, T, hidden_size), any float dtype
    (the recurrence accumulates in float32). Arguments follow
    flash-linear-attention's ``DeltaNet``: ``head_dim`` defaults to
    hidden_size // num_heads, ``expand_v`` scales the value head size,
    ``use_gate`` adds the SiLU output gate, ``allow_neg_eigval`` maps beta to
    [0, 2], ``mode`` is "chunk" (training) or "fused_recurrent".
    """

    @property
    def num_householder(self) -> int:
        """Householder factors (delta steps) per token: 1 for DeltaNet."""
        return 1
