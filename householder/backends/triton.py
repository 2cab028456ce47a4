"""Triton backend: the torch backend's tensors, with the numerics in Triton kernels.

Triangular factors (Gram matrix and in-block inverse fused, one program per
block of <= 64 factors), applying P or P^T to a block (one pass per block),
and the dense product run in the kernels of ``_triton_factor`` and
``_triton_apply``; their gradients are Triton kernels too, wired in through
``torch.autograd.Function``. Tensors must be on a CUDA device, except under
``TRITON_INTERPRET=1``, where Triton's interpreter runs the same kernels on
CPU tensors (slowly: for tests).

dtypes: float32 and float64 compute in their own precision; bfloat16/float16
inputs are read as they are, computed in float32 and written back in the input
dtype. Matrix products of float32 data run at ``fp32_precision``: "split"
(default on the GPU) is 3xTF32 with round-to-nearest splits, about float32
accuracy on the tensor cores; "ieee" is float32 FMA (exact float32, slow),
"tf32x3" tl.dot's own 3xTF32 (truncated splits, ~8x less accurate), "tf32"
one pass (~1e-3). Half inputs build their factors at ``fp32_precision`` and
apply them at ``half_precision`` ("tf32" by default: it holds bfloat16/float16
values exactly and its rounding stays below the output's). float64 uses
float64 dots.
"""

from __future__ import annotations

import torch

from householder.backends import _triton_apply as _apply
from householder.backends import _triton_factor as _factor
from householder.backends._launch import interpreting
from householder.backends.torch import TorchBackend, compute_dtype

_HALF = (torch.bfloat16, torch.float16)
_PRECISIONS = ("ieee", "tf32x3", "split", "tf32")


