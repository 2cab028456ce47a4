"""The model grid of the task suite: names -> LMConfig mixer settings and table labels.

Names (``_neg``: beta in [0, 2], eigenvalues of each factor in [-1, 1];
without it beta in [0, 1], eigenvalues in [0, 1]):

    deltanet, deltanet_neg                     DeltaNet
    deltaproduct<n>, deltaproduct<n>_neg       DeltaProduct with n Householder factors per token
    gated_deltanet[_neg], gated_deltaproduct<n>[_neg]   the gated variants (data-dependent decay)
    transformer                                softmax attention with rotary positions
    diag                                       gated linear attention with diagonal decay (Mamba-like)
"""

from __future__ import annotations

import re
from typing import Any

_DELTA = re.compile(r"^(gated_)?(deltanet|deltaproduct(\d+))(_neg)?$")

# The grid of the papers, in table order.
DEFAULT_MODELS = [
    "deltanet",
    "deltanet_neg",
    "deltaproduct2",
    "deltaproduct2_neg",
    "deltaproduct3",
    "deltaproduct3_neg",
    "gated_deltanet",
    "gated_deltanet_neg",
    "gated_deltaproduct2_neg",
    "transformer",
    "diag",
]


def mixer_settings(name: str) -> dict[str, Any]:
    """The LMConfig fields (mixer, num_householder, allow_neg_eigval) of model ``name``."""
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str; got {type(name).__name__}")
    if name == "transformer":
        return dict(mixer="attention")
    if name == "diag":
        import householder.layers.diag_linear_attention  # noqa: F401  (registers the mixer)

        return dict(mixer="diag_linear_attention")
    m = _DELTA.match(name)
    if m is None or (m.group(3) is not None and int(m.group(3)) < 1):
        raise ValueError(
            f"unknown model {name!r}; expected transformer, diag, or [gated_](deltanet|deltaproduct<n>)[_neg] "
            f"with n >= 1, e.g. one of {DEFAULT_MODELS}"
        )
    gated, base, n, neg = m.groups()
    settings: dict[str, Any] = dict(allow_neg_eigval=neg is not None)
    if base == "deltanet":
        settings["mixer"] = (gated or "") + "deltanet"
    else:
        settings["mixer"] = (gated or "") + "deltaproduct"
        settings["num_householder"] = int(n)
    return settings


def sort_key(name: str) -> tuple:
    """Table order: DeltaNet/DeltaProduct by n_h, [0,1] before [-1,1], gated after ungated; then Transformer, diag."""
    if name in ("transformer", "diag"):
        return (2, 0, 0, 0, name)
    s = mixer_settings(name)
    return (s["mixer"].startswith("gated_"), s.get("num_householder", 1), s["allow_neg_eigval"], 0, name)


def label(name: str) -> str:
    """Human-readable model label for tables, e.g. "DeltaProduct n_h=2 [-1,1]"."""
    if name == "transformer":
        return "Transformer"
    if name == "diag":
        return "Diagonal GLA (Mamba-like)"
    s = mixer_settings(name)
    base = "DeltaNet" if "num_householder" not in s else f"DeltaProduct n_h={s['num_householder']}"
    gated = "Gated " if s["mixer"].startswith("gated_") else ""
    return f"{gated}{base} {'[-1,1]' if s['allow_neg_eigval'] else '[0,1]'}"
