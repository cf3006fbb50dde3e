"""The dynamic-K, balanced and hash routers (moe.routing: top_p, threshold,
relu, sinkhorn, hash) against a plain loop over tokens (picks, outputs, gradients), the
rows the expert GEMMs receive, their losses and statistics, the option
errors, and a Transformer trained with each at EP2 against one process."""

import math

import pytest
import torch
import torch.nn.functional as F

from moeyard import MoE
from test_null_experts import GroupedMMRows

E, H, FF, T = 6, 16, 12, 40


def expert_mlp(x, w_gate_up, w_down):
    f = w_down.shape[-1]
    h = x @ w_gate_up.T
    return (F.silu(h[..., :f]) * h[..., f:]) @ w_down.T


def sinkhorn_choice(logits, iters, k):
    """S-BASE's selection in the multiplicative form, in float64: the
    columns (experts) and rows (tokens) of exp(logits) are scaled to sum to
    1 in turn; each token takes its k largest entries."""
    p = logits.double().exp()
    for _ in range(iters):
        p = p / p.sum(0, keepdim=True)
        p = p / p.sum(1, keepdim=True)
    return [sorted(range(p.shape[1]), key=lambda e: -p[t, e].item())[:k] for t in range(p.shape[0])]


def loop_picks(m: MoE, logits):
    """Each token's (expert, weight) picks, one token at a time."""
    scores = logits.softmax(-1)
    balanced = sinkhorn_choice(logits, m.sinkhorn_iters, m.top_k) if m.routing == "sinkhorn" else None
    out = []
    for t in range(logits.shape[0]):
        if m.routing == "relu":
            chosen = [e for e in range(E) if logits[t, e] > 0]
            out.append(skipped(m, [(e, logits[t, e] * m.scale) for e in chosen]))
            continue
        order = sorted(range(E), key=lambda e: -scores[t, e].item())
        if m.routing == "top_p":
            chosen, mass = [], 0.0
            for e in order[: m.top_k]:
                if mass >= m.top_p:
                    break
                chosen.append(e)
                mass += scores[t, e].item()
        elif m.routing == "threshold":
            chosen = [order[0]] + [e for e in order[1: m.top_k] if scores[t, e] >= m.score_threshold]
        elif m.routing == "sinkhorn" and m.training:
            chosen = balanced[t]
        else:
            chosen = order[: m.top_k]
        w = torch.stack([scores[t, e] for e in chosen])
        if m.renormalize:
            w = w / (w.sum() + 1e-20)
        out.append(skipped(m, list(zip(chosen, w * m.scale))))
    return out


def skipped(m, picks):
    """skip_ratio: the picks whose weight is below ratio times the best."""
    if m.skip_ratio == 0 or not picks:
        return picks
    best = max(w.item() for _, w in picks)
    return [(e, w) for e, w in picks if w.item() >= m.skip_ratio * best]


def reference(m: MoE, x2):
    logits = x2.float() @ m.router.weight.T
    y = torch.zeros(x2.shape[0], H)
    picks = loop_picks(m, logits)
    for t, token_picks in enumerate(picks):
        for e, w in token_picks:
            y[t] += w * expert_mlp(x2[t], m.w_gate_up[e], m.w_down[e])
    return y, picks


ROUTERS = {
    "top_p": dict(routing="top_p", top_p=0.5, top_k=4),
    "top_p_raw": dict(routing="top_p", top_p=0.7, top_k=3, renormalize=False),
    "threshold": dict(routing="threshold", score_threshold=0.17, top_k=4),
    "relu": dict(routing="relu", top_k=2, scale=0.5),
    "sinkhorn": dict(routing="sinkhorn", top_k=2, sinkhorn_iters=5),
    "sinkhorn_eval": dict(routing="sinkhorn", top_k=2),
    "skip": dict(top_k=3, skip_ratio=0.5),
    "relu_skip": dict(routing="relu", top_k=2, skip_ratio=0.3),
}


def make(name, seed=0):
    torch.manual_seed(seed)
    m = MoE(H, FF, E, **ROUTERS[name])
    with torch.no_grad():  # a skewed router, so balancing and K vary
        m.router.weight.mul_(3.0)
        m.router.weight[0] += 0.3
    m.train(name != "sinkhorn_eval")
    return m


