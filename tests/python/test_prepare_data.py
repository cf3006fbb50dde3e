"""scripts/prepare_data.py: the train/valid split is by tokens, so one input
file gives two non-empty shards; the shards are the token stream cut once;
JSON lines, Parquet and datasets directories give the same documents, with
the end-of-text token between them; memory does not grow with the
corpus."""

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "prepare_data.py")


def prepare(*args):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def read_shard(path):
    """(tokens, vocabulary) of a token shard, checking its header."""
    data = path.read_bytes()
    magic, (version, width, count, vocab) = data[:8], struct.unpack("<IIQQ", data[8:32])
    assert magic == b"MOEYTOK1" and version == 1 and width in (1, 2, 4)
    assert len(data) == 32 + count * width
    return np.frombuffer(data[32:], dtype={1: np.uint8, 2: np.uint16, 4: np.uint32}[width]), vocab


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


# ---- corpora in JSON lines, Parquet and datasets; EOS; constant memory ---------

DOCS = [f"document {i}: " + text_of(50 + 7 * i) for i in range(40)]


def small_tokenizer(path):
    """A byte-level BPE with an end-of-text token, trained on DOCS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(DOCS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))
    return tok


def stream_of(out):
    train, _ = read_shard(out / "train.bin")
    valid, vocab = read_shard(out / "valid.bin")
    return np.concatenate([train, valid]).tolist(), vocab


def test_jsonl_parquet_and_datasets_give_the_same_documents(tmp_path):
    """The same documents as JSON lines, Parquet and a saved datasets
    directory give the same shards: each document's batch-encoded ids, then
    the end-of-text token."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    tok = small_tokenizer(tmp_path / "tokenizer.json")
    eos = tok.token_to_id("<|endoftext|>")
    want = [i for d in DOCS for i in tok.encode(d, add_special_tokens=False).ids + [eos]]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    pq.write_table(pa.table({"body": DOCS}), tmp_path / "c.parquet", row_group_size=7)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": DOCS})}).save_to_disk(str(tmp_path / "ds"))
    for name, src in (("jsonl", "c.jsonl"), ("parquet", "c.parquet"), ("datasets", "ds")):
        r = prepare("--out", tmp_path / name, "--tokenizer", tmp_path / "tokenizer.json", "--field", "body",
                    "--seq-len", "16", "--batch-docs", "3", tmp_path / src)
        assert r.returncode == 0, r.stderr
        got, vocab = stream_of(tmp_path / name)
        assert got == want, name
        assert vocab == tok.get_vocab_size()
        assert (tmp_path / name / "tokenizer.json").exists()
    r = prepare("--out", tmp_path / "none", "--tokenizer", tmp_path / "tokenizer.json", "--field", "body",
                "--seq-len", "16", "--eos", "none", tmp_path / "c.jsonl")
    assert r.returncode == 0, r.stderr
    assert stream_of(tmp_path / "none")[0] == [i for i in want if i != eos]


@pytest.mark.parametrize("content,args,match", [
    ('{"text": "a"}\n{"body": "b"}\n', [], r"c.jsonl:2: no field 'text' \(--field\) holding a string or a conversation; the line has \['body'\]"),
    ('{"text": "a"}\nnot json\n', [], r"c.jsonl:2: not JSON"),
    ('{"text": "a"}\n', ["--eos", "<nope>"], r"--eos <nope> is neither a token of .* nor an id below"),
])
def test_corpus_errors_name_the_place(tmp_path, content, args, match):
    import re

    small_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "c.jsonl").write_text(content)
    r = prepare("--out", tmp_path / "out", "--tokenizer", tmp_path / "tokenizer.json", *args, tmp_path / "c.jsonl")
    assert r.returncode != 0 and re.search(match, r.stderr), r.stderr
    assert not (tmp_path / "out" / "train.bin").exists() and not (tmp_path / "out" / ".stream.tmp").exists()


def peak_rss_mb(tmp_path, corpus):
    """The peak resident memory of prepare_data run on `corpus` in a fresh
    interpreter (MB)."""
    code = ("import resource, runpy, sys; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__'); "
            "print('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)")
    r = subprocess.run([sys.executable, "-c", code, SCRIPT, "--out", str(tmp_path / corpus.stem), "--seq-len", "64",
                        str(corpus)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.split("RSS")[-1])


def test_memory_does_not_grow_with_the_corpus(tmp_path):
    """A corpus 16x larger (64 MB of JSON lines, and one 64 MB text file)
    costs no more memory: documents are read, encoded and written a batch
    at a time, and the shards are cut from the stream in chunks."""
    line = json.dumps({"text": text_of(4000)}) + "\n"
    for name, mb in (("small", 4), ("large", 64)):
        (tmp_path / f"{name}.jsonl").write_text(line * (mb * 1024 * 1024 // len(line)))
        (tmp_path / f"{name}.txt").write_text(text_of(4000) * (mb * 1024 * 1024 // 4000))
    for suffix in (".jsonl", ".txt"):
        small = peak_rss_mb(tmp_path, tmp_path / f"small{suffix}")
        large = peak_rss_mb(tmp_path, tmp_path / f"large{suffix}")
        assert large - small < 24, (suffix, small, large)


# ---- conversations: chat template and loss masks --------------------------------

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHATS = [[{"role": "user", "content": f"question {i}: " + text_of(30 + i)},
          {"role": "assistant", "content": f"answer {i}: " + text_of(20 + 2 * i)},
          {"role": "user", "content": "and then?"},
          {"role": "assistant", "content": f"then {i}"}] for i in range(30)]


def chat_tokenizer(d):
    """A BPE with the chat's special tokens, its config naming a template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    d.mkdir()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([m["content"] for c in CHATS for m in c] * 2, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": TEMPLATE, "eos_token": "<|endoftext|>"}))
    return tok


def test_chat_masks_mark_the_assistant_turns(tmp_path):
    """--chat renders each conversation with the template; the mask shards
    mark exactly the assistant turns' tokens (content and end of turn), the
    EOS between conversations is not trained."""
    tok = chat_tokenizer(tmp_path / "tok")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
    r = prepare("--out", tmp_path / "out", "--tokenizer", tmp_path / "tok", "--chat", "--seq-len", "16",
                tmp_path / "c.jsonl")
    assert r.returncode == 0, r.stderr
    ids, _ = stream_of(tmp_path / "out")
    masks = [read_shard(tmp_path / "out" / f"{s}.mask.bin") for s in ("train", "valid")]
    assert all(vocab == 2 for _, vocab in masks)
    mask = np.concatenate([m for m, _ in masks]).tolist()
    assert len(mask) == len(ids)
    eos = tok.token_to_id("<|endoftext|>")
    convs, cur = [], []
    for t, m in zip(ids, mask):
        if t == eos:
            assert m == 0
            convs.append(cur)
            cur = []
        else:
            cur.append((t, m))
    assert len(convs) == len(CHATS)
    for conv, chat in zip(convs, CHATS):
        trained = tok.decode([t for t, m in conv if m], skip_special_tokens=False)
        assert trained == "".join(m["content"] + "<|im_end|>\n" for m in chat if m["role"] == "assistant")
        assert tok.decode([t for t, _ in conv], skip_special_tokens=False).startswith("<|im_start|>user\n")
    r = prepare("--out", tmp_path / "bad", "--chat", tmp_path / "c.jsonl")
    assert r.returncode != 0 and "--chat needs --tokenizer" in r.stderr
