"""The delta rule, gated delta rule and DeltaProduct: public ops, checks, dispatch.

Layout and names follow flash-linear-attention so its users recognise them:
q, k (B, T, H, K); v (B, T, H, V); beta, g (B, T, H); states (N, H, K, V);
``cu_seqlens`` (N + 1,) packs N sequences into a batch of one (FlashAttention).
The state update is

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = scale S_t^T q_t,

a product of generalized Householder factors with a source term (DESIGN.md).
The work is done by the "torch" backend (chunkwise, plain PyTorch, autograd)
or the "triton" backend (fused kernels); torch is imported only when called.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

from householder import _checks

# product backend name -> module with the delta-rule ops for its tensors
_DELTA_MODULES = {
    "torch": "householder.backends.torch_delta",
    "triton": "householder.backends.triton_delta",
}


def _delta_ops(backend: str | None, x: Any):
    """The module that runs the delta rule for ``x`` (registry's choice: argument, context, inference)."""
    from householder._registry import BackendUnavailableError, resolve_name

    name = resolve_name(backend, x)
    if name not in _DELTA_MODULES:
        raise ValueError(
            f"backend must be one of {tuple(_DELTA_MODULES)} for the delta rule (it needs torch tensors); got {name!r}"
        )
    try:
        module = importlib.import_module(_DELTA_MODULES[name])
    except ImportError as exc:
        raise BackendUnavailableError(
            f"backend {name!r} is not available for the delta rule: {exc}. Install it with: pip install 'householder[{name}]'"
        ) from exc
    module.check_available(x)
    return module


def _check_tensor(torch, x: Any, name: str, device, optional: bool = False):
    if x is None and optional:
        return None
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__module__}.{type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor (float64, float32, bfloat16 or float16); got dtype {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name} must be on the same device as q ({device}); got {x.device}")
    return x


def _check_finite(torch, x, name: str) -> None:
    if x is not None and not bool(torch.isfinite(x).all()):
        raise ValueError(
            f"{name} must contain only finite numbers (got NaN or Inf); pass check_finite=False to skip this check"
        )


def _validate(q, k, v, beta, g, scale, initial_state, cu_seqlens, num_householder: int, check_finite: bool):
    """Check every argument; returns (scale, offsets as a list of ints or None).

    Offsets on a device are neither read nor checked under ``check_finite=False`` (the read is a
    synchronisation): offsets come back None with ``cu_seqlens`` given, and the backend takes them
    from the tensor."""
    try:
        import torch
    except ImportError as exc:  # the caller passed something that is not a tensor
        raise TypeError(f"q must be a torch.Tensor (torch is not installed): {exc}") from exc
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor; got {type(q).__module__}.{type(q).__name__}")
    device = q.device
    _check_tensor(torch, q, "q", device)
    for x, name in ((k, "k"), (v, "v"), (beta, "beta")):
        _check_tensor(torch, x, name, device)
    _check_tensor(torch, g, "g", device, optional=True)
    _check_tensor(torch, initial_state, "initial_state", device, optional=True)
    B, T, H, K, V = _checks.check_delta_shapes(
        q.shape, k.shape, v.shape, beta.shape, None if g is None else g.shape, num_householder
    )
    offsets = None
    N = B
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool:
            raise TypeError(
                f"cu_seqlens must be an integer torch.Tensor of shape (N + 1,); got "
                f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens).__name__)}"
            )
        if cu_seqlens.ndim != 1:
            raise ValueError(f"cu_seqlens must have shape (N + 1,); got shape {tuple(cu_seqlens.shape)}")
        if check_finite or cu_seqlens.device.type == "cpu":
            offsets = [int(c) for c in cu_seqlens.tolist()]
            N = _checks.check_cu_seqlens(offsets, B, T)
        else:
            N = _checks.check_packed_batch(cu_seqlens.shape[0], B)
    if initial_state is not None:
        _checks.check_state_shape(initial_state.shape, (N, H, K, V))
    if scale is None:
        scale = K**-0.5
    else:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"scale must be a finite float or None (meaning K ** -0.5); got {scale!r}")
        scale = float(scale)
    if check_finite:
        for x, name in ((q, "q"), (k, "k"), (v, "v"), (beta, "beta"), (g, "g"), (initial_state, "initial_state")):
            _check_finite(torch, x, name)
    return scale, offsets


def _check_result(o, S, check_finite: bool) -> None:
    if not check_finite:
        return
    import torch

    bad = not bool(torch.isfinite(o).all()) or (S is not None and not bool(torch.isfinite(S).all()))
    if bad:
        raise FloatingPointError(
            "delta rule overflowed to Inf/NaN on finite input: the state grew without bound. Each step is "
            "non-expansive only when beta_t * ||k_t||^2 lies in [0, 2] and g_t <= 0; normalise the keys "
            "(e.g. L2-normalise k) or bound beta"
        )


