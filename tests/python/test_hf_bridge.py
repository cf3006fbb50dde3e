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


def test_a_model_without_experts_is_refused():
    with pytest.raises(ValueError, match="patch_hf_model: Linear has no experts module"):
        hf.patch_hf_model(torch.nn.Linear(2, 2))
