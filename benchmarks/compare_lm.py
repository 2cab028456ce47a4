"""Side-by-side LM timing (issue: layers): our DeltaNet LM vs a same-size SDPA Transformer and fla's DeltaNet LM.

1. Training throughput (tokens/s, forward + backward + AdamW, bf16 autocast) of
   a ~125M-parameter model (hidden 768, 12 layers, 12 heads, GPT-2 vocabulary
   of 50257) at T = 2048 and 8192, 16k tokens per step: our DeltaNet LM, our
   LM with global SDPA attention in every layer (the Transformer), the same
   DeltaNet LM running flash-linear-attention's chunk_delta_rule kernels, and
   fla's own DeltaNetForCausalLM of the same size (the full
   flash-linear-attention package ships fla.models; fla-core alone does not).
2. Decoding latency per token (batch 1, bf16 weights, greedy) after a context
   of 1k and 16k tokens: DeltaNet with its O(1) recurrent cache, the
   Transformer with its KV cache, and fla's DeltaNetForCausalLM with its cache.

fla rows need CUDA and an importable fla (with transformers for fla.models);
otherwise they are skipped with the reason printed.

    python benchmarks/compare_lm.py --out benchmarks/results/lm_h100.md
    python benchmarks/compare_lm.py --quick          # tiny sizes, any device (smoke test)

The script writes device, versions, commit and the tables to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import platform
import statistics
import os
import sys
import time
import traceback
import types

import torch
import torch.nn.functional as F

import householder
import householder.layers.attention as attention_module
from householder.layers import LanguageModel, LMConfig
from householder.layers.modules import default_intermediate_size
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from benchmarks._provenance import tree_commit  # noqa: E402



class Skip(Exception):
    """A case that cannot run here (no CUDA, fla missing): reported as skipped, not failed."""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def require_fla(device: torch.device, module: str) -> types.ModuleType:
    """fla.<module> ("ops.delta_rule" or "models"), or Skip with the reason it cannot run here."""
    if device.type != "cuda":
        raise Skip("fla's kernels need CUDA")
    try:
        return importlib.import_module(f"fla.{module}")
    except Exception as exc:  # ImportError, or an fla/transformers that fails on import
        first = str(exc).splitlines()[0][:100] if str(exc) else ""
        raise Skip(f"fla.{module} not importable ({type(exc).__name__}: {first})") from exc


# -- the models ------------------------------------------------------------------


def ours(mixer: str, size: dict, device) -> torch.nn.Module:
    return LanguageModel(LMConfig(mixer=mixer, **size), device=device)


def fla_op_deltanet(size: dict, device) -> torch.nn.Module:
    """Our DeltaNet LM with fla's chunk_delta_rule as the recurrence: the same model, fla's kernels.

    Swapping the op in an identical model compares the kernels inside a full
    training step; fla's own model class is the row below it.
    """
    chunk_delta_rule = require_fla(device, "ops.delta_rule").chunk_delta_rule
    model = ours("deltanet", size, device)

    def fla_op(self, q, k, v, beta, g, initial_state, recurrent, use_cache):
        return chunk_delta_rule(q, k, v.to(q.dtype), beta.to(q.dtype), initial_state=initial_state, output_final_state=use_cache)

    for block in model.layers:
        block.mixer._op = types.MethodType(fla_op, block.mixer)
    return model


def fla_model(size: dict, device) -> torch.nn.Module:
    """fla's DeltaNetForCausalLM at our size: the same shapes as our DeltaNet LM, fla's code throughout.

    Matched to LMConfig: head dim 64, SwiGLU MLP of our width, tied embeddings,
    short convolutions (size 4) with SiLU, L2-normalised q/k, beta = sigmoid
    (no negative eigenvalues), no output gate, norm eps 1e-5. fla's fused norms,
    SwiGLU and cross-entropy stay on (its defaults).
    """
    models = require_fla(device, "models")
    config = models.DeltaNetConfig(
        vocab_size=size["vocab_size"],
        hidden_size=size["hidden_size"],
        num_hidden_layers=size["num_layers"],
        num_heads=size["num_heads"],
        intermediate_size=default_intermediate_size(size["hidden_size"]),
        tie_word_embeddings=True,
        use_short_conv=True,
        conv_size=4,
        qk_norm="l2",
        qk_activation="silu",
        use_beta=True,
        allow_neg_eigval=False,
        use_gate=False,
        expand_k=1.0,
        expand_v=1.0,
        norm_eps=1e-5,
    )
    return models.DeltaNetForCausalLM(config).to(device)


# how each model is called: a training loss from a (B, T + 1) batch, and one cached step
def ours_loss(model, x: torch.Tensor) -> torch.Tensor:
    return model(x[:, :-1], labels=x[:, 1:]).loss


def fla_loss(model, x: torch.Tensor) -> torch.Tensor:
    # fla shifts labels itself (position t is scored on labels[t + 1]), so labels are the inputs
    # and the last position has no target: T - 1 targets per row instead of T
    return model(input_ids=x[:, :-1], labels=x[:, :-1]).loss


def ours_step(model, ids: torch.Tensor, cache):
    out = model(ids, cache=cache, use_cache=True)
    return out.logits[:, -1], out.cache


def fla_step(model, ids: torch.Tensor, cache):
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1], out.past_key_values


def cache_bytes(x) -> int:
    """Bytes of every tensor in a cache: ours (Cache.nbytes) or fla's (an iterable of per-layer dicts)."""
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if hasattr(x, "nbytes") and callable(x.nbytes):
        return x.nbytes()
    if isinstance(x, dict):
        return sum(cache_bytes(v) for v in x.values())
    if isinstance(x, (str, bytes)) or not hasattr(x, "__iter__"):
        return 0
    return sum(cache_bytes(v) for v in x)  # lists, tuples, fla's Cache (its layers' state dicts)


