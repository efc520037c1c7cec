"""One test per cause, each the way users actually hit it: exact parameter sets and causes."""

import pytest
import torch
from torch import nn

from composites import CAUSES, Conditional, GradientFlowError, GradientGuard, Parallel, Sequential
from tests.guard.buggy_models import (
    ArgmaxRouter,
    CustomLayer,
    DetachInside,
    ForgotAux,
    ItemRoundTrip,
    NaNBranch,
    NoGradInside,
    NumpyEncoder,
    linear,
    problems,
)

X = torch.ones(4, 3)


def problems_of(model: nn.Module, optimizer=None, x=X) -> dict[str, tuple[str, str, str]]:
    """One guarded forward/backward, then :func:`problems`: {parameter: (sub-model, cause, where)}."""
    guard = GradientGuard(model, optimizer=optimizer)
    model(x).sum().backward()
    return problems(guard)


def test_numpy_round_trip_between_chained_models_is_detached_inside_the_encoder():
    model = Sequential({"encoder": NumpyEncoder(), "head": linear(3, 2)})
    where = "inside 'encoder'.forward, after 'encoder.net'"
    assert problems_of(model) == {
        "encoder.net.weight": ("encoder", "detached", where),
        "encoder.net.bias": ("encoder", "detached", where),
    }


def test_detach_between_layers_names_the_hand_off():
    where = "inside DetachInside.forward, after 'fc1', before 'fc2'"
    assert problems_of(DetachInside()) == {
        "fc1.weight": ("fc1", "detached", where),
        "fc1.bias": ("fc1", "detached", where),
    }


def test_tolist_and_torch_tensor_rewrap_is_detached():
    found = problems_of(ItemRoundTrip())
    assert {k: v[1] for k, v in found.items()} == {"encoder.weight": "detached", "encoder.bias": "detached"}
    assert found["encoder.weight"][2] == "inside ItemRoundTrip.forward, after 'encoder', before 'head'"


def test_no_grad_block_inside_forward():
    found = problems_of(NoGradInside())
    assert found == {
        "fc1.weight": ("fc1", "no_grad", "'fc1' ran under torch.no_grad()/inference_mode()"),
        "fc1.bias": ("fc1", "no_grad", "'fc1' ran under torch.no_grad()/inference_mode()"),
    }


