"""Side-by-side GPU timing of the "triton" and "torch" backends against their peers (issue 3).

Problems (unit keys, beta ~ U[0, 2]):
  A: a batch of 4096 products of n = 64 factors in d = 128;
  B: a batch of 16 products of n = 4096 factors in d = 128 (64 blocks of 64).
Peers: torch.linalg.householder_product on the same shape of work, and the
compact WY written in plain torch (solve_triangular + bmm). Cases: .dense(),
.apply to a (128, 128) block against .dense() followed by a matmul, float32
and bfloat16 inputs. Times are medians of CUDA-event timings
(triton.testing.do_bench); inputs are built with check_finite=False so the
timings hold the product alone. Also the orthogonality ||P^T P - I||_2 of a
product of 4096 reflections (beta = 2) in float32, in units of n u with
u = 2^-24.

    python benchmarks/compare_gpu_product.py --out benchmarks/results/gpu_product_h100.md [--commit SHA]
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import traceback

import numpy as np
import torch
import triton
from triton.testing import do_bench

import householder as hh
from householder import reference
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from benchmarks._provenance import tree_commit  # noqa: E402


U32 = 2.0**-24  # float32 unit roundoff


# -- timing ----------------------------------------------------------------------------


def median_ms(fn, slow: bool = False) -> float:
    """Median CUDA-event time of fn() in ms (slow peers: 3 timed runs after one warm-up)."""
    if not slow:
        return float(do_bench(fn, warmup=50, rep=300, return_mode="median"))
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def ceilings() -> dict:
    """Measured matmul rates (TFLOP/s) and copy bandwidth (TB/s) of this GPU."""
    out = {}
    n = 8192
    for name, dtype, tf32 in (("fp32", torch.float32, False), ("tf32", torch.float32, True), ("bf16", torch.bfloat16, False)):
        a = torch.randn(n, n, device="cuda", dtype=dtype)
        b = torch.randn(n, n, device="cuda", dtype=dtype)
        torch.backends.cuda.matmul.allow_tf32 = tf32
        ms = median_ms(lambda: a @ b)
        out[name] = 2 * n**3 / ms / 1e9
    torch.backends.cuda.matmul.allow_tf32 = False
    x = torch.empty(2**28, device="cuda", dtype=torch.float32)  # 1 GiB
    y = torch.empty_like(x)
    ms = median_ms(lambda: y.copy_(x))
    out["copy_TBps"] = 2 * x.numel() * 4 / ms / 1e9
    return out


# -- inputs and peers --------------------------------------------------------------------


def inputs(batch: int, n: int, d: int, dtype=torch.float32, seed: int = 0, beta=None):
    g = torch.Generator(device="cuda").manual_seed(seed)
    keys = torch.randn(batch, n, d, device="cuda", generator=g, dtype=torch.float32)
    keys = keys / keys.norm(dim=-1, keepdim=True)
    if beta is None:
        betas = 2.0 * torch.rand(batch, n, device="cuda", generator=g)
    else:
        betas = torch.full((batch, n), float(beta), device="cuda")
    return keys.to(dtype), betas.to(dtype)


def plain_wy_factor(K, beta):
    """T = (I + diag(beta) striu(K K^T))^{-1} diag(beta), in plain torch."""
    n = K.shape[-2]
    A = torch.eye(n, device=K.device, dtype=K.dtype) + beta[..., :, None] * torch.triu(K @ K.mT, 1)
    return torch.linalg.solve_triangular(A, torch.diag_embed(beta), upper=True, unitriangular=True)


def plain_wy_dense(K, beta):
    """P = I - K^T T K for one block per product, plain torch (solve_triangular + bmm)."""
    d = K.shape[-1]
    T = plain_wy_factor(K, beta)
    return torch.eye(d, device=K.device, dtype=K.dtype) - K.mT @ (T @ K)


def plain_wy_dense_blocked(K, beta, block: int = 64):
    """P for long products: T per block of 64 (one batched solve), then the blocks applied to I in turn."""
    B, n, d = K.shape
    m = n // block
    Kb = K.reshape(B, m, block, d)
    T = plain_wy_factor(Kb, beta.reshape(B, m, block))
    P = torch.eye(d, device=K.device, dtype=K.dtype) - Kb[:, -1].mT @ (T[:, -1] @ Kb[:, -1])
    for j in range(m - 2, -1, -1):
        P = P - Kb[:, j].mT @ (T[:, j] @ (Kb[:, j] @ P))
    return P


def lapack_shape(K, beta, full: bool):
    """householder_product's input for the same work: reflectors as columns of (d, n), or (d, d) for the full Q."""
    B, n, d = K.shape
    V = K.mT.contiguous()
    if full:
        V = torch.cat([V, torch.zeros(B, d, d - n, device=K.device, dtype=K.dtype)], dim=-1)
    return V, beta.contiguous()


