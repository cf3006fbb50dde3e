"""Config validation: every number has a documented range, and errors name the
key, the value, the range and where the value was given (file:line or the
`--set` argument), citing both keys when two are involved.

Most cases parse in-process through ``moeyard.train`` (the config is read and
checked before anything else; a valid config then stops at the missing
training shard); a few run the ``moeyard`` executable as users do."""

import os
import re
import subprocess

import pytest

import moeyard

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXE = os.path.join(os.environ.get("MOEYARD_BUILD_DIR", os.path.join(ROOT, "build")), "moeyard")

# One key a line, so that every key has its own line number.
BASE = """\
model:
  vocab_size: 256
  hidden_size: 32
  num_layers: 2
  num_heads: 4
  num_kv_heads: 2
  ffn_size: 64
  max_seq_len: 32
moe:
  num_experts: 4
  top_k: 2
  moe_every_n: 2
  capacity_factor: 1.5
data:
  train: /nonexistent.bin
  valid: ""
  seq_len: 32
optim:
  lr: 3.0e-3
  beta1: 0.9
  warmup: 5
train:
  steps: 2
  micro_batch: 2
  eval_every: 0
checkpoint:
  dir: RUN
  every: 0
log:
  every: 1
"""


def line_of(key, text=BASE):
    """1-based line of `section.key` in `text`."""
    section, name = key.split(".")
    lines = text.splitlines()
    start = lines.index(section + ":")
    for i in range(start + 1, len(lines)):
        if lines[i].startswith("  " + name + ":"):
            return i + 1
    raise KeyError(key)


