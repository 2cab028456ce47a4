"""asv GPU suites for the "cupy" backend: CUDA-event medians in ms.

``track_*`` methods warm up, then return the median of CUDA-event timings of
the call; every benchmark is n/a (NotImplementedError in setup) where the cupy
backend is unavailable (no CuPy, no GPU). The side-by-side script with the
peers is compare_cupy.py.
"""

from __future__ import annotations

import functools

import numpy as np

SIZES = {
    "batch4096_n64_d128": (4096, 64, 128),
    "batch16_n4096_d128": (16, 4096, 128),
}


def _backend():
    import householder as hh

    try:
        return hh.get_backend("cupy")
    except hh.BackendUnavailableError as exc:
        raise NotImplementedError(str(exc)) from exc


@functools.lru_cache(maxsize=4)
def _inputs(size: str, dtype: str):
    """Unit keys, beta ~ U[0, 2], and a (d, 64) block per product, on the GPU (cached across benchmarks)."""
    import cupy as cp

    batch, n, d = SIZES[size]
    rs = cp.random.RandomState(0)
    keys = rs.standard_normal((batch, n, d), dtype=np.float64)
    keys /= cp.linalg.norm(keys, axis=-1, keepdims=True)
    betas = rs.uniform(0.0, 2.0, (batch, n))
    x = rs.standard_normal((batch, d, 64))
    return keys.astype(dtype), betas.astype(dtype), x.astype(dtype)


def _median_ms(fn, repeat: int = 30, warmup: int = 3) -> float:
    import cupy as cp

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end))
    return float(np.median(times))


class CupyProduct:
    """Build the product and form P, or apply it to a (d, 64) block, on the cupy backend."""

    params = (["wy", "ut"], ["float32", "float64"], list(SIZES), [True, False])
    param_names = ["form", "dtype", "size", "fused"]
    unit = "ms"
    timeout = 300

    def setup(self, form, dtype, size, fused):
        self.be = _backend()
        self.keys, self.betas, self.x = _inputs(size, dtype)
        self.saved = self.be.fused
        self.be.fused = fused

    def teardown(self, form, dtype, size, fused):
        self.be.fused = self.saved

    def _product(self, form):
        import householder as hh

        return hh.product(self.keys, self.betas, form=form, backend="cupy", check_finite=False)

    def track_dense(self, form, dtype, size, fused):
        return _median_ms(lambda: self._product(form).dense())

    def track_apply(self, form, dtype, size, fused):
        P = self._product(form)
        return _median_ms(lambda: P.apply(self.x, check_finite=False))

    def track_build(self, form, dtype, size, fused):
        return _median_ms(lambda: self._product(form))