# -- flop and byte models ----------------------------------------------------------------


def flops(n: int, d: int, c: int, block: int = 64) -> float:
    """Matrix-product flops of the blocked product applied to a (d, c) block (c = d for dense)."""
    b = min(block, n)
    m = n // b
    return m * (2 * b * b * d + 4 * b * d * c + 2 * b * b * c)


# -- the report ----------------------------------------------------------------------------


class Report:
    def __init__(self, ceil: dict):
        self.rows = []
        self.ceil = ceil

    def add(self, problem, case, ms, base_ms=None, flop=None, kind="fp32", err=None):
        tf = flop / ms / 1e9 if flop else None
        row = {
            "problem": problem,
            "case": case,
            "ms": ms,
            "ratio": (ms / base_ms) if base_ms else None,
            "tflops": tf,
            "pct": (100 * tf / self.ceil[kind]) if tf else None,
            "kind": kind,
            "err": err,
        }
        self.rows.append(row)
        print(self.line(row), flush=True)

    @staticmethod
    def line(r) -> str:
        def f(v, fmt):
            return format(v, fmt) if v is not None else "-"

        return (
            f"| {r['problem']} | {r['case']} | {f(r['ms'], '.3f')} | {f(r['ratio'], '.3f')} | "
            f"{f(r['tflops'], '.1f')} | {f(r['pct'], '.1f')}% of {r['kind']} | {f(r['err'], '.1e')} |"
        )

    def table(self) -> str:
        head = (
            "| problem | case | ms (median) | x plain-torch WY | TFLOP/s | of measured ceiling | max rel err vs float64 |\n"
            "|---|---|---|---|---|---|---|\n"
        )
        return head + "\n".join(self.line(r) for r in self.rows) + "\n"


def rel_err(got, keys, betas, x=None, sample: int = 4) -> float:
    """Max error of the first ``sample`` products against the float64 reference, relative to max |ref|."""
    k, b = keys[:sample], betas[:sample]
    ref = reference.dense(k, b) if x is None else reference.apply(k, b, x[:sample])
    g = reference.to_float64(got[:sample])
    return float(np.abs(g - ref).max() / np.abs(ref).max())


