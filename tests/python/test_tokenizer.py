"""moeyard.Tokenizer (csrc/text/tokenizer.cpp) against the `tokenizers` library.

Each tokenizer is built here with `tokenizers` itself, saved as tokenizer.json,
loaded by the C++ class, and must give the same ids and the same decoded text.
"""

import json
import os
import random
import subprocess
import sys

import pytest
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from moeyard import _C

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXE = os.path.join(os.environ.get("MOEYARD_BUILD_DIR", os.path.join(ROOT, "build")), "moeyard")

CORPUS = [
    "Hello world! Don't panic; it's 42, isn't it? We'll see, they've said I'm fine.",
    "def main(args):\n    return [x ** 2 for x in range(10)]  # squares\n\n",
    "Ça va très bien, merci. Über größere Straßen fährt man schnell. naïve café",
    "你好，世界。東京は日本の首都です。안녕하세요 세계",
    "Emoji 🙂🚀👍🏽 and numbers 1234567890 3.14159 1,000,000",
    "   leading spaces and trailing   \t\ttabs\r\nwindows lines\n",
    "Привет мир. Γειά σου κόσμε.",
]

TRICKY = [
    "",
    " ",
    "   ",
    "\n",
    "\n\n\n",
    " \n \n",
    "\t\t x",
    "Hello world",
    " Hello  world ",
    "don't DON'T we'll You're I'M",
    "1234567890 12 3.5 -7 1,000",
    "naïve café über Straße",
    "你好世界 東京",
    "안녕하세요",
    "🙂🚀👍🏽",
    "Привет, мир!",
    "a\r\nb\rc",
    "x  \n  y",
    "<s>hello</s>",
    "hi<|endoftext|>there<|endoftext|><|endoftext|>",
    "<|endoftext|> starts",
    "tab\tand   spaces    end   ",
    "mixed 中文 and English 123 🙂!",
    "!!!???...,,,;;;",
    "x" * 200,
]

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# DeepSeek-V3 style: several Split steps, one with \uXXXX escapes (Oniguruma syntax).
DEEPSEEK_SPLITS = [
    r"\p{N}{1,3}",
    "[一-龥\\u3040-ゟ゠-ヿ]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
]


def fuzz_strings(n=150, seed=0):
    rng = random.Random(seed)
    alphabet = list("aAbz09 '\n\t\r.,!?-_") + ["  ", "é", "ß", "ü", "你", "界", "🙂", "👍🏽", "한", "Ж", "Ω",
                                               "<s>", "</s>", "<|endoftext|>", "'s", "'LL", "123", "    "]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 25))) for _ in range(n)]


def byte_level_trainer(vocab_size=500, special=("<|endoftext|>",)):
    return trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special),
                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)


def gpt2_style(add_prefix_space=False):
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 3, byte_level_trainer())
    tok.add_tokens([AddedToken("wörld", normalized=True), AddedToken("<tool>", normalized=False, special=False)])
    return tok


def split_style(pattern, nfc=False, ignore_merges=False):
    """Llama-3 / Qwen2 layout: Sequence[Split(regex), ByteLevel(use_regex=False)]."""
    tok = HFTokenizer(models.BPE(ignore_merges=ignore_merges))
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 3, byte_level_trainer(special=("<|begin_of_text|>", "<|endoftext|>")))
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                      special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))]),
    ])
    return tok


def deepseek_style():
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in DEEPSEEK_SPLITS]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 3, byte_level_trainer())
    return tok


def llama2_style(byte_fallback=True, metaspace=False):
    """SentencePiece-style BPE: ▁ for spaces, <0xNN> byte fallback, <unk>."""
    tok = HFTokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=byte_fallback))
    if metaspace:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    else:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    special = ["<unk>", "<s>", "</s>"] + ([f"<0x{b:02X}>" for b in range(256)] if byte_fallback else [])
    # A small alphabet: CJK, emoji and most accents are left to byte fallback (or <unk>).
    tr = trainers.BpeTrainer(vocab_size=600, special_tokens=special, limit_alphabet=60, show_progress=False)
    tok.train_from_iterator(CORPUS * 3, tr)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def metaspace_split_style():
    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.train_from_iterator(CORPUS * 3, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "</s>"],
                                                            show_progress=False))
    return tok


def whitespace_style(split=False):
    """Word-level pre-tokenization (as in tests/python/test_finetune.py)."""
    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit() if split else pre_tokenizers.Whitespace()
    tok.decoder = decoders.BPEDecoder()
    tok.train_from_iterator(CORPUS * 3, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"],
                                                            show_progress=False))
    return tok


BUILDERS = {
    "whitespace": whitespace_style,
    "whitespace_split": lambda: whitespace_style(split=True),
    "gpt2": gpt2_style,
    "gpt2_prefix_space": lambda: gpt2_style(add_prefix_space=True),
    "llama3": lambda: split_style(LLAMA3_PATTERN, ignore_merges=True),
    "qwen2": lambda: split_style(QWEN2_PATTERN, nfc=True),
    "deepseek": deepseek_style,
    "llama2": llama2_style,
    "llama2_metaspace": lambda: llama2_style(metaspace=True),
    "llama2_unk": lambda: llama2_style(byte_fallback=False),
    "metaspace_split": metaspace_split_style,
}


