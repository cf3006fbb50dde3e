"""``moeyard.train``: the C++ trainer from Python."""

import os
import sys
from typing import Dict, Iterable, Optional, Union

from . import _C


def train(
    config_path: Union[str, os.PathLike],
    overrides: Optional[Union[Dict[str, object], Iterable[str]]] = None,
    resume: str = "auto",
    overwrite: bool = False,
    allow_data_change: bool = False,
) -> Dict[str, object]:
    """Runs ``moeyard train --config config_path`` in this process.

    ``overrides``: ``{"optim.lr": 1e-3}`` or ``["optim.lr=1e-3"]``.
    ``resume``: ``"auto"`` (continue from the run's ``latest``), ``"never"``,
    or a checkpoint directory. ``overwrite`` and ``allow_data_change`` are
    the ``--overwrite`` and ``--allow-data-change`` flags (docs/training.md,
    "Resuming"). Returns steps, final_loss, final_valid_loss, skipped_steps,
    interrupted, host_reads (device-to-host reads of the steps' numbers:
    one per logging interval).
    """
    if isinstance(overrides, dict):
        items = [f"{k}={v}" for k, v in overrides.items()]
    else:
        items = list(overrides or [])
    os.environ.setdefault("MOEYARD_PYTHON", sys.executable)  # log.wandb's feed runs on this Python
    return _C.train(os.fspath(config_path), items, resume, overwrite, allow_data_change)
