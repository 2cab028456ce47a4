"""The reference language model: embeddings, pre-norm blocks of (mixer, SwiGLU MLP), a head.

The mixer of each layer comes from the config, so hybrids are configs:
``LMConfig(mixer=["deltanet", "swa"])`` alternates DeltaNet and sliding-window
attention; ``LMConfig(mixer="deltanet", attention_layers=[2, 5])`` puts global
attention in two layers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from householder.layers.attention import Attention
from householder.layers.cache import Cache
from householder.layers.deltanet import DeltaNet
from householder.layers.deltaproduct import DeltaProduct
from householder.layers.modules import RMSNorm, SwiGLU, default_intermediate_size, upcast

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def _delta_kwargs(c: "LMConfig", layer_idx: int) -> dict:
    return dict(
        hidden_size=c.hidden_size,
        num_heads=c.num_heads,
        head_dim=c.head_dim,
        expand_v=c.expand_v,
        use_short_conv=c.use_short_conv,
        conv_size=c.conv_size,
        allow_neg_eigval=c.allow_neg_eigval,
        use_gate=c.use_gate,
        norm_eps=c.norm_eps,
        chunk_size=c.chunk_size,
        layer_idx=layer_idx,
    )


def _attention(c: "LMConfig", layer_idx: int, window: int | None, **kw) -> Attention:
    return Attention(
        c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, window, c.rope_theta, layer_idx=layer_idx, **kw
    )


# mixer name -> builder(config, layer_idx, device=..., dtype=...) -> nn.Module with the mixer forward contract
MIXERS: dict[str, Callable[..., nn.Module]] = {
    "deltanet": lambda c, i, **kw: DeltaNet(**_delta_kwargs(c, i), **kw),
    "gated_deltanet": lambda c, i, **kw: DeltaNet(**_delta_kwargs(c, i), use_forget_gate=True, **kw),
    "deltaproduct": lambda c, i, **kw: DeltaProduct(num_householder=c.num_householder, **_delta_kwargs(c, i), **kw),
    "gated_deltaproduct": lambda c, i, **kw: DeltaProduct(
        num_householder=c.num_householder, use_forget_gate=True, **_delta_kwargs(c, i), **kw
    ),
    "attention": lambda c, i, **kw: _attention(c, i, None, **kw),
    "swa": lambda c, i, **kw: _attention(c, i, c.window_size, **kw),
}


def register_mixer(name: str, builder: Callable[..., nn.Module]) -> None:
    """Make ``name`` a mixer of LMConfig: ``builder(config, layer_idx, device=, dtype=)`` returns the module.

    The module must take forward(hidden_states, attention_mask=None, cache=None,
    use_cache=False) and return (output, cache), like DeltaNet.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str; got {name!r}")
    if not callable(builder):
        raise TypeError(f"builder must be callable; got {type(builder).__name__}")
    MIXERS[name] = builder


