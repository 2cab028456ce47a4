"""asv suites for the delta-rule ops: CUDA-event medians in ms (GPU) and wall-clock seconds (CPU).

``track_*`` methods on the GPU return the median of CUDA-event timings
(triton.testing.do_bench) after warm-up, and are n/a (NotImplementedError in
setup) without a CUDA GPU. The CPU suite times the torch backend's chunkwise
path on a small shape. The side-by-side script with the peers is
compare_delta.py.
"""

from __future__ import annotations

import functools

from benchmarks._gpu import require_cuda as _require_cuda

# (B, T) at 32768 tokens, H = 16 heads, K = V = 128: the shapes of the comparison
GPU_SHAPES = {"b16_t2048": (16, 2048), "b4_t8192": (4, 8192), "b2_t16384": (2, 16384)}
H, D = 16, 128


@functools.lru_cache(maxsize=4)
def _inputs(shape: str, n: int, dim: int, device: str = "cuda"):
    """bf16 q, k (unit rows), v, beta ~ U[0, 1] and float32 log-decays, cached across benchmarks."""
    import torch
    import torch.nn.functional as F

    B, T = GPU_SHAPES[shape] if shape in GPU_SHAPES else CPU_SHAPES[shape]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, T, H, dim, device=device, generator=gen).to(dtype)
    k = F.normalize(torch.randn(B, T * n, H, dim, device=device, generator=gen), dim=-1).to(dtype)
    v = torch.randn(B, T * n, H, dim, device=device, generator=gen).to(dtype)
    beta = torch.rand(B, T * n, H, device=device, generator=gen).to(dtype)
    g = F.logsigmoid(torch.randn(B, T, H, device=device, generator=gen))
    return q, k, v, beta, g


def _median_ms(fn, grad_to_none=None) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median"))


def _op(n: int, gated: bool, backend: str):
    import householder as hh

    def f(q, k, v, beta, g):
        g = g if gated else None
        if n == 1:
            return hh.delta_rule(q, k, v, beta, g=g, backend=backend, check_finite=False)[0]
        return hh.delta_product(q, k, v, beta, g=g, num_householder=n, backend=backend, check_finite=False)[0]

    return f


class GpuDeltaRule:
    """delta_rule (plain, gated) and delta_product (n_h = 2, 3) on the Triton backend, bf16, H = 16."""

    params = (["delta", "gated", "product2", "product3"], list(GPU_SHAPES), [64, 128])
    param_names = ["op", "shape", "dim"]
    unit = "ms"
    timeout = 600

    def setup(self, op, shape, dim):
        torch = _require_cuda()
        self.n = int(op[len("product"):]) if op.startswith("product") else 1
        self.gated = op != "delta"
        self.fn = _op(self.n, self.gated, "triton")
        self.args = [x.detach() for x in _inputs(shape, self.n, dim)]
        self.torch = torch

    def track_forward(self, op, shape, dim):
        def run():
            with self.torch.no_grad():
                self.fn(*self.args)

        return _median_ms(run)

    def track_forward_backward(self, op, shape, dim):
        args = [x.detach().requires_grad_() for x in self.args]
        do = self.torch.randn_like(self.fn(*args))

        def run():
            self.fn(*args).backward(do)

        return _median_ms(run, grad_to_none=args)


class GpuDeltaRuleVarlen:
    """Packed sequences of unequal lengths vs the same tokens as equal lengths (gated, bf16)."""

    params = (["equal", "packed"],)
    param_names = ["layout"]
    unit = "ms"
    timeout = 600

    def setup(self, layout):
        torch = _require_cuda()
        import householder as hh

        q, k, v, beta, g = _inputs("b4_t8192", 1, 128)
        if layout == "equal":
            self.args = (q, k, v, beta, g)
            self.cu = None
        else:
            self.args = tuple(x.reshape((1, -1) + tuple(x.shape[2:])) for x in (q, k, v, beta, g))
            # the same 32768 tokens cut into 7 sequences of unequal length
            cuts = [0, 1000, 5000, 5100, 12000, 20000, 27000, 32768]
            self.cu = torch.tensor(cuts, device="cuda", dtype=torch.int64)
        self.hh = hh
        self.torch = torch

    def track_forward_backward(self, layout):
        args = [x.detach().requires_grad_() for x in self.args]
        q, k, v, beta, g = args

        def fn():
            return self.hh.delta_rule(q, k, v, beta, g=g, cu_seqlens=self.cu, backend="triton", check_finite=False)[0]

        do = self.torch.randn_like(fn())

        def run():
            fn().backward(do)

        return _median_ms(run, grad_to_none=args)


CPU_SHAPES = {"b2_t256": (2, 256)}


class CpuDeltaRule:
    """The torch backend's chunkwise path on the CPU, float32, H = 16, K = V = 64."""

    params = (["delta", "gated"],)
    param_names = ["op"]
    timeout = 300

    def setup(self, op):
        try:
            import torch  # noqa: F401
        except ImportError as exc:
            raise NotImplementedError("needs torch") from exc
        self.fn = _op(1, op == "gated", "torch")
        self.args = _inputs("b2_t256", 1, 64, "cpu")

    def time_forward(self, op):
        self.fn(*self.args)
