"""Crafted files whose numbers overflow or have the wrong JSON type: token
shards, safetensors headers, tokenizer.json ids. Each is a clean error that
names the file and the field, never a crash. (The fuzz harnesses of
tests/fuzz/ cover the shard and safetensors parsers beyond these cases.)

Files that crashed the process before the readers were overflow-safe are
read in a child process, so that a regression fails these tests instead of
killing pytest."""

import json
import os
import struct
import subprocess
import sys

import pytest

import moeyard

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXE = os.path.join(os.environ.get("MOEYARD_BUILD_DIR", os.path.join(ROOT, "build")), "moeyard")

CONFIG = """
model: {vocab_size: 256, hidden_size: 32, num_layers: 2, num_heads: 4, num_kv_heads: 2, ffn_size: 64, max_seq_len: 16}
moe: {num_experts: 4, top_k: 2, moe_every_n: 2}
data: {train: TRAIN, valid: "", seq_len: 16}
train: {steps: 2, micro_batch: 2, grad_accum: 1, eval_every: 0}
checkpoint: {dir: RUN, every: 0}
"""


def shard(path, count, width, vocab, data_bytes):
    path.write_bytes(b"MOEYTOK1" + struct.pack("<IIQQ", 1, width, count, vocab) + b"\0" * data_bytes)
    return path


def train_on(tmp_path, shard_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG.replace("TRAIN", str(shard_path)).replace("RUN", str(tmp_path / "run")))
    return subprocess.run([EXE, "train", "--config", str(cfg)], capture_output=True, text=True, timeout=300)


# ---- token shards --------------------------------------------------------------

def test_shard_count_times_width_overflow_is_an_error_not_sigsegv(tmp_path):
    """(2^62 + 200) x 4 bytes wraps to 800: the size check passed and the
    trainer read far outside the mapping (SIGSEGV)."""
    bad = shard(tmp_path / "huge.bin", 2**62 + 200, 4, 256, 800)
    r = train_on(tmp_path, bad)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert str(bad) in r.stderr and "4611686018427388104 tokens of 4 bytes, more than 2^64" in r.stderr


def test_shard_vocabulary_must_fit_the_token_width(tmp_path):
    """A vocabulary of 2^63 + 5 read as int64 is negative and passed the
    check against model.vocab_size."""
    bad = shard(tmp_path / "vocab.bin", 100, 4, 2**63 + 5, 400)
    r = train_on(tmp_path, bad)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert str(bad) in r.stderr and "vocabulary size 9223372036854775813 is impossible" in r.stderr


# ---- a child process that reads crafted files -----------------------------------

WORKER = r"""
import json, sys
import moeyard
from moeyard import _C
for kind, path in json.loads(sys.argv[1]):
    try:
        if kind == "tokenizer":
            _C.Tokenizer.from_file(path)
        else:
            moeyard.Transformer.from_hf(path)
        result = "accepted"
    except Exception as e:
        result = f"{type(e).__name__}: {e}"
    print(json.dumps([path, result]), flush=True)
"""


