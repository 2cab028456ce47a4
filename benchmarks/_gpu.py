"""Shared by the GPU asv suites: the n/a rule for machines without CUDA."""

from __future__ import annotations


def require_cuda():
    """Return torch if a CUDA GPU is present; else raise NotImplementedError (asv: n/a)."""
    try:
        import torch
    except ImportError as exc:
        raise NotImplementedError("needs torch") from exc
    if not torch.cuda.is_available():
        raise NotImplementedError("needs a CUDA GPU")
    return torch
