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
    """Byte-level token shards (train.bin, valid.bin) of the first 500 kB of
    the Python standard library's sources (--builtin), made once per test
    session: the same corpus whatever the repository's own files say, so
    that tests comparing runs at a tolerance do not move with the docs."""
    d = tmp_path_factory.mktemp("data")
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "prepare_data.py"), "--out", str(d),
                    "--builtin", "--max-bytes", "500000"], check=True, capture_output=True)
    return d
