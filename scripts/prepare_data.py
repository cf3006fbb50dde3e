#!/usr/bin/env python3
"""Turn a corpus into moeyard token shards: runs python/moeyard/prepare_data.py
(installed with the package as the console script `moeyard-prepare`); see
its --help."""

import os
import runpy

runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python", "moeyard", "prepare_data.py"),
               run_name="__main__")
