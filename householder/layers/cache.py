"""The decoding cache: one small state per layer, so a new token never re-reads the prompt.

Recurrent mixers (DeltaNet, DeltaProduct and their gated forms) keep their
state matrices (B, H, K, V) and the tails of their short convolutions, O(1) in
the sequence length; attention keeps its keys and values (a sliding window of
them for "swa").
"""

from __future__ import annotations

from typing import Any

import torch


class Cache:
    """Per-layer decoding state of a model, indexed by ``layer_idx``.

    Each entry is a dict owned by the layer that wrote it (for example
    ``{"recurrent_state": (B, H, K, V), "conv_state": {...}}`` for DeltaNet);
    ``seen_tokens`` counts the columns (tokens or padding) consumed so far.
    """

    def __init__(self) -> None:
        self.layers: dict[int, dict[str, Any]] = {}
        self.seen_tokens = 0

    def __getitem__(self, layer_idx: int) -> dict[str, Any] | None:
        return self.layers.get(layer_idx)

    def __setitem__(self, layer_idx: int, state: dict[str, Any]) -> None:
        self.layers[layer_idx] = state

    def __len__(self) -> int:
        return len(self.layers)

    @classmethod
    def store(cls, cache: "Cache | None", layer_idx: int, state: dict[str, Any]) -> "Cache":
        """Put a layer's state into ``cache`` (a new Cache when None) and return the cache."""
        if cache is None:
            cache = cls()
        cache[layer_idx] = state
        return cache

    def __contains__(self, layer_idx: int) -> bool:
        return layer_idx in self.layers

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (1-D LongTensor) of every cached tensor (beam search, pruning)."""

        def pick(x):
            if isinstance(x, torch.Tensor):
                return x.index_select(0, index.to(x.device))
            if isinstance(x, dict):
                return {k: pick(v) for k, v in x.items()}
            return x

        self.layers = {i: pick(s) for i, s in self.layers.items()}

    def nbytes(self) -> int:
        """Bytes held by every cached tensor: what decoding keeps in memory."""

        def count(x):
            if isinstance(x, torch.Tensor):
                return x.numel() * x.element_size()
            if isinstance(x, dict):
                return sum(count(v) for v in x.values())
            return 0

        return sum(count(s) for s in self.layers.values())

    def __repr__(self) -> str:
        return f"Cache(layers={sorted(self.layers)}, seen_tokens={self.seen_tokens}, nbytes={self.nbytes()})"
