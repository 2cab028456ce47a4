"""asv GPU suites for the "triton" and "torch" backends: CUDA-event medians in ms.

``track_*`` methods return the median of CUDA-event timings (triton.testing.do_bench)
after warm-up; every benchmark is n/a (NotImplementedError in setup) without a
CUDA GPU. The side-by-side script with the peers is compare_gpu_product.py.
"""

from __future__ import annotations

import functools

from benchmarks._gpu import require_cuda as _require_cuda

SIZES = {
    "batch4096_n64_d128": (4096, 64, 128),
    "batch16_n4096_d128": (16, 4096, 128),
}




@functools.lru_cache(maxsize=4)
def _inputs(size: str, dtype: str):
    """Unit keys, beta ~ U[0, 2], and a (d, d) block per product, on the GPU (cached across benchmarks)."""
    torch = _require_cuda()
    batch, n, d = SIZES[size]
    g = torch.Generator(device="cuda").manual_seed(0)
    keys = torch.randn(batch, n, d, device="cuda", generator=g)
    keys = keys / keys.norm(dim=-1, keepdim=True)
    betas = 2.0 * torch.rand(batch, n, device="cuda", generator=g)
    x = torch.randn(batch, d, d, device="cuda", generator=g)
    dt = getattr(torch, dtype)
    return keys.to(dt), betas.to(dt), x.to(dt)


def _median_ms(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


class GpuProduct:
    """.dense(), .apply to a (d, d) block, and .dense() followed by a matmul."""

    params = (["triton", "torch"], ["wy", "ut"], ["float32", "bfloat16"], list(SIZES))
    param_names = ["backend", "form", "dtype", "size"]
    unit = "ms"
    timeout = 600

    def setup(self, backend, form, dtype, size):
        _require_cuda()
        import householder as hh

        try:
            hh.get_backend(backend)
        except hh.BackendUnavailableError as exc:
            raise NotImplementedError(str(exc)) from exc
        self.hh = hh
        self.keys, self.betas, self.x = _inputs(size, dtype)
        self.P = hh.product(self.keys, self.betas, form=form, backend=backend, check_finite=False)

    def track_dense(self, backend, form, dtype, size):
        hh = self.hh
        return _median_ms(lambda: hh.product(self.keys, self.betas, form=form, backend=backend, check_finite=False).dense())

    def track_factor(self, backend, form, dtype, size):
        hh = self.hh
        return _median_ms(lambda: hh.product(self.keys, self.betas, form=form, backend=backend, check_finite=False))

    def track_apply(self, backend, form, dtype, size):
        return _median_ms(lambda: self.P.apply(self.x, check_finite=False))

    def track_dense_then_matmul(self, backend, form, dtype, size):
        return _median_ms(lambda: self.P.dense() @ self.x)


class GpuPeers:
    """The peers on the batch-4096, n = 64, d = 128 problem, float32."""

    unit = "ms"
    timeout = 600

    def setup(self):
        self.torch = _require_cuda()
        self.keys, self.betas, _ = _inputs("batch4096_n64_d128", "float32")

    def track_plain_torch_compact_wy(self):
        from benchmarks.compare_gpu_product import plain_wy_dense

        torch = self.torch
        torch.backends.cuda.matmul.allow_tf32 = False
        return _median_ms(lambda: plain_wy_dense(self.keys, self.betas))

    def track_householder_product(self):
        from benchmarks.compare_gpu_product import lapack_shape

        V, tau = lapack_shape(self.keys, self.betas, full=False)
        return _median_ms(lambda: self.torch.linalg.householder_product(V, tau))