@pytest.mark.parametrize("name", list(ROUTERS))
def test_router_matches_a_loop(name):
    m = make(name)
    x = torch.randn(T, H, requires_grad=True)
    y, r = m(x)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref, picks = reference(m, x_ref)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    params = list(m.parameters())
    grads = torch.autograd.grad(y, [x] + params, g)
    grads_ref = torch.autograd.grad(y_ref, [x_ref] + params, g, allow_unused=True)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b if b is not None else torch.zeros_like(a), atol=1e-5, rtol=1e-5)
    # The reported picks, per token, in any order.
    got = [sorted(e for e in row.tolist() if e >= 0) for row in r.indices]
    assert got == [sorted(e for e, _ in p) for p in picks]
    counts = [len(p) for p in picks]
    assert abs(r.real_experts_per_token.item() - sum(counts) / T) < 1e-6
    hist = torch.bincount(torch.tensor(counts), minlength=E + 1).float()
    assert torch.equal(r.experts_per_token_histogram, hist), (r.experts_per_token_histogram, hist)
    if name.startswith(("top_p", "threshold", "relu", "skip")):
        assert len(set(counts)) > 1, counts  # K really varies per token


@pytest.mark.parametrize("name", ["top_p", "threshold", "relu", "skip"])
def test_dynamic_k_runs_only_the_picks(name):
    """Dropless: the GEMMs get one row per pick, expert by expert, however
    many slots the router's output holds."""
    m = make(name)
    x = torch.randn(T, H)
    with GroupedMMRows() as rec, torch.no_grad():
        _, r = m(x)
    _, picks = reference(m, x)
    want = torch.bincount(torch.tensor([e for p in picks for e, _ in p]), minlength=E)
    assert len(rec.offsets) == 2
    for off in rec.offsets:
        assert torch.equal(off.diff(), want), (off, want)
    slots = E if name == "relu" else m.top_k
    assert abs(r.capacity_utilization.item() - want.sum().item() / (T * slots)) < 1e-6


def test_sinkhorn_balances_a_skewed_router():
    """In training the Sinkhorn picks spread the load that plain top-k
    piles onto the favoured expert."""
    m = make("sinkhorn")
    with torch.no_grad():
        m.router.weight[0] += 0.2
    x = torch.randn(120, H) + 1.0  # expert 0's logit about 3 higher
    with torch.no_grad():
        _, balanced = m(x)
        m.eval()
        _, plain = m(x)
    assert plain.tokens_per_expert.max() > 1.5 * balanced.tokens_per_expert.max(), (
        plain.tokens_per_expert, balanced.tokens_per_expert)
    assert balanced.tokens_per_expert.sum() == plain.tokens_per_expert.sum() == 240


def test_relu_switch_loss_is_the_load_weighted_l1():
    """For relu the switch loss's P_e is the mean ReLU gate: E * sum_e
    f_e * mean_t relu(l_te), f_e = picks of e / (T K), K the target."""
    m = make("relu")
    x = torch.randn(T, H)
    _, r = m(x)
    gates = (x @ m.router.weight.T).relu()
    f = (gates > 0).float().sum(0) / (T * m.top_k)
    want = E * (f * gates.mean(0)).sum()
    torch.testing.assert_close(r.switch_loss, want)


def test_entropy_loss_is_the_mean_routing_entropy_with_gradient():
    m = make("top_p")
    x = torch.randn(T, H)
    _, r = m(x)
    p = (x @ m.router.weight.T).softmax(-1)
    want = -(p * p.log()).sum(-1).mean()
    torch.testing.assert_close(r.entropy_loss, want)
    torch.testing.assert_close(r.router_entropy, want)
    (g,) = torch.autograd.grad(r.entropy_loss, [m.router.weight])
    (g_ref,) = torch.autograd.grad(want, [m.router.weight])
    torch.testing.assert_close(g, g_ref)


def test_top_p_with_null_experts_skips_rows():
    """top_p over E + Z scores: a null pick makes no row."""
    torch.manual_seed(1)
    m = MoE(H, FF, E, routing="top_p", top_p=0.6, top_k=4, null_experts=2)
    x = torch.randn(T, H)
    with GroupedMMRows() as rec, torch.no_grad():
        _, r = m(x)
    real = (r.indices >= 0) & (r.indices < E)
    assert rec.offsets[0][-1].item() == real.sum().item()
    nulls = (r.indices >= E).sum().item()
    assert nulls > 0
    assert abs(r.null_fraction.item() - nulls / (r.indices >= 0).sum().item()) < 1e-6


def hash_experts(token_id, k):
    """Hash routing's experts for one token id, in Python integers."""
    first = ((token_id * 2654435761) % 2**32 >> 8) % E
    return [(first + j) % E for j in range(k)]