def delta_rule(
    q,
    k,
    v,
    beta,
    *,
    g=None,
    scale: float | None = None,
    initial_state=None,
    output_final_state: bool = False,
    cu_seqlens=None,
    chunk_size: int = 64,
    backend: str | None = None,
    check_finite: bool = True,
):
    """The (gated) delta rule over a sequence, computed chunkwise.

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T and
    o_t = scale S_t^T q_t, from S_0 = ``initial_state`` (zero if None).

    Parameters
    ----------
    q, k : Tensor, (B, T, H, K)
        Queries and keys; the library does not normalise keys.
    v : Tensor, (B, T, H, V)
    beta : Tensor, (B, T, H)
        Step sizes; beta * ||k||^2 in [0, 2] keeps each step non-expansive
        (2: a reflection, the negative-eigenvalue regime).
    g : Tensor, (B, T, H), optional
        Log-decay: the state is multiplied by exp(g_t) before token t's update.
    scale : float, optional
        Output scale, default K ** -0.5.
    initial_state : Tensor, (N, H, K, V), optional
    output_final_state : bool
        Return the final states (N, H, K, V) (float32; float64 for float64 input).
    cu_seqlens : integer Tensor, (N + 1,), optional
        Offsets of N sequences packed along T of a batch of one (B = 1): 0, then
        non-decreasing, ending at T. They are read on the host and checked, except
        on a GPU under ``check_finite=False``: the Triton backend then makes its
        chunk tables on the device without a synchronisation, and offsets that
        break those rules give undefined results.
    chunk_size : int
        Tokens per chunk of the chunkwise algorithm.
    backend : str, optional
        "torch" or "triton"; default from the context, then ``HOUSEHOLDER_BACKEND``,
        then the tensors ("triton" for CUDA tensors when Triton is installed).
    check_finite : bool
        Raise ValueError on NaN/Inf inputs and FloatingPointError when the state
        overflows (each check synchronises with the device). False skips these
        and the checks of ``cu_seqlens`` on a GPU.

    Returns
    -------
    o : Tensor, (B, T, H, V), in the promoted dtype of q, k, v
    final_state : Tensor, (N, H, K, V), or None unless ``output_final_state``
    """
    _checks.check_positive_int(chunk_size, "chunk_size")
    scale, offsets = _validate(q, k, v, beta, g, scale, initial_state, cu_seqlens, 1, check_finite)
    ops = _delta_ops(backend, q)
    o, S = ops.chunk(q, k, v, beta, g, scale, initial_state, offsets, chunk_size, 1, cu_seqlens=cu_seqlens)
    _check_result(o, S, check_finite)
    return o, (S if output_final_state else None)


def delta_product(
    q,
    k,
    v,
    beta,
    *,
    num_householder: int,
    g=None,
    scale: float | None = None,
    initial_state=None,
    output_final_state: bool = False,
    cu_seqlens=None,
    chunk_size: int = 64,
    backend: str | None = None,
    check_finite: bool = True,
):
    """DeltaProduct: ``num_householder`` delta steps per token, computed chunkwise.

    q (B, T, H, K); k (B, T*n, H, K); v (B, T*n, H, V); beta (B, T*n, H) with
    n = ``num_householder`` and token t's j-th step at index t*n + j; g (B, T, H)
    or None. Token t decays the state once by exp(g_t), applies its n steps
    S <- (I - beta k k^T) S + beta k v^T in order, then reads
    o_t = scale S^T q_t. ``cu_seqlens`` counts tokens (not steps). The other
    arguments and the return value are those of :func:`delta_rule`.
    """
    n = _checks.check_positive_int(num_householder, "num_householder")
    _checks.check_positive_int(chunk_size, "chunk_size")
    scale, offsets = _validate(q, k, v, beta, g, scale, initial_state, cu_seqlens, n, check_finite)
    ops = _delta_ops(backend, q)
    o, S = ops.chunk(q, k, v, beta, g, scale, initial_state, offsets, chunk_size, n, cu_seqlens=cu_seqlens)
    _check_result(o, S, check_finite)
    return o, (S if output_final_state else None)


def delta_rule_recurrent(
    q,
    k,
    v,
    beta,
    *,
    g=None,
    scale: float | None = None,
    initial_state=None,
    output_final_state: bool = True,
    cu_seqlens=None,
    num_householder: int = 1,
    backend: str | None = None,
    check_finite: bool = True,
):
    """The delta rule / DeltaProduct step by step: decoding (T = 1) and short prompts.

    Same semantics and shapes as :func:`delta_product` (``num_householder = 1``
    is :func:`delta_rule`), computed by the fused token-by-token recurrence,
    whose cost is linear in T with no chunk overhead. The final state is
    returned by default, as a generation cache needs it.
    """
    n = _checks.check_positive_int(num_householder, "num_householder")
    scale, offsets = _validate(q, k, v, beta, g, scale, initial_state, cu_seqlens, n, check_finite)
    ops = _delta_ops(backend, q)
    o, S = ops.recurrent(q, k, v, beta, g, scale, initial_state, offsets, n, cu_seqlens=cu_seqlens)
    _check_result(o, S, check_finite)
    return o, (S if output_final_state else None)
