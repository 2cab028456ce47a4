"""asv suites for householder.product: building the dense P and applying P, per
backend, form, dtype and size. CPU backends are timed with asv's own timer;
GPU backends report CUDA-event medians through ``track_*`` (see bench_gpu_*)."""

from __future__ import annotations

import numpy as np

import householder as hh

SIZES = {
    "batch256_n64_d128": (256, 64, 128),
    "batch4_n4096_d128": (4, 4096, 128),
}


def _inputs(size: str, dtype: str):
    batch, n, d = SIZES[size]
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((batch, n, d))
    keys /= np.linalg.norm(keys, axis=-1, keepdims=True)
    betas = rng.uniform(0.0, 2.0, (batch, n))
    return keys.astype(dtype), betas.astype(dtype)


class Dense:
    """P.dense() for a batch of products, NumPy backend."""

    params = (["wy", "ut"], ["float64", "float32"], list(SIZES))
    param_names = ["form", "dtype", "size"]
    timeout = 300

    def setup(self, form, dtype, size):
        self.keys, self.betas = _inputs(size, dtype)

    def time_dense(self, form, dtype, size):
        hh.product(self.keys, self.betas, form=form, backend="numpy", check_finite=False).dense()

    def peakmem_dense(self, form, dtype, size):
        hh.product(self.keys, self.betas, form=form, backend="numpy", check_finite=False).dense()


class Apply:
    """P @ x for x of shape (batch, d, 64), against forming P and multiplying."""

    params = (["wy", "ut"], ["float64", "float32"], list(SIZES))
    param_names = ["form", "dtype", "size"]
    timeout = 300

    def setup(self, form, dtype, size):
        keys, betas = _inputs(size, dtype)
        batch, n, d = SIZES[size]
        self.x = np.random.default_rng(1).standard_normal((batch, d, 64)).astype(dtype)
        self.P = hh.product(keys, betas, form=form, backend="numpy", check_finite=False)

    def time_apply(self, form, dtype, size):
        self.P.apply(self.x, check_finite=False)

    def time_dense_then_matmul(self, form, dtype, size):
        self.P.dense() @ self.x


class Peers:
    """The CPU peers on the issue's problem: rank-one loop and per-matrix xORGQR."""

    timeout = 300

    def setup(self):
        import scipy.linalg.lapack as lapack

        self.keys, self.betas = _inputs("batch256_n64_d128", "float64")
        rng = np.random.default_rng(2)
        self.qr, self.tau = [], []
        for _ in range(256):
            a = np.zeros((128, 128))
            qr, tau, _, _ = lapack.dgeqrf(rng.standard_normal((128, 64)))
            a[:, :64] = qr
            self.qr.append(a)
            self.tau.append(tau)

    def time_rank_one_loop(self):
        from benchmarks.compare_cpu import rank_one_loop

        rank_one_loop(self.keys, self.betas)

    def time_lapack_orgqr_per_matrix(self):
        from benchmarks.compare_cpu import orgqr_loop

        orgqr_loop(self.qr, self.tau)