@pytest.mark.parametrize("k", [1, 3])
def test_hash_routing_matches_a_loop(k):
    """Each token runs the experts its id hashes to, weighted scale / k;
    equal ids get equal experts; the output gives the router no gradient;
    the GEMMs get one row per pick."""
    torch.manual_seed(0)
    m = MoE(H, FF, E, routing="hash", top_k=k, scale=1.5)
    ids = torch.randint(0, 50000, (T,))
    ids[5] = ids[2]
    x = torch.randn(T, H, requires_grad=True)
    with GroupedMMRows() as rec:
        y, r = m(x, token_ids=ids)
    picks = [hash_experts(i, k) for i in ids.tolist()]
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = torch.stack([sum(1.5 / k * expert_mlp(x_ref[t], m.w_gate_up[e], m.w_down[e]) for e in picks[t])
                         for t in range(T)])
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    assert [sorted(row.tolist()) for row in r.indices] == [sorted(p) for p in picks]
    assert r.indices[5].tolist() == r.indices[2].tolist()
    assert len({tuple(p) for p in picks}) > 1
    want = torch.bincount(torch.tensor([e for p in picks for e in p]), minlength=E)
    assert len(rec.offsets) == 2
    for off in rec.offsets:
        assert torch.equal(off.diff(), want), (off, want)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    assert m.router.weight.grad is None or m.router.weight.grad.abs().max().item() == 0.0


def test_hash_routing_needs_token_ids():
    m = MoE(H, FF, E, routing="hash")
    with pytest.raises(RuntimeError, match="routing 'hash' picks experts from the token ids; pass token_ids"):
        m(torch.randn(T, H))
    with pytest.raises(RuntimeError, match=r"token_ids must be integers, one per token \(40\)"):
        m(torch.randn(T, H), token_ids=torch.zeros(T - 1, dtype=torch.long))
    with pytest.raises(RuntimeError, match="token_ids must be integers"):
        m(torch.randn(T, H), token_ids=torch.zeros(T))


