"""Distillation from a frozen teacher (`distill:`) and ZEDA-style skip
adaptation: a student that starts as its teacher (KL 0), null experts added
to a trained checkpoint (or a Hugging Face one) with router rows copied from
the real ones, the KL term's gradient, the null-fraction controller on top,
expert and tensor parallelism against one process, resume, and the config
errors."""

import json
import re
import shutil
import subprocess

import pytest
import torch

from test_distributed import EXE, assert_same_run, dp_config, final_model, run_metrics, torchrun

# The student keeps its selection bias still unless a test moves it.
STILL = ["--set", "schedule.bias_update_rate=0.0"]
TINY_LR = ["--set", "optim.lr=1e-20"]  # AdamW moves nothing by a float32 ulp


def train(cfg, *args, check=True):
    r = subprocess.run([EXE, "train", "--config", str(cfg), *args], capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, shards):
    """A 6-step run of the distributed tests' config (4 experts, top-2)."""
    d = tmp_path_factory.mktemp("teacher")
    train(dp_config(d, shards, "teacher", 4))
    return d / "teacher"


def student(tmp_path, shards, teacher, name, *sets, micro_batch=4):
    return [str(dp_config(tmp_path, shards, name, micro_batch)), "--set", f"distill.teacher={teacher}", *STILL, *sets]


def train_student(tmp_path, shards, teacher, name, *sets):
    cfg, *args = student(tmp_path, shards, teacher, name, *sets)
    train(cfg, *args)
    return run_metrics(tmp_path / name)


def test_student_starts_as_its_teacher(tmp_path, shards, teacher):
    """Same architecture: the student's weights are the teacher's, so the
    KL of the first step is 0 (train- and eval-mode forwards agree here)
    and, with a learning rate too small to move a float32, the saved
    student equals the teacher."""
    m = train_student(tmp_path, shards, teacher, "s", *TINY_LR)
    assert m[0]["kl"] < 1e-7, m[0]["kl"]
    assert m[0]["loss"] == pytest.approx(m[0]["aux"] + m[0]["kl"], abs=1e-7)  # ce_coeff 0
    want, got = final_model(teacher), final_model(tmp_path / "s")
    assert set(want) == set(got)
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-12, rtol=0, msg=n)


def test_null_experts_copy_the_real_router_rows(tmp_path, shards, teacher):
    """moe.null_experts 4 on a 4-expert teacher: router rows 4..7 are rows
    0..3, their selection bias the teacher's plus distill.null_logit_offset.
    At offset 0 each null expert ties with its real twin, so every token's
    second pick is its first pick's null twin (half the picks null) and the
    student's output shrinks: the KL is above 0 from step 1."""
    train_student(tmp_path, shards, teacher, "s", *TINY_LR, "--set", "moe.null_experts=4",
                  "--set", "distill.null_logit_offset=-0.25")
    t, s = final_model(teacher), final_model(tmp_path / "s")
    for i in range(2):
        w, sw = t[f"layers.{i}.moe.router.weight"], s[f"layers.{i}.moe.router.weight"]
        assert sw.shape == (8, w.shape[1])
        torch.testing.assert_close(sw, torch.cat([w, w]), atol=1e-12, rtol=0)
        b, sb = t[f"layers.{i}.moe.selection_bias"], s[f"layers.{i}.moe.selection_bias"]
        torch.testing.assert_close(sb, torch.cat([b, b - 0.25]), atol=1e-6, rtol=0)
    m = train_student(tmp_path, shards, teacher, "tied", *TINY_LR, "--set", "moe.null_experts=4",
                      "--set", "distill.null_logit_offset=0.0")
    assert [layer["null_fraction"] for layer in m[0]["moe_layers"]] == [0.5, 0.5]
    assert m[0]["kl"] > 1e-6  # the first test's is below 1e-7


def test_kl_pulls_the_student_to_its_teacher(tmp_path, shards, teacher):
    """The KL term trains: a student of its own init (distill.init_student
    false) is far from the teacher; 12 steps of KL alone halve the gap."""
    m = train_student(tmp_path, shards, teacher, "s", "--set", "distill.init_student=false",
                      "--set", "train.seed=5", "--set", "train.steps=12", "--set", "checkpoint.every=0")
    assert m[0]["kl"] > 1e-3 and m[-1]["kl"] < 0.5 * m[0]["kl"], [r["kl"] for r in m]


def test_controller_holds_the_null_share_while_distilling(tmp_path, shards, teacher):
    """ZEDA-style adaptation: KL from the teacher plus the null-fraction
    controller aiming at 30% of the picks. The null experts start as exact
    copies, so the share jumps between levels as the controller's bias
    crosses their twins'; over the last 10 steps it averages near the
    target in every layer."""
    m = train_student(tmp_path, shards, teacher, "s", "--set", "moe.null_experts=4",
                      "--set", "schedule.null_bias_rate=0.05", "--set", "schedule.null_target_fraction=0.3",
                      "--set", "train.steps=30", "--set", "checkpoint.every=0")
    assert m[0]["moe_layers"][0]["null_fraction"] < 0.3
    for i in range(2):
        share = sum(r["moe_layers"][i]["null_fraction"] for r in m[-10:]) / 10
        assert abs(share - 0.3) < 0.12, (i, [r["moe_layers"][i]["null_fraction"] for r in m])


