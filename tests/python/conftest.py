import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "python"))

import moeyard  # noqa: E402,F401  (registers torch.ops.moeyard)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: longer tests")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """Byte-level token shards (train.bin, valid.bin) of this repository's
    Python sources and docs, made once per test session."""
    d = tmp_path_factory.mktemp("data")
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "prepare_data.py"), "--out", str(d),
                    os.path.join(ROOT, "python"), os.path.join(ROOT, "docs")], check=True, capture_output=True)
    return d
