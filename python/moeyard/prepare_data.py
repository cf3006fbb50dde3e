#!/usr/bin/env python3
"""Turn a corpus into moeyard token shards.

    moeyard-prepare --out data/mycorpus INPUT ... [--tokenizer tokenizer.json]
    python scripts/prepare_data.py --out data/mycorpus INPUT ...      (from a checkout)
    python scripts/prepare_data.py --builtin --out data/builtin

Inputs, each a file or a directory (walked in sorted order):
  - text files (.txt, .md, .py, .rst in directories; any name given
    directly): one document each, read a block of lines at a time;
  - JSON lines (.jsonl): one document per line, the string in --field;
  - Parquet (.parquet): one document per row, column --field, read a row
    group at a time;
  - a directory written by `datasets`' save_to_disk (dataset_info.json or
    state.json in it; a DatasetDict's --split): one document per row.

With --chat, each document is a conversation (--field, default messages: a
list of {role, content}) rendered with the tokenizer's chat template
(tokenizer_config.json), and <out>/{train,valid}.mask.bin mark the tokens
of the assistant's turns: the trainer learns those only.

The documents are tokenized in batches with the tokenizer's batch encoder
(byte-level by default: vocabulary 256; with --tokenizer, any Hugging Face
tokenizer.json), --eos between documents, and streamed to disk: memory stays
constant whatever the corpus's size. valid.bin is the stream's last
--valid-fraction of tokens (at least one window of --seq-len + 1 tokens),
train.bin the rest, so a single input file works; a corpus too small to give
both shards a window is an error. --builtin uses the Python standard
library's own source files, which every machine has.

Shard format (little-endian, docs/training.md): 32-byte header
  magic b"MOEYTOK1" | u32 version=1 | u32 bytes per token (1, 2 or 4) |
  u64 token count | u64 vocabulary size
followed by the tokens.
"""

import argparse
import json
import math
import os
import shutil
import struct
import sys
import sysconfig

import numpy as np

MAGIC = b"MOEYTOK1"
TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst")
# Text files are tokenized this many characters at a time, cut after a line
# whose successor starts with a visible character (so that no whitespace run
# a pre-tokenizer groups is split).
BLOCK_CHARS = 1 << 20
# Tokens copied at a time when the stream is cut into the two shards.
COPY_TOKENS = 1 << 22
# Well-known end-of-text tokens, tried in order when the tokenizer's config
# names none.
EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|end|>")


def fail(msg):
    sys.exit(f"prepare_data: {msg}")


# ---- inputs -------------------------------------------------------------------


def is_dataset_dir(path):
    return os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, n)) for n in ("dataset_info.json", "state.json", "dataset_dict.json"))


def collect(paths):
    """The inputs in reading order: files by sorted path, datasets
    directories whole."""
    found = []
    for p in paths:
        if not os.path.exists(p):
            fail(f"input {p} does not exist")
        if is_dataset_dir(p) or not os.path.isdir(p):
            found.append(p)
            continue
        for root, dirs, names in os.walk(p):
            dirs.sort()
            for d in list(dirs):
                if is_dataset_dir(os.path.join(root, d)):
                    found.append(os.path.join(root, d))
                    dirs.remove(d)
            found += [os.path.join(root, n) for n in names if n.endswith(TEXT_SUFFIXES + (".jsonl", ".parquet"))]
    return sorted(found)


def input_bytes(path):
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(r, n)) for r, _, ns in os.walk(path) for n in ns)
    return os.path.getsize(path)


def text_blocks(path, progress):
    """A text file's document in blocks: (text, last block of the document)."""
    try:
        f = open(path, encoding="utf-8", errors="replace")
    except OSError as e:
        print(f"prepare_data: skipping {path}: {e}", file=sys.stderr)
        return
    with f:
        block, size = [], 0
        for line in f:
            if size >= BLOCK_CHARS and line[:1].strip():
                yield "".join(block), False
                block, size = [], 0
            block.append(line)
            size += len(line)
            progress(len(line))  # characters: close to the bytes read
        yield "".join(block), True


