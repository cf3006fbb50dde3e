"""Null (zero-compute) experts (moe.null_experts): moeyard.nn.MoE against a
plain loop over tokens and picks (outputs and gradients), the rows the
expert GEMMs actually receive (seen by a dispatch mode on the
grouped_mm calls), the switch loss's null forms, the statistics, the option
errors, and a Transformer trained with them."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from moeyard import MoE

E, Z, H, FF = 6, 3, 16, 12


def expert_mlp(x, w_gate_up, w_down):
    f = w_down.shape[-1]
    h = x @ w_gate_up.T
    return (F.silu(h[..., :f]) * h[..., f:]) @ w_down.T


def reference(m: MoE, x2: torch.Tensor):
    """The layer as a loop: top-k over the E + Z router rows; a real pick
    runs its expert, a null pick adds nothing (zero) or w * x (copy)."""
    T, K = x2.shape[0], m.top_k
    logits = x2.float() @ m.router.weight.T
    scores = logits.softmax(-1)
    cap = max(math.ceil(m.capacity_factor * T * K / E), 1) if m.capacity_factor > 0 else None
    filled = [0] * E
    y = torch.zeros(T, H)
    real_picks = 0
    for t in range(T):
        chosen = sorted(range(E + Z), key=lambda e: (-scores[t, e].item(), e))[:K]
        w = torch.stack([scores[t, e] for e in chosen])
        if m.renormalize:
            w = w / (w.sum() + 1e-20)
        w = w * m.scale
        real = torch.tensor([e < E for e in chosen], dtype=torch.float32)
        if m.null_weights == "real":
            w = w * real / ((w * real).sum() + 1e-20) * m.scale
        for e, wk in zip(chosen, w):
            if e >= E:
                if m.null_kind == "copy":
                    y[t] += wk * x2[t]
                continue
            real_picks += 1
            if cap is not None:
                filled[e] += 1
                if filled[e] > cap:
                    continue
            y[t] += wk * expert_mlp(x2[t], m.w_gate_up[e], m.w_down[e])
    return y, real_picks


class GroupedMMRows(TorchDispatchMode):
    """Records the expert offsets of every grouped_mm call."""

    def __init__(self):
        super().__init__()
        self.offsets = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.name() == "moeyard::grouped_mm":
            self.offsets.append(args[2].clone())
        return func(*args, **(kwargs or {}))


VARIANTS = {
    "zero_keep": dict(),
    "zero_real": dict(null_weights="real"),
    "copy_keep": dict(null_kind="copy"),
    "zero_keep_no_renorm": dict(renormalize=False, scale=1.5),
    "zero_keep_capacity": dict(capacity_factor=0.5),
}


def make(seed=0, **kw):
    torch.manual_seed(seed)
    m = MoE(H, FF, E, top_k=3, null_experts=Z, **kw)
    with torch.no_grad():  # null experts picked often enough to matter
        m.router.weight[E:] += 0.3 * m.router.weight[:Z]
    return m


@pytest.mark.parametrize("name", list(VARIANTS))
def test_null_experts_match_a_loop(name):
    m = make(**VARIANTS[name])
    x = torch.randn(24, H, requires_grad=True)
    y, r = m(x)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref, real_picks = reference(m, x_ref)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    params = [p for p in m.parameters()]
    grads = torch.autograd.grad(y, [x] + params, g)
    grads_ref = torch.autograd.grad(y_ref, [x_ref] + params, g, allow_unused=True)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b if b is not None else torch.zeros_like(a), atol=1e-5, rtol=1e-5)
    nulls = r.tokens_per_expert[E:].sum().item()
    assert 0 < nulls < 24 * 3 and r.tokens_per_expert[:E].sum().item() == real_picks
    assert r.tokens_per_expert.shape == (E + Z,)
    assert abs(r.null_fraction.item() - nulls / 72) < 1e-6
    assert abs(r.real_experts_per_token.item() - real_picks / 24) < 1e-6


def test_null_picks_make_no_expert_rows():
    """Dropless: the experts' GEMMs get exactly the real picks, expert by
    expert; the rows past them are neither computed nor counted as used."""
    m = make()
    x = torch.randn(24, H)
    with GroupedMMRows() as rec, torch.no_grad():
        _, r = m(x)
    scores = (x @ m.router.weight.T).softmax(-1)
    picks = scores.topk(3, -1).indices
    want = torch.bincount(picks[picks < E], minlength=E)
    assert len(rec.offsets) == 2  # gate_up and down
    for off in rec.offsets:
        assert torch.equal(off.diff(), want), (off, want)
        assert off[-1].item() == want.sum().item() < 72
    assert abs(r.capacity_utilization.item() - want.sum().item() / 72) < 1e-6


def test_all_null_picks_give_zero_and_no_rows():
    m = make()
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[E:] = 1.0  # every token's picks are null experts
    x = torch.rand(5, H) + 0.1
    with GroupedMMRows() as rec, torch.no_grad():
        y, r = m(x)
    assert torch.equal(y, torch.zeros_like(y))
    assert all(off[-1].item() == 0 for off in rec.offsets)
    assert r.null_fraction.item() == 1.0 and r.real_experts_per_token.item() == 0.0


@pytest.mark.parametrize("balance", ["average", "grouped"])
def test_switch_loss_null_forms(balance):
    m = make(null_balance=balance)
    x = torch.randn(30, H)
    _, r = m(x)
    p = (x @ m.router.weight.T).softmax(-1)
    counts = torch.bincount(p.topk(3, -1).indices.flatten(), minlength=E + Z).float()
    torch.testing.assert_close(r.tokens_per_expert, counts)
    f, P = counts / 90, p.mean(0)
    if balance == "average":
        want = (E + Z) * ((f[:E] * P[:E]).sum() + Z * f[E:].mean() * P[E:].mean())
    else:
        want = (E + Z) * (f[:E].sum() * P[:E].sum() / E + f[E:].sum() * P[E:].sum() / Z)
    torch.testing.assert_close(r.switch_loss, want)


@pytest.mark.parametrize("kw,match", [
    (dict(routing="expert_choice"), "null_experts needs routing 'token_choice'"),
    (dict(null_kind="copy", null_weights="real"), "null_kind 'copy' needs null_weights 'keep'"),
    (dict(top_k=10), r"top_k must be in \[1, num_experts \+ null_experts=9\], got 10"),
    (dict(null_kind="one"), "null_kind must be one of zero, copy, got 'one'"),
    (dict(null_experts=-1), r"null_experts must be in \[0, inf\), got -1"),
])
def test_null_expert_option_errors(kw, match):
    args = dict(top_k=3, null_experts=Z)
    args.update(kw)
    with pytest.raises((RuntimeError, ValueError), match=match):
        MoE(H, FF, E, **args)


def test_transformer_trains_with_null_experts_sharded_or_not(tmp_path, shards):
    """A Transformer with copy null experts trains in one process and with
    its real experts split over two (EP2): the same run, and the metrics
    carry the null statistics."""
    import subprocess

    from test_distributed import EXE, assert_same_run, dp_config, run_metrics, torchrun

    sets = ["--set", "moe.null_experts=2", "--set", "moe.top_k=3", "--set", "moe.null_kind=copy"]
    single = dp_config(tmp_path, shards, "single", 4)
    r = subprocess.run([EXE, "train", "--config", str(single), *sets], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ep = dp_config(tmp_path, shards, "ep", 2)
    r = torchrun(2, "train", "--config", str(ep), *sets, "--set", "parallel.expert_parallel=2", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_run(tmp_path / "single", tmp_path / "ep")
    layer = run_metrics(tmp_path / "single")[0]["moe_layers"][0]
    assert len(layer["tokens_per_expert"]) == 4 + 2
    assert 0 < layer["null_fraction"] < 1
    assert abs(layer["real_experts_per_token"] - 3 * (1 - layer["null_fraction"])) < 1e-6


def test_update_null_bias_moves_only_the_null_entries():
    m = make(selection_bias=True)
    load = torch.tensor([5.0, 5, 5, 5, 5, 5, 10, 0, 0])  # null share 10 / 40
    m.update_null_bias(load, 0.5, 0.1)
    torch.testing.assert_close(m.selection_bias, torch.tensor([0.0] * E + [0.1] * Z))
    m.update_selection_bias(load, 0.1)  # balances the real experts only
    torch.testing.assert_close(m.selection_bias, torch.tensor([0.0] * E + [0.1] * Z))


def test_null_fraction_controller_holds_the_target(tmp_path, shards):
    """schedule.null_bias_rate moves the null experts' selection bias after
    each step toward schedule.null_target_fraction: runs from the same start
    hold about 0.8 and about 0.2 over their last 15 steps. A sign controller
    oscillates around its target, and in runs this short the router moves
    as fast as the bias: the tolerance is wide, the two runs far apart."""
    import subprocess

    from test_distributed import EXE, dp_config, run_metrics

    def null_share(name, *sets):
        cfg = dp_config(tmp_path, shards, name, 4)
        cfg.write_text(cfg.read_text().replace("steps: 6", "steps: 30").replace("every: 3", "every: 30"))
        r = subprocess.run([EXE, "train", "--config", str(cfg), "--set", "moe.null_experts=2", *sets],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        rec = run_metrics(tmp_path / name)
        share = [sum(layer["null_fraction"] for layer in x["moe_layers"]) / len(x["moe_layers"]) for x in rec]
        return sum(share[-15:]) / 15

    held = {}
    for target in (0.8, 0.2):
        held[target] = null_share(f"held{target}", "--set", "schedule.null_bias_rate=0.01",
                                  "--set", f"schedule.null_target_fraction={target}")
        assert abs(held[target] - target) < 0.2, (target, held)
    assert held[0.8] - held[0.2] > 0.3, held


def test_decode_with_one_null_pick_runs_one_expert_row():
    """Batch-1 decode, top-2 with one pick null: each expert GEMM gets
    exactly one row, of the real expert picked."""
    m = make()
    m.top_k = 2
    x = torch.randn(1, H)
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[4] = x[0]  # real expert 4 first
        m.router.weight[E + 1] = 0.5 * x[0]  # then null expert 1
    with GroupedMMRows() as rec, torch.no_grad():
        y, r = m(x)
    assert r.indices.tolist() == [[4, E + 1]]
    for off in rec.offsets:
        assert off.diff().tolist() == [0, 0, 0, 0, 1, 0]
    w = (x @ m.router.weight.T).softmax(-1)[0]
    want = w[4] / (w[4] + w[E + 1]) * expert_mlp(x[0], m.w_gate_up[4], m.w_down[4])
    torch.testing.assert_close(y[0], want, atol=1e-5, rtol=1e-5)