@pytest.mark.parametrize("kw,match", [
    (dict(routing="top_p", score_fn="sigmoid"), "routing 'top_p' needs score_fn 'softmax'"),
    (dict(routing="relu", score_fn="sigmoid"), "routing 'relu' needs score_fn 'softmax'"),
    (dict(routing="top_p", num_groups=2), "num_groups > 1 .* needs routing 'token_choice'"),
    (dict(routing="relu", null_experts=2), "null_experts needs routing 'token_choice', 'top_p' or 'threshold'"),
    (dict(routing="hash", null_experts=2), "null_experts needs routing 'token_choice', 'top_p' or 'threshold'"),
    (dict(routing="hash", selection_bias=True), "selection_bias needs routing 'token_choice'"),
    (dict(routing="top_p", top_p=0.0), r"top_p must be in \(0, 1\], got 0"),
    (dict(routing="top_p", top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
    (dict(routing="threshold", score_threshold=-0.1), r"score_threshold must be in \[0, 1\], got -0.1"),
    (dict(routing="sinkhorn", sinkhorn_iters=0), r"sinkhorn_iters must be in \[1, inf\), got 0"),
    (dict(routing="top_k"), "routing must be one of token_choice, expert_choice, top_p"),
    (dict(routing="top_p", selection_bias=True), "selection_bias needs routing 'token_choice'"),
    (dict(routing="expert_choice", skip_ratio=0.5), "skip_ratio needs a token-choice routing, got 'expert_choice'"),
    (dict(skip_ratio=1.0), r"skip_ratio must be in \[0, 1\), got 1"),
])
def test_router_option_errors(kw, match):
    with pytest.raises((RuntimeError, ValueError), match=match):
        MoE(H, FF, E, **kw)


@pytest.mark.parametrize("name", ["top_p", "threshold", "relu", "sinkhorn", "hash"])
def test_transformer_trains_with_router_sharded_or_not(tmp_path, shards, name):
    """A Transformer with each router trains in one process and with its
    experts split over two (EP2): the same run. Sinkhorn balances each
    micro-batch's tokens, so its reference is two data-parallel processes
    holding every expert (the same micro-batches)."""
    import subprocess

    from test_distributed import EXE, assert_same_run, dp_config, run_metrics, torchrun

    def config(run, micro_batch):
        p = dp_config(tmp_path, shards, run, micro_batch)
        p.write_text(p.read_text().replace("selection_bias: true", "selection_bias: false")
                     .replace("bias_update_rate: 0.001", "bias_update_rate: 0.0"))
        return p

    top_k = 2 if name == "relu" else 3
    sets = ["--set", f"moe.routing={name}", "--set", f"moe.top_k={top_k}", "--set", "moe.renormalize=false"]
    if name == "sinkhorn":
        r = torchrun(2, "train", "--config", str(config("single", 2)), *sets, timeout=300)
    else:
        r = subprocess.run([EXE, "train", "--config", str(config("single", 4)), *sets],
                           capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    r = torchrun(2, "train", "--config", str(config("ep", 2)), *sets, "--set", "parallel.expert_parallel=2",
                 timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_run(tmp_path / "single", tmp_path / "ep")
    layer = run_metrics(tmp_path / "single")[-1]["moe_layers"][0]
    assert 0 < layer["real_experts_per_token"] <= (4 if name == "relu" else 3)
    assert math.isfinite(layer["entropy_loss"])
    hist = layer["experts_per_token_histogram"]
    assert len(hist) == 5 and sum(hist) == layer["tokens"]
    mean_k = sum(k * c for k, c in enumerate(hist)) / layer["tokens"]
    assert abs(mean_k - layer["real_experts_per_token"]) < 1e-9
    loads = layer["tokens_per_expert"]
    assert abs(layer["max_violation"] - (max(loads) / (sum(loads) / 4) - 1)) < 1e-9


def test_relu_l1_controller_moves_the_coefficient_and_resumes(tmp_path, shards):
    """schedule.relu_l1_mult: after each step switch_coeff is multiplied by
    mult^sign(real experts per token - top_k); a resumed run goes on from
    the checkpointed value."""
    import subprocess

    from test_distributed import EXE, dp_config, run_metrics

    cfg = dp_config(tmp_path, shards, "relu", 4)
    cfg.write_text(cfg.read_text().replace("selection_bias: true", "selection_bias: false")
                   .replace("bias_update_rate: 0.001", "bias_update_rate: 0.0"))
    sets = ["--set", "moe.routing=relu", "--set", "moe.top_k=1", "--set", "moe.switch_coeff=1e-3",
            "--set", "schedule.relu_l1_mult=1.5"]
    r = subprocess.run([EXE, "train", "--config", str(cfg), *sets], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([EXE, "train", "--config", str(cfg), *sets, "--set", "train.steps=8"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rec = run_metrics(tmp_path / "relu")
    assert [x["step"] for x in rec] == list(range(1, 9))
    assert rec[0]["switch_coeff"] == 1e-3
    for a, b in zip(rec, rec[1:]):
        k = sum(layer["real_experts_per_token"] for layer in a["moe_layers"]) / len(a["moe_layers"])
        want = a["switch_coeff"] * (1.5 if k > 1 else 1 / 1.5 if k < 1 else 1.0)
        assert abs(b["switch_coeff"] - want) <= 1e-12 * want, (a["step"], k, a["switch_coeff"], b["switch_coeff"])
    assert len({x["switch_coeff"] for x in rec}) > 2


@pytest.mark.parametrize("policy", ["position", "probs"])
def test_capacity_gemms_cover_filled_rows_only(policy):
    """With a capacity each expert's GEMM covers its filled rows (at most
    C), not all C; the output matches a loop that drops the same picks."""
    torch.manual_seed(0)
    m = MoE(H, FF, E, top_k=2, capacity_factor=1.0, drop_policy=policy)
    x = torch.randn(T, H)
    with GroupedMMRows() as rec, torch.no_grad():
        y, r = m(x)
    C = max(math.ceil(1.0 * T * 2 / E), 1)
    scores = (x @ m.router.weight.T).softmax(-1)
    top = scores.topk(2, -1)
    want = torch.bincount(top.indices.flatten(), minlength=E).clamp(max=C)
    assert want.sum() < E * C and r.dropped_fraction > 0  # unfilled and overfull experts
    for off in rec.offsets:
        assert torch.equal(off.diff(), want), (off, want)
    assert abs(r.capacity_utilization.item() - want.sum().item() / (E * C)) < 1e-6
    # The kept picks, as route_plan chooses them: by position or by weight.
    w = top.values / top.values.sum(-1, keepdim=True)
    pairs = [(t, k) for t in range(T) for k in range(2)]
    if policy == "probs":
        pairs.sort(key=lambda p: -w[p].item())
    y_ref, filled = torch.zeros(T, H), [0] * E
    for t, k in pairs:
        e = top.indices[t, k].item()
        filled[e] += 1
        if filled[e] <= C:
            y_ref[t] += w[t, k] * expert_mlp(x[t], m.w_gate_up[e], m.w_down[e])
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
