"""moeyard: sparse Mixture-of-Experts ops and layers for PyTorch.

Importing the package loads the native library, which registers the
``torch.ops.moeyard.*`` operators (CPU, Meta and autograd kernels in C++).
"""

import torch  # noqa: F401  (libtorch must be loaded before the native library)

from . import _C  # noqa: F401  (registers torch.ops.moeyard.*)
from . import ops
from .model import Transformer
from .train import train
from .nn import MoE, MoEResult

__version__ = _C.__version__

__all__ = ["MoE", "MoEResult", "Transformer", "ops", "train", "__version__"]