class TritonBackend(TorchBackend):
    """Torch tensors, Triton kernels (CUDA, or the CPU under TRITON_INTERPRET=1)."""

    name = "triton"

    def __init__(self, interpret: bool):
        self.interpret = interpret
        # the interpreter's dots are exact whatever the setting: "ieee" says so
        self.fp32_precision = "ieee" if interpret else "split"
        self.half_precision = "ieee" if interpret else "tf32"
        self._fp64_kernels: bool | None = True if interpret else None

    def _kernels_for(self, dtype: torch.dtype) -> bool:
        """Whether the kernels run for ``dtype``; False only where Triton cannot compile a float64 tl.dot.

        Checked once per process on the first float64 call; the float64 work then
        runs on the torch primitives (cuBLAS), with a warning.
        """
        if dtype != torch.float64 or self._fp64_kernels is not None:
            return dtype != torch.float64 or bool(self._fp64_kernels)
        def probe(dt):
            k = torch.eye(16, dtype=dt, device="cuda")[None]
            _factor.factor_forward("wy", k, torch.ones(1, 16, dtype=dt, device="cuda"), dt, "ieee")
            torch.cuda.synchronize()

        probe(torch.float32)  # must work: an error here is a bug, not a missing float64 lowering
        try:
            probe(torch.float64)
            self._fp64_kernels = True
        except Exception as exc:  # the same kernel fails only in float64: this Triton lacks a float64 tl.dot
            import warnings

            warnings.warn(
                f"Triton {__import__('triton').__version__} cannot compile float64 tl.dot here "
                f"({type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200]}); "
                f"backend 'triton' computes float64 inputs with the torch primitives",
                RuntimeWarning,
                stacklevel=3,
            )
            self._fp64_kernels = False
        return self._fp64_kernels

    # -- plumbing -----------------------------------------------------------
    def asarray(self, x, name: str) -> torch.Tensor:
        t = super().asarray(x, name)
        if t.device.type != "cuda" and not self.interpret:
            raise ValueError(
                f"{name} is a tensor on {t.device}, but backend 'triton' runs on CUDA tensors; move it "
                f"with .cuda(), use backend='torch', or set TRITON_INTERPRET=1 before importing "
                f"householder to run the kernels in Triton's CPU interpreter"
            )
        return t

    def from_numpy(self, a, like=None) -> torch.Tensor:
        """A tensor on the current CUDA device (on the CPU under the interpreter)."""
        t = super().from_numpy(a)
        if like is not None:
            return t.to(like.device)
        return t if self.interpret else t.cuda()

    def describe(self) -> str:
        import triton

        where = "interpreter on the CPU" if self.interpret else torch.cuda.get_device_name()
        fp64 = {None: "not yet checked", True: "kernels", False: "torch primitives"}[self._fp64_kernels]
        return (
            f"triton {triton.__version__}, torch {torch.__version__} on {where} "
            f"(float32 dots: {self.fp32_precision}; half: {self.half_precision}; float64: {fp64})"
        )

    def _precision(self, cdt: torch.dtype, dtype: torch.dtype, factor: bool = False) -> str:
        """The matrix-product precision of a kernel computing in ``cdt`` on inputs of ``dtype``."""
        if cdt == torch.float64:
            return "ieee"
        p = self.half_precision if (dtype in _HALF and not factor) else self.fp32_precision
        if p not in _PRECISIONS:
            raise ValueError(f"fp32_precision and half_precision must be one of {_PRECISIONS}; got {p!r}")
        return p

    # -- numerics -------------------------------------------------------------
    def _factor(self, mode: str, IN, beta):
        """A factor per block: IN (..., b, d) keys (wy, ut) or (..., b, b) UT matrices (utinv)."""
        cdt = compute_dtype(IN.dtype)
        batch = torch.broadcast_shapes(IN.shape[:-2], beta.shape[:-1])
        b, width = IN.shape[-2], IN.shape[-1]
        IN = IN.expand(batch + (b, width)).reshape(-1, b, width)
        beta = beta.expand(batch + (b,)).reshape(-1, b)
        out = _FactorFn.apply(mode, IN, beta, self._precision(cdt, IN.dtype, factor=True), self.interpret)
        return out.reshape(batch + (b, b))

    def wy_factor(self, K, beta):
        if not self._kernels_for(K.dtype):
            return super().wy_factor(K, beta)
        b = K.shape[-2]
        if b <= _factor.MAX_BT:
            return self._factor("wy", K, beta)
        # a block wider than the registers: T of 64-factor pieces, merged by the composition rule
        from householder._representation import compose_wy_factors

        parts = [(K[..., i : i + 64, :], self._factor("wy", K[..., i : i + 64, :], beta[..., i : i + 64])) for i in range(0, b, 64)]
        Kc, T = parts[0][0].to(parts[0][1].dtype), parts[0][1]
        for Ki, Ti in parts[1:]:
            Kc, T = compose_wy_factors(self, Kc, T, Ki.to(Ti.dtype), Ti)
        return T

    def ut_factor(self, K, beta):
        if K.shape[-2] <= _factor.MAX_BT and self._kernels_for(K.dtype):
            return self._factor("ut", K, beta)
        # the n x n matrix of a long product (P.factor): a plain Gram matrix, no inverse
        return super().ut_factor(K, beta)

    def _wy_blocks(self, form, K, beta, F):
        """Blocks of at most 64 factors with their WY factors T, flattened to one batch dimension."""
        b = K.shape[-2]
        if b > _factor.MAX_BT:
            # wide blocks: the diagonal 64-blocks of F are the factors of 64-factor pieces
            pad = -b % 64
            if pad:
                K = torch.cat([K, K.new_zeros(K.shape[:-2] + (pad, K.shape[-1]))], dim=-2)
                beta = torch.cat([beta, beta.new_zeros(beta.shape[:-1] + (pad,))], dim=-1)
                F = torch.nn.functional.pad(F, (0, pad, 0, pad))
            q = (b + pad) // 64
            idx = torch.arange(q, device=F.device)
            F = F.reshape(F.shape[:-2] + (q, 64, q, 64))[..., idx, :, idx, :].movedim(0, -3)
            K = K.reshape(K.shape[:-2] + (q, 64, K.shape[-1])).flatten(-4, -3)
            beta = beta.reshape(beta.shape[:-1] + (q, 64)).flatten(-3, -2)
            F = F.flatten(-4, -3)
        if form == "ut":
            F = self._factor("utinv", F, beta)
        return K, F

    def apply_blocks(self, form, K, beta, F, x, transpose: bool):
        if not self._kernels_for(x.dtype):
            return super().apply_blocks(form, K, beta, F, x, transpose)
        K, T = self._wy_blocks(form, K, beta, F)
        m, b, d = K.shape[-3:]
        batch = torch.broadcast_shapes(K.shape[:-3], T.shape[:-3], x.shape[:-2])
        c = x.shape[-1]
        Kf = K.expand(batch + (m, b, d)).reshape(-1, m, b, d)
        Tf = T.expand(batch + (m, b, b)).reshape(-1, m, b, b)
        xf = x.expand(batch + (d, c)).reshape(-1, d, c)
        y = _ApplyFn.apply(Kf, Tf, xf, transpose, self._precision(T.dtype, x.dtype), self.interpret)
        return y.reshape(batch + (d, c))

    def dense_blocks(self, form, K, beta, F):
        if not self._kernels_for(K.dtype):
            return super().dense_blocks(form, K, beta, F)
        K, T = self._wy_blocks(form, K, beta, F)
        m, b, d = K.shape[-3:]
        batch = torch.broadcast_shapes(K.shape[:-3], T.shape[:-3])
        Kf = K.expand(batch + (m, b, d)).reshape(-1, m, b, d)
        Tf = T.expand(batch + (m, b, b)).reshape(-1, m, b, b)
        y = _ApplyFn.apply(Kf, Tf, None, False, self._precision(T.dtype, K.dtype), self.interpret)
        return y.reshape(batch + (d, d))


