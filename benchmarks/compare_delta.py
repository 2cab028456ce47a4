"""Side-by-side timing of the delta-rule ops: ours (Triton) vs flash-linear-attention, with SDPA for context.

Usage (on a CUDA machine)::

    python benchmarks/compare_delta.py --out benchmarks/results/delta_h100.md

Writes device, versions, commit and the tables to ``--out``: median times
(CUDA events, ``triton.testing.do_bench``) of forward and forward+backward,
ratios (peer time / our time: > 1 means ours is faster), peak memory of
forward+backward, achieved bandwidth and arithmetic rate of our forward, and
the accuracy of ours and of the peer against a float64 computation.

Peers are timed where importable: flash-linear-attention (``pip install
fla-core==0.6.0``) and FlashQLA (``pip install flash-qla==0.1.3``, which needs
tilelang, apache-tvm-ffi, torch-c-dlpack-ext and z3-solver; Hopper or Blackwell),
whose gated op with g = 0 stands in for the plain delta rule.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import signal
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import householder as hh  # noqa: E402
from benchmarks._provenance import tree_commit  # noqa: E402

SHAPES = [(16, 2048), (8, 4096), (4, 8192), (2, 16384)]


# -- peers ----------------------------------------------------------------------------------


def load_fla():
    """fla's chunk ops, or None; its refusal of the gated backward on Triton < 3.7.1 + Hopper is switched off."""
    try:
        import fla
        import fla.ops.common.chunk_o as chunk_o
        from fla.ops.delta_rule import chunk_delta_rule
        from fla.ops.gated_delta_product import chunk_gated_delta_product
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception as exc:  # report and go on without the peer
        print(f"fla unavailable: {exc!r}")
        return None
    chunk_o.TRITON_ABOVE_3_7_1 = True  # its version check (issue #640); measured anyway, accuracy reported below
    return dict(version=fla.__version__, delta=chunk_delta_rule, gated=chunk_gated_delta_rule, product=chunk_gated_delta_product)


def make(B, T, H, K, V, n=1, gated=False, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, device="cuda", generator=gen)

    q = rnd(B, T, H, K).to(dtype)
    k = F.normalize(rnd(B, T * n, H, K), dim=-1).to(dtype)
    v = rnd(B, T * n, H, V).to(dtype)
    beta = torch.rand(B, T * n, H, device="cuda", generator=gen).to(dtype)
    g = F.logsigmoid(rnd(B, T, H)).float() if gated else None
    return q, k, v, beta, g


CHUNK = [64]


def load_qla():
    """FlashQLA's chunk_gated_delta_rule (TileLang, Hopper and Blackwell), or None with the reason printed."""
    try:
        import flash_qla
    except Exception as exc:  # report and go on without the peer
        print(f"FlashQLA unavailable: {exc!r}")
        return None
    return dict(version=flash_qla.__version__, gated=flash_qla.chunk_gated_delta_rule)


def qla_fn(qla, n, gated):
    """FlashQLA's gated op; with g = 0 it is the plain delta rule. It has no DeltaProduct (None)."""
    if qla is None or n > 1:
        return None

    def f(q, k, v, beta, g):
        gg = g if gated else torch.zeros(q.shape[:3], device=q.device, dtype=torch.float32)
        return qla["gated"](q, k, v, gg, beta)[0]

    return f


def ours_fn(n, gated):
    def f(q, k, v, beta, g):
        if n == 1:
            return hh.delta_rule(q, k, v, beta, g=g, chunk_size=CHUNK[0], backend="triton", check_finite=False)[0]
        return hh.delta_product(q, k, v, beta, g=g, num_householder=n, chunk_size=CHUNK[0], backend="triton", check_finite=False)[0]

    return f


def fla_fn(fla, n, gated):
    def f(q, k, v, beta, g):
        if n > 1:
            gg = g if g is not None else torch.zeros(q.shape[:3], device=q.device, dtype=torch.float32)
            return fla["product"](q, k, v, gg, beta, num_householder=n)[0]
        if gated:
            return fla["gated"](q, k, v, g, beta)[0]
        return fla["delta"](q, k, v, beta)[0]

    return f


