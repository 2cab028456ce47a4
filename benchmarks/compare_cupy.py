"""Side-by-side GPU timing of the "cupy" backend against its peers (issue 4).

Problem: a batch of 4096 products of n = 64 factors in d = 128 (unit keys,
beta ~ U[0, 2]), the dense P, float32 and float64. One set of inputs, made in
torch and shared with CuPy through DLPack (no copy). Cases:

- ours "cupy" with ``fused = True`` (fused tensor-core kernels: factor from the
  keys, then P = I - K^T T K in one pass; float32 as 3xTF32) and with
  ``fused = False``, the default (cuBLAS strided-batched GEMMs in
  float32/float64 and our triangular-solve kernel); also the two fused kernels
  alone;
- ours "triton" (when it imports) and ours "torch";
- plain torch compact WY (K K^T, solve_triangular, bmm);
- torch.linalg.householder_product on the same shape of work: reflectors
  (128, 64) per product (LAPACK's structure, unit diagonal implied), so it
  computes the first 64 columns of Q; it is not the same function, only the
  same size of problem.

Times are medians of CUDA-event timings (events of the library that runs the
case) after warm-up; inputs are made with check_finite=False so the timings
hold the product alone. "GB/s" counts the fewest bytes (read K, write P).
Errors: max |P - P_ref| / max |P_ref| over the first 4 products against the
float64 sequential reference.

    python benchmarks/compare_cupy.py --out benchmarks/results/cupy_h100.md [--commit SHA]
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import traceback

import numpy as np

import householder as hh
from householder import reference
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from benchmarks._provenance import tree_commit  # noqa: E402



def median_ms(fn, lib: str, repeat: int = 50, warmup: int = 5) -> float:
    """Median CUDA-event time of fn() in ms, with events of ``lib`` ("cupy" or "torch")."""
    if lib == "cupy":
        import cupy as cp

        def event():
            return cp.cuda.Event()

        def sync(e):
            e.synchronize()

        def elapsed(a, b):
            return cp.cuda.get_elapsed_time(a, b)
    else:
        import torch

        def event():
            return torch.cuda.Event(enable_timing=True)

        def sync(e):
            e.synchronize()

        def elapsed(a, b):
            return a.elapsed_time(b)

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start, end = event(), event()
        start.record()
        fn()
        end.record()
        sync(end)
        times.append(elapsed(start, end))
    return float(np.median(times))


def rel_err(got, keys, betas, sample: int = 4) -> float:
    ref = reference.dense(keys[:sample], betas[:sample])
    g = reference.to_float64(got[:sample])
    return float(np.abs(g - ref).max() / np.abs(ref).max())


def plain_wy_dense(K, beta):
    """P = I - K^T T K, T = (I + diag(beta) striu(K K^T))^{-1} diag(beta): plain torch."""
    import torch

    n, d = K.shape[-2], K.shape[-1]
    A = torch.eye(n, device=K.device, dtype=K.dtype) + beta[..., :, None] * torch.triu(K @ K.mT, 1)
    T = torch.linalg.solve_triangular(A, torch.diag_embed(beta), upper=True, unitriangular=True)
    return torch.eye(d, device=K.device, dtype=K.dtype) - K.mT @ (T @ K)


def versions() -> dict:
    import cupy as cp
    import torch

    out = {"cupy": cp.__version__, "torch": torch.__version__}
    rt = cp.cuda.runtime.runtimeGetVersion()
    out["CUDA runtime (CuPy)"] = f"{rt // 1000}.{rt % 1000 // 10}"
    drv = cp.cuda.runtime.driverGetVersion()
    out["CUDA driver"] = f"{drv // 1000}.{drv % 1000 // 10}"
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    out["numpy"] = np.__version__
    return out


def copy_bandwidth() -> float:
    """Device-to-device copy rate in GB/s, counting bytes read and written."""
    import cupy as cp

    x = cp.empty(2**28, dtype=cp.float32)
    y = cp.empty_like(x)
    ms = median_ms(lambda: y.__setitem__(Ellipsis, x), "cupy", repeat=20)
    return 2 * x.nbytes / ms / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="markdown file to write")
    parser.add_argument("--commit", default=None, help="git commit of the tree (default: git rev-parse)")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()

    import cupy as cp
    import torch

    be = hh.get_backend("cupy")
    B, n, d = args.batch, args.n, args.d
    g = torch.Generator(device="cuda").manual_seed(0)
    keys32 = torch.randn(B, n, d, device="cuda", generator=g)
    keys32 = keys32 / keys32.norm(dim=-1, keepdim=True)
    betas32 = 2.0 * torch.rand(B, n, device="cuda", generator=g)
    bw = copy_bandwidth()
    notes = []
    rows = []

    try:
        hh.get_backend("triton")
        have_triton = True
    except hh.BackendUnavailableError as exc:
        have_triton = False
        notes.append(f"backend 'triton' left out: {exc}")
        print(notes[-1], flush=True)

    for dtype in ("float32", "float64"):
        tdt = getattr(torch, dtype)
        K, beta = keys32.to(tdt).contiguous(), betas32.to(tdt).contiguous()
        Kc, bc = cp.from_dlpack(K), cp.from_dlpack(beta)  # the same memory
        ideal_bytes = K.numel() * K.element_size() + B * d * d * K.element_size()
        cases = []

        def cupy_dense(form, fused):
            def run():
                be.fused = fused
                return hh.product(Kc, bc, form=form, backend="cupy", check_finite=False).dense()

            return run

        for form in ("wy", "ut"):
            cases.append((f"ours cupy {form} (fused kernels)", "cupy", cupy_dense(form, True), True))
            cases.append((f"ours cupy {form} (cuBLAS + solve kernel)", "cupy", cupy_dense(form, False), True))
        Kb, bb = Kc.reshape(B, 1, n, d), bc.reshape(B, 1, n)
        T = be.wy_factor(Kb, bb)
        cases.append(("  cupy part: factor kernel (K -> T)", "cupy", lambda: be.wy_factor(Kb, bb), False))
        cases.append(("  cupy part: dense kernel (K, T -> P)", "cupy", lambda: be.dense_blocks("wy", Kb, bb, T), False))
        if have_triton:
            for form in ("wy", "ut"):
                cases.append((f"ours triton {form}", "torch",
                              lambda form=form: hh.product(K, beta, form=form, backend="triton", check_finite=False).dense(), True))
        cases.append(("ours torch wy", "torch", lambda: hh.product(K, beta, backend="torch", check_finite=False).dense(), True))
        cases.append(("plain torch compact WY (solve_triangular + bmm)", "torch", lambda: plain_wy_dense(K, beta), True))
        V, tau = K.mT.contiguous(), beta.contiguous()
        cases.append(("torch.linalg.householder_product (4096 x (128, 64))", "torch",
                      lambda: torch.linalg.householder_product(V, tau), "slow"))

        for name, lib, fn, check in cases:
            try:
                slow = check == "slow"
                ms = median_ms(fn, lib, repeat=3 if slow else args.repeat, warmup=1 if slow else 5)
                err = rel_err(fn(), K, beta) if check is True else None
            except Exception as exc:  # report the case and go on
                traceback.print_exc()
                notes.append(f"{dtype} {name}: failed: {exc!r}")
                continue
            finally:
                be.fused = True
            row = {"dtype": dtype, "case": name, "ms": ms, "gbps": ideal_bytes / ms / 1e6, "err": err}
            rows.append(row)
            print(f"{dtype:8s} {name:58s} {ms:9.3f} ms  {row['gbps']:7.0f} GB/s  err {err if err is not None else '-'}", flush=True)
        if be.fused_unavailable:
            notes.append(f"fused kernels unavailable: {be.fused_unavailable}")

    # ratios against our cupy default and against the triton backend, per dtype
    lines = []
    for dtype in ("float32", "float64"):
        sub = [r for r in rows if r["dtype"] == dtype]
        ours = next((r["ms"] for r in sub if r["case"] == "ours cupy wy (fused kernels)"), None)
        tri = next((r["ms"] for r in sub if r["case"] == "ours triton wy"), None)
        for r in sub:
            vs_ours = f"{r['ms'] / ours:.2f}" if ours else "-"
            vs_tri = f"{r['ms'] / tri:.2f}" if tri else "-"
            err = f"{r['err']:.1e}" if r["err"] is not None else "-"
            lines.append(f"| {dtype} | {r['case']} | {r['ms']:.3f} | {vs_ours} | {vs_tri} | {r['gbps']:.0f} | {err} |")
    table = (
        "| dtype | case | ms (median) | x ours cupy wy | x ours triton wy | GB/s (K + P bytes) | max rel err |\n"
        "|---|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n"
    )
    device = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"]
    device = device.decode() if isinstance(device, bytes) else device
    ver = ", ".join(f"{k} {v}" for k, v in versions().items())
    text = (
        f"# CuPy backend vs peers: dense P, batch {B} x n {n} x d {d}\n\n"
        f"- device: {device}; measured copy bandwidth {bw:.0f} GB/s (read + write)\n"
        f"- versions: {ver}\n"
        f"- commit: {tree_commit(args.commit)}; date: {datetime.date.today().isoformat()}\n"
        f"- script: `python benchmarks/compare_cupy.py --out ...`; medians of {args.repeat} CUDA-event timings "
        f"(3 for householder_product) after warm-up\n"
        f"- our cupy backend: {be.describe()}\n\n"
        + table
        + "\n"
        + "".join(f"- note: {n_}\n" for n_ in notes)
        + "\nhouseholder_product takes LAPACK-structured reflectors (unit diagonal implied, zeros above) and "
        "returns the first 64 columns of Q: the same size of work, not the same function; its error is not listed.\n"
    )
    with open(args.out, "w") as fh:
        fh.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