def save(tok, path):
    tok.save(str(path))
    return _C.Tokenizer.from_file(str(path))


def check_same(hf, ours, texts):
    for text in texts:
        want = hf.encode(text, add_special_tokens=False).ids
        got = ours.encode(text)
        assert got == want, (text, got, want)
        assert ours.encode(text, add_special_tokens=True) == hf.encode(text).ids, text
        for skip in (True, False):
            assert ours.decode(got, skip) == hf.decode(want, skip_special_tokens=skip), (text, skip)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_matches_tokenizers(tmp_path, name):
    hf = BUILDERS[name]()
    ours = save(hf, tmp_path / "tokenizer.json")
    texts = TRICKY + CORPUS + fuzz_strings()
    check_same(hf, ours, texts)
    assert ours.vocab_size == hf.get_vocab_size(with_added_tokens=True)


def test_round_trip_byte_level(tmp_path):
    hf = gpt2_style()
    ours = save(hf, tmp_path / "tokenizer.json")
    for text in TRICKY + CORPUS:
        assert ours.decode(ours.encode(text), False) == text


def test_byte_fallback_and_unk(tmp_path):
    hf = llama2_style()
    ours = save(hf, tmp_path / "a.json")
    ids = ours.encode("ᚠ")  # not in the vocabulary: three <0xNN> byte tokens
    assert [hf.id_to_token(i) for i in ids][-3:] == ["<0xE1>", "<0x9A>", "<0xA0>"]
    # (the trainer made <0xNN> added special tokens, so keep them in decode)
    assert ours.decode(ours.encode("a ᚠ b"), False) == "a ᚠ b"
    assert ours.decode(ids[-2:], False) == "\ufffd\ufffd"  # an incomplete character
    assert ours.bos_id == 1 and ours.eos_id == 2
    unk = save(llama2_style(byte_fallback=False), tmp_path / "b.json")
    assert unk.encode("ᚠᚠ")[-1:] == [0] and unk.encode("ᚠᚠ").count(0) == 1  # fused <unk>


def test_merges_as_strings(tmp_path):
    """Older files write merges as "a b" strings; both forms load."""
    hf = gpt2_style()
    j = json.loads(hf.to_str())
    assert isinstance(j["model"]["merges"][0], list)
    j["model"]["merges"] = [" ".join(m) for m in j["model"]["merges"]]
    p = tmp_path / "tokenizer.json"
    p.write_text(json.dumps(j))
    hf2 = HFTokenizer.from_file(str(p))
    check_same(hf2, _C.Tokenizer.from_file(str(p)), TRICKY)


# Scripts whose normalization is not the identity: precomposed and combining
# Latin, Arabic (with harakat and presentation forms), Devanagari (nukta),
# Thai, Hangul jamo, compatibility characters (ligatures, full-width, ℌ, ①).
UNICODE_TEXTS = [
    "cafe\u0301 and caf\u00e9, A\u030a and \u00c5, \u1e9b\u0323",
    "\u0627\u0644\u0633\u0651\u064e\u0644\u0627\u0645 \ufefb \ufdf2 \u0622 \u0627\u0653",
    "\u0915\u093c \u0958 \u0928\u092e\u0938\u094d\u0924\u0947 \u0915\u094d\u0937",
    "\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35\u0e04\u0e23\u0e31\u0e1a \u0e4d\u0e32 \u0e33",
    "\u1100\u1161\u11a8 \uac01 \ufb01 \uff21\uff42 \u210c \u2460 x\u00b2 \u212b",
]


@pytest.mark.parametrize("form", ["NFC", "NFD", "NFKC", "NFKD"])
def test_unicode_normalizers_match_tokenizers(tmp_path, form):
    """Each Unicode normalization form (utf8proc) gives the ids and text
    `tokenizers` gives on scripts that NFC and NFKC change."""
    hf = split_style(QWEN2_PATTERN, nfc=True)
    j = json.loads(hf.to_str())
    j["normalizer"] = {"type": form}
    p = tmp_path / "tokenizer.json"
    p.write_text(json.dumps(j))
    hf = HFTokenizer.from_file(str(p))
    check_same(hf, _C.Tokenizer.from_file(str(p)), UNICODE_TEXTS + TRICKY)
    assert hf.normalizer.normalize_str(UNICODE_TEXTS[0]) != UNICODE_TEXTS[0]  # the texts are not trivial


def bad(tmp_path, edit):
    j = json.loads(gpt2_style().to_str())
    edit(j)
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(j))
    return p