# -- measurement ------------------------------------------------------------------------------


def bench(fn, args, backward: bool):
    """Median ms of fn (and its backward) plus peak extra memory (MiB) of one call."""
    from triton.testing import do_bench

    leaves = [a for a in args if a is not None]
    if backward:
        for a in leaves:
            a.requires_grad_(True)
        do = torch.randn_like(fn(*args))

        def run():
            fn(*args).backward(do)

    else:

        def run():
            with torch.no_grad():
                fn(*args)

    run()
    torch.cuda.synchronize()
    ms = do_bench(run, warmup=20, rep=80, grad_to_none=leaves if backward else None, return_mode="median")
    for a in leaves:
        a.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    for a in leaves:
        a.grad = None
        a.requires_grad_(False)
    return ms, peak


def sdpa_ms(B, T, H, D):
    from triton.testing import do_bench

    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        # a factory: sdpa_kernel's context manager can be entered only once
        def ctx():
            return sdpa_kernel(SDPBackend.CUDNN_ATTENTION)

        label = "cuDNN"
        with ctx():
            F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(do)
    except Exception:
        import contextlib

        ctx, label = contextlib.nullcontext, "default"

    def fwd():
        with ctx(), torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def fb():
        with ctx():
            F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(do)

    return do_bench(fwd, warmup=25, rep=100, return_mode="median"), do_bench(fb, warmup=25, rep=100, grad_to_none=[q, k, v], return_mode="median"), label


def accuracy(fla, gated, n=1, B=2, T=2048, H=8, K=128, V=128, variants=(("ours", ()),)):
    """Max-abs errors / max |ref| of o and of each gradient, ours and fla's, against float64 (torch path).

    ``variants``: (label, --set items) of our runs, each under its own CONFIG overrides."""
    q, k, v, beta, g = make(B, T, H, K, V, n=n, gated=gated, seed=1)
    # seeded, so that the errors of two runs are of the same inputs
    do = torch.randn(B, T, H, V, device="cuda", generator=torch.Generator(device="cuda").manual_seed(2)).to(torch.bfloat16)
    names = ["o", "dq", "dk", "dv", "dbeta"] + (["dg"] if gated else [])

    def grads(fn, dtype):
        leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v, beta)]
        gg = None if g is None else g.detach().to(dtype if dtype == torch.float64 else torch.float32).requires_grad_()
        o = fn(*leaves, gg)
        inputs = leaves + ([gg] if gated else [])
        gr = torch.autograd.grad(o, inputs, do.to(o.dtype))
        return [o] + list(gr)

    def ref_fn(q, k, v, beta, g):
        if n == 1:
            return hh.delta_rule(q, k, v, beta, g=g, backend="torch", check_finite=False)[0]
        return hh.delta_product(q, k, v, beta, g=g, num_householder=n, backend="torch", check_finite=False)[0]

    from householder.backends import triton_delta as td

    ref = grads(ref_fn, torch.float64)
    out = {}
    for label, settings in variants:
        before = dict(td.CONFIG)
        try:
            apply_settings(settings)
            out[label] = grads(ours_fn(n, gated), torch.bfloat16)
        finally:
            td.CONFIG.update(before)
    if fla is not None:
        try:
            out["fla"] = grads(fla_fn(fla, n, gated), torch.bfloat16)
        except Exception as exc:
            print(f"fla accuracy run failed: {exc!r}")
    rows = {}
    for who, res in out.items():
        rows[who] = [float((a.double() - b).abs().max() / b.abs().max()) for a, b in zip(res, ref)]
    return names, rows


# -- report -----------------------------------------------------------------------------------


def _config_text() -> str:
    from householder.backends import triton_delta as td

    return ", ".join(f"{k}={v}" for k, v in td.CONFIG.items())


def setting_values(item: str) -> tuple:
    """(key, values) of a KEY=V1,V2,... argument; values of tuple entries ((num_warps, num_stages))
    are separated by ';'."""
    key, _, vals = item.partition("=")
    return key, vals.split(";") if ";" in vals else vals.split(",")