def jsonl_documents(path, field, progress):
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            progress(len(raw))
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                fail(f"{path}:{lineno}: not JSON ({e.msg})")
            text = obj.get(field) if isinstance(obj, dict) else None
            if not isinstance(text, (str, list)):
                fail(f"{path}:{lineno}: no field '{field}' (--field) holding a string or a conversation; the line "
                     f"has {sorted(obj) if isinstance(obj, dict) else type(obj).__name__}")
            yield text, True


def parquet_documents(path, field, progress):
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if field not in pf.schema_arrow.names:
        fail(f"{path}: no column '{field}' (--field); it has {pf.schema_arrow.names}")
    rows, size = max(pf.metadata.num_rows, 1), os.path.getsize(path)
    for batch in pf.iter_batches(columns=[field], batch_size=1024):
        progress(size * batch.num_rows / rows)
        for text in batch.column(0).to_pylist():
            yield text or "", True


def dataset_documents(path, field, split, progress):
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            fail(f"{path}: no split '{split}' (--split); it has {sorted(ds)}")
        ds = ds[split]
    if field not in ds.column_names:
        fail(f"{path}: no column '{field}' (--field); it has {ds.column_names}")
    rows, size = max(len(ds), 1), input_bytes(path)
    for batch in ds.iter(batch_size=1024):
        texts = batch[field]
        progress(size * len(texts) / rows)
        for text in texts:
            yield text or "", True


def documents(path, a, progress):
    """(text, ends a document) pieces of one input, in order."""
    if is_dataset_dir(path):
        return dataset_documents(path, a.field, a.split, progress)
    if path.endswith(".jsonl"):
        return jsonl_documents(path, a.field, progress)
    if path.endswith(".parquet"):
        return parquet_documents(path, a.field, progress)
    return text_blocks(path, progress)


# ---- tokenizer ----------------------------------------------------------------


class ByteLevel:
    vocab = 256
    eos = None

    def encode_batch(self, texts):
        return [(np.frombuffer(t.encode("utf-8", "replace"), dtype=np.uint8), None) for t in texts]


class HF:
    def __init__(self, path, eos):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(path)
        self.vocab = self.tok.get_vocab_size()
        self.eos = self.find_eos(path, eos)

    def find_eos(self, path, eos):
        if eos == "none":
            return None
        if eos != "auto":
            token = self.tok.token_to_id(eos)
            if token is None and eos.isdigit():
                token = int(eos)
            if token is None or not 0 <= token < self.vocab:
                fail(f"--eos {eos} is neither a token of {path} nor an id below {self.vocab}")
            return token
        config = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        names = list(EOS_NAMES)
        if os.path.exists(config):
            named = json.load(open(config)).get("eos_token")
            named = named.get("content") if isinstance(named, dict) else named
            names = ([named] if named else []) + names
        for name in names:
            if self.tok.token_to_id(name) is not None:
                return self.tok.token_to_id(name)
        return None

    def encode_batch(self, texts):
        return [(np.asarray(e.ids, dtype=np.int64), None)
                for e in self.tok.encode_batch(texts, add_special_tokens=False)]


class Chat(HF):
    """Conversations through the tokenizer's chat template: each assistant
    turn's tokens (what the template adds for it after the generation
    prompt) are marked 1 in the mask, everything else 0."""

    def __init__(self, path, eos):
        super().__init__(path, eos)
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)))
        if not self.hf.chat_template:
            fail(f"--chat: {os.path.dirname(os.path.abspath(path))} has no chat template "
                 "(tokenizer_config.json chat_template)")

    def render(self, messages, **kw):
        out = self.hf.apply_chat_template(messages, tokenize=True, **kw)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    def encode(self, messages):
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            fail("--chat: a conversation must be a list of {role, content}")
        ids = self.render(messages)
        mask = np.zeros(len(ids), dtype=np.uint8)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            after = self.render(messages[: i + 1])
            if ids[: len(after)] != after or after[: len(before)] != before:
                fail("--chat: the chat template does not render a conversation's turns as prefixes of it; "
                     "its assistant tokens cannot be marked")
            mask[len(before):len(after)] = 1
        return np.asarray(ids, dtype=np.int64), mask

    def encode_batch(self, conversations):
        return [self.encode(c) for c in conversations]


