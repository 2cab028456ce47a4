"""Backend selection: argument, context, global, environment variable, inference."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import householder as hh
from householder import _registry


def test_numpy_always_available():
    assert "numpy" in hh.available_backends()
    assert set(hh.available_backends()) <= set(hh.backend_names())


def test_inference_from_numpy_and_lists():
    assert hh.product(np.ones((2, 3)), np.ones(2)).backend == "numpy"
    assert hh.product([[1.0, 0.0]], [2.0]).backend == "numpy"


def test_context_and_global_and_env(monkeypatch):
    k, b = np.ones((2, 3)), np.ones(2)
    monkeypatch.setenv(_registry.ENV_VAR, "jax")
    with pytest.raises(ValueError, match="environment variable HOUSEHOLDER_BACKEND must be one of"):
        hh.product(k, b)
    monkeypatch.setenv(_registry.ENV_VAR, "numpy")
    assert hh.product(k, b).backend == "numpy"
    hh.set_backend("cupy")
    try:
        with hh.use_backend("numpy"):  # the innermost choice wins
            assert hh.product(k, b).backend == "numpy"
        assert hh.product(k, b, backend="numpy").backend == "numpy"
    finally:
        hh.set_backend(None)
    with pytest.raises(ValueError, match="backend must be one of"):
        hh.set_backend("fortran")
    with pytest.raises(ValueError, match="backend must be one of"):
        with hh.use_backend("fortran"):
            pass


def test_unavailable_backend_names_extra(monkeypatch):
    monkeypatch.setitem(_registry._MODULES, "numpy_fake", ("householder_no_such_module", "fake"))
    with pytest.raises(hh.BackendUnavailableError, match=r"pip install 'householder\[fake\]'"):
        hh.get_backend("numpy_fake")
    assert "numpy_fake" not in hh.available_backends()


def test_import_loads_no_optional_library():
    code = (
        "import sys, householder, numpy as np; "
        "householder.product(np.ones((2, 3)), np.ones(2)).dense(); "
        "bad = [m for m in ('torch', 'cupy', 'triton') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    env = {k: v for k, v in os.environ.items() if k != _registry.ENV_VAR}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