def problem_a(rep: Report, be):
    B, n, d = 4096, 64, 128
    K, beta = inputs(B, n, d)
    X = torch.randn(B, d, d, device="cuda")
    f_dense = f_apply = flops(n, d, d) * B
    base = median_ms(lambda: plain_wy_dense(K, beta))
    rep.add("A", "plain torch compact WY dense (solve_triangular + bmm)", base, base, f_dense, "fp32", rel_err(plain_wy_dense(K, beta), K, beta))
    V, tau = lapack_shape(K, beta, full=False)
    rep.add("A", "torch.linalg.householder_product (4096, 128, 64)", median_ms(lambda: torch.linalg.householder_product(V, tau), slow=True), base)
    Vf, tauf = lapack_shape(K, beta, full=True)
    rep.add("A", "torch.linalg.householder_product (4096, 128, 128), 64 tau: full Q", median_ms(lambda: torch.linalg.householder_product(Vf, tauf), slow=True), base)
    for form in ("wy", "ut"):
        fn = lambda: hh.product(K, beta, form=form, backend="torch", check_finite=False).dense()  # noqa: E731
        rep.add("A", f"ours torch {form} dense", median_ms(fn), base, f_dense, "fp32", rel_err(fn(), K, beta))
    for prec in ("split", "tf32x3", "tf32"):
        be.fp32_precision = prec
        kind = "tf32" if prec != "ieee" else "fp32"
        for form in ("wy", "ut"):
            fn = lambda: hh.product(K, beta, form=form, backend="triton", check_finite=False).dense()  # noqa: E731
            rep.add("A", f"ours triton {form} dense [{prec}]", median_ms(fn), base, f_dense, kind, rel_err(fn(), K, beta))
        P = hh.product(K, beta, backend="triton", check_finite=False)
        rep.add("A", f"ours triton wy factor only [{prec}]", median_ms(lambda: hh.product(K, beta, backend="triton", check_finite=False)), base, 2 * n * n * d * B, kind)
        app = lambda: P.apply(X, check_finite=False)  # noqa: E731
        rep.add("A", f"ours triton wy apply to (128,128) [{prec}]", median_ms(app), base, f_apply, kind, rel_err(app(), K, beta, X))
        rep.add("A", f"ours triton wy dense + matmul [{prec}]", median_ms(lambda: P.dense() @ X), base)
    be.fp32_precision = "split"
    Kh, bh = K.bfloat16(), beta.bfloat16()
    Xh = X.bfloat16()
    fn = lambda: hh.product(Kh, bh, backend="triton", check_finite=False).dense()  # noqa: E731
    rep.add("A", "ours triton wy dense, bf16 inputs", median_ms(fn), base, f_dense, "tf32", rel_err(fn(), Kh, bh))
    Ph = hh.product(Kh, bh, backend="triton", check_finite=False)
    app = lambda: Ph.apply(Xh, check_finite=False)  # noqa: E731
    rep.add("A", "ours triton wy apply to (128,128), bf16 inputs", median_ms(app), base, f_apply, "tf32", rel_err(app(), Kh, bh, Xh))
    rep.add("A", "ours triton wy dense + matmul, bf16 inputs", median_ms(lambda: Ph.dense() @ Xh), base)
    fn = lambda: hh.product(Kh, bh, backend="torch", check_finite=False).dense()  # noqa: E731
    rep.add("A", "ours torch wy dense, bf16 inputs", median_ms(fn), base, f_dense, "fp32", rel_err(fn(), Kh, bh))
    # the check_finite=True default adds a pass over the inputs and a host sync
    fn = lambda: hh.product(K, beta, backend="triton").dense()  # noqa: E731
    rep.add("A", "ours triton wy dense, check_finite=True", median_ms(fn), base)


def problem_b(rep: Report, be):
    B, n, d = 16, 4096, 128
    K, beta = inputs(B, n, d, seed=1)
    X = torch.randn(B, d, d, device="cuda")
    f = flops(n, d, d) * B
    base = median_ms(lambda: plain_wy_dense_blocked(K, beta))
    rep.add("B", "plain torch blocked compact WY dense (64-blocks)", base, base, f, "fp32", rel_err(plain_wy_dense_blocked(K, beta), K, beta, sample=2))

    def chunked_householder_product():
        # 64 full Q's of 64 reflectors each (same shape of work per block), multiplied in turn
        Kc = K.reshape(B * 64, 64, d)
        V, tau = lapack_shape(Kc, beta.reshape(B * 64, 64), full=True)
        Q = torch.linalg.householder_product(V, tau).reshape(B, 64, d, d)
        P = Q[:, 0]
        for j in range(1, 64):
            P = P @ Q[:, j]
        return P

    rep.add("B", "torch.linalg.householder_product, 64 chunks (1024,128,128) + 63 bmm", median_ms(chunked_householder_product, slow=True), base)
    for form in ("wy", "ut"):
        fn = lambda: hh.product(K, beta, form=form, backend="torch", check_finite=False).dense()  # noqa: E731
        rep.add("B", f"ours torch {form} dense", median_ms(fn), base, f, "fp32", rel_err(fn(), K, beta, sample=2))
    for prec in ("split", "tf32x3", "tf32"):
        be.fp32_precision = prec
        kind = "tf32" if prec != "ieee" else "fp32"
        for form in ("wy", "ut"):
            fn = lambda: hh.product(K, beta, form=form, backend="triton", check_finite=False).dense()  # noqa: E731
            rep.add("B", f"ours triton {form} dense [{prec}]", median_ms(fn), base, f, kind, rel_err(fn(), K, beta, sample=2))
        P = hh.product(K, beta, backend="triton", check_finite=False)
        app = lambda: P.apply(X, check_finite=False)  # noqa: E731
        rep.add("B", f"ours triton wy apply to (128,128) [{prec}]", median_ms(app), base, f, kind, rel_err(app(), K, beta, X, sample=2))
        rep.add("B", f"ours triton wy dense + matmul [{prec}]", median_ms(lambda: P.dense() @ X), base)
    be.fp32_precision = "split"
    Pt = hh.product(K, beta, backend="torch", check_finite=False)
    rep.add("B", "ours torch wy apply to (128,128)", median_ms(lambda: Pt.apply(X, check_finite=False)), base, f, "fp32")
    Kh, bh, Xh = K.bfloat16(), beta.bfloat16(), X.bfloat16()
    fn = lambda: hh.product(Kh, bh, backend="triton", check_finite=False).dense()  # noqa: E731
    rep.add("B", "ours triton wy dense, bf16 inputs", median_ms(fn), base, f, "tf32", rel_err(fn(), Kh, bh, sample=2))
    Ph = hh.product(Kh, bh, backend="triton", check_finite=False)
    app = lambda: Ph.apply(Xh, check_finite=False)  # noqa: E731
    rep.add("B", "ours triton wy apply to (128,128), bf16 inputs", median_ms(app), base, f, "tf32", rel_err(app(), Kh, bh, Xh, sample=2))


