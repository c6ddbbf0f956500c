"""lens-kernels: fused kernels for the LENS calibrated-reward GRPO loss (arXiv 2510.08696).

``fused_lens_loss`` goes from logits to the clipped-surrogate loss without materialising the
vocabulary-wide log-softmax; ``reference`` is the same math in plain PyTorch.
"""
from . import reference
from .advantages import LensAdvantages, lens_advantages, lens_advantages_from_stats
from .api import fused_lens_loss, token_logprobs
from .backends import is_available
from .linear_api import fused_linear_lens_loss, fused_linear_token_logprobs
from .modules import FusedLinearLensLoss, LensLoss
from .output import LensOutput

__version__ = "0.1.0"

__all__ = [
    "fused_lens_loss",
    "token_logprobs",
    "fused_linear_lens_loss",
    "fused_linear_token_logprobs",
    "LensLoss",
    "FusedLinearLensLoss",
    "lens_advantages",
    "lens_advantages_from_stats",
    "reference",
    "LensOutput",
    "LensAdvantages",
    "is_available",
    "__version__",
]