# ---- output -------------------------------------------------------------------


def header(count, width, vocab):
    return MAGIC + struct.pack("<IIQQ", 1, width, count, vocab)


def write_part(path, stream, first, count, width, vocab):
    """Tokens [first, first + count) of the raw stream file as a shard,
    atomically (written beside, fsynced, renamed)."""
    dtype = {1: np.uint8, 2: np.uint16, 4: np.uint32}[width]
    tmp = path + ".tmp"
    with open(tmp, "wb") as out, open(stream, "rb") as src:
        out.write(header(count, width, vocab))
        src.seek(first * width)
        left = count
        while left:
            chunk = np.fromfile(src, dtype=dtype, count=min(left, COPY_TOKENS))
            if chunk.size == 0:
                fail(f"{stream} ended {left:,} tokens early (the disk full?)")
            chunk.tofile(out)
            left -= chunk.size
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


def split_point(total: int, valid_fraction: float, window: int):
    """(train tokens, valid tokens) of a stream of `total` tokens: valid is
    the last valid_fraction of it, rounded up, and at least one window; both
    must hold a window, else the corpus is too small."""
    n_valid = max(window, math.ceil(total * valid_fraction))
    if total - n_valid < window:
        fail(f"the input has {total:,} tokens, too few for a train and a valid shard of at least {window:,} tokens "
             f"each (--seq-len {window - 1} + 1); give more text or a smaller --seq-len")
    return total - n_valid, n_valid


