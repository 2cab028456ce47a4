"""Building blocks shared by the mixers and the LM: norms, short convolution, SwiGLU, RoPE, masks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def upcast(x: torch.Tensor) -> torch.Tensor:
    """x in float32 if it is a half type (bfloat16, float16), else unchanged (float32, float64)."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension, computed in float32.

    x (..., hidden_size) -> (..., hidden_size), same dtype as x.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, *, device=None, dtype=None):
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 statistics: bf16 sums of squares lose the small entries
        y = upcast(x)
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(y.dtype)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"


class GatedRMSNorm(RMSNorm):
    """RMSNorm(x) * SiLU(gate): the output gate of DeltaNet-style mixers.

    x, gate (..., hidden_size) -> (..., hidden_size).
    """

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return (upcast(super().forward(x)) * F.silu(upcast(gate))).to(x.dtype)


class ShortConvolution(nn.Module):
    """Causal depthwise 1-D convolution over time, optionally followed by SiLU.

    x (B, T, channels) -> (B, T, channels). With a cached tail (B, kernel_size - 1,
    channels) of the previous inputs, the output continues the earlier call
    exactly, so decoding costs O(kernel_size) per token.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 4,
        bias: bool = False,
        activation: str | None = "silu",
        *,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if activation not in (None, "silu"):
            raise ValueError(f"activation must be None or 'silu'; got {activation!r}")
        self.channels = channels
        self.kernel_size = kernel_size
        self.activation = activation
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(channels, device=device, dtype=dtype)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor, tail: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (y, new_tail); y (B, T, channels), new_tail (B, kernel_size - 1, channels)."""
        B, T, C = x.shape
        w = self.kernel_size - 1
        if tail is None:
            tail = x.new_zeros(B, w, C)
        xx = torch.cat([tail.to(x.dtype), x], dim=1)  # (B, w + T, C)
        weight = self.weight.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = F.conv1d(xx.transpose(1, 2), weight, bias, groups=C).transpose(1, 2)
        if self.activation == "silu":
            y = F.silu(y)
        return y, xx[:, xx.shape[1] - w :].detach() if w else xx[:, :0]

    def extra_repr(self) -> str:
        return f"{self.channels}, kernel_size={self.kernel_size}, activation={self.activation}"


class SwiGLU(nn.Module):
    """The gated MLP of LLaMA: down(SiLU(gate(x)) * up(x)).

    x (..., hidden_size) -> (..., hidden_size).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, *, device=None, dtype=None):
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def default_intermediate_size(hidden_size: int, multiple_of: int = 64) -> int:
    """8/3 of hidden_size rounded up to a multiple: SwiGLU's parameter count matches a 4x MLP."""
    n = int(8 * hidden_size / 3)
    return multiple_of * -(-n // multiple_of)


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / ||x|| over the last dimension (half types in float32); zero rows stay zero."""
    y = upcast(x)
    return (y * torch.rsqrt(y.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


def rotary_tables(positions: torch.Tensor, dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles at positions (B, T): each (B, T, 1, dim // 2) float32.

    Computed once per call and shared by queries and keys, for the new tokens only.
    """
    half = dim // 2
    inv_freq = theta ** (-torch.arange(half, device=positions.device, dtype=torch.float32) / half)
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (B, T, half)
    return angles.cos()[:, :, None], angles.sin()[:, :, None]


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (half-split layout) of x (B, T, H, D) with tables from :func:`rotary_tables`."""
    half = cos.shape[-1]
    y = upcast(x)
    cos, sin = cos.to(y.dtype), sin.to(y.dtype)
    x1, x2 = y[..., :half], y[..., half : 2 * half]
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, y[..., 2 * half :]], dim=-1)
    return out.to(x.dtype)


def token_mask(attention_mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
    """The (B, T) boolean mask of the current tokens, from a (B, T) or (B, T_past + T) mask.

    ``attention_mask`` holds 1 (or True) for tokens and 0 for padding; only the last
    ``length`` columns are read (earlier padding lives in the cache). Returns None
    when every token is real, so callers can take the unmasked fast path.
    """
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.ndim != 2:
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask must be a (B, T) tensor of 0/1 with B = {batch}; got {got}")
    if attention_mask.shape[0] != batch or attention_mask.shape[1] < length:
        raise ValueError(
            f"attention_mask must have shape (B, T) = ({batch}, {length}) or (B, T_past + T) covering the "
            f"current tokens; got shape {tuple(attention_mask.shape)}"
        )
    mask = attention_mask[:, attention_mask.shape[1] - length :].bool()
    return None if bool(mask.all()) else mask


def project_qkv(layer: nn.Module, x: torch.Tensor, state: dict | None) -> tuple:
    """q, k, v projections of x (B, T, hidden) through ``layer``'s q/k/v_proj, then
    its short convolutions with SiLU (``layer.use_short_conv``) or SiLU alone.

    Returns (q, k, v, conv_state): the convolution tails to cache, {} without them.
    """
    q, k, v = layer.q_proj(x), layer.k_proj(x), layer.v_proj(x)
    conv_state: dict = {}
    if not layer.use_short_conv:
        return torch.nn.functional.silu(q), torch.nn.functional.silu(k), torch.nn.functional.silu(v), conv_state
    past = state["conv_state"] if state else {}
    q, conv_state["q"] = layer.q_conv1d(q, past.get("q"))
    k, conv_state["k"] = layer.k_conv1d(k, past.get("k"))
    v, conv_state["v"] = layer.v_conv1d(v, past.get("v"))
    return q, k, v, conv_state


def resolve_head_dim(hidden_size: int, num_heads: int, head_dim: int | None) -> int:
    """``head_dim``, or hidden_size // num_heads when it is None (which must divide evenly)."""
    if head_dim is not None:
        return head_dim
    if hidden_size % num_heads:
        raise ValueError(
            f"hidden_size must be divisible by num_heads when head_dim is None; got hidden_size = "
            f"{hidden_size}, num_heads = {num_heads}"
        )
    return hidden_size // num_heads
