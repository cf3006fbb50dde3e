"""The routing critic (moe.critic_hidden, `critic:`): the layer's
drop_lowest input against a plain loop, the critic trained apart from the
model (its runs bit-equal to runs without it), the same under expert
parallelism and the sharded optimizer, the skip budget's calibration, and
the config errors."""

import math
import re
import subprocess

import pytest
import torch

from moeyard import MoE
from test_distributed import EXE, assert_same_run, dp_config, final_model, run_metrics, torchrun
from test_null_experts import GroupedMMRows
from test_routers import expert_mlp

E, H, FF, T = 6, 16, 12, 40


def loop_reference(m, x, drop, null_experts=0):
    """Each token's top_k picks (renormalized), the lowest-weight pick of a
    real expert removed where `drop` is set and the token has two or more."""
    scores = (x @ m.router.weight.T).softmax(-1)
    y = torch.zeros(T, H)
    rows = [0] * E
    for t in range(T):
        order = sorted(range(E + null_experts), key=lambda e: -scores[t, e].item())[: m.top_k]
        w = torch.stack([scores[t, e] for e in order])
        w = w / (w.sum() + 1e-20)
        picks = list(zip(order, w))
        real = [(e, wt) for e, wt in picks if e < E]
        if drop[t] and len(real) >= 2:
            lowest = min(real, key=lambda p: p[1].item())
            picks = [p for p in picks if p[0] != lowest[0]]
        for e, wt in picks:
            if e < E:
                y[t] += wt * expert_mlp(x[t], m.w_gate_up[e], m.w_down[e])
                rows[e] += 1
    return y, rows


@pytest.mark.parametrize("null_experts", [0, 3])
def test_drop_lowest_matches_a_loop(null_experts):
    torch.manual_seed(0)
    m = MoE(H, FF, E, top_k=3, null_experts=null_experts)
    with torch.no_grad():
        m.router.weight.mul_(3.0)
    x = torch.randn(T, H, requires_grad=True)
    drop = torch.rand(T) < 0.5
    with GroupedMMRows() as rec:
        y, r = m(x, drop_lowest=drop)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref, rows = loop_reference(m, x_ref, drop.tolist(), null_experts)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for off in rec.offsets:
        assert off.diff().tolist() == rows
    g = torch.randn_like(y)
    gx, = torch.autograd.grad(y, x, g)
    gx_ref, = torch.autograd.grad(y_ref, x_ref, g)
    torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=1e-5)
    _, plain = m(x.detach())
    assert r.real_experts_per_token < plain.real_experts_per_token


def test_drop_lowest_errors():
    m = MoE(H, FF, E)
    with pytest.raises(RuntimeError, match=r"drop_lowest must be bool, one per token \(40\)"):
        m(torch.randn(T, H), drop_lowest=torch.ones(T, dtype=torch.long))
    with pytest.raises(RuntimeError, match=r"drop_lowest must be bool, one per token \(40\)"):
        m(torch.randn(T, H), drop_lowest=torch.ones(T - 1, dtype=torch.bool))
    ec = MoE(H, FF, E, routing="expert_choice")
    with pytest.raises(RuntimeError, match="drop_lowest needs a token-choice routing"):
        ec(torch.randn(T, H), drop_lowest=torch.ones(T, dtype=torch.bool))


CRITIC = ["--set", "moe.critic_hidden=8", "--set", "critic.every=2"]


def config(tmp_path, shards, name, micro_batch):
    p = dp_config(tmp_path, shards, name, micro_batch)
    p.write_text(p.read_text().replace("optim: {lr: 3.0e-3, warmup: 2}",
                                       "optim: {lr: 3.0e-3, warmup: 2, grad_clip: 0.5}"))
    return p