def apply_settings(items) -> None:
    """Apply --set KEY=VALUE overrides to triton_delta.CONFIG (recorded in the report's header)."""
    from householder.backends import triton_delta as td

    for item in items:
        key, _, val = item.partition("=")
        if key not in td.CONFIG:
            raise SystemExit(f"--set: unknown key {key!r}; known: {sorted(td.CONFIG)}")
        words = {"True": True, "true": True, "False": False, "false": False}
        if isinstance(td.CONFIG[key], bool):
            # a word other than these is kept as it is (e.g. prefetch_gates=output)
            td.CONFIG[key] = {"1": True, "0": False, **words}.get(val, val)
        elif isinstance(td.CONFIG[key], str):
            td.CONFIG[key] = words.get(val, val)  # (prefetch_gates takes True, False or pass names)
        elif isinstance(td.CONFIG[key], tuple):
            td.CONFIG[key] = tuple(int(x) for x in val.split(","))
        else:
            td.CONFIG[key] = None if val == "None" else int(val)


def fwd_model(B, T, H, K, V, n, C=64):
    """Bytes of the forward's memory floor (inputs once, output once) and its useful FLOPs."""
    steps = B * T * n * H
    toks = B * T * H
    bytes_ = 2 * (toks * K + steps * (K + V) + toks * V) + 2 * steps + (4 * toks)
    # chunk: K K^T, Q K^T, W = A K, U = A V, Aqk Vn (2 C^2 per row); state: W S, Q S, K^T Vn (2 K V per row)
    flops = steps * (2 * C * (3 * K + 2 * V) + 6 * K * V)
    return bytes_, flops


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="markdown file to write")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128, help="K = V")
    ap.add_argument("--shapes", default=",".join(f"{b}x{t}" for b, t in SHAPES))
    ap.add_argument("--ops", default="delta,gated,product2,product3")
    ap.add_argument("--product-shapes", default="8x4096", help="(B, T) for DeltaProduct")
    ap.add_argument("--no-accuracy", action="store_true")
    ap.add_argument("--accuracy-shapes", default="2x2048x8", metavar="BxTxH,...",
                    help="(B, T, H) of the accuracy section, each")
    ap.add_argument("--accuracy-ab", action="append", default=[], metavar="KEY=V1,V2,...",
                    help="accuracy rows of ours under each value of a triton_delta.CONFIG entry, e.g. dg_form=decays,chunk")
    ap.add_argument("--sweep", action="store_true", help="also time our kernels under a few launch settings")
    ap.add_argument("--chunk", type=int, default=64, help="our chunk size")
    ap.add_argument("--profile", action="store_true", help="also list the CUDA time per kernel of one forward+backward")
    ap.add_argument("--varlen", action="store_true", help="also time packed sequences (cu_seqlens) against the batched layout")
    ap.add_argument("--no-sdpa", action="store_true")
    ap.add_argument("--no-qla", action="store_true", help="leave FlashQLA out even where it is installed")
    ap.add_argument("--no-fla", action="store_true",
                    help="leave fla out even where it is installed (ours alone, e.g. a quick --profile or --ab)")
    ap.add_argument("--keep-ab", action="store_true",
                    help="also time our forward+backward with the forward's chunk quantities recomputed, kept (save_prep) "
                         "and kept with the per-chunk states (save_states)")
    ap.add_argument("--ab", action="append", default=[], metavar="KEY=V1,V2,...",
                    help="also time our ops at each of --shapes under each value of a triton_delta.CONFIG entry, e.g. "
                         "gates=0,1,2 or 'bwd_fused=8,1;4,1' (values of (num_warps, num_stages) entries separated by ';')")
    ap.add_argument("--ab-joint", action="append", default=[], metavar="'K=V K2=V2|K=V3 ...'",
                    help="like --ab, for sets of CONFIG entries changed together: variants separated by '|', each "
                         "KEY=VALUE items separated by spaces, e.g. 'bwd_fused=4,2 bwd_fused_gated=4,2|bwd_fused=8,2 bwd_fused_gated=8,2'")
    ap.add_argument("--ab-ops", default="delta,gated", help="the ops --ab times (delta, gated or both)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override an entry of triton_delta.CONFIG, e.g. BV=64 or bwd_dqk=4,1 (num_warps,num_stages)")
    args = ap.parse_args()
    ab_ops = [x for x in args.ab_ops.split(",") if x]
    if not ab_ops or set(ab_ops) - {"delta", "gated"}:
        raise SystemExit(f"--ab-ops: give delta, gated or both; got {args.ab_ops!r}")

    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",") if s]
    pshapes = [tuple(int(x) for x in s.split("x")) for s in args.product_shapes.split(",") if s]
    H, D = args.heads, args.dim
    CHUNK[0] = args.chunk
    apply_settings(args.set)
    signal.signal(signal.SIGTERM, stop_marker(args.out))
    # fla >= 0.6 hands its gated op to FlashQLA when that is installed: keep fla's own Triton path
    # in the fla columns (FlashQLA has columns of its own)
    os.environ.setdefault("FLA_FLASH_QLA", "0")
    fla = None if args.no_fla else load_fla()
    qla = None if args.no_qla else load_qla()
    commit = tree_commit()
    props = torch.cuda.get_device_properties(0)
    import triton

    lines = [
        "# Delta rule: householder (Triton) vs flash-linear-attention",
        "",
        f"- device: {torch.cuda.get_device_name(0)} ({props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB)",
        f"- torch {torch.__version__}, triton {triton.__version__}, fla-core {fla['version'] if fla else 'n/a'}, "
        f"FlashQLA {qla['version'] if qla else 'n/a'} (qla columns; the plain delta rule as its gated op with g = 0), "
        f"python {platform.python_version()}",
        f"- householder commit {commit}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- bf16 q, k, v, beta; float32 log-decay g; H = {H}, K = V = {D}; unit-norm keys; our chunk {args.chunk}; "
        "median of CUDA-event timings (triton.testing.do_bench); ratio = fla / ours, qla/ours = FlashQLA / ours (> 1: ours faster)",
        f"- our launch settings (householder.backends.triton_delta.CONFIG): {_config_text()}",
        "- fla's refusal of its gated backward on Triton < 3.7.1 on Hopper (its issue #640) is switched off to time it; "
        f"FLA_FLASH_QLA={os.environ['FLA_FLASH_QLA']} (0: fla's own Triton kernels, not its dispatch to FlashQLA)",
        f"- GB/s: the forward's memory floor (inputs read once, output written once; {fwd_model(16, 2048, H, D, D, 1)[0] / 1e6:.0f} MB "
        "at 32768 tokens) over our forward time; the card's copy bandwidth is the ceiling",
        "- TFLOP/s: the chunk algorithm's useful matrix work (K K^T, Q K^T, W, U, Aqk Vn, W S, Q S, K^T Vn), "
        "not the triangular factor, over our forward time",
        "",
    ]
    print("\n".join(lines))

    table = ["| op | B x T | ours fwd ms | fla fwd ms | ratio fwd | ours fwd+bwd ms | fla fwd+bwd ms | ratio fwd+bwd | ours peak MiB | fla peak MiB | ours fwd GB/s | ours fwd TFLOP/s "
             "| qla fwd ms | qla fwd+bwd ms | qla/ours fwd | qla/ours fwd+bwd | qla peak MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    ops = [op for op in args.ops.split(",") if op]  # --ops "": no timing table, only the other sections
    for op in ops:
        n = int(op[len("product"):]) if op.startswith("product") else 1
        gated = op == "gated" or n > 1  # fla's DeltaProduct op is the gated one
        for B, T in (pshapes if n > 1 else shapes):
            x = make(B, T, H, D, D, n=n, gated=gated)
            row = {}
            peers = (("ours", ours_fn(n, gated)), ("fla", fla_fn(fla, n, gated) if fla else None), ("qla", qla_fn(qla, n, gated)))
            for who, fn in peers:
                if fn is None:
                    continue
                try:
                    row[who] = bench(fn, list(x), False) + bench(fn, list(x), True)
                except Exception as exc:
                    print(f"{who} {op} {B}x{T} failed: {exc!r}")
                torch.cuda.empty_cache()
            o, f, c = row.get("ours"), row.get("fla"), row.get("qla")
            nb, nf = fwd_model(B, T, H, D, D, n)

            def fmt(v, p=3):
                return "-" if v is None else f"{v:.{p}f}"

            line = (
                f"| {op} | {B} x {T} | {fmt(o and o[0])} | {fmt(f and f[0])} | {fmt(o and f and f[0] / o[0], 2)} | "
                f"{fmt(o and o[2])} | {fmt(f and f[2])} | {fmt(o and f and f[2] / o[2], 2)} | {fmt(o and o[3], 0)} | "
                f"{fmt(f and f[3], 0)} | {fmt(o and nb / o[0] / 1e6, 0)} | {fmt(o and nf / o[0] / 1e9, 1)} | "
                f"{fmt(c and c[0])} | {fmt(c and c[2])} | {fmt(o and c and c[0] / o[0], 2)} | {fmt(o and c and c[2] / o[2], 2)} | "
                f"{fmt(c and c[3], 0)} |"
            )
            table.append(line)
            print(line, flush=True)
            _write(args.out, lines + ["## Timings", ""] + table + [""])
    lines += ["## Timings", ""] + table + [""]
    _write(args.out, lines)

    if not args.no_accuracy:
        variants = [("ours", [])]
        for item in args.accuracy_ab:
            key, values = setting_values(item)
            variants += [(f"ours {key}={val}", [f"{key}={val}"]) for val in values]
        acc = ["| op | B x T x H | impl | " + " | ".join(["o", "dq", "dk", "dv", "dbeta", "dg"]) + " |",
               "|---|---|---|---|---|---|---|---|---|"]
        head = [
            "## Accuracy against float64 (max |err| / max |ref|, bf16 inputs)",
            "",
            "The reference is our torch path in float64 on the same bf16-rounded inputs. DeltaProduct "
            "(n = 2) runs T tokens of two steps each.",
            "",
        ]
        for B, T, H_ in (tuple(int(x) for x in s.split("x")) for s in args.accuracy_shapes.split(",") if s):
            for op, gated, n in (("delta", False, 1), ("gated", True, 1), ("product2", True, 2)):
                try:
                    names, rows = accuracy(fla, gated, n, B=B, T=T, H=H_, variants=variants)
                except Exception as exc:
                    acc.append(f"| {op} | {B} x {T} x {H_} | failed: {exc!r} | | | | | | |")
                    continue
                for who, errs in rows.items():
                    cells = [f"{e:.1e}" for e in errs] + ["-"] * (6 - len(errs))
                    acc.append(f"| {op} | {B} x {T} x {H_} | {who} | " + " | ".join(cells) + " |")
                print("\n".join(acc[-len(rows):]), flush=True)
                _write(args.out, lines + head + acc + [""])
                torch.cuda.empty_cache()
        lines += head + acc + [""]
        _write(args.out, lines)

    if args.no_sdpa:
        shapes_sdpa = []
    else:
        shapes_sdpa = shapes
    sd = ["| T | SDPA fwd ms | SDPA fwd+bwd ms | backend |", "|---|---|---|---|"]
    for B, T in shapes_sdpa:
        try:
            a, b, label = sdpa_ms(B, T, H, D)
            sd.append(f"| {T} (B = {B}) | {a:.3f} | {b:.3f} | {label} |")
        except Exception as exc:
            sd.append(f"| {T} (B = {B}) | failed: {exc!r} | | |")
        print(sd[-1], flush=True)
        torch.cuda.empty_cache()
    if shapes_sdpa:
        lines += [f"## Attention for context (torch SDPA, causal, bf16, head dim {D})", ""] + sd + [""]
    _write(args.out, lines)

    if args.profile:
        lines += ["## CUDA time per kernel, one forward+backward (torch.profiler)", ""]
        lines += profile(fla, H, D, sorted({shapes[0], shapes[-1]})) + [""]
        _write(args.out, lines)
    if args.keep_ab:
        lines += ["## Backward with the forward's chunk quantities kept or recomputed (ours, CONFIG['save_prep'], "
                  "CONFIG['save_states']; held after fwd includes the output)", ""]
        lines += keep_ab(H, D, sorted({shapes[0], shapes[-1]})) + [""]
        _write(args.out, lines)
    if args.varlen:
        lines += ["## Packed sequences (cu_seqlens, B = 1) vs batched, our gated op", ""] + varlen_overhead(H, D, shapes) + [""]
        _write(args.out, lines)
    for item in args.ab:
        key, values = setting_values(item)
        lines += [f"## Our ops under each value of CONFIG[{key!r}]", ""] + ab(H, D, shapes, key, values, ab_ops) + [""]
        _write(args.out, lines)
    for item in args.ab_joint:
        lines += ["## Our ops under each set of CONFIG entries", ""]
        lines += ab_variants(H, D, shapes, "settings", joint_variants(item), ab_ops) + [""]
        _write(args.out, lines)
    if args.sweep:
        lines += ["## Launch-setting sweep (ours, gated delta rule)", ""] + sweep(H, D, shapes) + [""]

    _write(args.out, lines)
    print(f"wrote {args.out}")
    return 0


def _write(path, lines) -> None:
    """Rewrite the report so far (a run cut short still leaves its finished sections)."""
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


STOPPED = ("**The run was stopped here (SIGTERM, e.g. a time limit): the section above may be cut "
           "short, and the sections the command asked for after it were not run.**")


def stop_marker(path):
    """A SIGTERM handler that appends ``STOPPED`` to the report at ``path`` and exits with status
    124 (timeout's), so that a report cut short says so rather than passing for a whole one."""
    def handler(signum, frame):
        if os.path.exists(path):
            with open(path, "a") as fh:
                fh.write("\n" + STOPPED + "\n")
        raise SystemExit(124)
    return handler


def sweep(H, D, shapes):
    """Our gated op under variants of triton_delta.CONFIG, at the first and last shape."""
    import copy

    from householder.backends import triton_delta as td

    default = copy.deepcopy(td.CONFIG)
    variants = [
        ("default", {}),
        ("state BV=64", {"BV": 64}),
        ("state stages=3", {"state_gated": (4, 3)}),
        ("prep warps=8", {"prep": (8, 1)}),
        ("state BV=16", {"BV": 16}),
        ("bwd_state stages=3", {"bwd_state_gated": (4, 3)}),
        ("bwd_dqk warps=4", {"bwd_dqk": (4, 1)}),
        ("bwd_wy warps=4", {"bwd_wy": (4, 1)}),
        ("bwd BV=64", {"bwd_BV": 64}),
        ("bwd BV=16", {"bwd_BV": 16}),
        ("bwd chunk 32", {"bwd_chunk": 32}),
    ]
    out = ["| setting | B x T | fwd ms | fwd+bwd ms |", "|---|---|---|---|"]
    for name, change in variants:
        td.CONFIG.clear()
        td.CONFIG.update(copy.deepcopy(default))
        td.CONFIG.update(change)
        for B, T in (shapes[0], shapes[-1]):
            x = make(B, T, H, D, D, gated=True)
            try:
                f = bench(ours_fn(1, True), list(x), False)[0]
                fb = bench(ours_fn(1, True), list(x), True)[0]
                out.append(f"| {name} | {B} x {T} | {f:.3f} | {fb:.3f} |")
            except Exception as exc:
                out.append(f"| {name} | {B} x {T} | failed: {exc!r} | |")
            print(out[-1], flush=True)
    td.CONFIG.clear()
    td.CONFIG.update(default)
    return out


def ab(H, D, shapes, key, values, ops=("delta", "gated")):
    """Our delta and/or gated ops (``ops``), forward and forward+backward, under each value of CONFIG[key]."""
    return ab_variants(H, D, shapes, key, [(val, [f"{key}={val}"]) for val in values], ops)


def joint_variants(text: str) -> list:
    """(label, --set items) of each variant of an --ab-joint argument: variants separated by '|',
    each a space-separated list of KEY=VALUE."""
    out = []
    for variant in (v.strip() for v in text.split("|")):
        items = variant.split()
        if not items or any("=" not in item for item in items):
            raise SystemExit(f"--ab-joint: each variant is KEY=VALUE items separated by spaces; got {variant!r}")
        out.append((" ".join(items), items))
    return out


def ab_variants(H, D, shapes, column, variants, ops=("delta", "gated")):
    """Our delta and/or gated ops (``ops``), forward and forward+backward, under each of ``variants``
    ((label, --set items)), taken in turn at each shape; CONFIG is restored after each."""
    from householder.backends import triton_delta as td

    before = dict(td.CONFIG)
    out = [f"| op | B x T | {column} | fwd ms | fwd+bwd ms | peak MiB |", "|---|---|---|---|---|---|"]
    for op, gated in ((op, op == "gated") for op in ops):
        for B, T in shapes:
            x = make(B, T, H, D, D, gated=gated)
            for label, items in variants:
                try:
                    apply_settings(items)
                    f = bench(ours_fn(1, gated), list(x), False)[0]
                    fb, peak = bench(ours_fn(1, gated), list(x), True)
                    out.append(f"| {op} | {B} x {T} | {label} | {f:.3f} | {fb:.3f} | {peak:.0f} |")
                except Exception as exc:
                    out.append(f"| {op} | {B} x {T} | {label} | failed: {exc!r} | | |")
                finally:
                    td.CONFIG.update(before)
                print(out[-1], flush=True)
            torch.cuda.empty_cache()
    return out


def profile(fla, H, D, shapes):
    """CUDA time per kernel of one forward+backward call (torch.profiler), ours and fla's: where the time goes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    out = ["| op | B x T | impl | kernel | calls | ms |", "|---|---|---|---|---|---|"]
    for op, gated in (("delta", False), ("gated", True)):
        for B, T in shapes:
            x = make(B, T, H, D, D, gated=gated)
            for who, fn in (("ours", ours_fn(1, gated)), ("fla", fla_fn(fla, 1, gated) if fla else None)):
                if fn is None:
                    continue
                leaves = [a.requires_grad_(True) for a in x if a is not None]
                try:
                    do = torch.randn_like(fn(*x))
                    for _ in range(3):
                        fn(*x).backward(do)
                    for a in leaves:
                        a.grad = None  # else the profiled call pays for accumulating into .grad
                    torch.cuda.synchronize()
                    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                        fn(*x).backward(do)
                        torch.cuda.synchronize()
                except Exception as exc:
                    out.append(f"| {op} | {B} x {T} | {who} | failed: {exc!r} | | |")
                    continue
                finally:
                    for a in leaves:
                        a.grad = None
                        a.requires_grad_(False)
                per = {}
                for ev in prof.key_averages():
                    t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
                    if t > 0 and ev.key and not ev.key.startswith(("cudaLaunch", "cudaDevice", "cuLaunch")):
                        per[ev.key] = (ev.count, t / 1e3)
                total = 0.0
                for name, (cnt, ms) in sorted(per.items(), key=lambda kv: -kv[1][1])[:12]:
                    out.append(f"| {op} | {B} x {T} | {who} | {name[:60]} | {cnt} | {ms:.3f} |")
                    total += ms
                out.append(f"| {op} | {B} x {T} | {who} | (top kernels together) | | {total:.3f} |")
                print("\n".join(out[-min(len(per), 12) - 1:]), flush=True)
                torch.cuda.empty_cache()
    return out


def keep_ab(H, D, shapes):
    """Our forward+backward with save_prep / save_states on and off: the time saved against the memory held."""
    from householder.backends import triton_delta as td

    modes = {"recomputed": (False, False), "kept": (True, False), "kept + states": (True, True)}
    out = ["| op | B x T | " + " | ".join(f"{m} fwd+bwd ms" for m in modes) + " | "
           + " | ".join(f"{m} peak MiB" for m in modes) + " | " + " | ".join(f"{m}: held after fwd MiB" for m in modes) + " |",
           "|---|---|" + "---|" * (3 * len(modes))]
    before = td.CONFIG["save_prep"], td.CONFIG["save_states"]
    for op, gated in (("delta", False), ("gated", True)):
        for B, T in shapes:
            x = make(B, T, H, D, D, gated=gated)
            cells = {}
            try:
                for mode, (prep, states) in modes.items():
                    td.CONFIG["save_prep"], td.CONFIG["save_states"] = prep, states
                    fb, peak = bench(ours_fn(1, gated), list(x), True)
                    leaves = [a.requires_grad_(True) for a in x if a is not None]
                    base = torch.cuda.memory_allocated()
                    o = ours_fn(1, gated)(*x)
                    held = (torch.cuda.memory_allocated() - base) / 2**20  # the output included
                    del o
                    for a in leaves:
                        a.requires_grad_(False)
                    cells[mode] = (fb, peak, held)
                out.append(f"| {op} | {B} x {T} | " + " | ".join(f"{cells[m][0]:.3f}" for m in modes) + " | "
                           + " | ".join(f"{cells[m][1]:.0f}" for m in modes) + " | "
                           + " | ".join(f"{cells[m][2]:.0f}" for m in modes) + " |")
            except Exception as exc:
                out.append(f"| {op} | {B} x {T} | failed: {exc!r} |" + " |" * (3 * len(modes) - 1))
            finally:
                td.CONFIG["save_prep"], td.CONFIG["save_states"] = before
            print(out[-1], flush=True)
            torch.cuda.empty_cache()
    return out


def varlen_overhead(H, D, shapes):
    """Our gated op on B equal sequences vs the same tokens packed into B = 1 with cu_seqlens,
    given on the GPU (under check_finite=False: chunk tables made on the device, no read on the
    host) and on the CPU (read and checked; tables cached per offsets)."""
    out = ["| B x T | batched fwd ms | packed fwd ms (cu_seqlens GPU / CPU) | fwd overhead (GPU / CPU) "
           "| batched fwd+bwd ms | packed fwd+bwd ms (GPU / CPU) | fwd+bwd overhead (GPU / CPU) |",
           "|---|---|---|---|---|---|---|"]
    for B, T in shapes:
        q, k, v, beta, g = make(B, T, H, D, D, gated=True)
        cus = [torch.arange(0, B * T + 1, T, device=dev, dtype=torch.int32) for dev in ("cuda", "cpu")]

        def packed(cu):
            def f(q, k, v, beta, g):
                return hh.delta_rule(q, k, v, beta, g=g, cu_seqlens=cu, chunk_size=CHUNK[0], backend="triton", check_finite=False)[0]

            return f

        flat = [x.reshape(1, B * T, *x.shape[2:]) for x in (q, k, v, beta, g)]
        try:
            a = [bench(ours_fn(1, True), [q, k, v, beta, g], bwd)[0] for bwd in (False, True)]
            b = [[bench(packed(cu), flat, bwd)[0] for cu in cus] for bwd in (False, True)]

            def pct(x, y):
                return f"{100 * (x / y - 1):+.1f}%"

            out.append(f"| {B} x {T} | {a[0]:.3f} | {b[0][0]:.3f} / {b[0][1]:.3f} | {pct(b[0][0], a[0])} / {pct(b[0][1], a[0])} "
                       f"| {a[1]:.3f} | {b[1][0]:.3f} / {b[1][1]:.3f} | {pct(b[1][0], a[1])} / {pct(b[1][1], a[1])} |")
        except Exception as exc:
            out.append(f"| {B} x {T} | failed: {exc!r} | | | | | |")
        print(out[-1], flush=True)
        torch.cuda.empty_cache()
    return out


if __name__ == "__main__":
    sys.exit(main())