@pytest.mark.parametrize("edit, match", [
    (lambda j: j["model"].pop("merges"), r"model\.merges: missing"),
    (lambda j: j["model"].update(type="WordPiece"), r"model\.type: unsupported model \"WordPiece\""),
    (lambda j: j["model"]["merges"].append(["zzq", "qzz"]), r"model\.merges\[\d+\].*missing from model\.vocab"),
    (lambda j: j.update(normalizer={"type": "Lowercase"}), r"normalizer\.type: unsupported normalizer \"Lowercase\""),
    (lambda j: j.update(pre_tokenizer={"type": "BertPreTokenizer"}),
     r"pre_tokenizer\.type: unsupported pre-tokenizer \"BertPreTokenizer\""),
    (lambda j: j.update(decoder={"type": "WordPiece", "prefix": "##"}), r"decoder\.type: unsupported decoder"),
    (lambda j: j.update(pre_tokenizer={"type": "Split", "pattern": {"Regex": "(unclosed"}, "behavior": "Isolated",
                                       "invert": False}), r"pre_tokenizer\.pattern: regex .* does not compile"),
])
def test_bad_files(tmp_path, edit, match):
    p = bad(tmp_path, edit)
    with pytest.raises(RuntimeError, match=match) as e:
        _C.Tokenizer.from_file(str(p))
    assert str(p) in str(e.value)


def test_wordpiece_file_is_refused(tmp_path):
    tok = HFTokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    p = tmp_path / "wp.json"
    tok.save(str(p))
    with pytest.raises(RuntimeError, match=r"model\.type.*WordPiece"):
        _C.Tokenizer.from_file(str(p))
    with pytest.raises(RuntimeError, match="cannot open"):
        _C.Tokenizer.from_file(str(tmp_path / "missing.json"))


# ---- moeyard generate with a checkpoint's tokenizer.json ---------------------------

GEN_CONFIG = """
model: {vocab_size: 320, hidden_size: 32, num_layers: 2, num_heads: 4, num_kv_heads: 2, ffn_size: 64, max_seq_len: 64}
moe: {num_experts: 4, top_k: 2, moe_every_n: 2}
data: {train: TRAIN, valid: VALID, seq_len: 32}
optim: {lr: 3.0e-3, warmup: 2}
train: {steps: 4, micro_batch: 2, grad_accum: 1, eval_every: 100, eval_batches: 1}
checkpoint: {dir: RUN, every: 4, keep_last: 1}
log: {every: 2}
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    # A fixed corpus, so the tiny model (and what it generates) does not
    # change whenever a file in the repository does.
    (d / "text").mkdir()
    (d / "text" / "corpus.txt").write_text("\n".join(CORPUS * 100), encoding="utf-8")
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "prepare_data.py"), "--out", str(d / "data"),
                    str(d / "text")], check=True, capture_output=True)
    cfg = d / "gen.yaml"
    cfg.write_text(GEN_CONFIG.replace("TRAIN", str(d / "data" / "train.bin"))
                   .replace("VALID", str(d / "data" / "valid.bin")).replace("RUN", str(d / "run")))
    r = subprocess.run([EXE, "train", "--config", str(cfg), "--resume", "never"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return d / "run"


def generate(ckpt, *args):
    return subprocess.run([EXE, "generate", "--checkpoint", str(ckpt), "--max-new-tokens", "5", "--temperature", "0",
                           *args], capture_output=True, text=True, timeout=120)


def test_generate_uses_tokenizer(tmp_path, checkpoint):
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(CORPUS * 3, byte_level_trainer(vocab_size=300))
    assert hf.get_vocab_size() <= 320
    tok_path = tmp_path / "tokenizer.json"
    hf.save(str(tok_path))

    r = generate(checkpoint, "--prompt", "def main(", "--tokenizer", str(tok_path))
    assert r.returncode == 0, r.stderr
    assert "tokenizer " + str(tok_path) in r.stderr and "byte-level BPE" in r.stderr
    text = r.stdout.rstrip("\n")
    assert text.startswith("def main(")
    # The continuation is the tokenizer's decoding of <= 5 tokens.
    prompt_ids = hf.encode("def main(").ids
    assert hf.decode(hf.encode(text).ids) == text and len(text) > len("def main(")

    # <checkpoint>/tokenizer.json is found without the flag.
    step = checkpoint / (checkpoint / "latest").read_text().strip()
    (step / "tokenizer.json").write_bytes(tok_path.read_bytes())
    try:
        again = generate(checkpoint, "--prompt", "def main(")
        assert again.returncode == 0, again.stderr
        assert again.stdout == r.stdout and str(step / "tokenizer.json") in again.stderr
    finally:
        (step / "tokenizer.json").unlink()
    byte = generate(checkpoint, "--prompt", "def main(")
    assert byte.returncode == 0 and "byte-level (no tokenizer.json)" in byte.stderr
    assert len(prompt_ids) < len("def main(")  # the tokenizer run really used BPE tokens


def test_generate_refuses_a_larger_vocab(tmp_path, checkpoint):
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(CORPUS * 3, byte_level_trainer(vocab_size=400))
    assert hf.get_vocab_size() > 320
    p = tmp_path / "tokenizer.json"
    hf.save(str(p))
    r = generate(checkpoint, "--prompt", "x", "--tokenizer", str(p))
    assert r.returncode != 0
    assert f"has {hf.get_vocab_size()} tokens, more than the model's vocab_size 320" in r.stderr