@dataclasses.dataclass
class LMConfig:
    """Configuration of :class:`LanguageModel`; checked on construction.

    ``mixer`` is one name for every layer, or a list of names: one per layer,
    or a pattern whose length divides ``num_layers`` and is repeated
    (["deltanet", "swa"] alternates). ``attention_layers`` lists layers that use
    global attention whatever ``mixer`` says. Names: see ``MIXERS``.
    """

    vocab_size: int = 256
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    head_dim: int | None = None
    mixer: str | list[str] = "deltanet"
    attention_layers: list[int] = dataclasses.field(default_factory=list)
    num_householder: int = 2
    allow_neg_eigval: bool = False
    use_gate: bool = False
    use_short_conv: bool = True
    conv_size: int = 4
    expand_v: float = 1.0
    chunk_size: int = 64
    num_kv_heads: int | None = None
    window_size: int = 512
    rope_theta: float = 10000.0
    intermediate_size: int | None = None
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "conv_size", "chunk_size", "window_size"):
            _positive(getattr(self, name), name)
        if isinstance(self.num_householder, bool) or not isinstance(self.num_householder, int) or self.num_householder < 1:
            raise ValueError(f"num_householder must be an int >= 1; got {self.num_householder!r}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size must be divisible by num_heads (or give head_dim); got hidden_size = "
                f"{self.hidden_size}, num_heads = {self.num_heads}"
            )
        if self.head_dim is not None:
            _positive(self.head_dim, "head_dim")
        if self.num_kv_heads is not None and (
            isinstance(self.num_kv_heads, bool) or not isinstance(self.num_kv_heads, int)
            or self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads
        ):
            raise ValueError(f"num_kv_heads must be None or a divisor of num_heads = {self.num_heads}; got {self.num_kv_heads!r}")
        if self.intermediate_size is not None:
            _positive(self.intermediate_size, "intermediate_size")
        if isinstance(self.mixer, tuple):
            self.mixer = list(self.mixer)
        self.attention_layers = [int(i) for i in self.attention_layers]
        for i in self.attention_layers:
            if not 0 <= i < self.num_layers:
                raise ValueError(f"attention_layers must hold layer indices in [0, {self.num_layers}); got {i}")
        self.layer_mixers()  # validates the names and the pattern length

    def layer_mixers(self) -> list[str]:
        """The mixer name of every layer, in order."""
        names = [self.mixer] if isinstance(self.mixer, str) else list(self.mixer)
        if not names or self.num_layers % len(names):
            raise ValueError(
                f"mixer must be a name or a list whose length divides num_layers = {self.num_layers}; "
                f"got {len(names)} names"
            )
        for name in names:
            if name not in MIXERS:
                raise ValueError(f"unknown mixer {name!r}; expected one of {sorted(MIXERS)}")
        out = [names[i % len(names)] for i in range(self.num_layers)]
        for i in self.attention_layers:
            out[i] = "attention"
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LMConfig":
        """The config from a dict; unknown keys are an error, not silently dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown LMConfig fields {unknown}; expected a subset of {sorted(known)}")
        return cls(**d)

    def save(self, path: str | os.PathLike) -> None:
        """Write the config as JSON to ``path``."""
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LMConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))


def _positive(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1; got {value!r}")


class LMOutput(NamedTuple):
    """logits (B, T, vocab_size), float32 (float64 for a float64 model); loss (scalar) when labels were given; the cache when use_cache."""

    logits: torch.Tensor
    loss: torch.Tensor | None
    cache: Cache | None


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LMConfig, layer_idx: int, *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.mixer_name = config.layer_mixers()[layer_idx]
        self.mixer_norm = RMSNorm(config.hidden_size, config.norm_eps, **kw)
        self.mixer = MIXERS[self.mixer_name](config, layer_idx, **kw)
        self.mlp_norm = RMSNorm(config.hidden_size, config.norm_eps, **kw)
        inter = config.intermediate_size or default_intermediate_size(config.hidden_size)
        self.mlp = SwiGLU(config.hidden_size, inter, **kw)

    def forward(self, x, attention_mask=None, cache=None, use_cache=False):
        h, cache = self.mixer(self.mixer_norm(x), attention_mask=attention_mask, cache=cache, use_cache=use_cache)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), cache


class LanguageModel(nn.Module):
    """Decoder-only LM with a configurable mixer per layer.

    input_ids (B, T) int64 -> logits (B, T, vocab_size) float32 (float64 for a float64 model). Build it from
    an :class:`LMConfig`; ``generate`` decodes with the cache,
    ``save_pretrained``/``from_pretrained`` use safetensors plus a JSON config.
    """

    def __init__(self, config: LMConfig, *, device=None, dtype=None):
        super().__init__()
        if not isinstance(config, LMConfig):
            raise TypeError(f"config must be an LMConfig; got {type(config).__name__}")
        self.config = config
        kw = dict(device=device, dtype=dtype)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, **kw)
        self.layers = nn.ModuleList(Block(config, i, **kw) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps, **kw)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, **kw)
        self._init_weights()
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embeddings.weight

    def _init_weights(self) -> None:
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        # residual branches' last projections scaled down by depth (GPT-2), so the stream's variance stays O(1)
        for block in self.layers:
            for name, p in block.named_parameters():
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * self.config.num_layers))

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameters (tied weights counted once)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embeddings.weight.numel()
        return n

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool = False,
        labels: torch.Tensor | None = None,
    ) -> LMOutput:
        """input_ids (B, T) int64; attention_mask (B, T) or (B, T_past + T), 1 = token, 0 = padding.

        labels (B, T) int64: the target of each position (not shifted; -100 is
        ignored) gives the mean cross-entropy as ``loss``.
        """
        if input_ids.ndim != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be a (B, T) integer tensor; got shape {tuple(input_ids.shape)}, dtype {input_ids.dtype}")
        if use_cache and cache is None:
            cache = Cache()
        x = self.embeddings(input_ids)
        for block in self.layers:
            x, _ = block(x, attention_mask=attention_mask, cache=cache, use_cache=use_cache)
        logits = upcast(self.lm_head(self.norm(x)))
        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}; got {tuple(labels.shape)}")
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        if use_cache:
            cache.seen_tokens += input_ids.shape[1]
        return LMOutput(logits, loss, cache if use_cache else None)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        *,
        attention_mask: torch.Tensor | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue ``input_ids`` (B, T) by ``max_new_tokens``; returns (B, T + max_new_tokens) int64.

        temperature 0 is greedy decoding; otherwise tokens are sampled from
        softmax(logits / temperature), restricted to the ``top_k`` most likely
        when given. Prompts of different lengths are left padded and marked by
        ``attention_mask``. The prompt is read once; each new token costs one
        step of every layer's cache.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0; got {max_new_tokens!r}")
        if not (isinstance(temperature, (int, float)) and temperature >= 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a finite float >= 0 (0 = greedy); got {temperature!r}")
        if top_k is not None:
            _positive(top_k, "top_k")
        was_training = self.training
        self.eval()
        try:
            out = self(input_ids, attention_mask=attention_mask, use_cache=True)
            tokens = [input_ids]
            for i in range(max_new_tokens):
                nxt = _pick(out.logits[:, -1], temperature, top_k, generator)
                tokens.append(nxt[:, None])
                if i + 1 < max_new_tokens:
                    out = self(nxt[:, None], cache=out.cache, use_cache=True)
        finally:
            self.train(was_training)
        return torch.cat(tokens, dim=1)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created if needed)."""
        from safetensors.torch import save_model

        os.makedirs(directory, exist_ok=True)
        self.config.save(os.path.join(directory, CONFIG_NAME))
        save_model(self, os.path.join(directory, WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, device=None, dtype=None) -> "LanguageModel":
        """The model saved by :meth:`save_pretrained` in ``directory``."""
        from safetensors.torch import load_model

        config = LMConfig.load(os.path.join(directory, CONFIG_NAME))
        model = cls(config, device=device, dtype=dtype)
        load_model(model, os.path.join(directory, WEIGHTS_NAME), device=str(device or "cpu"))
        return model


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    """Next token (B,) from logits (B, V): argmax, or a sample at ``temperature`` among the top_k."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
