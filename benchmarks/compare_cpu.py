"""Side-by-side CPU timing of the NumPy backend against its peers (issue: core).

Problem: float64, a batch of 256 products of n = 64 factors in d = 128.
Peers: a NumPy loop of n rank-one updates (batched over the 256), and LAPACK's
xORGQR through SciPy, called once per matrix on the same reflectors. Also
``.apply`` to a (d, 64) block against forming P and multiplying.

    python benchmarks/compare_cpu.py [--batch 256 --n 64 --d 128 --out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import numpy as np
import scipy
import scipy.linalg.lapack as lapack

import householder as hh
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from benchmarks._provenance import tree_commit  # noqa: E402



def median_time(fn, repeat: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def rank_one_loop(keys, betas):
    batch, n, d = keys.shape
    P = np.broadcast_to(np.eye(d), (batch, d, d)).copy()
    for i in range(n):
        k = keys[:, i, :]
        Pk = np.einsum("bij,bj->bi", P, k)
        P -= betas[:, i, None, None] * Pk[:, :, None] * k[:, None, :]
    return P


def orgqr_loop(qr_stack, tau_stack):
    out = []
    for a, t in zip(qr_stack, tau_stack):
        q, _, info = lapack.dorgqr(a, t)
        out.append(q)
    return np.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--m", type=int, default=64, help="columns of the block for apply")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--out", default=None, help="markdown file to write the record to")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    batch, n, d = args.batch, args.n, args.d

    # Real reflectors from QR, so that xORGQR and we build the very same Q.
    a = rng.standard_normal((batch, d, d))
    qr_stack = np.empty((batch, d, d), order="C")
    tau_stack = np.empty((batch, n))
    keys = np.zeros((batch, n, d))
    for i in range(batch):
        qr, tau, _, info = lapack.dgeqrf(a[i, :, :n])
        full = np.zeros((d, d))
        full[:, :n] = qr
        qr_stack[i] = full
        tau_stack[i] = tau
        v = np.tril(qr, -1)
        v[np.arange(n), np.arange(n)] = 1.0
        keys[i] = v.T
    betas = tau_stack
    x = rng.standard_normal((batch, d, args.m))

    # dorgqr with k = n reflectors on a d x d array gives the full Q = P.
    q_lapack = np.stack([lapack.dorgqr(qr_stack[i], tau_stack[i])[0] for i in range(2)])
    ours = hh.product(keys, betas).dense()
    err = float(np.abs(ours[:2] - q_lapack).max())
    assert err < 1e-12, f"mismatch with dorgqr: {err}"

    rows = []
    t_loop = median_time(lambda: rank_one_loop(keys, betas), max(2, args.repeat // 3))
    t_orgqr = median_time(lambda: orgqr_loop(qr_stack, tau_stack), args.repeat)
    for form in ("wy", "ut"):
        t_dense = median_time(lambda: hh.product(keys, betas, form=form, check_finite=False).dense(), args.repeat)
        P = hh.product(keys, betas, form=form, check_finite=False)
        t_apply = median_time(lambda: P.apply(x, check_finite=False), args.repeat)
        t_dense_mm = median_time(lambda: P.dense() @ x, args.repeat)
        rows.append((form, t_dense, t_apply, t_dense_mm))

    lines = [
        "# CPU: NumPy backend vs rank-one loop and LAPACK xORGQR",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- commit: {tree_commit()}",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        f"- numpy {np.__version__}, scipy {scipy.__version__}, python {platform.python_version()}",
        f"- problem: float64, batch {batch}, n = {n}, d = {d}; apply to ({d}, {args.m}) blocks; medians of {args.repeat}",
        "",
        f"rank-one loop (batched NumPy): {t_loop * 1e3:.2f} ms; xORGQR per matrix (SciPy): {t_orgqr * 1e3:.2f} ms",
        "",
        "| form | dense (ms) | loop / dense | xORGQR / dense | apply (ms) | dense+matmul (ms) | (dense+matmul) / apply |",
        "|---|---|---|---|---|---|---|",
    ]
    for form, t_dense, t_apply, t_dense_mm in rows:
        lines.append(
            f"| {form} | {t_dense * 1e3:.2f} | {t_loop / t_dense:.1f}x | {t_orgqr / t_dense:.2f}x | "
            f"{t_apply * 1e3:.2f} | {t_dense_mm * 1e3:.2f} | {t_dense_mm / t_apply:.2f}x |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
