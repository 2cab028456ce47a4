"""Softmax attention through torch's scaled_dot_product_attention: global or sliding-window.

The baseline the recurrent mixers are compared with, and the attention layers
of hybrid models. Same forward contract as the recurrent mixers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from householder.layers.cache import Cache
from householder.layers.modules import resolve_head_dim, rotary, rotary_tables, token_mask

# time dimension of each cached buffer: k, v (B, Hkv, capacity, D); key_mask (B, capacity)
_TIME_DIM = {"k": 2, "v": 2, "key_mask": 1}


def _moved(x: torch.Tensor, dim: int, offset: int, length: int, capacity: int) -> torch.Tensor:
    """A new buffer of ``capacity`` along ``dim`` holding x's entries [offset, offset + length) at its front."""
    shape = list(x.shape)
    shape[dim] = capacity
    out = x.new_empty(shape)  # entries past ``length`` are written before they are read
    out.narrow(dim, 0, length).copy_(x.narrow(dim, offset, length))
    return out


def _extend(state: dict | None, new: dict[str, torch.Tensor | None]) -> tuple[dict, int, int]:
    """The cached k, v and key_mask with ``new``'s appended: (buffers, offset, length).

    Each buffer holds its valid entries at [offset, offset + length) along its
    time dimension; key_mask is None while no padding was seen. Without autograd
    the buffers are written in place and moved to a buffer with twice the room
    only when full, so a decoded token costs a copy of itself, not of the cache.
    With autograd they are concatenated (in-place writes would break backward),
    and a buffer made then is always full, so it is never written in place later.
    """
    T = new["k"].shape[2]
    if not state:
        return dict(new), 0, T
    offset, length = state["offset"], state["length"]
    old = {name: state[name] for name in _TIME_DIM}
    if new["key_mask"] is not None and old["key_mask"] is None:
        # the first padding this cache sees: every cached key before it is a token
        B, capacity = old["k"].shape[0], old["k"].shape[2]
        old["key_mask"] = torch.ones(B, capacity, dtype=torch.bool, device=old["k"].device)
    names = [n for n in _TIME_DIM if new[n] is not None]
    if torch.is_grad_enabled():
        out = {n: None for n in _TIME_DIM}
        for n in names:
            d = _TIME_DIM[n]
            out[n] = torch.cat([old[n].narrow(d, offset, length), new[n]], dim=d)
        return out, 0, length + T
    if offset + length + T > old["k"].shape[2]:
        room = max(length + T, 2 * length)
        old = {n: None if old[n] is None else _moved(old[n], _TIME_DIM[n], offset, length, room) for n in _TIME_DIM}
        offset = 0
    for n in names:
        old[n].narrow(_TIME_DIM[n], offset + length, T).copy_(new[n])
    return old, offset, length + T


def _keep_last(buffers: dict, offset: int, length: int, keep: int) -> tuple[dict, int, int]:
    """Drop all but the last ``keep`` valid entries (the sliding window's cache); returns (buffers, offset, length).

    Dropping moves the offset; the buffers are copied only when most of their
    room would be dead (after a long prompt), not at every decoded token.
    """
    if length <= keep:
        return buffers, offset, length
    offset, length = offset + length - keep, keep
    if buffers["k"].shape[2] > 2 * keep:
        room = keep if torch.is_grad_enabled() else 2 * keep  # full under autograd: see _extend
        buffers = {n: None if x is None else _moved(x, _TIME_DIM[n], offset, length, room) for n, x in buffers.items()}
        offset = 0
    return buffers, offset, length


def _sdpa_continuing(q, k, v, attn_mask, gqa: dict) -> torch.Tensor:
    """SDPA for a call that continues a cache, whose key length is new at every call.

    On H100-class GPUs with a recent cuDNN, torch tries cuDNN's attention first,
    and cuDNN builds (and keeps) an execution plan for every new problem shape:
    tens of milliseconds per decoded token, for a kernel that runs in
    microseconds. Flash and memory-efficient attention take any key length, so
    cuDNN is switched off for the duration of this call only.
    """
    if q.device.type != "cuda" or not torch.backends.cuda.cudnn_sdp_enabled():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **gqa)
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **gqa)
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)


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

        cos, sin = rotary_tables(positions, D, self.rope_theta)
        q = rotary(self.q_proj(hidden_states).view(B, T, H, D), cos, sin).transpose(1, 2)
        k = rotary(self.k_proj(hidden_states).view(B, T, Hkv, D), cos, sin).transpose(1, 2)
        v = self.v_proj(hidden_states).view(B, T, Hkv, D).transpose(1, 2)
        # a Python flag, not key_mask.all(): no device synchronisation per call
        padded = mask is not None or bool(state and state["padded"])
        if mask is None and padded:
            mask = torch.ones(B, T, dtype=torch.bool, device=dev)

        buffers, offset, length = _extend(state, {"k": k, "v": v, "key_mask": mask})
        keys, values = buffers["k"].narrow(2, offset, length), buffers["v"].narrow(2, offset, length)
        key_mask = None if buffers["key_mask"] is None else buffers["key_mask"].narrow(1, offset, length)
        start = state["start"] if state else 0  # absolute column of the first cached key

        attn_mask = self._mask(key_mask, start, seen, T, length, dev)
        gqa = {"enable_gqa": True} if Hkv != H else {}
        if state:
            o = _sdpa_continuing(q, keys, values, attn_mask, gqa)
        elif attn_mask is None and T > 1:
            o = F.scaled_dot_product_attention(q, keys, values, is_causal=True, **gqa)
        else:
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=attn_mask, **gqa)
        o = self.o_proj(o.transpose(1, 2).reshape(B, T, H * D))

        if use_cache:
            if self.window_size is not None:
                # the next query sees only the last window_size - 1 keys
                before = length
                buffers, offset, length = _keep_last(buffers, offset, length, self.window_size - 1)
                start += before - length
            cache = Cache.store(cache, idx, {
                **buffers,
                "offset": offset,
                "length": length,
                "start": start,
                "seen": seen + T,
                "positions": past_pos + (T if mask is None else mask.long().sum(1)),
                "padded": padded,
            })
        return o, cache

    def _mask(self, key_mask, start: int, seen: int, T: int, L: int, dev) -> torch.Tensor | None:
        """Boolean (B or 1, 1, T, L) mask of the keys each query may see, or None when every key is
        visible (T = 1 without padding) or the call is plain causal attention (no cache, window or padding).

        key_mask (B, L) marks the keys that are tokens, None when all are.
        """
        if T == 1:
            # one query sees the whole cache, which holds only the keys of its window
            if key_mask is None:
                return None
            allowed = key_mask.clone()
            allowed[:, -1] = True  # a padding query sees itself, so no row is empty (an empty row gives NaN)
            return allowed[:, None, None, :]
        if key_mask is None and self.window_size is None and seen == 0:
            return None
        qi = seen + torch.arange(T, device=dev)[:, None]  # absolute columns
        kj = start + torch.arange(L, device=dev)[None, :]
        allowed = kj <= qi
        if self.window_size is not None:
            allowed = allowed & (kj > qi - self.window_size)
        allowed = allowed[None] if key_mask is None else allowed[None] & key_mask[:, None, :]
        # a padding query sees itself, so no row is empty (an empty row gives NaN)
        allowed = allowed | (kj == qi)[None]
        return allowed[:, None]

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, window_size={self.window_size}"
