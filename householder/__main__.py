"""Command line: ``python -m householder [info|train|tasks] ...``.

``info`` (the default) lists the backends available here and checks a product
on each against the float64 reference.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def _info(args: argparse.Namespace) -> int:
    import householder as hh

    rng = np.random.default_rng(args.seed)
    batch, n, d = args.batch, args.n, args.d
    keys = rng.standard_normal((batch, n, d))
    keys /= np.linalg.norm(keys, axis=-1, keepdims=True)
    betas = rng.uniform(0.0, 2.0, (batch, n))
    ref = hh.reference.dense(keys, betas)
    print(f"householder {hh.__version__}")
    print(f"backends known: {', '.join(hh.backend_names())}")
    available = hh.available_backends()
    print(f"backends available here: {', '.join(available)}")
    for name in hh.backend_names():
        if name not in available:
            try:
                hh.get_backend(name)
            except hh.BackendUnavailableError as exc:
                print(f"  {name}: {exc}")
    print(f"\nproduct of n = {n} factors in d = {d}, batch {batch}, unit keys, beta ~ U[0, 2]")
    print(f"{'backend':<8} {'form':<5} {'dtype':<8} {'max |P - P_ref|':>16} {'time (ms)':>10}  device")
    status = 0
    for name in available:
        be = hh.get_backend(name)
        for dtype in (np.float64, np.float32):
            for form in ("wy", "ut"):
                try:
                    k = be.from_numpy(keys.astype(dtype))
                    b = be.from_numpy(betas.astype(dtype))
                    P = hh.product(k, b, form=form, backend=name)
                    dense = P.dense()
                    be.synchronize() if hasattr(be, "synchronize") else None
                    t0 = time.perf_counter()
                    for _ in range(args.repeat):
                        dense = hh.product(k, b, form=form, backend=name).dense()
                    be.synchronize() if hasattr(be, "synchronize") else None
                    ms = (time.perf_counter() - t0) / args.repeat * 1e3
                    err = float(np.abs(be.to_numpy(dense).astype(np.float64) - ref).max())
                except Exception as exc:  # report every backend, then fail
                    print(f"{name:<8} {form:<5} {np.dtype(dtype).name:<8} FAILED: {exc!r}")
                    status = 1
                    continue
                tol = 1e-10 if dtype == np.float64 else 1e-4
                flag = "" if err < tol else "  <-- above tolerance"
                status |= int(err >= tol)
                print(f"{name:<8} {form:<5} {np.dtype(dtype).name:<8} {err:16.2e} {ms:10.3f}  {be.describe()}{flag}")
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m householder", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    info = sub.add_parser("info", help="list backends and check a product on each (default)")
    for p in (parser, info):
        p.add_argument("--batch", type=int, default=64)
        p.add_argument("--n", type=int, default=32)
        p.add_argument("--d", type=int, default=64)
        p.add_argument("--repeat", type=int, default=5)
        p.add_argument("--seed", type=int, default=0)
    _add_optional_commands(sub)
    args = parser.parse_args(argv)
    if args.command in (None, "info"):
        return _info(args)
    return args.run(args)


def _add_optional_commands(sub) -> None:
    """Subcommands that live in their own modules (training, tasks)."""
    import importlib

    for module_name in ("householder.training", "householder.tasks"):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.add_subcommand(sub)


if __name__ == "__main__":
    sys.exit(main())
