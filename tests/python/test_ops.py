"""opcheck, gradcheck and reference checks of every torch.ops.moeyard op."""

import itertools
import os

import pytest
import torch
from torch.library import opcheck

ops = torch.ops.moeyard
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _routing(T, E, K, dtype=torch.float32, seed=0, capacity=-1, policy="position"):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g, dtype=dtype)
    w, idx, _ = ops.router_topk(logits, K)
    return ops.route_plan(idx, w, E, capacity, policy) + (w, idx)


def sample_inputs():
    """(op name, args, kwargs) covering the options of every op and its backward."""
    out = []
    for dtype, (T, E, K) in itertools.product(DTYPES, [(7, 4, 2), (5, 8, 8), (0, 3, 1), (9, 1, 1)]):
        g = torch.Generator().manual_seed(T * 100 + E)
        logits = torch.randn(T, E, generator=g).to(dtype)
        for score_fn, renorm in [("softmax", True), ("sigmoid", False), ("sigmoid", True)]:
            out.append(("router_topk", (logits.clone().requires_grad_(True), K), dict(score_fn=score_fn, renormalize=renorm, scale=1.5)))
        if E % 4 == 0 and E >= 4:
            bias = torch.randn(E, generator=g)
            out.append(("router_topk", (logits, K), dict(score_fn="sigmoid", selection_bias=bias, num_groups=4, topk_groups=2 if K <= E // 2 else 4)))
        w, idx, s = ops.router_topk(logits, K)
        out.append(("router_topk_backward", (torch.randn(T, K).to(dtype), torch.randn(T, E).to(dtype), idx, s, "softmax", True, 2.0), {}))
        out.append(("router_topk_backward", (torch.randn(T, K).to(dtype), torch.randn(T, E).to(dtype), idx, s, "sigmoid", False, 1.0), {}))
        for cap, pol in [(-1, "position"), (1, "position"), (2, "probs"), (T + 1, "probs")]:
            out.append(("route_plan", (idx, w, E, cap, pol), {}))
        idx_pad = idx.clone()
        if T > 0:
            idx_pad[0] = -1
        out.append(("route_plan", (idx_pad, w, E), {}))
        H = 6
        x = torch.randn(T, H, generator=g).to(dtype)
        for cap in (-1, 1):
            row_token, slot, offsets, counts = ops.route_plan(idx, w, E, cap)
            out.append(("permute", (x.clone().requires_grad_(True), row_token), {}))
            out.append(("permute_backward", (torch.randn(row_token.numel(), H).to(dtype), row_token, T), {}))
            rows = torch.randn(row_token.numel(), H).to(dtype)
            for wd in {dtype, torch.float32}:
                ww = w.to(wd)
                out.append(("unpermute", (rows.clone().requires_grad_(True), slot, ww.clone().requires_grad_(True)), {}))
                out.append(("unpermute_backward", (torch.randn(T, H).to(dtype), rows, slot, ww), {}))
            weight = torch.randn(E, 5, H).to(dtype)
            out.append(("grouped_mm", (rows.clone().requires_grad_(True), weight.clone().requires_grad_(True), offsets), {}))
            out.append(("grouped_mm_backward", (torch.randn(rows.shape[0], 5).to(dtype), rows, weight, offsets), {}))
        gate_up = torch.randn(T, 10, generator=g).to(dtype)
        out.append(("swiglu", (gate_up.clone().requires_grad_(True),), {}))
        out.append(("swiglu_backward", (torch.randn(T, 5).to(dtype), gate_up), {}))
        span = torch.tensor([min(1, T), T // 2, max(T - 1, min(1, T))])  # rows [1, T - 1)
        out.append(("swiglu", (gate_up.clone().requires_grad_(True), span), {}))
        out.append(("swiglu_backward", (torch.randn(T, 5).to(dtype), gate_up, span), {}))
    return out


SAMPLES = sample_inputs()


@pytest.mark.parametrize("i", range(len(SAMPLES)), ids=[f"{s[0]}-{i}" for i, s in enumerate(SAMPLES)])
def test_opcheck(i):
    name, args, kwargs = SAMPLES[i]
    opcheck(getattr(ops, name).default, args, kwargs)


def test_samples_cover_every_op():
    names = {s[0] for s in SAMPLES}
    registered = {
        "router_topk", "router_topk_backward", "route_plan", "permute", "permute_backward",
        "unpermute", "unpermute_backward", "grouped_mm", "grouped_mm_backward", "swiglu", "swiglu_backward",
    }
    assert names == registered


# ---- float64 gradcheck of every differentiable op ------------------------------------


@pytest.mark.parametrize("score_fn,renorm,groups", [("softmax", True, 1), ("softmax", False, 1), ("sigmoid", True, 2), ("sigmoid", False, 1)])
def test_gradcheck_router_topk(score_fn, renorm, groups):
    logits = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(8, dtype=torch.float64) * 0.1
    def f(l):
        w, _, s = ops.router_topk(l, 3, score_fn, renorm, 1.7, bias, groups, groups)
        return w, s
    assert torch.autograd.gradcheck(f, (logits,))


@pytest.mark.parametrize("capacity", [-1, 2])
def test_gradcheck_permute_unpermute(capacity):
    row_token, slot, offsets, counts, w, idx = _routing(6, 4, 2, capacity=capacity)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ops.permute(x, row_token), (x,))
    rows = torch.randn(row_token.numel(), 5, dtype=torch.float64, requires_grad=True)
    ww = w.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda r, w: ops.unpermute(r, slot, w), (rows, ww))


def test_gradcheck_grouped_mm_and_swiglu():
    row_token, slot, offsets, counts, w, idx = _routing(7, 3, 2)
    rows = torch.randn(row_token.numel(), 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r, wt: ops.grouped_mm(r, wt, offsets), (rows, weight))
    gu = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.swiglu, (gu,))
    assert torch.autograd.gradcheck(lambda g: ops.swiglu(g, torch.tensor([1, 2, 4])), (gu,))


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_computes_the_offsets_rows_only(dtype):
    """With expert offsets, the rows they span are plain swiglu's (forward
    and backward) and the others are zero without being read: NaN in a
    padding row stays out of both outputs."""
    gu = torch.randn(9, 12).to(dtype)
    gu[0] = float("nan")
    gu[7:] = float("nan")
    offsets = torch.tensor([1, 3, 3, 7])
    dy = torch.randn(9, 6).to(dtype)
    y = ops.swiglu(gu, offsets)
    dx = torch.ops.moeyard.swiglu_backward(dy, gu, offsets)
    assert torch.equal(y[1:7], ops.swiglu(gu[1:7]))
    assert torch.equal(dx[1:7], torch.ops.moeyard.swiglu_backward(dy[1:7], gu[1:7]))
    for t in (y, dx):
        assert torch.equal(t[0], torch.zeros_like(t[0])) and torch.equal(t[7:], torch.zeros_like(t[7:]))
    for bad, match in ((torch.tensor([2, 1]), r"span rows within \[0, 9\], got \[2, 1\)"),
                       (torch.tensor([0, 10]), r"span rows within \[0, 9\], got \[0, 10\)"),
                       (torch.tensor([0.0, 1.0]), "expert_offsets must be a 1-D int64 tensor")):
        with pytest.raises(RuntimeError, match=match):
            ops.swiglu(gu, bad)


# ---- references written with plain torch ------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_router_topk_matches_aten(dtype):
    logits = torch.randn(33, 16).to(dtype)
    w, idx, s = ops.router_topk(logits, 4)
    ref_s = logits.float().softmax(-1)
    ref_w, ref_i = ref_s.topk(4, -1)
    ref_w = ref_w / ref_w.sum(-1, keepdim=True)
    tol = 1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-6
    torch.testing.assert_close(s.float(), ref_s, atol=tol, rtol=tol)
    if dtype in (torch.float32, torch.float64):
        assert torch.equal(idx, ref_i)
    torch.testing.assert_close(w.float(), ref_w, atol=tol, rtol=tol)


def test_route_plan_reference_loop():
    T, E, K, C = 20, 4, 2, 4
    row_token, slot, offsets, counts, w, idx = _routing(T, E, K, capacity=C)
    seen = [0] * E
    for t in range(T):
        for k in range(K):
            e = int(idx[t, k])
            if seen[e] < C:
                assert int(slot[t, k]) == e * C + seen[e]
                assert int(row_token[e * C + seen[e]]) == t
            else:
                assert int(slot[t, k]) == -1
            seen[e] += 1
    assert counts.tolist() == [min(s, C) for s in seen]
    assert offsets.tolist() == [e * C for e in range(E + 1)]


def test_route_plan_probs_keeps_highest():
    T, E, K, C = 30, 3, 1, 5
    row_token, slot, offsets, counts, w, idx = _routing(T, E, K, capacity=C, policy="probs")
    for e in range(E):
        mine = [(float(w[t, 0]), -t) for t in range(T) if int(idx[t, 0]) == e]
        keep = sorted(sorted(mine, reverse=True)[:C], key=lambda p: -p[1])
        got = [int(row_token[e * C + j]) for j in range(int(counts[e]))]
        assert got == [-p[1] for p in keep]


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: ops.router_topk(torch.randn(4, 3), 4), "router_topk: k must be in"),
        (lambda: ops.router_topk(torch.randn(4, 3), 0), "router_topk: k must be in"),
        (lambda: ops.router_topk(torch.randn(4, 3), 1, "relu"), "score_fn must be"),
        (lambda: ops.router_topk(torch.randn(4, 3, dtype=torch.float64).long(), 1), "logits must be float"),
        (lambda: ops.router_topk(torch.randn(4), 1), "logits must be 2-D"),
        (lambda: ops.route_plan(torch.tensor([[5]]), torch.ones(1, 1), 3), "indices must be in"),
        (lambda: ops.route_plan(torch.tensor([[0]]), torch.ones(1, 1), 3, 0), "capacity must be >= 1"),
        (lambda: ops.route_plan(torch.tensor([[0]]), torch.ones(1, 1), 3, -1, "random"), "drop_policy must be"),
        (lambda: ops.route_plan(torch.tensor([[0]], dtype=torch.int32), torch.ones(1, 1), 3), "indices must be int64"),
        (lambda: ops.permute(torch.randn(3, 2), torch.tensor([3])), "row_token must be in"),
        (lambda: ops.unpermute(torch.randn(3, 2), torch.tensor([[4]]), torch.ones(1, 1)), "slot must be in"),
        (lambda: ops.grouped_mm(torch.randn(3, 2), torch.randn(2, 4, 5), torch.tensor([0, 1, 3])), "input has 2 features"),
        (lambda: ops.grouped_mm(torch.randn(3, 2), torch.randn(2, 4, 2).double(), torch.tensor([0, 1, 3])), "same dtype"),
        (lambda: ops.grouped_mm(torch.randn(3, 2), torch.randn(2, 4, 2), torch.tensor([0, 2, 1])), "non-decreasing"),
        (lambda: ops.swiglu(torch.randn(3, 5)), "even number of columns"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


def _bad_backward_calls(device):
    """Every backward op called with a gradient (or size) of the wrong shape,
    on `device`; the other arguments are valid."""
    d = dict(device=device)
    f = lambda *shape: torch.zeros(*shape, **d)  # noqa: E731
    idx = torch.tensor([[0, 1], [1, 2], [2, 0]], **d)
    zeros_long = lambda *shape: torch.zeros(*shape, dtype=torch.long, **d)  # noqa: E731
    offsets = torch.tensor([0, 3, 6], **d)
    return [
        ("router_topk_backward", lambda: ops.router_topk_backward(f(3, 3), f(3, 4), idx, f(3, 4), "softmax", True, 1.0), "grad_weights must have the shape of indices"),
        ("router_topk_backward", lambda: ops.router_topk_backward(f(3, 2), f(2, 4), idx, f(3, 4), "softmax", True, 1.0), "grad_scores must have the shape of scores"),
        ("permute_backward", lambda: ops.permute_backward(f(5, 2), zeros_long(6), 3), "grad_rows must have one row per row_token entry"),
        ("permute_backward", lambda: ops.permute_backward(f(6, 2), zeros_long(6), -1), "num_tokens must be >= 0"),
        ("unpermute_backward", lambda: ops.unpermute_backward(f(3, 5), f(6, 4), zeros_long(3, 2), f(3, 2)), "grad_y must have shape"),
        ("unpermute_backward", lambda: ops.unpermute_backward(f(4, 4), f(6, 4), zeros_long(3, 2), f(3, 2)), "grad_y must have shape"),
        ("grouped_mm_backward", lambda: ops.grouped_mm_backward(f(6, 7), f(6, 4), f(2, 5, 4), offsets), "grad_out must have shape"),
        ("grouped_mm_backward", lambda: ops.grouped_mm_backward(f(6), f(6, 4), f(2, 5, 4), offsets), "grad_out must have shape"),
        ("swiglu_backward", lambda: ops.swiglu_backward(f(3, 4), f(3, 10)), "grad must have shape"),
        ("swiglu_backward", lambda: ops.swiglu_backward(f(2, 5), f(3, 10)), "grad must have shape"),
    ]


def _error_of(call):
    with pytest.raises(RuntimeError) as e:
        call()
    return str(e.value)


@pytest.mark.parametrize("i", range(len(_bad_backward_calls("cpu"))))
def test_backward_rejects_wrong_grad_shape_on_cpu_and_meta_alike(i):
    """The CPU and Meta (shape) kernels run the same checks: a wrong-shape
    gradient fails under torch.compile's fake tensors exactly as it fails in
    eager mode, with the same words."""
    name, on_cpu, match = _bad_backward_calls("cpu")[i]
    _, on_meta, _ = _bad_backward_calls("meta")[i]
    cpu_error, meta_error = _error_of(on_cpu), _error_of(on_meta)
    assert f"{name}: " in cpu_error and match in cpu_error, cpu_error
    assert meta_error == cpu_error


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K", [13, 64, 1027])
def test_grouped_mm_streaming_and_blas_paths_match_a_loop(K, dtype):
    """Experts with <= 32 rows take the weight-streaming kernel (tiles of 2
    x 4 below 4 rows, 4 x 3 from 4 rows, and their tails), larger ones BLAS;
    both against a float64 per-expert loop of the same (rounded) values,
    with K off the vector width and Dout off the tile widths. bfloat16: one
    rounding of a float32 sum."""
    torch.manual_seed(0)
    sizes = [0, 1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 32, 33, 40]
    E, Dout = len(sizes), 37
    offsets = torch.tensor([0] + sizes).cumsum(0)
    rows = torch.randn(int(offsets[-1]), K).to(dtype)
    weight = torch.randn(E, Dout, K).to(dtype)
    out = ops.grouped_mm(rows, weight, offsets)
    assert out.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-4 * K ** 0.5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2 * K ** 0.5)
    for e in range(E):
        a, b = int(offsets[e]), int(offsets[e + 1])
        want = rows[a:b].double() @ weight[e].double().t()
        assert torch.allclose(out[a:b].double(), want, **tol), e


@pytest.mark.parametrize("capability", ["avx2", "avx512"])
def test_streaming_kernels_pass_under_each_lower_cpu_capability(capability):
    """MOEYARD_CPU_CAPABILITY caps the streaming kernels' instruction set
    (by default the best the CPU runs: on AVX512_BF16 CPUs, bf16 products
    by VDPBF16PS): the float32, bf16 and fp16 streaming tests and the
    decoding-logits test pass under each lower one too, so every kernel is
    tested on the machines that run the best one."""
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    tests = [f"{here}/test_ops.py", f"{here}/test_model.py"]
    picks = "streaming_and_blas or reduced_precision or few_row_products"
    env = dict(os.environ, MOEYARD_CPU_CAPABILITY=capability)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests, "-k", picks],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and "failed" not in r.stdout