@pytest.fixture
def config(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text(BASE.replace("RUN", str(tmp_path / "run")))
    return p


def at(config, key):
    return f"{config}:{line_of(key)}"


def parse_error(config, *overrides):
    """The error message of loading `config` with `overrides` ("" when the
    config is valid, i.e. loading stopped at the missing training shard)."""
    try:
        moeyard.train(str(config), list(overrides), resume="never")
    except RuntimeError as e:
        msg = str(e).splitlines()[0]
        return "" if "/nonexistent.bin" in msg else msg
    raise AssertionError("training /nonexistent.bin did not fail")


def cli(config, *overrides):
    args = [a for o in overrides for a in ("--set", o)]
    r = subprocess.run([EXE, "train", "--config", str(config), "--resume", "never", *args],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]
    return r.stderr


# ---- every number has a range ---------------------------------------------------------

# The list of accepted bad values, then at least one per other section.
OUT_OF_RANGE = [
    ("optim.lr", "inf", "(0, inf)"),
    ("optim.weight_decay", "-1", "[0, inf)"),
    ("optim.beta1", "1.5", "[0, 1)"),
    ("optim.eps", "-1", "(0, inf)"),
    ("optim.grad_clip", "-1", "[0, inf)"),
    ("optim.min_lr_ratio", "5", "[0, 1]"),
    ("optim.warmup", "-3", "[0, inf)"),
    ("optim.router_lr_mult", "-1", "[0, inf)"),
    ("train.eval_batches", "0", "[1, inf)"),
    ("train.threads", "-4", "[0, inf)"),
    ("optim.beta2", "1", "[0, 1)"),
    ("optim.wsd_decay_fraction", "0", "(0, 1]"),
    ("optim.expert_grad_clip", "nan", "[0, inf)"),
    ("train.max_bad_steps", "0", "[1, inf)"),
    ("train.eval_every", "-1", "[0, inf)"),
    ("model.norm_eps", "nan", "(0, inf)"),
    ("model.rotary_pct", "1.5", "[0, 1]"),
    ("model.rope_theta", ".inf", "(0, inf)"),
    ("model.vocab_size", "0", "[1, inf)"),
    ("moe.expert_dropout", "-0.1", "[0, 1)"),
    ("moe.capacity_factor", "-1", "[0, inf)"),
    ("moe.noise_eps", "1", "[0, 1)"),
    ("moe.num_experts", "-1", "[0, inf)"),
    ("data.seq_len", "1", "[2, inf)"),
    ("data.seed", "-1", "[0, inf)"),
    ("checkpoint.keep_last", "0", "[1, inf)"),
    ("checkpoint.every", "-1", "[0, inf)"),
    ("checkpoint.timeout_s", "-.inf", "(0, inf)"),
    ("log.every", "0", "[1, inf)"),
    ("schedule.bias_update_rate", "-0.5", "[0, inf)"),
    ("schedule.null_bias_rate", "-0.5", "[0, inf)"),
    ("schedule.null_target_fraction", "1.5", "[0, 1]"),
    ("schedule.relu_l1_mult", "-1", "[0, inf)"),
    ("parallel.timeout_s", ".nan", "(0, inf)"),
    ("parallel.data_parallel", "-1", "[0, inf)"),
    ("parallel.tensor_parallel", "0", "[1, inf)"),
]


@pytest.mark.parametrize("key,value,range_", OUT_OF_RANGE, ids=[f"{k}={v}" for k, v, _ in OUT_OF_RANGE])
def test_value_outside_its_range_names_key_value_range(config, key, value, range_):
    kv = f"{key}={value}"
    assert parse_error(config, kv) == f"config: {key} (--set {kv}): {value} is outside {range_}"


def test_value_in_the_file_cites_its_line(config):
    config.write_text(config.read_text().replace("beta1: 0.9", "beta1: 1.5"))
    assert parse_error(config) == f"config: optim.beta1 ({at(config, 'optim.beta1')}): 1.5 is outside [0, 1)"


@pytest.mark.parametrize("group,match", [
    ("{pattern: attn., lr_mult: -1}", "optim.groups[0].lr_mult (--set optim.groups=[{}]): -1 is outside [0, inf)"),
    ("{pattern: attn., weight_decay: .nan}",
     "optim.groups[0].weight_decay (--set optim.groups=[{}]): .nan is outside [0, inf)"),
])
def test_optim_groups_numbers_have_ranges(config, group, match):
    assert parse_error(config, f"optim.groups=[{group}]") == "config: " + match.replace("{}", group)


# Every numeric field (the docs list its range): int or float.
MOE_ROWS = [r for part in ("structure", "options", "coefficients") for r in moeyard._C.moe_interface()[part]]
INTS = {
    "model": ["vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "ffn_size",
              "dense_ffn_size", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
              "v_head_dim", "sliding_window", "rope_original_max_position", "max_seq_len"],
    # The `moe:` keys come from the MoE layer's tables (csrc/model/moe_interface.h).
    "moe": [r["name"] for r in MOE_ROWS if r["type"] == "int" and r["name"] not in ("top_k", "topk_groups")],
    "data": ["seq_len", "seed"],
    "optim": ["warmup"],
    "train": ["steps", "micro_batch", "grad_accum", "seed", "threads", "eval_every", "eval_batches",
              "max_bad_steps"],
    "checkpoint": ["every", "keep_last"],
    "log": ["every"],
    "parallel": ["data_parallel", "tensor_parallel", "expert_parallel"],
    "finetune.lora": ["rank"],
}
FLOATS = {
    "model": ["norm_eps", "clip_qkv", "attention_scale", "rope_theta", "rotary_pct", "rope_factor",
              "yarn_beta_fast", "yarn_beta_slow", "yarn_mscale", "yarn_mscale_all_dim", "yarn_attention_factor"],
    "moe": [r["name"] for r in MOE_ROWS if r["type"] == "float"],
    "optim": ["lr", "min_lr_ratio", "wsd_decay_fraction", "weight_decay", "beta1", "beta2", "eps",
              "router_lr_mult", "grad_clip", "expert_grad_clip"],
    "checkpoint": ["timeout_s"],
    "schedule": ["bias_update_rate", "null_bias_rate", "null_target_fraction", "relu_l1_mult"],
    "parallel": ["timeout_s"],
    "finetune.lora": ["alpha", "dropout"],
}
# Ranges that depend on another key, checked below with their own cases.
RELATIVE = {"moe.top_k", "moe.topk_groups", "moe.layers", "train.recompute_layers"}


def documented_ranges():
    """key -> the range column of docs/training.md and docs/model.md."""
    out = {}
    for doc, sections in (("training.md", {"": ""}),
                          ("model.md", {"## Options (`model:`)": "model.", "## MoE options": "moe."})):
        prefix = ""
        for line in open(os.path.join(ROOT, "docs", doc)):
            if doc == "model.md" and line.startswith("## "):  # tables of other sections are not options
                prefix = next((p for head, p in sections.items() if head and line.startswith(head)), None)
            if prefix is None:
                continue
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not line.startswith("| `") or len(cells) < 4:
                continue
            keys = re.findall(r"`([\w.\[\]<>]+)`", cells[0])
            for k in keys:
                out[prefix + k] = cells[2].replace("`", "").replace(" each", "")
    return out


def numeric_fields():
    return [(f"{s}.{k}", int) for s, ks in INTS.items() for k in ks] + \
           [(f"{s}.{k}", float) for s, ks in FLOATS.items() for k in ks]


def test_every_numeric_field_has_a_documented_range():
    docs = documented_ranges()
    for key, _ in numeric_fields():
        assert re.fullmatch(r"[\[(]-?[\d.e-]+, (inf|[\d.]+)[\])]", docs.get(key, "")), (key, docs.get(key))
    for key in RELATIVE | {"schedule.<option>.start"}:
        assert docs.get(key), key


@pytest.mark.parametrize("key,kind", numeric_fields(), ids=[k for k, _ in numeric_fields()])
def test_every_number_is_checked_against_its_documented_range(config, key, kind):
    documented = documented_ranges()[key]
    # Below every documented range (all lower bounds are >= 0), then NaN and
    # infinity, which no range contains.
    bad = ["-1000000"] + ([".nan", "inf", "-.inf"] if kind is float else [])
    for value in bad:
        kv = f"{key}={value}"
        assert parse_error(config, kv) == f"config: {key} (--set {kv}): {value} is outside {documented}"
    if kind is int:
        kv = f"{key}=nan"
        assert parse_error(config, kv) == f"config: {key} (--set {kv}): expected an integer, got 'nan'"


def test_defaults_and_documented_lower_bounds_are_accepted(config):
    assert parse_error(config) == ""
    assert parse_error(config, "optim.beta1=0", "optim.weight_decay=0", "optim.grad_clip=0", "optim.warmup=0",
                       "optim.min_lr_ratio=1", "optim.wsd_decay_fraction=1", "train.threads=0",
                       "train.eval_every=0", "checkpoint.every=0", "moe.capacity_factor=0",
                       "optim.groups=[{pattern: attn., lr_mult: 0}]") == ""


# ---- schedules --------------------------------------------------------------------------

@pytest.mark.parametrize("schedule,match", [
    # the issue: a top-k above the experts was accepted (routing used 4, metrics logged 6)
    ("top_k={start: 6}", "schedule.top_k.start (--set schedule.top_k={start: 6}): 6 is outside "
                         "[1, moe.num_experts (X:moe.num_experts) = 4]"),
    ("top_k={type: linear, start: 4, end: 0}",
     "schedule.top_k.end (--set schedule.top_k={type: linear, start: 4, end: 0}): 0 is outside "
     "[1, moe.num_experts (X:moe.num_experts) = 4]"),
    # negative values used to mean "off"; given, they are errors
    ("capacity_factor={type: linear, start: -1, end: 1}",
     "schedule.capacity_factor.start (--set schedule.capacity_factor={type: linear, start: -1, end: 1}): "
     "-1 is outside (0, inf)"),
    ("top_k={start: -1}", "schedule.top_k.start (--set schedule.top_k={start: -1}): -1 is outside "
                          "[1, moe.num_experts (X:moe.num_experts) = 4]"),
    ("capacity_factor={start: 0}", "schedule.capacity_factor.start (--set schedule.capacity_factor={start: 0}): "
                                   "0 is outside (0, inf)"),
    ("capacity_factor={start: .nan}", "schedule.capacity_factor.start "
                                      "(--set schedule.capacity_factor={start: .nan}): .nan is outside (0, inf)"),
    ("top_k={type: linear, end: 2}", "schedule.top_k.start (--set schedule.top_k={type: linear, end: 2}): "
                                     "is required"),
    ("capacity_factor={type: cosine, start: 2}",
     "schedule.capacity_factor.end (--set schedule.capacity_factor={type: cosine, start: 2}): is required "
     "with type 'cosine'"),
    ("top_k={start: 2, steps: -1}", "schedule.top_k.steps (--set schedule.top_k={start: 2, steps: -1}): "
                                    "-1 is outside [0, inf)"),
    ("top_k={start: 2, begin: -5}", "schedule.top_k.begin (--set schedule.top_k={start: 2, begin: -5}): "
                                    "-5 is outside [0, inf)"),
    ("top_k={start: 2, type: none}", "schedule.top_k.type (--set schedule.top_k={start: 2, type: none}): "
                                     "must be constant, linear, cosine, step or wsd, got 'none'"),
    # every numeric routing option and aux-loss coefficient can be scheduled, within its range
    ("noise_eps={start: 1}", "schedule.noise_eps.start (--set schedule.noise_eps={start: 1}): 1 is outside [0, 1)"),
    ("z_coeff={type: linear, start: 0.1, end: -1}",
     "schedule.z_coeff.end (--set schedule.z_coeff={type: linear, start: 0.1, end: -1}): -1 is outside [0, inf)"),
    ("expert_dropout={start: 0.1, decay_fraction: 0}",
     "schedule.expert_dropout.decay_fraction (--set schedule.expert_dropout={start: 0.1, decay_fraction: 0}): "
     "0 is outside (0, 1]"),
    ("score_fn={start: 1}", "schedule.score_fn (--set schedule.score_fn={start: 1}): unknown key"),
    # integer options: no warmup from 0, and every value the run uses must suit the model
    ("top_k={start: 2, warmup: 3}", "schedule.top_k (--set schedule.top_k={start: 2, warmup: 3}).warmup: "
                                    "an integer option has no warmup"),
    ("num_groups={type: linear, start: 1, end: 4}",
     "schedule.num_groups (--set schedule.num_groups={type: linear, start: 1, end: 4}) gives num_groups = 3: "
     "num_groups must be >= 1 and divide num_experts=4, got 3"),
])
def test_bad_schedules_are_errors(config, schedule, match):
    expected = "config: " + match.replace("X:moe.num_experts", at(config, "moe.num_experts"))
    msg = parse_error(config, "schedule." + schedule)
    assert msg.startswith(expected), msg


def test_schedule_error_with_moe_from_set_cites_both(config):
    assert parse_error(config, "moe.num_experts=2", "schedule.top_k={start: 3}") == \
        "config: schedule.top_k.start (--set schedule.top_k={start: 3}): 3 is outside " \
        "[1, moe.num_experts (--set moe.num_experts=2) = 2]"


@pytest.mark.parametrize("schedule", [
    "schedule.top_k={type: linear, start: 4, end: 1}",
    "schedule.top_k={start: 1}",
    "schedule.capacity_factor={type: step, start: 2.0, end: 0.5, begin: 1, steps: 1}",
    "schedule.top_k=null",  # explicitly off
    "schedule.capacity_factor=null",
    "schedule.z_coeff={type: wsd, start: 0.01, end: 0.001, decay_fraction: 0.5}",
    "schedule.noise_eps={type: cosine, start: 0.1, end: 0, warmup: 1}",
])
def test_valid_schedules_are_accepted(config, schedule):
    assert parse_error(config, schedule) == ""


# ---- --set citations and errors about two keys --------------------------------------------

def test_set_errors_cite_the_argument_not_the_file(config):
    err = cli(config, "train.steps=many")
    assert "config: train.steps (--set train.steps=many): expected an integer, got 'many'" in err, err
    assert str(config) not in err
    err = cli(config, "optim.lrr=1")
    assert "config: optim.lrr (--set optim.lrr=1): unknown key" in err, err
    err = cli(config, "optim.eps=-1")
    assert "config: optim.eps (--set optim.eps=-1): -1 is outside (0, inf)" in err, err
    # a mapping given whole: its keys cite it
    assert parse_error(config, "optim={lr: -1}") == "config: optim.lr (--set optim={lr: -1}): -1 is outside (0, inf)"
    # the later argument wins
    assert parse_error(config, "moe={top_k: 2}", "moe.top_k=0") == \
        "config: moe.top_k (--set moe.top_k=0): 0 is outside [1, inf)"
    assert parse_error(config, "moe.top_k=0", "moe={top_k: 0}") == \
        "config: moe.top_k (--set moe={top_k: 0}): 0 is outside [1, inf)"


def test_two_key_errors_cite_both(config):
    text = config.read_text()
    config.write_text(text.replace("\n  seq_len: 32", "\n  seq_len: 64"))
    assert parse_error(config) == (f"config: data.seq_len ({at(config, 'data.seq_len')}) = 64 exceeds "
                                   f"model.max_seq_len ({at(config, 'model.max_seq_len')}) = 32")
    config.write_text(text)
    err = cli(config, "data.seq_len=64")
    assert (f"config: data.seq_len (--set data.seq_len=64) = 64 exceeds "
            f"model.max_seq_len ({at(config, 'model.max_seq_len')}) = 32") in err, err
    err = cli(config, "data.seq_len=64", "model.max_seq_len=48")
    assert ("config: data.seq_len (--set data.seq_len=64) = 64 exceeds "
            "model.max_seq_len (--set model.max_seq_len=48) = 48") in err, err


@pytest.mark.parametrize("override,match", [
    ("moe.top_k=9", "moe.top_k (--set moe.top_k=9) = 9 is outside [1, moe.num_experts (X:moe.num_experts) = 4]"),
    ("model.num_kv_heads=3",
     "model.num_kv_heads (--set model.num_kv_heads=3) = 3 must divide model.num_heads (X:model.num_heads) = 4"),
    ("model.num_heads=3", "model.num_heads (--set model.num_heads=3) = 3 must divide "
                          "model.hidden_size (X:model.hidden_size) = 32 unless model.head_dim is set"),
    ("moe.num_groups=3", "moe.num_groups (--set moe.num_groups=3) = 3 must divide "
                         "moe.num_experts (X:moe.num_experts) = 4"),
    ("moe.topk_groups=2", "moe.topk_groups (--set moe.topk_groups=2) = 2 is outside "
                          "[1, moe.num_groups (default) = 1]"),
    ("moe.layers=[5]", "moe.layers (--set moe.layers=[5]): entry 5 is not a layer index in "
                       "[0, model.num_layers (X:model.num_layers) = 2)"),
    ("moe.layers=[-1]", "moe.layers (--set moe.layers=[-1]): entry -1 is outside [0, inf)"),
    ("train.recompute_layers=[0, 2]", "train.recompute_layers (--set train.recompute_layers=[0, 2]): entry 2 is not "
                                      "a layer index in [0, model.num_layers (X:model.num_layers) = 2)"),
    ("train.recompute_layers=[-1]",
     "train.recompute_layers (--set train.recompute_layers=[-1]): entry -1 is outside [0, inf)"),
    ("parallel.expert_parallel=3", "moe.num_experts (X:moe.num_experts) = 4 must be divisible by "
                                   "parallel.expert_parallel (--set parallel.expert_parallel=3) = 3"),
    ("parallel.tensor_parallel=3", "parallel.tensor_parallel (--set parallel.tensor_parallel=3) = 3 must divide "
                                   "model.num_heads (X:model.num_heads) = 4"),
])
def test_cross_key_errors_cite_both_keys(config, override, match):
    expected = "config: " + re.sub(r"X:([\w.]+)", lambda m: at(config, m.group(1)), match)
    assert parse_error(config, override) == expected


def test_recompute_mode_must_be_a_known_name(config):
    assert parse_error(config, "train.recompute=mlp") == \
        "config: train.recompute (--set train.recompute=mlp): must be one of none, moe, attention, full, got 'mlp'"
    config.write_text(config.read_text().replace("  eval_every: 0\n", "  eval_every: 0\n  recompute: Full\n"))
    line = line_of("train.recompute", config.read_text())
    assert parse_error(config) == \
        f"config: train.recompute ({config}:{line}): must be one of none, moe, attention, full, got 'Full'"
    for mode in ("none", "moe", "attention", "full"):
        assert parse_error(config, f"train.recompute={mode}", "train.recompute_layers=[1]") == ""


# ---- the model config on its own (moeyard.Transformer) -------------------------------------

MODEL = """\
vocab_size: 32
hidden_size: 32
num_layers: 2
num_heads: 4
norm_eps: 1.0e-6
moe:
  num_experts: 4
  top_k: 2
"""


def test_model_file_errors_cite_lines(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text(MODEL.replace("norm_eps: 1.0e-6", "norm_eps: -1e-6"))
    with pytest.raises(RuntimeError, match=re.escape(f"config: norm_eps ({p}:5): -1e-6 is outside (0, inf)")):
        moeyard.Transformer(str(p))
    p.write_text(MODEL.replace("top_k: 2", "top_k: 5"))
    with pytest.raises(RuntimeError, match=re.escape(
            f"config: moe.top_k ({p}:8) = 5 is outside [1, moe.num_experts ({p}:7) = 4]")):
        moeyard.Transformer(str(p))
    p.write_text(MODEL + "num_kv_heads: 3\n")
    with pytest.raises(RuntimeError, match=re.escape(
            f"config: model.num_kv_heads ({p}:9) = 3 must divide model.num_heads ({p}:4) = 4")):
        moeyard.Transformer(str(p))


@pytest.mark.parametrize("field,value", [("rope_theta", float("nan")), ("rotary_pct", float("inf")),
                                         ("norm_eps", float("-inf"))])
def test_model_dict_rejects_non_finite(field, value):
    # json.dumps writes NaN / Infinity / -Infinity
    with pytest.raises(RuntimeError, match=rf"config: {field} \(line 1\): -?(NaN|Infinity) is outside"):
        moeyard.Transformer(dict(vocab_size=32, hidden_size=32, num_layers=2, num_heads=4, **{field: value}))


# ---- finetune.lora -----------------------------------------------------------------------

@pytest.mark.parametrize("override,match", [
    ("finetune.lora.targets=[attention, qkv]",
     "config: finetune.lora.targets (--set finetune.lora.targets=[attention, qkv]): unknown target 'qkv' "
     "(one of: attention, mlp, experts, q_proj, k_proj, v_proj, o_proj, q_a_proj, q_b_proj, kv_a_proj, "
     "kv_b_proj)"),
    ("finetune.lora.targets=[]", "config: finetune.lora.targets (--set finetune.lora.targets=[]): is empty"),
    ("finetune.lora.targets=attention",
     "config: finetune.lora.targets (--set finetune.lora.targets=attention): expected a list"),
    ("finetune.lora.base_dtype=int8",
     "config: finetune.lora.base_dtype (--set finetune.lora.base_dtype=int8): must be model or one of "
     "float32, bfloat16, float64, got 'int8'"),
    ("finetune.lora.ranks=4", "finetune.lora.ranks"),
    ("finetune.lora.rank=2.5", "config: finetune.lora.rank (--set finetune.lora.rank=2.5): expected an integer"),
    ("finetune.adapter=x", "finetune.adapter"),
    ("finetune.lora=false", "config: finetune.lora (--set finetune.lora=false): expected a mapping"),
    ("finetune.lora.targets=[q_a_proj]",
     "config: finetune.lora.targets: 'q_a_proj' matches no layer of this model"),
])
def test_lora_config_errors(config, override, match):
    msg = parse_error(config, override)
    assert match in msg, msg


def test_lora_targets_matching_nothing_are_an_error(config):
    # A group may be absent (no dense MLP here) while another matches.
    assert parse_error(config, "finetune.lora.targets=[mlp, experts]", "moe.num_experts=0") == ""
    assert parse_error(config, "finetune.lora.targets=[experts]", "moe.num_experts=0") == \
        "config: finetune.lora.targets [experts] match no layer of this model"


def test_null_bias_rate_needs_null_experts_and_a_selection_bias(config):
    msg = parse_error(config, "schedule.null_bias_rate=0.01")
    assert msg.startswith("config: schedule.null_bias_rate (--set schedule.null_bias_rate=0.01) > 0 moves the "
                          "null experts' selection bias: it needs moe.null_experts"), msg
    assert parse_error(config, "schedule.null_bias_rate=0.01", "moe.null_experts=2", "moe.selection_bias=true") == ""


@pytest.mark.parametrize("sets,match", [
    (["schedule.relu_l1_mult=0.5"], "schedule.relu_l1_mult (--set schedule.relu_l1_mult=0.5) = 0.5 must be 0 (off) or > 1"),
    (["schedule.relu_l1_mult=1.2"], "> 0 adapts the L1 of relu routing: it needs moe.routing"),
    (["schedule.relu_l1_mult=1.2", "moe.routing=relu", "moe.switch_coeff=0"],
     "it needs a value > 0 to start from (ReMoE: 1e-8) and no schedule.switch_coeff, got 0"),
    (["moe.routing=top_p", "moe.selection_bias=true"], "moe.selection_bias (--set moe.selection_bias=true): true needs "
     "moe.routing: token_choice, got 'top_p'"),
    (["moe.routing=relu", "moe.null_experts=2"], "config: moe: null_experts needs routing 'token_choice', 'top_p'"),
    (["moe.routing=top_p", "moe.score_fn=sigmoid"], "config: moe: routing 'top_p' needs score_fn 'softmax'"),
])
def test_router_combinations_are_refused(config, sets, match):
    msg = parse_error(config, *sets)
    assert match in msg, msg
    assert parse_error(config, "schedule.relu_l1_mult=1.2", "moe.routing=relu", "moe.switch_coeff=1e-8") == ""


def test_lora_with_tensor_parallel_is_accepted(config):
    # The config is valid; one process cannot run TP2 (test_lora.py runs it).
    msg = parse_error(config, "finetune.lora.rank=4", "parallel.tensor_parallel=2")
    assert msg.startswith("config: parallel.tensor_parallel (2) must divide the number of processes"), msg


def test_lora_defaults_are_accepted(config):
    assert parse_error(config, "finetune.lora={}") == ""
    assert parse_error(config, "finetune.lora.rank=1", "finetune.lora.dropout=0", "finetune.lora.alpha=1e-3",
                       "finetune.lora.targets=[q_proj, experts]", "finetune.lora.base_dtype=bfloat16") == ""


# ---- shipped configs still parse -------------------------------------------------------------

def test_shipped_configs_still_parse(tmp_path):
    for name, extra in (("tiny.yaml", []), ("bench_mid.yaml", ["model.num_layers=1"])):
        assert parse_error(os.path.join(ROOT, "configs", name), "data.train=/nonexistent.bin",
                           f"checkpoint.dir={tmp_path / name}", *extra) == "", name
    moeyard.Transformer(os.path.join(ROOT, "configs", "model_tiny.yaml"))


@pytest.mark.parametrize("key,value,allowed", [
    ("optim.lr_schedule", "exp", "must be cosine, linear, constant or wsd, got 'exp'"),
    ("optim.shard", "zero3", "must be none, optimizer or optimizer+grads, got 'zero3'"),
])
def test_bad_choice_names_key_value_and_choices(config, key, value, allowed):
    kv = f"{key}={value}"
    assert parse_error(config, kv) == f"config: {key} (--set {kv}): {allowed}"
    for good in {"optim.shard": ["none", "optimizer", "optimizer+grads"]}.get(key, []):
        assert parse_error(config, f"{key}={good}") == ""