def read_in_child(files):
    """{path: error message or "accepted"} for [(kind, path)], read in one
    child process; a crash is reported for the file it happened on."""
    r = subprocess.run([sys.executable, "-c", WORKER, json.dumps(files)], capture_output=True, text=True,
                       timeout=300, cwd=ROOT, env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python")))
    out = dict(json.loads(line) for line in r.stdout.splitlines() if line.startswith("["))
    for _, path in files:
        out.setdefault(path, f"CRASH (exit {r.returncode}): {r.stderr[-1500:]}")
    return out


# ---- safetensors headers -----------------------------------------------------------

def raw_safetensors(header_text, data_bytes):
    h = header_text.encode()
    return struct.pack("<Q", len(h)) + h + b"\0" * data_bytes


def tensor(dtype='"F32"', shape="[2]", offsets="[0, 8]"):
    return '{"w": {"dtype": %s, "shape": %s, "data_offsets": %s}}' % (dtype, shape, offsets)


DEEP = "[" * 1_000_000 + "]" * 1_000_000
SAFETENSORS = {
    "shape_product_overflows": (tensor(shape="[4294967296, 4294967296, 4]", offsets="[0, 0]"), 0,
                                "tensor 'w': bad shape [4294967296,4294967296]...: more than 2^63 bytes"),
    "zero_size_with_huge_strides": (tensor(shape="[0, 4611686018427387904, 4]", offsets="[0, 0]"), 0,
                                    "more than 2^63 bytes of F32"),
    "offsets_negative": (tensor(offsets="[-8, 0]"), 8, "tensor 'w': data_offsets[0] is -8, expected an integer >= 0"),
    "offsets_strings": (tensor(offsets='["0", "8"]'), 8, "tensor 'w': data_offsets[0] is \"0\""),
    "offsets_float": (tensor(offsets="[0, 8.0]"), 8, "tensor 'w': data_offsets[1] is 8.0"),
    "offsets_huge": (tensor(offsets="[0, 18446744073709551615]"), 8,
                     "tensor 'w': data_offsets [0, 18446744073709551615) outside the 8-byte data section"),
    "offsets_past_uint64": (tensor(offsets="[0, 18446744073709551616]"), 8, "tensor 'w': data_offsets[1] is 1.8"),
    "dtype_not_a_string": (tensor(dtype="4"), 8, "tensor 'w': dtype must be a string, got 4"),
    "shape_not_a_list": (tensor(shape="2"), 8, "tensor 'w': bad shape: expected a list of sizes, got 2"),
    "metadata_too_deep_to_print": ('{"__metadata__": {"k": %s}}' % DEEP, 0, "__metadata__ 'k' must be a string"),
    "shape_too_deep_to_print": (tensor(shape="[%s]" % DEEP), 8, "tensor 'w': bad shape: size 0 is a list"),
}


@pytest.fixture(scope="module")
def safetensors_results(tmp_path_factory):
    base = tmp_path_factory.mktemp("st")
    model = moeyard.Transformer(dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, ffn_size=64,
                                     moe=dict(num_experts=4)))
    model.save_hf(base / "ok", "mixtral")
    files = []
    for name, (header, data_bytes, _) in SAFETENSORS.items():
        d = base / name
        d.mkdir()
        (d / "config.json").write_text((base / "ok" / "config.json").read_text())
        (d / "model.safetensors").write_bytes(raw_safetensors(header, data_bytes))
        files.append(("safetensors", str(d)))
    files.append(("safetensors", str(base / "ok")))
    return base, read_in_child(files)


@pytest.mark.parametrize("case", sorted(SAFETENSORS))
def test_bad_safetensors_header_names_file_and_tensor(safetensors_results, case):
    base, results = safetensors_results
    msg = results[str(base / case)]
    assert msg.startswith("RuntimeError: "), msg
    assert str(base / case / "model.safetensors") in msg and SAFETENSORS[case][2] in msg, msg
    assert "[json.exception" not in msg


def test_valid_export_still_loads(safetensors_results):
    base, results = safetensors_results
    assert results[str(base / "ok")] == "accepted"


# ---- tokenizer.json numbers -------------------------------------------------------

def tokenizer_json(vocab_id=2, added_id=3, template_id=3, strip_start=1):
    return json.dumps({
        "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": vocab_id}, "merges": ["a b"]},
        "added_tokens": [{"id": added_id, "content": "<s>", "special": True}],
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": "<s>"}}, {"Sequence": {"id": "A"}}],
                           "special_tokens": {"<s>": {"id": "<s>", "ids": [template_id]}}},
        "decoder": {"type": "Strip", "content": " ", "start": strip_start, "stop": 0},
    })