@contextlib.contextmanager
def sdpa_backend_left_to_torch():
    """Decode as before the fix: cached calls run SDPA with torch's default backend order.

    That order puts cuDNN first on H100-class GPUs when torch finds a cuDNN newer than 9.15 (see the header).
    """
    fixed = attention_module._sdpa_continuing

    def plain(q, k, v, attn_mask, gqa):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **gqa)

    attention_module._sdpa_continuing = plain
    try:
        yield
    finally:
        attention_module._sdpa_continuing = fixed


# -- the measurements ------------------------------------------------------------


def train_throughput(model, loss_of, batch: int, T: int, vocab: int, device, steps: int, warmup: int) -> dict:
    """Median tokens/s over ``steps`` timed training steps, and the peak memory."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    gen = torch.Generator(device="cpu").manual_seed(0)
    data = [torch.randint(0, vocab, (batch, T + 1), generator=gen).to(device) for _ in range(4)]
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup + steps):
        x = data[i % 4]
        sync(device)
        t0 = time.perf_counter()
        with amp:
            loss = loss_of(model, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        loss = loss.detach()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {float(loss)}")
    t = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"tok_s": batch * T / t, "ms": t * 1e3, "peak_gib": peak, "loss": float(loss)}


@torch.no_grad()
def decode_latency(model, step, context: int, vocab: int, device, tokens: int, chunk: int) -> dict:
    """Median ms per decoded token after a ``context``-token prompt (prefilled in chunks), batch 1.

    Each token is one eager forward through ``step`` (no CUDA graphs), timed
    between device synchronisations; the first quarter of the tokens is dropped.
    """
    model.eval()
    gen = torch.Generator(device="cpu").manual_seed(1)
    prompt = torch.randint(0, vocab, (1, context), generator=gen).to(device)
    cache = None
    for s in range(0, context, chunk):
        logits, cache = step(model, prompt[:, s : s + chunk], cache)
    nxt = logits.argmax(-1, keepdim=True)
    times = []
    for _ in range(tokens):
        sync(device)
        t0 = time.perf_counter()
        logits, cache = step(model, nxt, cache)
        nxt = logits.argmax(-1, keepdim=True)
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"ms": 1e3 * statistics.median(times[len(times) // 4 :]), "cache_mib": cache_bytes(cache) / 2**20}


def failure(exc: Exception) -> str:
    if isinstance(exc, Skip):
        return f"skipped: {exc}"
    return f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"


def versions(device: torch.device) -> str:
    parts = [f"torch {torch.__version__}", f"CUDA {torch.version.cuda}"]
    if device.type == "cuda":
        parts.append(f"cuDNN {torch.backends.cudnn.version()}")
    for name in ("triton", "transformers"):
        try:
            parts.append(f"{name} {__import__(name).__version__}")
        except Exception:
            parts.append(f"{name} not installed")
    try:
        import fla

        parts.append(f"fla {getattr(fla, '__version__', 'installed')}")
    except Exception as exc:  # an fla that fails to import is reported, not fatal
        parts.append(f"fla unavailable ({type(exc).__name__}: {str(exc)[:80]})")
    return ", ".join(parts) + f", Python {platform.python_version()}"


CASES = ("train-ours", "train-sdpa", "train-fla-op", "train-fla-model",
         "decode-ours", "decode-sdpa", "decode-fla", "decode-sdpa-default")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write the report (markdown) here")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test on any device")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per case")
    p.add_argument("--warmup", type=int, default=3, help="untimed training steps per case (the first compiles kernels)")
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--commit", default=None, help="commit to record where the copy has no git metadata (default: git rev-parse)")
    p.add_argument("--cases", default=",".join(CASES),
                   help=f"comma-separated cases to run (default all): {', '.join(CASES)}")
    args = p.parse_args()
    wanted = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(wanted) - set(CASES))
    if unknown:
        p.error(f"unknown --cases {unknown}; choose from {list(CASES)}")
    device = torch.device(args.device)
    if args.quick:
        size = dict(vocab_size=256, hidden_size=64, num_layers=2, num_heads=2)
        lengths, tokens_per_step, contexts, steps, warmup = (64, 256), 512, (64, 256), 2, 1
    else:
        size = dict(vocab_size=50257, hidden_size=768, num_layers=12, num_heads=12)
        lengths, tokens_per_step, contexts, steps, warmup = (2048, 8192), 16384, (1024, 16384), args.steps, args.warmup
    began = time.perf_counter()

    lines = []

    def say(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)
        if args.out:  # rewritten each line, so a run stopped part-way keeps what it measured
            with open(args.out, "w") as f:
                f.write("\n".join(lines) + "\n")

    def free() -> None:
        if device.type == "cuda":
            torch.cuda.empty_cache()

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    say("# LM benchmark: DeltaNet LM vs SDPA Transformer vs fla's DeltaNet LM" + (" (quick smoke sizes)" if args.quick else ""))
    say()
    say(f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; commit {tree_commit(args.commit)}")
    say(f"- device: {name}; {versions(device)}")
    say(f"- householder {householder.__version__}; delta-rule backend for these tensors: "
        f"{householder._registry.infer_backend_name(torch.empty(0, device=device))}")
    say(f"- model: hidden {size['hidden_size']}, {size['num_layers']} layers, {size['num_heads']} heads, vocab {size['vocab_size']}, "
        f"SwiGLU MLP of width {default_intermediate_size(size['hidden_size'])}, tied embeddings; "
        f"training in bf16 autocast with float32 weights, AdamW")
    say()

    def training() -> None:
        say(f"## Training throughput ({tokens_per_step} tokens per step, median of {steps} steps after {warmup} warm-up)")
        say()
        say("| model | params | T | batch | tokens/s | ms/step | peak GiB | last loss |")
        say("|---|---|---|---|---|---|---|---|")
        builders = [
            ("train-ours", "ours: DeltaNet", lambda: ours("deltanet", size, device), ours_loss),
            ("train-sdpa", "ours: Transformer (SDPA)", lambda: ours("attention", size, device), ours_loss),
            ("train-fla-op", "our DeltaNet LM with fla's chunk_delta_rule", lambda: fla_op_deltanet(size, device), ours_loss),
            ("train-fla-model", "fla: DeltaNetForCausalLM", lambda: fla_model(size, device), fla_loss),
        ]
        for key, label, build, loss_of in builders:
            if key not in wanted:
                continue
            for T in lengths:
                batch = max(1, tokens_per_step // T)
                model = None
                try:
                    torch.manual_seed(0)
                    model = build()
                    params = sum(p.numel() for p in model.parameters())
                    r = train_throughput(model, loss_of, batch, T, size["vocab_size"], device, steps, warmup)
                    say(f"| {label} | {params / 1e6:.1f}M | {T} | {batch} | {r['tok_s']:,.0f} | {r['ms']:.1f} | {r['peak_gib']:.1f} | {r['loss']:.2f} |")
                except Exception as exc:  # report the case and go on with the others
                    say(f"| {label} | - | {T} | {batch} | {failure(exc)} | | | |")
                    if not isinstance(exc, Skip):
                        traceback.print_exc()
                del model
                free()
        say()
        say("fla's loss scores T - 1 positions per row (it shifts the labels itself), ours T; "
            "the losses are of untrained models on random tokens.")
        say()


    def decoding() -> None:
        say(f"## Decoding latency (batch 1, bf16 weights, greedy, median ms per token over {args.decode_tokens} tokens)")
        say()
        say("| model | context | ms/token | cache MiB |")
        say("|---|---|---|---|")
        cases = [
            ("decode-ours", "ours: DeltaNet (recurrent state)", lambda: ours("deltanet", size, device), ours_step, contextlib.nullcontext),
            ("decode-sdpa", "ours: Transformer (KV cache)", lambda: ours("attention", size, device), ours_step, contextlib.nullcontext),
            ("decode-fla", "fla: DeltaNetForCausalLM (recurrent state)", lambda: fla_model(size, device), fla_step, contextlib.nullcontext),
        ]
        if device.type == "cuda":
            cases.append(("decode-sdpa-default", "ours: Transformer (KV cache), SDPA backend left to torch as before the fix",
                          lambda: ours("attention", size, device), ours_step, sdpa_backend_left_to_torch))
        for key, label, build, step, context in cases:
            if key not in wanted:
                continue
            model = None
            try:
                torch.manual_seed(0)
                model = build().to(torch.bfloat16)
                for ctx in contexts:
                    with context():
                        r = decode_latency(model, step, ctx, size["vocab_size"], device, args.decode_tokens, chunk=min(ctx, 4096))
                    say(f"| {label} | {ctx} | {r['ms']:.2f} | {r['cache_mib']:.1f} |")
            except Exception as exc:
                say(f"| {label} | - | {failure(exc)} | |")
                if not isinstance(exc, Skip):
                    traceback.print_exc()
            del model
            free()
        say()
        say("Decoding runs one eager forward per token (no CUDA graphs) for every model, so at short "
            "contexts the per-layer kernel launches dominate; the recurrent caches stay the same size at any context. "
            "Our KV cache is a buffer that grows by doubling, and the MiB column counts its room. "
            "Calls that continue our KV cache run SDPA without cuDNN's attention, which builds an execution "
            "plan for every new key length; the last row (CUDA only) decodes with torch's default backend order instead.")
        say()

    # sections in the order of the first case of each in --cases (a slow case cannot starve the other section)
    first_decode = min((i for i, c in enumerate(wanted) if c.startswith("decode-")), default=len(wanted))
    first_train = min((i for i, c in enumerate(wanted) if c.startswith("train-")), default=len(wanted))
    for section in ((decoding, training) if first_decode < first_train else (training, decoding)):
        section()
    say(f"Total wall time of this script: {time.perf_counter() - began:.0f} s.")
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