def tokenize_to(stream, files, a, tok, width):
    """Tokenizes every input into the raw stream file (and, for
    conversations, their loss masks into <stream>.mask); (documents, tokens,
    input characters)."""
    from tqdm import tqdm

    dtype = np.uint16 if width == 2 else np.uint32
    bar = tqdm(total=sum(input_bytes(p) for p in files), unit="B", unit_scale=True, desc="prepare_data",
               mininterval=2.0, disable=None)
    docs = tokens = chars = 0
    batch, ends = [], []

    def flush(out):
        nonlocal tokens
        for (ids, mask), end in zip(tok.encode_batch(batch), ends):
            if ids.size == 0:  # an empty document (or block) adds nothing
                continue
            if end and tok.eos is not None:
                ids = np.append(ids, tok.eos)
                mask = None if mask is None else np.append(mask, 0).astype(np.uint8)
            ids.astype(dtype).tofile(out)
            if masks is not None:
                mask.tofile(masks)
            tokens += ids.size
        batch.clear()
        ends.clear()
        bar.set_postfix(docs=docs, tokens=tokens, refresh=False)

    masks = open(stream + ".mask", "wb") if a.chat else None
    with open(stream, "wb") as out:
        for path in files:
            for text, end in documents(path, a, bar.update):
                if isinstance(text, list) != a.chat:
                    fail(f"{path}: {'a conversation' if isinstance(text, list) else 'a text'} in --field "
                         f"'{a.field}'; " + ("--chat reads conversations" if a.chat else
                                             "conversations need --chat"))
                batch.append(text)
                ends.append(end)
                docs += end
                chars += len(text) if isinstance(text, str) else sum(len(str(m.get("content", ""))) for m in text)
                if len(batch) >= a.batch_docs:
                    flush(out)
                if a.max_bytes and chars >= a.max_bytes:
                    break
            if a.max_bytes and chars >= a.max_bytes:
                break
        flush(out)
    if masks is not None:
        masks.close()
    bar.close()
    return docs, tokens, chars


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="*")
    ap.add_argument("--out", required=True)
    ap.add_argument("--builtin", action="store_true", help="use the Python standard library sources")
    ap.add_argument("--tokenizer", help="a Hugging Face tokenizer.json, or a checkpoint directory holding one (default: bytes)")
    ap.add_argument("--field", help="the document's field in JSON lines, Parquet and datasets (default text; "
                                    "messages with --chat)")
    ap.add_argument("--chat", action="store_true",
                    help="documents are conversations: render them with the tokenizer's chat template and write "
                         "loss masks marking the assistant's tokens")
    ap.add_argument("--split", default="train", help="the split of a saved DatasetDict (default train)")
    ap.add_argument("--eos", default="auto",
                    help="token between documents: auto (the tokenizer config's eos_token, else a well-known "
                         "end-of-text token; none for bytes), none, or a token or id")
    ap.add_argument("--batch-docs", type=int, default=256, help="documents per batch-encoder call (default 256)")
    ap.add_argument("--valid-fraction", type=float, default=0.05,
                    help="share of the tokens, taken from the end, that go to valid.bin (default 0.05)")
    ap.add_argument("--seq-len", type=int, default=128,
                    help="the training window (data.seq_len): each shard gets at least seq_len + 1 tokens "
                         "(default 128)")
    ap.add_argument("--max-bytes", type=int, default=0,
                    help="stop reading after this many input characters, both shards together; the last "
                         "document may be cut there, without its EOS (0: all)")
    a = ap.parse_args(argv)
    if not 0.0 < a.valid_fraction < 1.0:
        fail(f"--valid-fraction must be in (0, 1), got {a.valid_fraction}")
    if a.seq_len < 1:
        fail(f"--seq-len must be >= 1, got {a.seq_len}")
    if a.batch_docs < 1:
        fail(f"--batch-docs must be >= 1, got {a.batch_docs}")
    files = collect([sysconfig.get_paths()["stdlib"]] if a.builtin else a.inputs)
    if not files:
        fail("no input files")
    if a.tokenizer and os.path.isdir(a.tokenizer):  # a Hugging Face checkpoint directory
        a.tokenizer = os.path.join(a.tokenizer, "tokenizer.json")
    a.field = a.field or ("messages" if a.chat else "text")
    if a.chat and not a.tokenizer:
        fail("--chat needs --tokenizer (a directory with tokenizer.json and a chat template)")
    tok = (Chat if a.chat else HF)(a.tokenizer, a.eos) if a.tokenizer else ByteLevel()
    if not a.tokenizer and a.eos not in ("auto", "none"):
        fail("--eos needs --tokenizer (byte-level data has no end-of-text token)")
    width = 2 if tok.vocab <= 65536 else 4
    os.makedirs(a.out, exist_ok=True)
    stream = os.path.join(a.out, ".stream.tmp")
    try:
        docs, total, chars = tokenize_to(stream, files, a, tok, width)
        n_train, n_valid = split_point(total, a.valid_fraction, a.seq_len + 1)
        print(f"prepare_data: {len(files)} inputs, {docs:,} documents, {chars:,} characters, {total:,} tokens"
              + (f" (EOS {tok.eos} between documents)" if tok.eos is not None else ""))
        for split, first, count in (("train", 0, n_train), ("valid", n_train, n_valid)):
            write_part(os.path.join(a.out, f"{split}.bin"), stream, first, count, width, tok.vocab)
            mask = os.path.join(a.out, f"{split}.mask.bin")
            if a.chat:  # one 0/1 per token: 1 where the loss counts
                write_part(mask, stream + ".mask", first, count, 1, 2)
            elif os.path.exists(mask):  # an earlier --chat run's
                os.remove(mask)
            print(f"prepare_data: {split}: {count:,} tokens -> {a.out}/{split}.bin")
    finally:
        for f in (stream, stream + ".mask"):
            if os.path.exists(f):
                os.remove(f)
    if a.tokenizer:  # the trainer copies it into every checkpoint (for generate)
        shutil.copyfile(a.tokenizer, os.path.join(a.out, "tokenizer.json"))


if __name__ == "__main__":
    main()
