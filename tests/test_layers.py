"""Mixers and the LM: chunk == recurrent, cached decoding == full forward (with left padding),
gradients, DeltaProduct(1) == DeltaNet, save/load, generation, bad configs.

Models are tiny and float64, so exact identities hold to ~1e-12 and each test
takes well under a second on a shared CPU.
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")

from householder.layers import (  # noqa: E402
    Attention,
    Cache,
    DeltaNet,
    DeltaProduct,
    LanguageModel,
    LMConfig,
    register_mixer,
)
from householder.layers.lm import MIXERS  # noqa: E402

import householder  # noqa: E402

BUILTIN_MIXERS = ["deltanet", "gated_deltanet", "deltaproduct", "gated_deltaproduct", "attention", "swa"]
TOL = 1e-10  # float64 end to end


@pytest.fixture(autouse=True)
def torch_backend():
    # the float64 identities below run on the torch backend everywhere (Triton takes
    # float32/bf16 only); test_triton_backend_matches_torch covers the Triton path
    with householder.use_backend("torch"):
        yield


@pytest.fixture
def seed(request) -> int:
    # fresh weights and tokens every run; the seed is printed for a failing run
    s = int.from_bytes(os.urandom(4), "little")
    print(f"torch seed {s}")
    torch.manual_seed(s)
    return s


def tiny_config(mixer, **kw) -> LMConfig:
    base = dict(vocab_size=37, hidden_size=32, num_layers=2, num_heads=2, chunk_size=8, window_size=5, num_householder=2)
    base.update(kw)
    return LMConfig(mixer=mixer, **base)


def tiny_model(mixer, **kw) -> LanguageModel:
    model = LanguageModel(tiny_config(mixer, **kw), dtype=torch.float64)
    _perturb(model)
    return model.eval()


def _perturb(module: torch.nn.Module) -> None:
    # norm weights start at one and convolutions near zero: move every parameter off its
    # initial value so that no term of the computation is trivially neutral
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))


def delta_layer(cls, **kw):
    base = dict(hidden_size=24, num_heads=2, chunk_size=8, layer_idx=0, dtype=torch.float64)
    base.update(kw)
    layer = cls(**base)
    _perturb(layer)
    return layer


DELTA_VARIANTS = [
    (DeltaNet, {}),
    (DeltaNet, {"use_forget_gate": True, "use_gate": True}),
    (DeltaNet, {"allow_neg_eigval": True, "use_short_conv": False}),
    (DeltaProduct, {"num_householder": 2}),
    (DeltaProduct, {"num_householder": 3, "use_forget_gate": True, "allow_neg_eigval": True, "expand_v": 2.0}),
]
VARIANT_IDS = ["deltanet", "gated+outgate", "negeig-noconv", "product2", "gated-product3"]


# -- mixers --------------------------------------------------------------------


@pytest.mark.parametrize("cls,kw", DELTA_VARIANTS, ids=VARIANT_IDS)
def test_chunk_mode_equals_recurrent_mode(seed, cls, kw):
    chunk = delta_layer(cls, mode="chunk", **kw).train()  # training mode always takes the chunked op
    recurrent = delta_layer(cls, mode="fused_recurrent", **kw)
    recurrent.load_state_dict(chunk.state_dict())
    x = torch.randn(2, 29, 24, dtype=torch.float64)
    o1, c1 = chunk(x, use_cache=True)
    o2, c2 = recurrent(x, use_cache=True)
    assert o1.shape == x.shape
    torch.testing.assert_close(o1, o2, atol=TOL, rtol=0)
    torch.testing.assert_close(c1[0]["recurrent_state"], c2[0]["recurrent_state"], atol=TOL, rtol=0)


@pytest.mark.parametrize("kw", [{}, {"use_forget_gate": True, "use_gate": True, "allow_neg_eigval": True}], ids=["plain", "gated"])
def test_deltaproduct_with_one_householder_equals_deltanet(seed, kw):
    net = delta_layer(DeltaNet, **kw).train()
    prod = delta_layer(DeltaProduct, num_householder=1, **kw).train()
    prod.load_state_dict(net.state_dict(), strict=True)  # same parameter names and shapes
    x = torch.randn(2, 21, 24, dtype=torch.float64)
    o1, c1 = net(x, use_cache=True)
    o2, c2 = prod(x, use_cache=True)
    torch.testing.assert_close(o1, o2, atol=TOL, rtol=0)
    torch.testing.assert_close(c1[0]["recurrent_state"], c2[0]["recurrent_state"], atol=TOL, rtol=0)


def test_deltaproduct_steps_are_distinct_householder_factors(seed):
    # two steps per token must differ from one: the second key/value/beta are used
    prod = delta_layer(DeltaProduct, num_householder=2).train()
    x = torch.randn(1, 12, 24, dtype=torch.float64)
    o2, _ = prod(x)
    with torch.no_grad():
        w = prod.b_proj.weight.view(2, 2, 24)
        w[1] = -1e4  # beta of every second step ~ 0: those steps become identities
    o_fewer, _ = prod(x)
    assert (o2 - o_fewer).abs().max() > 1e-3


def test_mixer_arguments_and_errors():
    layer = DeltaNet(hidden_size=64, num_heads=4)
    assert layer.head_dim == 16 and layer.num_householder == 1
    assert DeltaProduct(hidden_size=64, num_heads=4, num_householder=3).k_proj.out_features == 3 * 64
    with pytest.raises(ValueError, match="hidden_size must be divisible by num_heads"):
        DeltaNet(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="num_householder must be an int >= 1; got 0"):
        DeltaProduct(hidden_size=32, num_heads=2, num_householder=0)
    with pytest.raises(ValueError, match="mode must be one of"):
        DeltaNet(hidden_size=32, num_heads=2, mode="parallel")
    with pytest.raises(ValueError, match="qk_norm must be 'l2'"):
        DeltaNet(hidden_size=32, num_heads=2, qk_norm="sum")
    with pytest.raises(ValueError, match="head_dim \\* expand_v must be a positive integer"):
        DeltaNet(hidden_size=32, num_heads=2, expand_v=0.3)
    with pytest.raises(ValueError, match="num_kv_heads must divide num_heads"):
        Attention(hidden_size=32, num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        layer(torch.randn(2, 5, 64), attention_mask=torch.ones(3, 5))


def test_beta_ranges(seed):
    # allow_neg_eigval doubles beta: [0, 2] reaches reflections; the default stays in [0, 1]
    seen = {}

    def spy(q, k, v, beta, **kw):
        seen["beta"] = beta
        return real(q, k, v, beta, **kw)

    real = householder.delta_rule
    x = 30 * torch.randn(1, 40, 24, dtype=torch.float64)  # large inputs saturate the sigmoid
    for neg, lo, hi in ((False, 0.0, 1.0), (True, 0.0, 2.0)):
        layer = delta_layer(DeltaNet, allow_neg_eigval=neg).train()
        householder.delta_rule = spy
        try:
            layer(x)
        finally:
            householder.delta_rule = real
        b = seen["beta"].detach()
        assert float(b.min()) >= lo and float(b.max()) <= hi
        assert float(b.max()) > hi - 0.25 * (hi - lo)  # the range is used, not just bounded


# -- the LM: cached decoding, padding, gradients ----------------------------------


def _decode(model, ids, mask, prefill, grad=True):
    """Logits of prefill + one token at a time through the cache, (B, T, V).

    ``grad=False`` decodes under no_grad, where attention writes its cache in place.
    """
    with torch.set_grad_enabled(grad):
        out = model(ids[:, :prefill], attention_mask=None if mask is None else mask[:, :prefill], use_cache=True)
        logits, cache = [out.logits], out.cache
        for t in range(prefill, ids.shape[1]):
            out = model(ids[:, t : t + 1], attention_mask=None if mask is None else mask[:, : t + 1], cache=cache, use_cache=True)
            logits.append(out.logits)
    return torch.cat(logits, 1)


@pytest.mark.parametrize("mixer", BUILTIN_MIXERS + [["deltanet", "swa"]], ids=BUILTIN_MIXERS + ["hybrid"])
def test_cached_decoding_equals_full_forward(seed, mixer):
    model = tiny_model(mixer)
    ids = torch.randint(0, 37, (2, 23))
    full = model(ids).logits
    assert full.dtype == torch.float64
    for grad in (True, False):
        torch.testing.assert_close(_decode(model, ids, None, prefill=5, grad=grad), full, atol=TOL, rtol=0)
    # chunked prefill: later calls continue a cache with several tokens at once
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            first = model(ids[:, :9], use_cache=True)
            second = model(ids[:, 9:12], cache=first.cache, use_cache=True)
            rest = model(ids[:, 12:], cache=second.cache, use_cache=True)
        torch.testing.assert_close(torch.cat([first.logits, second.logits, rest.logits], 1), full, atol=TOL, rtol=0)


@pytest.mark.parametrize("mixer", BUILTIN_MIXERS + [["deltaproduct", "attention"]], ids=BUILTIN_MIXERS + ["hybrid"])
def test_left_padding_matches_unpadded_rows(seed, mixer):
    model = tiny_model(mixer)
    T, pads = 19, (0, 4, 11)
    ids = torch.randint(0, 37, (3, T))
    mask = torch.ones(3, T, dtype=torch.long)
    for row, p in enumerate(pads):
        mask[row, :p] = 0
        ids[row, :p] = torch.randint(0, 37, (p,))  # padding content must not matter
    full = model(ids, attention_mask=mask).logits
    decoded = [_decode(model, ids, mask, prefill=13, grad=grad) for grad in (True, False)]
    for row, p in enumerate(pads):
        alone = model(ids[row : row + 1, p:]).logits[0]
        torch.testing.assert_close(full[row, p:], alone, atol=TOL, rtol=0)
        for d in decoded:
            torch.testing.assert_close(d[row, p:], alone, atol=TOL, rtol=0)


@pytest.mark.parametrize("mixer", BUILTIN_MIXERS)
def test_gradients_reach_every_parameter(seed, mixer):
    model = tiny_model(mixer, num_layers=1, tie_word_embeddings=False).train()
    ids = torch.randint(0, 37, (2, 17))
    loss = model(ids, labels=torch.roll(ids, -1, 1)).loss
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, f"{name} got a zero gradient"


def test_cache_memory_is_constant_for_recurrent_layers(seed):
    model = tiny_model(["deltaproduct", "swa"], num_layers=2)
    out = model(torch.randint(0, 37, (1, 8)), use_cache=True)
    sizes = []
    for _ in range(12):
        out = model(out.logits[:, -1:].argmax(-1), cache=out.cache, use_cache=True)
        sizes.append((out.cache[0]["recurrent_state"].shape, out.cache[1]["length"]))
    assert len({s for s in sizes}) == 1  # state shape and window length fixed while decoding
    assert sizes[0][1] == 4  # window_size - 1 keys
    assert out.cache.seen_tokens == 20
    assert isinstance(out.cache, Cache) and out.cache.nbytes() > 0


@pytest.mark.parametrize("window", [1, 2, 3])
def test_small_windows_and_padding_mid_decode(seed, window):
    # windows whose cache holds 0, 1 or 2 keys; padding that first appears after a cache without any
    model = tiny_model("swa", window_size=window)
    ids = torch.randint(0, 37, (2, 12))
    full = model(ids).logits
    for grad in (True, False):
        torch.testing.assert_close(_decode(model, ids, None, prefill=4, grad=grad), full, atol=TOL, rtol=0)
    for mixer in ("attention", "swa"):
        model = tiny_model(mixer, window_size=window)
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[1, 6] = 0  # one padding column in the middle of row 1
        with torch.no_grad():
            out = model(ids[:, :5], use_cache=True)
            late = model(ids[:, 5:], attention_mask=mask, cache=out.cache).logits
            full = model(ids, attention_mask=mask).logits[:, 5:]
        torch.testing.assert_close(late, full, atol=TOL, rtol=0)


@pytest.mark.parametrize("mixer", ["attention", "swa"])
def test_attention_decode_step_is_unmasked_and_in_place(seed, mixer, monkeypatch):
    # a decoded token sees every cached key (swa keeps only its window), so without padding SDPA
    # gets no mask (a mask rules out flash attention on GPUs); under no_grad the cache is written
    # in place: a global cache moves only when its room doubles, a window cache once per window
    model = tiny_model(mixer, num_layers=1, window_size=5)
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((q.shape[2], k.shape[2], attn_mask))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    ids = torch.randint(0, 37, (2, 8))
    with torch.no_grad():
        out = model(ids, use_cache=True)
        out = model(ids[:, -1:], cache=out.cache, use_cache=True)  # the first step makes room
        buffers = []
        for _ in range(12):
            buffers.append(out.cache[0]["k"])
            out = model(ids[:, -1:], cache=out.cache, use_cache=True)
    steps = calls[1:]
    assert len(steps) == 13 and all(T == 1 and m is None for T, _, m in steps)
    if mixer == "attention":
        assert [L for _, L, _ in steps] == list(range(9, 22))
        assert all(b is buffers[0] for b in buffers[:8])  # room for 16 keys: 8 tokens without a move
    else:
        assert all(L == 5 for _, L, _ in steps)  # 4 cached keys and the new one
        assert len({id(b) for b in buffers}) <= 4  # a buffer of room 8 for a window of 4: one move per 4 tokens


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (cuDNN attention is a CUDA backend)")
def test_decode_step_avoids_cudnn_attention(monkeypatch):
    # cuDNN builds an execution plan per key length: decoding must not reach it
    model = LanguageModel(tiny_config("attention"), device="cuda", dtype=torch.bfloat16).eval()
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kw):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return real(*args, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    enabled = torch.backends.cuda.cudnn_sdp_enabled()
    with torch.no_grad():
        out = model(torch.randint(0, 37, (1, 8), device="cuda"), use_cache=True)
        model(out.logits[:, -1:].argmax(-1), cache=out.cache, use_cache=True)
    assert seen[2:] == [False, False] and torch.backends.cuda.cudnn_sdp_enabled() == enabled


def test_grouped_query_attention_decoding(seed):
    model = tiny_model("attention", num_heads=4, num_kv_heads=2)
    ids = torch.randint(0, 37, (2, 11))
    torch.testing.assert_close(_decode(model, ids, None, prefill=3), model(ids).logits, atol=TOL, rtol=0)


# -- generation --------------------------------------------------------------------


def test_generate_greedy_matches_naive_loop(seed):
    model = tiny_model(["gated_deltanet", "swa"])
    ids = torch.randint(0, 37, (2, 6))
    out = model.generate(ids, 9)
    naive = ids
    for _ in range(9):
        naive = torch.cat([naive, model(naive).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, naive)


def test_generate_sampling(seed):
    model = tiny_model("deltanet")
    ids = torch.randint(0, 37, (3, 4))
    assert torch.equal(model.generate(ids, 5, temperature=1.0, top_k=1), model.generate(ids, 5))
    g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    a = model.generate(ids, 8, temperature=0.7, top_k=5, generator=g1)
    b = model.generate(ids, 8, temperature=0.7, top_k=5, generator=g2)
    assert torch.equal(a, b) and a.shape == (3, 12)
    # each sampled token is among the 5 most likely under the model
    logits = model(a[:, :-1]).logits[:, 3:]
    top = logits.topk(5, dim=-1).indices
    assert (top == a[:, 4:, None]).any(-1).all()
    with pytest.raises(ValueError, match="temperature must be"):
        model.generate(ids, 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k must be"):
        model.generate(ids, 2, temperature=1.0, top_k=0)


def test_generate_left_padded_prompts(seed):
    model = tiny_model(["deltanet", "attention"])
    a, b = torch.randint(0, 37, (1, 7)), torch.randint(0, 37, (1, 3))
    ids = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = torch.tensor([[1] * 7, [0] * 4 + [1] * 3])
    out = model.generate(ids, 6, attention_mask=mask)
    assert torch.equal(out[0], model.generate(a, 6)[0])
    assert torch.equal(out[1, 4:], model.generate(b, 6)[0])


# -- configs, save/load ------------------------------------------------------------


def test_save_load_round_trip(seed, tmp_path):
    model = tiny_model(["gated_deltaproduct", "swa"], allow_neg_eigval=True, use_gate=True)
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    loaded = LanguageModel.from_pretrained(tmp_path, dtype=torch.float64)
    assert loaded.config == model.config
    assert loaded.lm_head.weight is loaded.embeddings.weight  # still tied
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    ids = torch.randint(0, 37, (2, 13))
    assert torch.equal(model(ids).logits, loaded.eval()(ids).logits)


def test_hybrid_configs():
    c = LMConfig(num_layers=4, mixer=["deltanet", "swa"])
    assert c.layer_mixers() == ["deltanet", "swa", "deltanet", "swa"]
    c = LMConfig(num_layers=6, mixer="gated_deltaproduct", attention_layers=[1, 4])
    assert c.layer_mixers() == ["gated_deltaproduct", "attention"] + ["gated_deltaproduct"] * 2 + ["attention", "gated_deltaproduct"]
    model = LanguageModel(LMConfig(hidden_size=32, num_heads=2, num_layers=2, mixer=["deltanet", "swa"], window_size=3))
    assert [type(b.mixer).__name__ for b in model.layers] == ["DeltaNet", "Attention"]
    assert model.layers[1].mixer.window_size == 3
    assert LMConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize(
    "kw,message",
    [
        ({"mixer": "mamba"}, "unknown mixer 'mamba'; expected one of"),
        ({"mixer": ["deltanet", "swa", "attention"]}, "length divides num_layers = 4"),
        ({"hidden_size": 100, "num_heads": 3}, "hidden_size must be divisible by num_heads"),
        ({"num_householder": 0}, "num_householder must be an int >= 1; got 0"),
        ({"num_householder": 1.5}, "num_householder must be an int >= 1; got 1.5"),
        ({"attention_layers": [4]}, "attention_layers must hold layer indices in \\[0, 4\\); got 4"),
        ({"num_kv_heads": 3}, "num_kv_heads must be None or a divisor of num_heads = 4"),
        ({"window_size": 0}, "window_size must be an int >= 1; got 0"),
        ({"vocab_size": -1}, "vocab_size must be an int >= 1"),
    ],
)
def test_bad_configs_give_clear_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        LMConfig(**kw)


def test_bad_model_inputs():
    with pytest.raises(ValueError, match="unknown LMConfig fields \\['hidden'\\]"):
        LMConfig.from_dict({"hidden": 3})
    with pytest.raises(TypeError, match="config must be an LMConfig"):
        LanguageModel({"hidden_size": 32})
    model = LanguageModel(LMConfig(hidden_size=32, num_heads=2, num_layers=1))
    with pytest.raises(ValueError, match="input_ids must be a \\(B, T\\) integer tensor"):
        model(torch.randn(2, 3))
    with pytest.raises(ValueError, match="labels must have the shape of input_ids"):
        model(torch.zeros(2, 3, dtype=torch.long), labels=torch.zeros(2, 4, dtype=torch.long))


def test_register_mixer():
    register_mixer("test_identity", lambda c, i, **kw: _Identity())
    try:
        model = LanguageModel(LMConfig(hidden_size=32, num_heads=2, num_layers=2, mixer=["test_identity", "deltanet"]))
        out = model(torch.zeros(1, 5, dtype=torch.long), use_cache=True)
        assert out.logits.shape == (1, 5, 256)
    finally:
        del MIXERS["test_identity"]


class _Identity(torch.nn.Module):
    def forward(self, hidden_states, attention_mask=None, cache=None, use_cache=False):
        return hidden_states, cache


# -- the same layers on the Triton backend (GPU, or the interpreter on the CPU) -------------


def _triton_available() -> str | None:
    try:
        householder.get_backend("triton")
    except householder.BackendUnavailableError as exc:
        return str(exc)
    return None


def _close(a, b, what: str, rel: float = 5e-3) -> None:
    # float32 on both paths; Triton's float32 dots may run in tf32 on GPUs
    err = float((a.double() - b.double()).abs().max())
    scale = float(b.double().abs().max()) + 1e-12
    assert err <= rel * scale, f"{what}: max error {err:.3g} vs max |value| {scale:.3g}"


@pytest.mark.parametrize("mixer", ["gated_deltanet", "deltaproduct"])
def test_triton_backend_matches_torch(seed, mixer):
    reason = _triton_available()
    if reason:
        pytest.skip(f"backend 'triton' unavailable here: {reason}")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter takes CPU tensors
    model = LanguageModel(tiny_config([mixer, "swa"], num_householder=2, allow_neg_eigval=True, chunk_size=16), device=device)
    _perturb(model)
    ids = torch.randint(0, 37, (2, 40), device=device)
    results = {}
    for backend in ("torch", "triton"):
        model.zero_grad()
        with householder.use_backend(backend):
            out = model.train()(ids, labels=torch.roll(ids, -1, 1))
            out.loss.backward()
            model.eval()
            with torch.no_grad():
                decoded = _decode(model, ids[:, :24], None, prefill=20)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results[backend] = (out.logits.detach(), grads, decoded)
    (l1, g1, d1), (l2, g2, d2) = results["triton"], results["torch"]
    _close(l1, l2, "logits")
    _close(d1, d2, "cached decoding")
    _close(d1, l2[:, :24], "cached decoding vs full forward")
    for name in g2:
        _close(g1[name], g2[name], f"gradient of {name}")
