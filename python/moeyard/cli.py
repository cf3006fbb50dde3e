"""`moeyard` console entry point: runs the C++ executable installed with the package."""

import os
import sys


def main() -> None:
    exe = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bin", "moeyard")
    if not os.path.exists(exe):
        sys.exit(f"moeyard: the native executable is missing at {exe}; reinstall the package")
    # log.wandb's feed runs on this Python (it has moeyard, and wandb).
    os.environ.setdefault("MOEYARD_PYTHON", sys.executable)
    os.execv(exe, [exe] + sys.argv[1:])