@pytest.mark.parametrize("sets", [["--set", "parallel.expert_parallel=2"],
                                  ["--set", "parallel.tensor_parallel=2"]],
                         ids=["ep2", "tp2"])
def test_distillation_under_parallelism_matches_one_process(tmp_path, shards, teacher, sets):
    """The teacher is loaded in pieces like the student (its experts split
    over EP, its vocabulary and heads over TP: the KL's softmaxes are
    reduced over the TP ranks); the run equals one process's."""
    null = ["--set", "moe.null_experts=4", "--set", "schedule.null_bias_rate=0.05"]
    cfg, *args = student(tmp_path, shards, teacher, "single", *null)
    train(cfg, *args)
    mb = 2 if "parallel.expert_parallel=2" in sets else 4  # the same global batch
    cfg, *args = student(tmp_path, shards, teacher, "two", *null, micro_batch=mb)
    r = torchrun(2, "train", "--config", cfg, *args, *sets, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # Under TP the heads and the vocabulary-parallel KL round differently
    # from one process. AdamW's normalized update turns that rounding in
    # tiny gradients (rare tokens' embedding rows) into parameter
    # differences of up to a learning rate or two (3e-3 here), which the
    # null experts' sign-driven bias controller carries on and router
    # near-ties (a few picks of ~1000) may flip; which near-ties flip
    # depends on the last bit of every kernel. So: the first two steps
    # agree tightly, pick for pick; the run as a whole to ~1e-4, the
    # parameters to two learning rates.
    tp = "parallel.tensor_parallel=2" in sets
    if tp:
        ma, mb = run_metrics(tmp_path / "single"), run_metrics(tmp_path / "two")
        for x, y in zip(ma[:2], mb[:2]):
            for k in ("loss", "ce", "grad_norm", "kl"):
                assert abs(x[k] - y[k]) <= 2e-5 * max(1.0, abs(x[k])), (x["step"], k, x[k], y[k])
            assert [m["tokens_per_expert"] for m in x["moe_layers"]] == \
                [m["tokens_per_expert"] for m in y["moe_layers"]], x["step"]
    assert_same_run(tmp_path / "single", tmp_path / "two", moved_picks=4 if tp else 0,
                    param_tol=6e-3 if tp else 1e-4, tol=1e-4 if tp else 2e-5)
    for a, b in zip(run_metrics(tmp_path / "single"), run_metrics(tmp_path / "two")):
        assert abs(a["kl"] - b["kl"]) <= 2e-5 * max(1.0, a["kl"]), (a["step"], a["kl"], b["kl"])


def test_resumed_distillation_equals_an_uninterrupted_one(tmp_path, shards, teacher):
    """Resumed at step 3, the student comes from its checkpoint (not the
    teacher again) and the run continues as if never stopped."""
    null = ["--set", "moe.null_experts=4", "--set", "schedule.null_bias_rate=0.05"]
    m = train_student(tmp_path, shards, teacher, "whole", *null)
    run = tmp_path / "part"
    shutil.copytree(tmp_path / "whole", run)
    shutil.rmtree(run / "step_6")
    (run / "latest").write_text("step_3\n")
    cfg, *args = student(tmp_path, shards, teacher, "part", *null)
    r = train(cfg, *args, "--resume", "auto")
    assert "resumed from" in r.stderr + r.stdout
    again = run_metrics(run)
    for a, b in zip(m, again):
        assert (a["step"], a["loss"], a["kl"]) == (b["step"], b["loss"], b["kl"])
    for n, v in final_model(tmp_path / "whole").items():
        assert torch.equal(v, final_model(run)[n]), n


def test_hugging_face_teacher_with_null_experts(tmp_path, shards):
    """A Hugging Face checkpoint as teacher and init: model.init_from gives
    the architecture, moe.null_experts adds rows the checkpoint lacks (only
    with distill.teacher), and the same architecture starts at KL 0."""
    from test_hf_import import make_hf

    hf = tmp_path / "hf"
    make_hf("qwen2_moe", seed=3, vocab_size=256).save_pretrained(hf)
    cfg = dp_config(tmp_path, shards, "unused", 4)
    text = cfg.read_text().split("\n")
    text = [line for line in text if not line.startswith(("model:", "moe:"))]
    for name, extra in (("same", []), ("null", ["--set", "moe.null_experts=4"])):
        p = tmp_path / f"{name}.yaml"
        p.write_text("\n".join(text).replace(str(tmp_path / "unused"), str(tmp_path / name)))
        train(p, "--set", f"model.init_from={hf}", "--set", "model.dtype=float32", "--set", "model.max_seq_len=32",
              "--set", f"distill.teacher={hf}", "--set", "moe.selection_bias=true", *TINY_LR, *extra)
    same, null = run_metrics(tmp_path / "same"), run_metrics(tmp_path / "null")
    assert same[0]["kl"] < 1e-6 and null[0]["kl"] > 1e-4, (same[0]["kl"], null[0]["kl"])
    r = train(p, "--set", f"model.init_from={hf}", "--set", "moe.null_experts=4", check=False)
    assert r.returncode != 0 and "adds router rows the checkpoint in model.init_from" in r.stderr, r.stderr[-800:]


@pytest.mark.parametrize("sets,match", [
    (["--set", "distill.kl_coeff=-1"], r"distill.kl_coeff.*\[0, inf\)"),
    (["--set", "distill.kl_coeff=0"], r"distill.kl_coeff.*and distill.ce_coeff are both 0"),
    (["--set", "distill.teacher=''", "--set", "distill.kl_coeff=2"], r"distill.teacher.*is required by the other"),
    (["--set", "distill.teacher=/nonexistent/run"], r"distill.teacher \(/nonexistent/run\) is not a directory"),
    (["--set", "distill.teacher=EMPTY"], r"holds neither a moeyard checkpoint"),
    (["--set", "model.hidden_size=48"], r"distill.init_student: tensor 'embed.weight' has shape \[256, 48\] in "
                                        r"this model but \[256, 32\] in the teacher"),
    (["--set", "model.num_layers=3"], r"distill.init_student: the teacher .* has no tensor 'layers.2"),
])
def test_distill_config_errors(tmp_path, shards, teacher, sets, match):
    (tmp_path / "empty").mkdir()
    sets = [s.replace("EMPTY", str(tmp_path / "empty")) for s in sets]
    cfg, *args = student(tmp_path, shards, teacher, "bad", *sets)
    r = train(cfg, *args, check=False)
    assert r.returncode != 0 and re.search(match, r.stderr), r.stderr[-1500:]


def test_teacher_of_another_vocabulary(tmp_path, shards, teacher):
    from test_hf_import import make_hf

    hf = tmp_path / "hf"
    make_hf("qwen2_moe", seed=3, vocab_size=96).save_pretrained(hf)
    cfg, *args = student(tmp_path, shards, teacher, "bad", "--set", f"distill.teacher={hf}")
    r = train(cfg, *args, check=False)
    assert r.returncode != 0 and "has a vocabulary of 96 tokens but model.vocab_size is 256" in r.stderr, \
        r.stderr[-1500:]
    assert json.loads((hf / "config.json").read_text())["vocab_size"] == 96


def test_plan_counts_the_teacher(tmp_path, shards, teacher):
    """`moeyard plan` adds the teacher's pieces (its experts split over EP
    like the student's), its float32 logits and the KL's saved gradient;
    none once distill.kl_coeff is 0 (the teacher is released)."""
    cfg, *args = student(tmp_path, shards, teacher, "plan")

    def plan(*more):
        r = subprocess.run([EXE, "plan", "--config", cfg, "--world", "2", "--json", *args, *more],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr[-1500:]
        return json.loads(r.stdout)["ranks"][0]

    weights = final_model(teacher)
    expert = sum(v.numel() * 4 for n, v in weights.items() if ".moe.w_" in n)
    dense = sum(v.numel() * 4 for n, v in weights.items() if ".moe.w_" not in n and "selection_bias" not in n)
    logits = 4 * 32 * 256 * 8  # micro-batch x seq_len x vocab x (logits + KL gradient), float32
    assert plan("--set", "parallel.expert_parallel=2", "--set", "train.micro_batch=4")["teacher"] == \
        dense + expert // 2 + logits
    assert plan("--set", "distill.kl_coeff=0", "--set", "distill.ce_coeff=1")["teacher"] == 0


def test_checkpoints_record_the_teacher_and_resume_says_when_it_moved(tmp_path, shards, teacher):
    """The manifest names the checkpoint distill.teacher resolved to; a
    resume against another one (a copy here) says so."""
    train_student(tmp_path, shards, teacher, "s", "--set", "moe.null_experts=4")
    manifest = json.loads((tmp_path / "s" / "step_6" / "manifest.json").read_text())
    assert manifest["teacher"] == str(teacher / "step_6")
    shutil.copytree(teacher, tmp_path / "moved")
    shutil.rmtree(tmp_path / "s" / "step_6")
    (tmp_path / "s" / "latest").write_text("step_3\n")
    cfg, *args = student(tmp_path, shards, tmp_path / "moved", "s", "--set", "moe.null_experts=4")
    r = train(cfg, *args, "--resume", "auto")
    assert f"the checkpoint resumed was trained against {teacher / 'step_6'}" in r.stdout + r.stderr
