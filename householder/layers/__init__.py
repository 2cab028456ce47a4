"""Torch modules on top of the core's delta-rule ops: mixers, the reference LM, its cache.

Importing this package imports torch; ``import householder`` alone does not.
Layers call :func:`householder.delta_rule` / :func:`householder.delta_product`,
never a backend module, so the backend follows the tensors (torch on the CPU,
Triton on CUDA) or the caller's choice (``householder.use_backend``).
"""

from householder.layers.attention import Attention
from householder.layers.cache import Cache
from householder.layers.deltanet import MODES, DeltaNet
from householder.layers.deltaproduct import DeltaProduct
from householder.layers.diag_linear_attention import DiagLinearAttention  # registers mixer "diag_linear_attention"
from householder.layers.lm import MIXERS, Block, LanguageModel, LMConfig, LMOutput, register_mixer
from householder.layers.modules import GatedRMSNorm, RMSNorm, ShortConvolution, SwiGLU

__all__ = [
    "Attention",
    "Block",
    "Cache",
    "DeltaNet",
    "DeltaProduct",
    "DiagLinearAttention",
    "GatedRMSNorm",
    "LMConfig",
    "LMOutput",
    "LanguageModel",
    "MIXERS",
    "MODES",
    "RMSNorm",
    "ShortConvolution",
    "SwiGLU",
    "register_mixer",
]
