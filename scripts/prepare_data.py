#!/usr/bin/env python3
"""Turn text files into moeyard token shards.

    python scripts/prepare_data.py --out data/mycorpus FILE_OR_DIR ... [--tokenizer tokenizer.json]
    python scripts/prepare_data.py --builtin --out data/builtin

Writes <out>/train.bin and <out>/valid.bin. The input files are read in
sorted order and tokenized into one stream; valid.bin is its last
--valid-fraction of the tokens (at least one window of --seq-len + 1 tokens),
train.bin the rest, so a single input file works. A corpus too small to give
both shards a window is an error. Byte-level by default (vocabulary 256); with --tokenizer, any Hugging
Face tokenizer.json through the `tokenizers` package. --builtin uses the
Python standard library's own source files, which every machine has.

Shard format (little-endian, docs/training.md): 32-byte header
  magic b"MOEYTOK1" | u32 version=1 | u32 bytes per token (2 or 4) |
  u64 token count | u64 vocabulary size
followed by the tokens.
"""

import argparse
import math
import os
import shutil
import struct
import sys
import sysconfig

import numpy as np

MAGIC = b"MOEYTOK1"


def write_shard(path: str, tokens: np.ndarray, vocab: int) -> None:
    width = 2 if vocab <= 65536 else 4
    arr = tokens.astype(np.uint16 if width == 2 else np.uint32)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<IIQQ", 1, width, arr.size, vocab))
        f.write(arr.tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def split_point(total: int, valid_fraction: float, window: int):
    """(train tokens, valid tokens) of a stream of `total` tokens: valid is
    the last valid_fraction of it, rounded up, and at least one window; both
    must hold a window, else the corpus is too small."""
    n_valid = max(window, math.ceil(total * valid_fraction))
    if total - n_valid < window:
        sys.exit(f"prepare_data: the input has {total:,} tokens, too few for a train and a valid shard of at "
                 f"least {window:,} tokens each (--seq-len {window - 1} + 1); give more text or a smaller --seq-len")
    return total - n_valid, n_valid


def collect(paths):
    files = []
    for p in paths:
        if os.path.isdir(p):
            for root, _, names in os.walk(p):
                files += [os.path.join(root, n) for n in names if n.endswith((".py", ".txt", ".md", ".rst"))]
        else:
            files.append(p)
    return sorted(files)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="*")
    ap.add_argument("--out", required=True)
    ap.add_argument("--builtin", action="store_true", help="use the Python standard library sources")
    ap.add_argument("--tokenizer", help="a Hugging Face tokenizer.json, or a checkpoint directory holding one (default: bytes)")
    ap.add_argument("--valid-fraction", type=float, default=0.05,
                    help="share of the tokens, taken from the end, that go to valid.bin (default 0.05)")
    ap.add_argument("--seq-len", type=int, default=128,
                    help="the training window (data.seq_len): each shard gets at least seq_len + 1 tokens "
                         "(default 128)")
    ap.add_argument("--max-bytes", type=int, default=0,
                    help="stop reading files after this many input bytes, both shards together (0: all)")
    a = ap.parse_args(argv)
    inputs = [sysconfig.get_paths()["stdlib"]] if a.builtin else a.inputs
    files = collect(inputs)
    if not files:
        sys.exit("prepare_data: no input files")
    if a.tokenizer and os.path.isdir(a.tokenizer):  # a Hugging Face checkpoint directory
        a.tokenizer = os.path.join(a.tokenizer, "tokenizer.json")
    if a.tokenizer:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(a.tokenizer)
        vocab = tok.get_vocab_size()
        encode = lambda text: np.asarray(tok.encode(text).ids, dtype=np.int64)  # noqa: E731
    else:
        vocab = 256
        encode = lambda text: np.frombuffer(text.encode("utf-8", "replace"), dtype=np.uint8)  # noqa: E731
    if not 0.0 < a.valid_fraction < 1.0:
        sys.exit(f"prepare_data: --valid-fraction must be in (0, 1), got {a.valid_fraction}")
    if a.seq_len < 1:
        sys.exit(f"prepare_data: --seq-len must be >= 1, got {a.seq_len}")
    parts, total_bytes, used = [], 0, 0
    for name in files:
        try:
            with open(name, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        parts.append(encode(text))
        total_bytes += len(text)
        used += 1
        if a.max_bytes and total_bytes >= a.max_bytes:
            break
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    del parts
    n_train, n_valid = split_point(tokens.size, a.valid_fraction, a.seq_len + 1)
    os.makedirs(a.out, exist_ok=True)
    print(f"prepare_data: {used} files, {tokens.size:,} tokens")
    for split, part in (("train", tokens[:n_train]), ("valid", tokens[n_train:])):
        write_shard(os.path.join(a.out, f"{split}.bin"), part, vocab)
        print(f"prepare_data: {split}: {part.size:,} tokens -> {a.out}/{split}.bin")
    if a.tokenizer:  # the trainer copies it into every checkpoint (for generate)
        shutil.copyfile(a.tokenizer, os.path.join(a.out, "tokenizer.json"))


if __name__ == "__main__":
    main()