def test_inference_mode_stage_is_no_grad():
    class Frozen(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = linear(3, 3)

        def forward(self, x):
            with torch.inference_mode():
                h = self.body(x)
            return h.clone()

    found = problems_of(Sequential({"encoder": Frozen(), "head": linear(3, 2)}))
    assert {k: v[:2] for k, v in found.items()} == {
        "encoder.body.weight": ("encoder", "no_grad"),
        "encoder.body.bias": ("encoder", "no_grad"),
    }


def test_plain_tensor_attribute_is_not_registered():
    found = problems_of(Sequential({"layer": CustomLayer()}))
    assert {k: v[:2] for k, v in found.items()} == {"layer.scale": ("layer", "not_registered")}


def test_forgotten_sub_model_is_unused():
    found = problems_of(ForgotAux())
    assert found == {
        "aux.weight": ("aux", "unused", "'aux' never ran in forward, though the model (ForgotAux) did"),
        "aux.bias": ("aux", "unused", "'aux' never ran in forward, though the model (ForgotAux) did"),
    }


def test_argmax_router_is_a_non_differentiable_route():
    model = Sequential({"experts": Conditional({"a": linear(3, 2), "b": linear(3, 2)}, router=ArgmaxRouter())})
    found = problems_of(model)
    assert {k: v[:2] for k, v in found.items()} == {
        "experts.router.gate.weight": ("experts.router", "non_differentiable_route"),
        "experts.router.gate.bias": ("experts.router", "non_differentiable_route"),
    }
    assert model.experts.active_branches in (("a",), ("b",))


def test_hard_one_hot_route_override_is_a_non_differentiable_route():
    class Hard(Conditional):
        def route(self, x):
            return nn.functional.one_hot(self.router(x).argmax(-1), 2).float()

    found = problems_of(Hard({"a": linear(3, 2), "b": linear(3, 2)}, router=linear(3, 2)))
    assert {k: v[1] for k, v in found.items()} == {
        "router.weight": "non_differentiable_route",
        "router.bias": "non_differentiable_route",
    }


def test_nan_branch_is_non_finite_and_names_only_that_branch():
    found = problems_of(Parallel({"ok": linear(3, 2), "bad": NaNBranch()}))
    assert {k: v[:2] for k, v in found.items()} == {
        "bad.fc.weight": ("bad", "non_finite"),
        "bad.fc.bias": ("bad", "non_finite"),
    }


def test_parameter_missing_from_a_hand_built_optimizer():
    model = Sequential({"encoder": linear(3, 3), "head": linear(3, 2)})
    optimizer = torch.optim.SGD(model.head.parameters(), lr=0.1)
    found = problems_of(model, optimizer)
    assert {k: v[:2] for k, v in found.items()} == {
        "encoder.weight": ("encoder", "not_in_optimizer"),
        "encoder.bias": ("encoder", "not_in_optimizer"),
    }


def test_error_is_a_runtime_error_with_a_table_and_one_hint_per_cause():
    guard = GradientGuard(model := ForgotAux())
    model(X).sum().backward()
    with pytest.raises(RuntimeError) as caught:
        guard.check()
    text = str(caught.value)
    assert text.splitlines()[0] == "2 parameters did not get a proper gradient in this backward:"
    assert text.splitlines()[1].split() == ["parameter", "sub-model", "cause", "where"]
    assert text.count("fix unused:") == 1
    assert all(p.hint for p in caught.value.problems) and set(CAUSES) >= {p.cause for p in caught.value.problems}


def test_warn_style_check_returns_the_problems_without_raising():
    guard = GradientGuard(model := ForgotAux())
    model(X).sum().backward()
    report = guard.check(raise_error=False)
    assert not report.ok and sorted(p.parameter for p in report.problems) == ["aux.bias", "aux.weight"]


def test_check_without_a_forward_since_the_last_check_still_names_parameters():
    model = ForgotAux()
    guard = GradientGuard(model)
    model(X).sum().backward()
    guard.check(raise_error=False)
    model.head.weight.sum().backward()  # a backward that did not go through the model's forward
    report = guard.check(raise_error=False)
    assert {p.parameter for p in report.problems} == {n for n, _ in model.named_parameters()} - {"head.weight"}
    assert {p.cause for p in report.problems} == {"unused"}


def test_cut_in_a_training_loop_that_calls_sub_models_itself():
    model = Sequential({"encoder": linear(3, 3), "head": linear(3, 2)})
    guard = GradientGuard(model)
    features = model.encoder(X).detach()  # the loop hands off between sub-models itself
    model.head(features).sum().backward()
    report = guard.check(raise_error=False)
    assert {(p.parameter, p.cause) for p in report.problems} == {
        ("encoder.weight", "detached"),
        ("encoder.bias", "detached"),
    }
    assert report.problems[0].where.startswith("between 'encoder' and 'head', in the code that calls them")


class MaskToken(nn.Module):
    """A mask embedding read only when a mask is passed (BERT/wav2vec-style pretraining tokens)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = linear(3, 3)
        self.mask_emb = nn.Parameter(torch.zeros(3))

    def forward(self, x, mask=None):
        return self.lin(x if mask is None else torch.where(mask[:, None], self.mask_emb, x))


def test_a_parameter_the_forward_never_reads_is_unused_not_detached():
    assert problems_of(MaskToken()) == {
        "mask_emb": ("", "unused", "MaskToken.forward ran but never read it in this forward")
    }


def test_a_weight_its_parent_reads_functionally_is_used_and_cut_with_the_rest():
    class Attention(nn.Module):  # nn.MultiheadAttention reads out_proj.weight without calling out_proj
        def __init__(self) -> None:
            super().__init__()
            self.attn, self.head = nn.MultiheadAttention(4, 2), linear(4, 1)

        def forward(self, x):
            return self.head(self.attn(x, x, x)[0].detach())

    where = "inside Attention.forward, after 'attn', before 'head'"
    found = problems_of(Attention(), x=torch.ones(3, 2, 4))
    assert found == {
        "attn.in_proj_weight": ("attn", "detached", where),
        "attn.in_proj_bias": ("attn", "detached", where),
        "attn.out_proj.weight": ("attn.out_proj", "detached", where),
        "attn.out_proj.bias": ("attn.out_proj", "detached", where),
    }


class Pooled(nn.Module):
    """Returns every hidden state and a pooled summary, as BERT does; the loss uses only one."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder, self.pooler = linear(3, 3), linear(3, 3)

    def forward(self, x):
        hidden = self.encoder(x)
        return {"last_hidden_state": hidden, "pooler_output": self.pooler(hidden)}


def test_an_output_left_out_of_the_loss_is_not_in_loss_with_its_own_fix():
    model = Pooled()
    guard = GradientGuard(model)
    model(X)["last_hidden_state"].sum().backward()
    with pytest.raises(GradientFlowError) as caught:
        guard.check()
    where = "the model (Pooled) returned an output that depends on it, but the loss does not"
    assert {p.parameter: (p.module, p.cause, p.where) for p in caught.value.problems} == {
        "pooler.weight": ("pooler", "not_in_loss", where),
        "pooler.bias": ("pooler", "not_in_loss", where),
    }
    assert "fix not_in_loss: Use that output in the loss" in str(caught.value)
    assert "not_in_loss" in CAUSES and ".detach()" not in caught.value.problems[0].hint


def test_an_auxiliary_head_the_loop_calls_but_leaves_out_of_the_loss_is_not_in_loss():
    model = Sequential({"encoder": linear(3, 3), "head": linear(3, 2), "aux": linear(3, 2)})
    guard = GradientGuard(model)
    features = model.encoder(X)
    logits, aux_logits = model.head(features), model.aux(features)  # noqa: F841 - aux_logits left out
    logits.sum().backward()
    report = guard.check(raise_error=False)
    assert {(p.parameter, p.cause, p.where) for p in report.problems} == {
        (name, "not_in_loss", "'aux' returned an output that depends on it, but the loss does not")
        for name in ("aux.weight", "aux.bias")
    }


class Decoder(nn.Module):
    """Reads the encoder's output (``memory``) only inside its layers, as cross-attention does; LayerDrop may skip them all."""

    def __init__(self, skip_all: bool, detach: bool = False) -> None:
        super().__init__()
        self.layers, self.norm = nn.ModuleList([linear(3, 3), linear(3, 3)]), linear(3, 3)
        self.skip_all, self.detach = skip_all, detach

    def forward(self, x, memory):
        if self.detach:
            memory = memory.detach()
        for layer in self.layers:
            if self.skip_all:
                continue
            x = layer(x) + memory
        return self.norm(x)


class EncoderDecoder(nn.Module):
    def __init__(self, decoder: Decoder) -> None:
        super().__init__()
        self.encoder, self.decoder = linear(3, 3), decoder

    def forward(self, x):
        return self.decoder(x, self.encoder(x))


def test_an_encoder_output_the_decoder_never_read_because_every_layer_was_skipped_is_not_in_loss_not_detached():
    unread = "'encoder' returned an output that depends on it, but 'decoder', which received it, never read it in this forward"
    assert problems_of(EncoderDecoder(Decoder(skip_all=True))) == {
        "encoder.weight": ("encoder", "not_in_loss", unread),
        "encoder.bias": ("encoder", "not_in_loss", unread),
        **{
            f"decoder.layers.{i}.{kind}": (
                f"decoder.layers.{i}",
                "unused",
                f"'decoder.layers.{i}' never ran in forward, though 'decoder' did",
            )
            for i in range(2)
            for kind in ("weight", "bias")
        },
    }
    # read and then cut: still the detach, where it happened
    cut = "inside 'decoder'.forward, which received it with gradient but returned it without"
    assert problems_of(EncoderDecoder(Decoder(skip_all=False, detach=True))) == {
        "encoder.weight": ("encoder", "detached", cut),
        "encoder.bias": ("encoder", "detached", cut),
    }
