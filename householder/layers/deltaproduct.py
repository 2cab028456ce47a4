"""DeltaProduct (and Gated DeltaProduct) token mixer over the core's delta-product op.

Each token takes ``num_householder`` delta steps, each with its own key, value
and beta, so its state transition is a product of that many generalized
Householder factors (Siems et al. 2025, "DeltaProduct"):

    S <- exp(g_t) S;   for j = 1..n: S <- (I - beta_tj k_tj k_tj^T) S + beta_tj k_tj v_tj^T;   o_t = S^T q_t / sqrt(K)

The recurrence is :func:`householder.delta_product`; this module builds its
inputs exactly as :class:`~householder.layers.DeltaNet` does, with n keys,
values and betas per token.
"""

from __future__ import annotations

from householder.layers.deltanet import _check_int, _DeltaMixer


class DeltaProduct(_DeltaMixer):
    """DeltaProduct token mixer; Gated DeltaProduct with ``use_forget_gate=True``.

    hidden_states (B, T, hidden_size) -> (B, T, hidden_size). Takes the
    arguments of :class:`~householder.layers.DeltaNet` plus ``num_householder``
    (>= 1); k_proj, v_proj and b_proj produce n keys, values and betas per
    token. With ``num_householder=1`` it has DeltaNet's parameters (same names
    and shapes) and computes the same function.
    """

    def __init__(self, hidden_size: int = 1024, num_heads: int = 4, *args, num_householder: int = 2, **kwargs):
        _check_int(num_householder, "num_householder")
        self._num_householder = num_householder
        super().__init__(hidden_size, num_heads, *args, **kwargs)

    @property
    def num_householder(self) -> int:
        """Householder factors (delta steps) per token."""
        return self._num_householder