def sweep(be) -> str:
    """Time launch settings of the factor kernel and of the apply/dense kernel (float32, "split").

    Returns a markdown table and records the fastest settings per problem in SWEPT
    (applied by :func:`use_swept`); the library's heuristics are restored afterwards.
    """
    from householder.backends import _triton_apply as ap
    from householder.backends import _triton_factor as fa

    lines = ["| problem | op | setting | ms |", "|---|---|---|---|"]
    best = {}
    cases = {
        "A": (inputs(4096, 64, 128), [(4, 32, 64), (8, 32, 64), (8, 64, 64), (4, 64, 32), (4, 32, 32)]),
        "B": (inputs(16, 4096, 128, seed=1), [(4, 32, 16), (4, 64, 16), (8, 64, 16), (4, 32, 32)]),
    }
    for prob, ((K, beta), configs) in cases.items():
        for quad in (True, False):
            for wf in (2, 4, 8):
                fa.CONFIG.update(num_warps=wf, quadrants=quad)
                try:
                    ms = median_ms(lambda: hh.product(K, beta, backend="triton", check_finite=False))
                except Exception as exc:
                    lines.append(f"| {prob} | factor | quadrants {quad}, warps {wf} | failed: {type(exc).__name__} |")
                    continue
                lines.append(f"| {prob} | factor | quadrants {quad}, warps {wf} | {ms:.3f} |")
                best.setdefault((prob, "factor"), []).append((ms, (quad, wf)))
                print(lines[-1], flush=True)
        quad, wf = min(best[(prob, "factor")])[1]
        fa.CONFIG.update(num_warps=wf, quadrants=quad)
        P = hh.product(K, beta, backend="triton", check_finite=False)
        for w, bd, bc in configs:
            ap.CONFIG.update(num_warps=w, BD=bd, BC=bc)
            try:
                ms = median_ms(lambda: P.dense())
            except Exception as exc:  # e.g. out of shared memory for this tile
                lines.append(f"| {prob} | dense | warps {w}, BD {bd}, BC {bc} | failed: {type(exc).__name__} |")
                continue
            lines.append(f"| {prob} | dense | warps {w}, BD {bd}, BC {bc} | {ms:.3f} |")
            best.setdefault((prob, "dense"), []).append((ms, (w, bd, bc)))
            print(lines[-1], flush=True)
    chosen = {prob: (min(best[(prob, "dense")])[1], min(best[(prob, "factor")])[1]) for prob in cases}
    lines.append("")
    lines.append(f"fastest (warps, BD, BC of apply/dense; quadrants, warps of the factor): {chosen}")
    SWEPT.update(chosen)
    for cfg in (ap.CONFIG, fa.CONFIG):
        for k in cfg:
            cfg[k] = None
    return "\n".join(lines) + "\n"


SWEPT: dict = {}


def use_swept(be, prob: str) -> str:
    """Apply the settings the sweep found fastest for ``prob`` (nothing if no sweep ran)."""
    from householder.backends import _triton_apply as ap
    from householder.backends import _triton_factor as fa

    if prob not in SWEPT:
        return "library defaults"
    (w, bd, bc), (quad, wf) = SWEPT[prob]
    ap.CONFIG.update(num_warps=w, BD=bd, BC=bc)
    fa.CONFIG.update(num_warps=wf, quadrants=quad)
    return f"apply/dense warps {w}, BD {bd}, BC {bc}; factor quadrants {quad}, warps {wf} (fastest in the sweep)"