class _FactorFn(torch.autograd.Function):
    """Block factors in Triton ("wy": T from K; "ut": A from K; "utinv": T from A), Triton backward."""

    @staticmethod
    def forward(ctx, mode, IN, beta, precision, interpret):
        cdt = compute_dtype(IN.dtype)
        IN, beta = IN.contiguous(), beta.contiguous()
        ctx.save_for_backward(IN, beta)
        ctx.mode, ctx.precision = mode, precision
        return _factor.factor_forward(mode, IN, beta, cdt, precision)

    @staticmethod
    def backward(ctx, dout):
        IN, beta = ctx.saved_tensors
        cdt = compute_dtype(IN.dtype)
        din, dbeta = _factor.factor_backward(ctx.mode, IN, beta, dout.to(cdt).contiguous(), cdt, ctx.precision)
        return None, din.to(IN.dtype), dbeta.to(beta.dtype), None, None


class _ApplyFn(torch.autograd.Function):
    """y = P x (P^T x) for K (B, m, b, d), T (B, m, b, b), x (B, d, c) or None (y = P), Triton backward."""

    @staticmethod
    def forward(ctx, K, T, x, transpose, precision, interpret):
        out_dtype = K.dtype if x is None else x.dtype
        cdt = T.dtype
        K, T = K.contiguous(), T.contiguous()
        x = None if x is None else x.contiguous()
        save = any(ctx.needs_input_grad[:3])
        y, ws = _apply.apply_forward(K, T, x, transpose, out_dtype, cdt, precision, save, interpret)
        ctx.save_for_backward(K, T, x, ws)
        ctx.transpose, ctx.precision, ctx.interpret = transpose, precision, interpret
        return y

    @staticmethod
    def backward(ctx, dy):
        K, T, x, ws = ctx.saved_tensors
        need_dx = x is not None and ctx.needs_input_grad[2]
        dK, dT, dx = _apply.apply_backward(
            K, T, x, ws, dy.contiguous(), ctx.transpose, need_dx, T.dtype, ctx.precision, ctx.interpret
        )
        return dK.to(K.dtype), dT, dx, None, None, None


def load() -> TritonBackend:
    """The Triton backend; unavailable without a CUDA device unless TRITON_INTERPRET=1."""
    import triton  # noqa: F401  (ImportError -> the registry says which extra to install)

    from householder._registry import BackendUnavailableError

    interpret = interpreting()
    if not interpret and not torch.cuda.is_available():
        raise BackendUnavailableError(
            "backend 'triton' is not available: no CUDA device (set TRITON_INTERPRET=1 to run its kernels in "
            "Triton's CPU interpreter, or use backend='torch')"
        )
    return TritonBackend(interpret)