TOKENIZERS = {
    # id + 1 overflowed, then id_to_token[2^63 - 1] was written: SIGSEGV
    "vocab_id_int64_max": (tokenizer_json(vocab_id=2**63 - 1), 'model.vocab["ab"]: token id 9223372036854775807'),
    # sized a table of 2^40 entries: out of memory
    "vocab_id_huge": (tokenizer_json(vocab_id=2**40), 'model.vocab["ab"]: token id 1099511627776 is not an integer'),
    "vocab_id_negative": (tokenizer_json(vocab_id=-1), 'model.vocab["ab"]: token id -1'),
    "vocab_id_float": (tokenizer_json(vocab_id=2.5), 'model.vocab["ab"]: token id 2.5'),
    "vocab_id_string": (tokenizer_json(vocab_id="2"), 'model.vocab["ab"]: token id "2"'),
    "added_id_huge": (tokenizer_json(added_id=2**40), "added_tokens[0].id: token id 1099511627776"),
    "template_id_huge": (tokenizer_json(template_id=2**40),
                         'post_processor.special_tokens["<s>"].ids[0]: token id 1099511627776'),
    "strip_start_negative": (tokenizer_json(strip_start=-1), "decoder.start: expected an integer >= 0, got -1"),
    "strip_start_float": (tokenizer_json(strip_start=1e30), "decoder.start: expected an integer >= 0, got 1e+30"),
    # quoting the entry in the message recursed once per level: SIGSEGV
    "merge_nested_a_million_levels": (tokenizer_json().replace('["a b"]', "[" + DEEP + "]"),
                                      "a JSON array nested more than 64 levels deep"),
}


@pytest.fixture(scope="module")
def tokenizer_results(tmp_path_factory):
    base = tmp_path_factory.mktemp("tok")
    files = []
    for name, (text, _) in TOKENIZERS.items():
        (base / f"{name}.json").write_text(text)
        files.append(("tokenizer", str(base / f"{name}.json")))
    (base / "ok.json").write_text(tokenizer_json())
    files.append(("tokenizer", str(base / "ok.json")))
    return base, read_in_child(files)


@pytest.mark.parametrize("case", sorted(TOKENIZERS))
def test_bad_tokenizer_numbers_name_file_and_field(tokenizer_results, case):
    base, results = tokenizer_results
    msg = results[str(base / f"{case}.json")]
    assert msg.startswith("RuntimeError: tokenizer " + str(base / f"{case}.json")), msg
    assert TOKENIZERS[case][1] in msg, msg


def test_template_ids_count_in_the_vocabulary_size(tmp_path):
    """The valid file still loads; an id the template adds beyond the vocab
    counts in vocab_size, which the CLI checks against the model."""
    from moeyard import _C

    ok = _C.Tokenizer.from_str(tokenizer_json())
    assert ok.vocab_size == 4 and ok.encode("ab", add_special_tokens=True) == [3, 2]
    wide = _C.Tokenizer.from_str(tokenizer_json(template_id=9))
    assert wide.vocab_size == 10 and wide.encode("ab", add_special_tokens=True) == [9, 2]


# ---- Hugging Face checkpoints: layer numbers in tensor names -------------------------

@pytest.mark.parametrize("layer", ["x", "99999999999999999999", ""])
def test_deepseek_mtp_layer_number_that_is_not_a_number(tmp_path, layer):
    """With num_nextn_predict_layers, tensors of layers >= num_hidden_layers
    are skipped; a layer "number" that is not one (or overflows int64) was a
    bare `stoll` exception. It is an unused tensor, reported with its file."""
    from safetensors.torch import load_file, save_file
    import torch

    cfg = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=0, ffn_size=64,
               attention="mla", kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8,
               moe=dict(num_experts=4, score_fn="sigmoid", selection_bias=True))
    d = tmp_path / "ds"
    moeyard.Transformer(cfg).save_hf(d, "deepseek_v3")
    config = json.loads((d / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1
    (d / "config.json").write_text(json.dumps(config))
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.2.eh_proj.weight"] = torch.zeros(32, 64)  # a real MTP layer: skipped
    save_file(tensors, d / "model.safetensors")
    moeyard.Transformer.from_hf(d)
    bad = f"model.layers.{layer}.eh_proj.weight"
    tensors[bad] = torch.zeros(32, 64)
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(RuntimeError, match="tensors are not used by the model") as e:
        moeyard.Transformer.from_hf(d)
    assert f"{bad} ({d / 'model.safetensors'})" in str(e.value)
