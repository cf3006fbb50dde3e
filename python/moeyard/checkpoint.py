"""Reading native moeyard checkpoints (``<dir>/step_<N>/``) from Python.

A one-process run writes ``model.safetensors``; each rank of a multi-process
run writes ``model-rank<r>.safetensors`` with the tensors it owns: whole
replicated tensors, and tensor-parallel pieces or expert slices whose
``__metadata__`` entry (``{"dim", "parts", "index", "count"}``) places them
in the full tensor. :func:`load` verifies every file against the manifest's
SHA-256 and returns full tensors under their global names, whatever the
layout the checkpoint was saved at (docs/training.md). The reading is the
C++ trainer's own (``csrc/io/checkpoint.h``).
"""

import os

from . import _C


def load(step_dir, kind="model"):
    """Full tensors of a checkpoint's ``kind`` files ("model" or "optimizer").

    Raises ValueError when a file is missing or corrupt (SHA-256 mismatch),
    a piece is missing or does not fit, or there are no ``kind`` files.
    """
    try:
        return dict(_C.load_checkpoint(os.fspath(step_dir), kind))
    except RuntimeError as e:
        raise ValueError(str(e).split("\nException raised from")[0]) from None
