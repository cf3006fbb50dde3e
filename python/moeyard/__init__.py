"""moeyard: sparse Mixture-of-Experts ops and layers for PyTorch.

Importing the package loads the native library, which registers the
``torch.ops.moeyard.*`` operators (CPU, Meta and autograd kernels in C++).
"""

import torch  # noqa: F401  (libtorch must be loaded before the native library)

try:  # written by the build: the torch the native library was compiled against
    from ._build_info import TORCH_VERSION as _BUILT_WITH
except ImportError:  # a build from before this file existed
    _BUILT_WITH = None
if _BUILT_WITH is not None and torch.__version__ != _BUILT_WITH:
    raise ImportError(
        f"moeyard was built against torch {_BUILT_WITH} but torch {torch.__version__} is installed: its C++ "
        f"library would not load, or worse, run against another ABI. Install torch=={_BUILT_WITH}, or rebuild "
        f"moeyard with this torch (scripts/setup.sh, or pip install --no-build-isolation .)")

from . import _C  # noqa: F401  (registers torch.ops.moeyard.*)
from . import ops
from .model import Transformer
from .train import train
from .nn import MoE, MoEResult
from .hf import patch_hf_model

__version__ = _C.__version__


def configs_dir() -> str:
    """The shipped configs (tiny.yaml, finetune_*.yaml, ...): installed with
    the package, or the checkout's configs/."""
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    installed = os.path.join(here, "configs")
    return installed if os.path.isdir(installed) else os.path.join(here, "..", "..", "configs")


__all__ = ["MoE", "MoEResult", "Transformer", "configs_dir", "ops", "patch_hf_model", "train", "__version__"]