def orthogonality(be, d: int = 128, n: int = 4096) -> str:
    """||P^T P - I||_2 / (n u) for n reflections in float32, random and nearly parallel unit keys."""
    lines = ["| keys | backend | form | fp32 dots | ||P^T P - I||_2 | / (n u) |", "|---|---|---|---|---|---|"]
    K, beta = inputs(4, n, d, seed=3, beta=2.0)
    base = K[:, :1, :]
    Kp = base + 1e-3 * K  # nearly parallel: angles of about 1e-3
    Kp = Kp / Kp.norm(dim=-1, keepdim=True)
    for label, keys in (("random", K), ("nearly parallel (1e-3)", Kp)):
        cases = [("torch", None)] + [("triton", p) for p in ("split", "tf32x3", "ieee", "tf32")]
        for backend, prec in cases:
            if prec:
                be.fp32_precision = prec
            for form in ("wy", "ut"):
                P = hh.product(keys, beta, form=form, backend=backend).dense().double()
                E = P.mT @ P - torch.eye(d, device="cuda", dtype=torch.float64)
                err = float(torch.linalg.matrix_norm(E, ord=2).max())
                lines.append(f"| {label} | {backend} | {form} | {prec or 'cuBLAS fp32'} | {err:.2e} | {err / (n * U32):.3f} |")
                print(lines[-1], flush=True)
    be.fp32_precision = "split"
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="markdown file to write")
    parser.add_argument("--commit", default=None, help="git commit of the code (default: git rev-parse HEAD)")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: sweep,a,b,orth")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    commit = tree_commit(args.commit, full=True)
    torch.backends.cuda.matmul.allow_tf32 = False  # plain torch peers in true float32
    be = hh.get_backend("triton")
    head = (
        f"# GPU product benchmark\n\n"
        f"- device: {torch.cuda.get_device_name()}\n"
        f"- torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}\n"
        f"- commit: {commit}\n- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n"
        f"- command: python benchmarks/compare_gpu_product.py --out {os.path.basename(args.out)}\n\n"
    )
    print(head, flush=True)
    ceil = ceilings()
    head += (
        "Measured ceilings (8192^3 matmul, median): "
        + ", ".join(f"{k} {v:.0f} TFLOP/s" for k, v in ceil.items() if k != "copy_TBps")
        + f"; device copy {ceil['copy_TBps']:.2f} TB/s (read + write).\n\n"
        "Problem A: 4096 products, n = 64, d = 128. Problem B: 16 products, n = 4096, d = 128.\n"
        "Unit keys, beta ~ U[0, 2], float32 unless stated; plain torch peers in true float32 (no TF32).\n"
        "TFLOP/s from the model count m (2 b^2 d + 4 b d c + 2 b^2 c) per product (blocks of b = 64, c = d).\n"
        "[split] etc.: matrix-product precision of the float32 kernels (split: 3xTF32 with rounded splits, the default;\n"
        "tf32x3: tl.dot's 3xTF32; tf32: one pass). bf16 inputs: factors at split, apply at tf32.\n\n"
    )
    print(head, flush=True)
    rep = Report(ceil)
    parts = []
    skip = set(filter(None, args.skip.split(",")))
    if "sweep" not in skip:
        try:
            head += "## Launch-setting sweep (triton, float32 dense)\n\n" + sweep(be) + "\n"
        except Exception:
            traceback.print_exc()
            parts.append(f"sweep stopped with an error:\n\n```\n{traceback.format_exc()}```\n")
    for name, fn in (("a", problem_a), ("b", problem_b)):
        if name in skip:
            continue
        try:
            head += f"Problem {name.upper()} runs with: {use_swept(be, name.upper())}.\n\n"
            fn(rep, be)
        except Exception:
            traceback.print_exc()
            parts.append(f"problem {name.upper()} stopped with an error:\n\n```\n{traceback.format_exc()}```\n")
        with open(args.out, "w") as fh:  # keep what was measured so far
            fh.write(head + rep.table() + "\n" + "\n".join(parts))
    orth = ""
    if "orth" not in skip:
        try:
            orth = "\n## Orthogonality, n = 4096 reflections (beta = 2), d = 128, float32, u = 2^-24\n\n" + orthogonality(be)
        except Exception:
            traceback.print_exc()
            orth = f"\northogonality stopped with an error:\n\n```\n{traceback.format_exc()}```\n"
    with open(args.out, "w") as fh:
        fh.write(head + rep.table() + "\n" + "\n".join(parts) + orth)
    print(rep.table())
    print(orth)
    return 0


if __name__ == "__main__":
    sys.exit(main())
