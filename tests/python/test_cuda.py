"""CUDA kernels against the CPU kernels. Skipped cleanly without a GPU."""

import pytest
import torch
from torch.library import opcheck

import moeyard
from test_ops import SAMPLES

ops = torch.ops.moeyard
pytestmark = pytest.mark.gpu


def _cuda(v):
    if isinstance(v, torch.Tensor):
        return v.detach().cuda().requires_grad_(v.requires_grad)
    return v


def _close(a, b, dtype):
    if isinstance(a, (tuple, list)):
        for x, y in zip(a, b):
            _close(x, y, dtype)
        return
    if a.dtype == torch.int64:
        assert torch.equal(a.cpu(), b), "integer outputs must be identical"
        return
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
    torch.testing.assert_close(a.cpu().double(), b.double(), atol=tol, rtol=tol)


@pytest.mark.parametrize("i", range(len(SAMPLES)), ids=[f"{s[0]}-{i}" for i, s in enumerate(SAMPLES)])
def test_op_cuda_matches_cpu(i):
    name, args, kwargs = SAMPLES[i]
    op = getattr(ops, name)
    cpu = op(*args, **kwargs)
    gpu = op(*[_cuda(a) for a in args], **{k: _cuda(v) for k, v in kwargs.items()})
    dtype = next(a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point())
    if name == "router_topk" and dtype not in (torch.float32, torch.float64):
        gpu, cpu = (gpu[0], gpu[2]), (cpu[0], cpu[2])  # near-ties may pick differently
    _close(gpu, cpu, dtype)


@pytest.mark.parametrize("i", range(0, len(SAMPLES), 3))
def test_opcheck_cuda(i):
    name, args, kwargs = SAMPLES[i]
    opcheck(getattr(ops, name).default, [_cuda(a) for a in args], {k: _cuda(v) for k, v in kwargs.items()})


@pytest.mark.parametrize("kw", [dict(), dict(capacity_factor=1.0, drop_policy="probs"), dict(
    score_fn="sigmoid", selection_bias=True, num_groups=4, topk_groups=2, num_shared_experts=1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_cuda_matches_cpu(kw, dtype):
    torch.manual_seed(0)
    m = moeyard.MoE(64, 32, 8, 2, dtype=dtype, **kw)
    mg = moeyard.MoE(64, 32, 8, 2, dtype=dtype, device="cuda", **kw)
    mg.load_state_dict(m.state_dict())
    x = torch.randn(4, 50, 64, dtype=dtype)
    y, r = m(x)
    yg, rg = mg(x.cuda())
    _close(yg, y, dtype)
    (yg.float().square().sum() + rg.switch_loss).backward()
    (y.float().square().sum() + r.switch_loss).backward()
    for (n, p), (_, pg) in zip(m.named_parameters(), mg.named_parameters()):
        tol = 1e-3 if dtype == torch.float32 else 1e-1
        torch.testing.assert_close(pg.grad.cpu().float(), p.grad.float(), atol=tol, rtol=tol, msg=n)
