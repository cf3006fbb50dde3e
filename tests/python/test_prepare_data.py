"""scripts/prepare_data.py: the train/valid split is by tokens, so one input
file gives two non-empty shards; the shards are the token stream cut once."""

import os
import struct
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "prepare_data.py")


def prepare(*args):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def read_shard(path):
    """(tokens, vocabulary) of a token shard, checking its header."""
    data = path.read_bytes()
    magic, (version, width, count, vocab) = data[:8], struct.unpack("<IIQQ", data[8:32])
    assert magic == b"MOEYTOK1" and version == 1 and width in (2, 4)
    assert len(data) == 32 + count * width
    return np.frombuffer(data[32:], dtype=np.uint16 if width == 2 else np.uint32), vocab


def text_of(n):
    g = np.random.default_rng(0)
    return "".join(chr(c) for c in g.integers(32, 127, n))


def test_one_input_file_gives_both_shards(tmp_path):
    src = tmp_path / "book.txt"
    src.write_text(text_of(10_000))
    r = prepare("--out", tmp_path / "out", src)
    assert r.returncode == 0, r.stderr
    train, vocab = read_shard(tmp_path / "out" / "train.bin")
    valid, _ = read_shard(tmp_path / "out" / "valid.bin")
    assert vocab == 256
    assert train.size > 0 and valid.size > 0
    assert train.size + valid.size == 10_000
    assert valid.size == 500  # the last 5% by default
    # The shards are the byte stream cut once: train first, valid after.
    whole = np.frombuffer(src.read_bytes(), dtype=np.uint8)
    assert np.array_equal(np.concatenate([train, valid]), whole)


def test_split_point_is_deterministic_across_files(tmp_path):
    """Files are read in sorted order, the cut lands inside the last file."""
    d = tmp_path / "corpus"
    d.mkdir()
    texts = {"b.txt": text_of(3000), "a.txt": text_of(2000)[::-1], "c.md": "xyz" * 400}
    for name, t in texts.items():
        (d / name).write_text(t)
    outs = []
    for run in ("one", "two"):
        r = prepare("--out", tmp_path / run, "--valid-fraction", "0.3", d)
        assert r.returncode == 0, r.stderr
        outs.append([(tmp_path / run / f"{s}.bin").read_bytes() for s in ("train", "valid")])
    assert outs[0] == outs[1]
    train, _ = read_shard(tmp_path / "one" / "train.bin")
    valid, _ = read_shard(tmp_path / "one" / "valid.bin")
    whole = "".join(texts[n] for n in sorted(texts)).encode()
    assert train.size + valid.size == len(whole) == 6200
    assert valid.size == 1860  # ceil(0.3 * 6200)
    assert bytes(train.astype(np.uint8)) + bytes(valid.astype(np.uint8)) == whole


def test_valid_shard_holds_at_least_one_window(tmp_path):
    src = tmp_path / "small.txt"
    src.write_text(text_of(1000))
    r = prepare("--out", tmp_path / "out", "--seq-len", "99", src)
    assert r.returncode == 0, r.stderr
    valid, _ = read_shard(tmp_path / "out" / "valid.bin")
    train, _ = read_shard(tmp_path / "out" / "train.bin")
    assert valid.size == 100 and train.size == 900  # 5% would be 50, below a window


def test_too_small_corpus_is_an_error(tmp_path):
    src = tmp_path / "tiny.txt"
    src.write_text("hello world")
    r = prepare("--out", tmp_path / "out", src)
    assert r.returncode != 0
    assert "11 tokens" in r.stderr and "--seq-len" in r.stderr
    assert not (tmp_path / "out" / "train.bin").exists()
    assert not (tmp_path / "out" / "valid.bin").exists()
    ok = prepare("--out", tmp_path / "out", "--seq-len", "4", src)  # two windows of 5 fit
    assert ok.returncode == 0, ok.stderr
    valid, _ = read_shard(tmp_path / "out" / "valid.bin")
    assert valid.size == 5


def test_bad_valid_fraction_is_an_error(tmp_path):
    src = tmp_path / "book.txt"
    src.write_text(text_of(1000))
    for bad in ("0", "1", "-0.1"):
        r = prepare("--out", tmp_path / "out", "--valid-fraction", bad, src)
        assert r.returncode != 0 and "--valid-fraction" in r.stderr
