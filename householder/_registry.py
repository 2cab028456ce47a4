"""The backend registry: names, lazy imports, selection and inference.

Nothing here imports torch, cupy or triton until that backend is asked for;
inference looks only at ``type(x).__module__`` (the einops/opt_einsum idea).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
from typing import Any, Iterator

# name -> (module that defines BACKEND, pip extra that provides it)
_MODULES = {
    "numpy": ("householder.backends.numpy", None),
    "torch": ("householder.backends.torch", "torch"),
    "triton": ("householder.backends.triton", "triton"),
    "cupy": ("householder.backends.cupy", "cuda"),
}
ENV_VAR = "HOUSEHOLDER_BACKEND"

_loaded: dict[str, Any] = {}
_state = threading.local()
_global_choice: list[str | None] = [None]


class BackendUnavailableError(ImportError):
    """A known backend cannot run here (package missing or no device)."""


def backend_names() -> tuple[str, ...]:
    """All backend names the registry knows, available or not."""
    return tuple(_MODULES)


def _check_name(name: Any, what: str = "backend") -> str:
    if not isinstance(name, str) or name not in _MODULES:
        raise ValueError(f"{what} must be one of {backend_names()}; got {name!r}")
    return name


def get_backend(name: str):
    """Return the backend object for ``name``, importing its module on first use."""
    _check_name(name)
    if name in _loaded:
        return _loaded[name]
    module_name, extra = _MODULES[name]
    try:
        module = importlib.import_module(module_name)
        backend = module.load()
    except BackendUnavailableError:
        raise
    except ImportError as exc:
        hint = f"pip install 'householder[{extra}]'" if extra else "reinstall householder"
        raise BackendUnavailableError(
            f"backend {name!r} is not available: {exc}. Install it with: {hint}"
        ) from exc
    _loaded[name] = backend
    return backend


def available_backends() -> list[str]:
    """Names of the backends that import and find their device on this machine."""
    out = []
    for name in _MODULES:
        try:
            get_backend(name)
        except BackendUnavailableError:
            continue
        out.append(name)
    return out


def set_backend(name: str | None) -> None:
    """Set the process-wide default backend (``None`` restores inference)."""
    if name is not None:
        _check_name(name)
    _global_choice[0] = name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: use backend ``name`` for calls in this thread inside the block."""
    _check_name(name)
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def _chosen_name() -> str | None:
    stack = getattr(_state, "stack", None)
    if stack:
        return stack[-1]
    if _global_choice[0] is not None:
        return _global_choice[0]
    env = os.environ.get(ENV_VAR)
    if env:
        return _check_name(env, what=f"environment variable {ENV_VAR}")
    return None


def infer_backend_name(x: Any) -> str:
    """Backend name for an array, from its library; no library is imported."""
    module = type(x).__module__.split(".")[0]
    if module == "torch":
        if x.device.type == "cuda":
            try:
                get_backend("triton")
                return "triton"
            except BackendUnavailableError:
                return "torch"
        return "torch"
    if module == "cupy":
        return "cupy"
    return "numpy"


def resolve_name(backend: str | None, x: Any) -> str:
    """The backend name for a call: explicit argument, then context, global, env var, inference."""
    name = backend if backend is not None else _chosen_name()
    if name is None:
        return infer_backend_name(x)
    return _check_name(name)


def resolve(backend: str | None, x: Any):
    """The backend for a call: explicit argument, then context, global, env var, inference."""
    return get_backend(resolve_name(backend, x))