def train(cfg, *args):
    r = subprocess.run([EXE, "train", "--config", str(cfg), *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_critic_is_trained_apart_from_the_model(tmp_path, shards):
    """With clipping on: the model's losses, gradient norms and parameters
    are bit-equal with and without a critic (its input is detached, its
    targets come from extra eval-mode forwards, its gradients stay out of
    the model's norm), while the critic's own parameters move on its target
    steps only."""
    train(config(tmp_path, shards, "plain", 4))
    train(config(tmp_path, shards, "critic", 4), *CRITIC)
    plain, critic = run_metrics(tmp_path / "plain"), run_metrics(tmp_path / "critic")
    for a, b in zip(plain, critic):
        assert (a["loss"], a["grad_norm"]) == (b["loss"], b["grad_norm"])
        assert ("critic" in b) == (b["step"] % 2 == 1)  # steps 0, 2, 4 (0-based)
        for layer in b.get("critic", []):
            assert math.isfinite(layer["mse"]) and -1 <= layer["rank_corr"] <= 1
            assert abs(layer["target_mean"]) <= 1.0  # critic.clip
    pa, pb = final_model(tmp_path / "plain"), final_model(tmp_path / "critic")
    assert {n for n in pb if ".critic_" not in n} == set(pa)
    for n in pa:
        assert torch.equal(pa[n], pb[n]), n
    # Steps 3 and 6 saved: the critic moved (its target steps 3 and 5 lie
    # between).
    mid = final_model(tmp_path / "critic", 3)
    assert not torch.equal(mid["layers.0.moe.critic_w1"], pb["layers.0.moe.critic_w1"])


@pytest.mark.parametrize("sets", [["--set", "parallel.expert_parallel=2"], ["--set", "optim.shard=optimizer"]])
def test_critic_under_parallelism_matches_one_process(tmp_path, shards, sets):
    """The critic trains the same at EP2 (or with the sharded optimizer over
    DP2) as in one process on the same global batch: the model's run and
    every parameter, the critic's included, and the critic's error."""
    train(config(tmp_path, shards, "single", 4), *CRITIC)
    r = torchrun(2, "train", "--config", str(config(tmp_path, shards, "two", 2)), *CRITIC, *sets, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_run(tmp_path / "single", tmp_path / "two")
    for a, b in zip(run_metrics(tmp_path / "single"), run_metrics(tmp_path / "two")):
        for la, lb in zip(a.get("critic", []), b.get("critic", [])):
            assert abs(la["mse"] - lb["mse"]) <= 1e-4 * max(la["mse"], 1e-6) + 1e-9


def test_skip_budget_calibrates_the_thresholds(tmp_path, shards):
    """critic.skip_budget 0.4 with top-2 dropless: at each evaluation 40% of
    the validation tokens skip their second pick, 20% of the picks; in
    training only with critic.skip_in_training; the thresholds are saved
    with the model and skip as much in Python."""
    cfg = config(tmp_path, shards, "budget", 4)
    train(cfg, *CRITIC, "--set", "critic.skip_budget=0.4")
    evals = [m for m in run_metrics(tmp_path / "budget") if "valid_loss" in m]
    assert len(evals) == 2
    for m in evals:
        # Tokens whose critic predictions tie (a hidden unit inactive on
        # all of them) skip together: the share lands near, not on, 0.2.
        assert abs(m["critic_skipped"] - 0.2) < 0.03, m["critic_skipped"]
        assert m["valid_loss_critic_skip"] != m["valid_loss"]
        assert len(m["critic_thresholds"]) == 2
    # The thresholds act in training only with critic.skip_in_training:
    # after the first evaluation (step 3) the steps' real picks fall.
    def real(run):
        return [min(layer["real_experts_per_token"] for layer in m["moe_layers"]) for m in run_metrics(run)]
    assert all(k == 2.0 for k in real(tmp_path / "budget"))
    train(config(tmp_path, shards, "in_training", 4), *CRITIC, "--set", "critic.skip_budget=0.4",
          "--set", "critic.skip_in_training=true")
    ks = real(tmp_path / "in_training")
    assert all(k == 2.0 for k in ks[:3]) and all(k < 1.9 for k in ks[3:]), ks
    state = final_model(tmp_path / "budget")
    saved = [state[f"layers.{i}.moe.critic_threshold"].item() for i in range(2)]
    assert saved == pytest.approx(evals[-1]["critic_thresholds"], rel=1e-6)

    import moeyard

    model = moeyard.Transformer.from_checkpoint(tmp_path / "budget")
    tokens = torch.randint(0, 256, (8, 32))
    preds = model.critic_predictions(tokens)
    assert len(preds) == 2 and preds[0].shape == (8, 32)
    with torch.no_grad():
        out = model.loss(tokens)
        for i in range(2):
            dict(model.named_buffers())[f"layers.{i}.moe.critic_threshold"].fill_(-math.inf)
        plain = model.loss(tokens)
    for i in range(2):
        share = (preds[i] < saved[i]).double().mean().item()
        got = out["moe_layers"][i]["real_experts_per_token"].item()
        want = plain["moe_layers"][i]["real_experts_per_token"].item() - share
        assert abs(got - want) < 1e-5, (i, got, want)


@pytest.mark.parametrize("sets,match", [
    (["--set", "critic.skip_budget=0.3"], r"critic.skip_budget.*needs a critic: set moe.critic_hidden > 0"),
    (["--set", "moe.critic_hidden=8", "--set", "critic.skip_budget=1.0"], r"critic.skip_budget.*\[0, 1\)"),
    (["--set", "moe.critic_hidden=8", "--set", "critic.clip=0"], r"critic.clip.*\(0, inf\)"),
    (["--set", "moe.critic_hidden=-1"], r"moe.critic_hidden.*\[0, inf\)"),
    (["--set", "moe.critic_hidden=8", "--set", "moe.routing=expert_choice"],
     r"moe.critic_hidden \(--set moe.critic_hidden=8\) = 8 needs a token-choice routing"),
    (["--set", "moe.critic_hidden=8", "--set", "critic.skip_budget=0.3", "--set", "data.valid=''"],
     "calibrates on the validation batches: set data.valid"),
])
def test_critic_config_errors(tmp_path, shards, sets, match):
    cfg = config(tmp_path, shards, "bad", 4)
    r = subprocess.run([EXE, "train", "--config", str(cfg), *sets], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and re.search(match, r.stderr), r.stderr[-1500:]