def test_a_bad_cpu_capability_is_named():
    import subprocess
    import sys

    python_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python")
    env = dict(os.environ, MOEYARD_CPU_CAPABILITY="sse9", PYTHONPATH=python_dir)
    code = ("import torch, moeyard\nops = torch.ops.moeyard\n"
            "ops.grouped_mm(torch.randn(2, 8), torch.randn(1, 4, 8), torch.tensor([0, 2]))")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "MOEYARD_CPU_CAPABILITY = 'sse9'" in r.stderr and "avx512_bf16" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("E", [6, 16, 67])
def test_router_topk_nan_and_minus_inf_rows(E):
    """Rows wider than a vector (the AVX2 arg-max) and narrower ones agree on
    the edge cases: a NaN score is picked first (where the CUDA kernel puts
    it too), -inf logits are never picked while finite ones remain."""
    torch.manual_seed(E)
    logits = torch.randn(5, E)
    logits[1, 3] = float("nan")
    logits[2, :: 2] = float("-inf")
    w, idx, _ = ops.router_topk(logits, 3, score_fn="sigmoid", renormalize=False)
    assert idx[1, 0].item() == 3
    rest = logits[1].clone()
    rest[3] = float("-inf")
    assert torch.equal(idx[1, 1:], rest.topk(2).indices)
    assert (idx[2] % 2 == 1).all()
    for r in (0, 3, 4):
        assert torch.equal(idx[r], logits[r].topk(3).indices)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grouped_mm_reduced_precision_accumulates_in_float32(dtype):
    """bf16/fp16 grouped_mm (forward and both gradients) on the CPU equals the
    float32 products rounded once (within one rounding): on CPUs without
    bf16/fp16 GEMM units moeyard multiplies in float32 (ATen's own bf16 GEMM
    runs ~300x slower there), streaming and widening the weights for experts
    of <= 32 rows (expert 0 here) and through float32 GEMMs above (expert 2)."""
    torch.manual_seed(0)
    N, E, H, F_ = 52, 3, 24, 40
    x = torch.randn(N, H).to(dtype).requires_grad_()
    w = torch.randn(E, F_, H).to(dtype).requires_grad_()
    offsets = torch.tensor([0, 5, 5, 45], dtype=torch.long)  # expert 1 empty, 7 padding rows
    y = ops.grouped_mm(x, w, offsets)
    g = torch.randn(N, F_).to(dtype)
    y.backward(g)
    x32, w32, g32 = x.detach().float(), w.detach().float(), g.float()
    want = torch.zeros(N, F_)
    gx = torch.zeros(N, H)
    gw = torch.zeros(E, F_, H)
    for e in range(E):
        a, b = offsets[e].item(), offsets[e + 1].item()
        want[a:b] = x32[a:b] @ w32[e].T
        gx[a:b] = g32[a:b] @ w32[e]
        gw[e] = g32[a:b].T @ x32[a:b]
    for got, ref in [(y.detach(), want), (x.grad, gx), (w.grad, gw)]:
        # One rounding of the float32 result: at most one unit in the last
        # place of the reduced type (2^-8 relative for bf16, 2^-11 for fp16).
        ulp = 2.0 ** (-8 if dtype == torch.bfloat16 else -11)
        assert ((got.float() - ref).abs() <= ulp * ref.abs() + 1e-6).all()
    assert torch.all(y.detach()[45:] == 0) and torch.all(x.grad[45:] == 0)
