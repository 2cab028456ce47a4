"""Products of generalized Householder transformations, H = I - beta k k^T.

``householder.product(keys, betas)`` returns P = H_1 H_2 ... H_n in compact WY
or UT form on the NumPy, torch, Triton or CuPy backend. Importing this package
imports neither torch nor CuPy nor Triton.
"""

from householder import reference
from householder._delta import delta_product, delta_rule, delta_rule_recurrent
from householder._registry import (
    BackendUnavailableError,
    available_backends,
    backend_names,
    get_backend,
    set_backend,
    use_backend,
)
from householder._representation import DEFAULT_BLOCK_SIZE, HouseholderProduct, product

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "DEFAULT_BLOCK_SIZE",
    "HouseholderProduct",
    "available_backends",
    "backend_names",
    "delta_product",
    "delta_rule",
    "delta_rule_recurrent",
    "get_backend",
    "product",
    "reference",
    "set_backend",
    "use_backend",
]
