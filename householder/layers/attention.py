"""Softmax attention through torch's scaled_dot_product_attention: global or sliding-window.

The baseline the recurrent mixers are compared with, and the attention layers
of hybrid models. Same forward contract as the recurrent mixers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from householder.layers.cache import Cache
from householder.layers.modules import resolve_head_dim, rotary, token_mask


def _append(buffer: torch.Tensor | None, length: int, new: torch.Tensor, dim: int) -> tuple[torch.Tensor, int]:
    """Append ``new`` after the first ``length`` entries of ``buffer`` along ``dim``.

    Without autograd the buffer grows by doubling and is written in place, so a
    decoded token costs one copy of itself, not of the whole cache. Returns the
    buffer and the new length; the valid part is ``buffer.narrow(dim, 0, length)``.
    """
    if buffer is None:
        return new, new.shape[dim]
    total = length + new.shape[dim]
    if torch.is_grad_enabled():  # in-place writes would break backward through the cache
        return torch.cat([buffer.narrow(dim, 0, length), new], dim=dim), total
    if total > buffer.shape[dim]:
        shape = list(buffer.shape)
        shape[dim] = max(total, 2 * buffer.shape[dim])
        grown = buffer.new_zeros(shape)
        grown.narrow(dim, 0, length).copy_(buffer.narrow(dim, 0, length))
        buffer = grown
    buffer.narrow(dim, length, new.shape[dim]).copy_(new)
    return buffer, total


class Attention(nn.Module):
    """Multi-head causal softmax attention with rotary positions; ``window_size`` makes it local.

    hidden_states (B, T, hidden_size) -> (B, T, hidden_size). ``window_size = w``
    lets each token see itself and the w - 1 tokens before it, and the cache
    then keeps only those w - 1 keys; None is global attention with a growing
    key/value cache. ``num_kv_heads < num_heads`` is grouped-query attention.
    """

    def __init__(
        self,
        hidden_size: int = 1024,
        num_heads: int = 8,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        window_size: int | None = None,
        rope_theta: float = 10000.0,
        qkv_bias: bool = False,
        layer_idx: int | None = None,
        *,
        device=None,
        dtype=None,
    ):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        head_dim = resolve_head_dim(hidden_size, num_heads, head_dim)
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads must divide num_heads = {num_heads}; got num_kv_heads = {num_kv_heads}")
        if window_size is not None and (isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1):
            raise ValueError(f"window_size must be a positive int or None (global attention); got {window_size!r}")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.window_size = window_size
        self.rope_theta = rope_theta
        self.layer_idx = layer_idx
        kw = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=qkv_bias, **kw)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias, **kw)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias, **kw)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False, **kw)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, Cache | None]:
        """hidden_states (B, T, hidden_size); attention_mask (B, T) or (B, T_past + T), 1 = token, 0 = padding.

        Returns (output (B, T, hidden_size), cache); the cache is updated in
        place (or created) when ``use_cache``.
        """
        B, T, _ = hidden_states.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        idx = 0 if self.layer_idx is None else self.layer_idx
        mask = token_mask(attention_mask, B, T)
        state = cache[idx] if cache is not None else None
        dev = hidden_states.device

        seen = state["seen"] if state else 0  # columns (tokens and padding) before this call
        past_pos = state["positions"] if state else torch.zeros(B, dtype=torch.long, device=dev)
        if mask is None:
            positions = past_pos[:, None] + torch.arange(T, device=dev)
        else:
            # positions count real tokens only, so a left-padded row matches its unpadded self
            positions = past_pos[:, None] + (mask.long().cumsum(1) - 1).clamp_min(0)

        q = rotary(self.q_proj(hidden_states).view(B, T, H, D), positions, self.rope_theta).transpose(1, 2)
        k = rotary(self.k_proj(hidden_states).view(B, T, Hkv, D), positions, self.rope_theta).transpose(1, 2)
        v = self.v_proj(hidden_states).view(B, T, Hkv, D).transpose(1, 2)
        new_keep = torch.ones(B, T, dtype=torch.bool, device=dev) if mask is None else mask

        if state:
            kbuf, length = _append(state["k"], state["length"], k, 2)
            vbuf, _ = _append(state["v"], state["length"], v, 2)
            mbuf, _ = _append(state["key_mask"], state["length"], new_keep, 1)
            start = state["start"]
            keys, values, key_mask = kbuf[:, :, :length], vbuf[:, :, :length], mbuf[:, :length]
        else:
            kbuf, vbuf, mbuf, length, start = k, v, new_keep, T, 0
            keys, values, key_mask = k, v, new_keep

        # a Python flag, not key_mask.all(): no device synchronisation per call
        padded = mask is not None or bool(state and state["padded"])
        attn_mask = self._mask(key_mask, start, seen, T, dev, padded)
        gqa = {"enable_gqa": True} if Hkv != H else {}
        if attn_mask is None and not state and T > 1:
            o = F.scaled_dot_product_attention(q, keys, values, is_causal=True, **gqa)
        else:
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=attn_mask, **gqa)
        o = self.o_proj(o.transpose(1, 2).reshape(B, T, H * D))

        if use_cache:
            if cache is None:
                cache = Cache()
            if self.window_size is not None and length > self.window_size - 1:
                # the next query sees only the last window_size - 1 keys
                drop = length - (self.window_size - 1)
                kbuf, vbuf, mbuf = (x.narrow(d, drop, length - drop).clone() for x, d in ((kbuf, 2), (vbuf, 2), (mbuf, 1)))
                start, length = start + drop, length - drop
            cache[idx] = {
                "k": kbuf,
                "v": vbuf,
                "key_mask": mbuf,
                "length": length,
                "start": start,
                "seen": seen + T,
                "positions": past_pos + new_keep.long().sum(1),
                "padded": padded,
            }
        return o, cache

    def _mask(self, key_mask, start: int, seen: int, T: int, dev, padded: bool) -> torch.Tensor | None:
        """Boolean (B, 1, T, L) mask of the keys each query may see, or None for plain causal attention."""
        L = key_mask.shape[1]
        if not padded and self.window_size is None and (seen == 0 or T == 1):
            return None  # plain causal (no cache) or one new token seeing every cached key
        qi = seen + torch.arange(T, device=dev)[:, None]  # absolute columns
        kj = start + torch.arange(L, device=dev)[None, :]
        allowed = kj <= qi
        if self.window_size is not None:
            allowed = allowed & (kj > qi - self.window_size)
        allowed = allowed[None] & key_mask[:, None, :]
        # a padding query sees itself, so no row is empty (an empty row gives NaN)
        allowed = allowed | (kj == qi)[None]
        return allowed[:, None]

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, window_size={self.window_size}"
