"""The diagonal-decay baseline mixer of the task suite (householder/layers/diag_linear_attention.py)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from householder.layers import LanguageModel, LMConfig  # noqa: E402
from householder.layers.diag_linear_attention import (  # noqa: E402
    DiagLinearAttention,
    diag_linear_attention,
    diag_linear_attention_recurrent,
)


def _inputs(B=2, T=37, H=3, K=8, V=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, K, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=g, dtype=torch.float64)
    # log-decays from strong (-8) to none (0), including exact zeros
    logd = -8 * torch.rand(B, T, H, K, generator=g, dtype=torch.float64)
    logd[:, ::5] = 0
    S0 = torch.randn(B, H, K, V, generator=g, dtype=torch.float64)
    return q, k, v, logd, S0


@pytest.mark.parametrize("chunk_size", [1, 4, 16, 64])
def test_chunked_equals_recurrence(chunk_size):
    q, k, v, g, S0 = _inputs()
    for init in (None, S0):
        o_ref, S_ref = diag_linear_attention_recurrent(q, k, v, g, 0.3, init)
        o, S = diag_linear_attention(q, k, v, g, 0.3, init, chunk_size)
        torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(S, S_ref, rtol=1e-10, atol=1e-10)


def test_recurrence_is_the_formula():
    q, k, v, g, _ = _inputs(B=1, T=3, H=1, K=2, V=1)
    o, _ = diag_linear_attention_recurrent(q, k, v, g, 1.0)
    S = torch.zeros(2, 1, dtype=torch.float64)
    for t in range(3):
        S = torch.diag(g[0, t, 0].exp()) @ S + k[0, t, 0][:, None] * v[0, t, 0][None, :]
        torch.testing.assert_close(o[0, t, 0], S.T @ q[0, t, 0])


def test_chunked_gradients_match():
    q, k, v, g, S0 = _inputs(T=21)
    grads = []
    for fn in (lambda *a: diag_linear_attention(*a, chunk_size=8), diag_linear_attention_recurrent):
        xs = [x.clone().requires_grad_() for x in (q, k, v, g, S0)]
        o, S = fn(xs[0], xs[1], xs[2], xs[3], 0.5, xs[4])
        (o.square().sum() + S.sum()).backward()
        grads.append([x.grad for x in xs])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_lm_with_diag_mixer_decodes_and_pads_like_the_full_forward():
    torch.manual_seed(0)
    config = LMConfig(vocab_size=11, hidden_size=16, num_layers=2, num_heads=2, mixer="diag_linear_attention")
    model = LanguageModel(config, dtype=torch.float64).eval()
    assert isinstance(model.layers[0].mixer, DiagLinearAttention)
    ids = torch.randint(0, 11, (2, 40))
    full = model(ids).logits
    # prefix (chunked path) then one token at a time through the cache
    out = model(ids[:, :23], use_cache=True)
    steps = [out.logits]
    for t in range(23, 40):
        out = model(ids[:, t : t + 1], cache=out.cache, use_cache=True)
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-9, atol=1e-9)
    # a left-padded row gives the logits of the row without padding
    padded = torch.cat([torch.zeros(2, 5, dtype=ids.dtype), ids], 1)
    mask = torch.cat([torch.zeros(2, 5), torch.ones(2, 40)], 1).long()
    torch.testing.assert_close(model(padded, attention_mask=mask).logits[:, 5:], full, rtol=1e-9, atol=1e-9)


def test_bad_sizes():
    with pytest.raises(ValueError, match="hidden_size must be divisible by num_heads when head_dim is None; got hidden_size = 10, num_heads = 4"):
        DiagLinearAttention(10, 4)
