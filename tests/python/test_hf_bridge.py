"""moeyard.hf.patch_hf_model: the experts of a loaded transformers model
computed by moeyard's ops on the model's own weights. For every family,
logits and gradients equal the unpatched model's (float32), and the
moeyard ops really run."""

import pytest
import torch

from moeyard import hf
from test_hf_import import family_configs, make_hf


class CountedGroupedMM:
    def __init__(self, monkeypatch):
        self.calls = 0
        real = hf.ops.grouped_mm

        def counted(*args):
            self.calls += 1
            return real(*args)

        monkeypatch.setattr(hf.ops, "grouped_mm", counted)


@pytest.mark.parametrize("family", sorted(family_configs()))
def test_patched_model_matches_transformers(family, monkeypatch):
    torch.manual_seed(0)
    ref = make_hf(family, seed=5).float()
    ours = make_hf(family, seed=5).float()
    ids = torch.randint(0, ref.config.vocab_size, (2, 12))
    counter = CountedGroupedMM(monkeypatch)
    assert hf.patch_hf_model(ours) is ours
    want, got = ref(ids).logits, ours(ids).logits
    assert counter.calls > 0  # moeyard computed the experts
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    want.square().mean().backward()
    got.square().mean().backward()
    for (n, a), (_, b) in zip(ref.named_parameters(), ours.named_parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("family", sorted(family_configs()))
def test_whole_blocks_match_transformers(family):
    """patch_hf_model(blocks=True): every sparse block computed by
    MoE.from_hf_block (moeyard's router, the family's routing from the
    config) gives the unpatched model's logits and gradients, on the same
    parameters under the same names, and keeps its routing result."""
    torch.manual_seed(0)
    ref = make_hf(family, seed=5).float()
    ours = make_hf(family, seed=5).float()
    names = [n for n, _ in ours.named_parameters()]
    ids = torch.randint(0, ref.config.vocab_size, (2, 12))
    hf.patch_hf_model(ours, blocks=True)
    assert [n for n, _ in ours.named_parameters()] == names
    want, got = ref(ids).logits, ours(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    blocks = [m for m in ours.modules() if "moeyard_moe" in m.__dict__]
    assert blocks and all(b.moeyard_result.tokens_per_expert.sum().item() == 2 * 12 * b.moeyard_moe.top_k
                          for b in blocks)
    want.square().mean().backward()
    got.square().mean().backward()
    for (n, a), (_, b) in zip(ref.named_parameters(), ours.named_parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_from_hf_block_shares_the_blocks_tensors():
    """The MoE's parameters are the block's own tensors: an optimizer step
    on the moeyard module changes the transformers block."""
    from moeyard import MoE

    model = make_hf("mixtral", seed=3).float()
    block = model.model.layers[0].mlp
    moe = MoE.from_hf_block(block, model.config)
    assert {id(p) for p in moe.parameters()} == {id(p) for p in block.parameters()}
    before = block.experts.gate_up_proj.detach().clone()
    y, r = moe(torch.randn(2, 5, model.config.hidden_size))
    (y.square().mean() + r.switch_loss).backward()
    torch.optim.SGD(moe.parameters(), lr=0.1).step()
    assert not torch.equal(block.experts.gate_up_proj, before)


def test_a_model_without_experts_is_refused():
    with pytest.raises(ValueError, match="patch_hf_model: Linear has no experts module"):
        hf.patch_hf_model(torch.nn.Linear(2, 2))
