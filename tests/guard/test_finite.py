"""Finite checks: NaN/Inf anywhere is found on both paths of any_non_finite, the gradients left bit for bit,
and sparse gradients are checked, normed and named like dense ones."""

import math

import pytest
import torch
from torch import nn

from composites import GradientGuard
from composites.guard import finite
from composites.guard.finite import any_non_finite
from tests.guard.buggy_models import linear, problems


def bits(t):
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def grads(dtype=torch.float32):
    return [
        torch.tensor([1.5, -0.0, 1e18 if dtype == torch.float32 else 1.0], dtype=dtype),
        torch.arange(4.0, dtype=dtype),
    ]


@pytest.mark.parametrize("fused_up_to", [finite.FUSED_UP_TO, 0], ids=["fused", "norms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_single_bad_element_is_found_on_either_path_and_nothing_changes(monkeypatch, fused_up_to, dtype, bad):
    monkeypatch.setattr(finite, "FUSED_UP_TO", fused_up_to)
    fused_calls = []
    kernel = torch._amp_foreach_non_finite_check_and_unscale_
    monkeypatch.setattr(
        torch, "_amp_foreach_non_finite_check_and_unscale_", lambda *a: fused_calls.append(1) or kernel(*a)
    )
    clean = grads(dtype)
    before = [g.clone() for g in clean]
    assert any_non_finite(clean) is False
    dirty = grads(dtype)
    dirty[1][2] = bad
    before += [g.clone() for g in dirty]
    assert any_non_finite(dirty) is True
    for g, b in zip(clean + dirty, before):
        assert torch.equal(bits(g), bits(b))  # -0.0 stays -0.0; NaN stays the same NaN
    assert len(fused_calls) == (2 if fused_up_to else 0)


def test_mixed_dtypes_and_graph_carrying_grads_take_the_norm_path_untouched():
    mixed = [torch.ones(3), torch.ones(2, dtype=torch.float16)]
    assert any_non_finite(mixed) is False
    carrying = torch.ones(3, requires_grad=True) * 2  # create_graph=True leaves grads like this
    assert any_non_finite([carrying]) is False
    assert carrying.grad_fn is not None and carrying._version == 0
    assert any_non_finite([]) is False


def test_sparse_embedding_gradients_are_checked_normed_and_named_when_not_finite():
    embedding = nn.Embedding(5, 3, sparse=True)
    nn.init.constant_(embedding.weight, 1.0)
    model = nn.Sequential(embedding, linear(3, 1))
    guard = GradientGuard(model)
    model(torch.tensor([1, 2, 1])).sum().backward()  # rows 1 (twice) and 2: an uncoalesced sparse gradient
    assert embedding.weight.grad.is_sparse
    report = guard.check()
    assert report.grad_norms()["0"] == pytest.approx(math.sqrt(3 * 0.2**2 + 3 * 0.1**2), rel=1e-6)
    model(torch.tensor([3])).sum().backward()
    embedding.weight.grad = torch.sparse_coo_tensor([[3]], [[float("nan"), 0.0, 0.0]], (5, 3), check_invariants=True)
    where = "step 2: the forward is finite; first non-finite gradient in backward order: '0.weight'"
    assert problems(guard, "cause", "where") == {"0.weight": ("non_finite", where)}
