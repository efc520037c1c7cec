"""A guard on a torch.compile-d model: no Dynamo crash, eager names, and the same problems and causes as eager.

Dynamo tracing is the point here, so most tests compile with ``backend="eager"`` (no codegen
time); two run the default inductor backend, one of them with random skipping (LayerDrop), whose
random numbers Inductor makes its own way unless the guard has it draw them as eager code does.
"""

from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from composites import CompositeModule, Conditional, GradientFlowError, GradientGuard, Parallel, Sequential
from tests.guard.buggy_models import DetachInside, NoGradInside
from tests.stand_ins import CompileSpy, linear

X = torch.ones(4, 3)
EAGER = partial(torch.compile, backend="eager")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Unused(nn.Module):
    """A branch built but never called."""

    def __init__(self) -> None:
        super().__init__()
        self.used, self.spare = linear(3, 2), linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


BUGS = {
    "detach": lambda: Sequential({"enc": DetachInside(), "head": linear(2, 2)}),
    "no_grad": lambda: Sequential({"enc": NoGradInside(), "head": linear(2, 2)}),
    "unused": lambda: Sequential({"enc": Unused(), "head": linear(2, 2)}),
}


def problems(model: nn.Module, guarded: nn.Module | None = None, steps: int = 2) -> list[set[tuple[str, ...]]]:
    """Per step, {(parameter, sub-model, cause, where)} from a guard on ``guarded`` while ``model`` runs."""
    guard = GradientGuard(model if guarded is None else guarded)
    found = []
    for _ in range(steps):
        model(X).sum().backward()
        try:
            guard.check()
            found.append(set())
        except GradientFlowError as err:
            found.append({(p.parameter, p.module, p.cause, p.where) for p in err.problems})
    return found


@pytest.mark.parametrize("bug", sorted(BUGS))
def test_a_guard_on_a_compiled_model_finds_the_same_problems_as_on_the_eager_one(bug):
    torch.manual_seed(0)
    eager = problems(BUGS[bug]())
    torch.manual_seed(0)
    compiled = EAGER(BUGS[bug]())
    assert problems(compiled) == eager
    assert eager[0] and {p[2] for p in eager[0]} == {{"detach": "detached"}.get(bug, bug)}


@pytest.mark.parametrize("how", ["torch.compile", "Module.compile"])
def test_a_model_compiled_after_the_guard_was_built_is_checked_the_same(how):
    eager = problems(BUGS["detach"]())
    model = BUGS["detach"]()
    guard_first = GradientGuard(model)
    if how == "torch.compile":
        run = EAGER(model)
    else:
        model.compile(backend="eager")
        run = model
    found = []
    for _ in range(2):
        run(X).sum().backward()
        with pytest.raises(GradientFlowError) as caught:
            guard_first.check()
        found.append({(p.parameter, p.module, p.cause, p.where) for p in caught.value.problems})
    assert found == eager


def test_parameters_keep_their_eager_names_and_a_clean_compiled_model_passes():
    model = Sequential({"enc": linear(3, 3), "head": nn.Sequential(linear(3, 2))})
    guard = GradientGuard(EAGER(model))
    assert guard.names == ["enc.weight", "enc.bias", "head.0.weight", "head.0.bias"]
    for _ in range(3):
        EAGER(model)(X).sum().backward()
        assert guard.check().ok


def test_a_compiled_torch_nn_sequential_records_its_call_with_one_graph_and_no_crash():
    # torch.nn classes are traced from their __call__, so the model's own pre-hook runs inside
    # Dynamo: it records eagerly (one graph break before the graph), the children's hooks not at all
    model = nn.Sequential(linear(3, 3), linear(3, 2))
    guard = GradientGuard(model)
    compiled = EAGER(model)
    torch._dynamo.utils.counters.clear()
    for _ in range(3):
        compiled(X).sum().backward()
        assert [call.module for call in guard.recorded_calls] == [model]  # the model's own call, once
        assert guard.check().ok
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_inactive_conditional_branches_stay_inactive_under_compile():
    model = Sequential({"gate": Conditional({"a": linear(3, 2), "b": linear(3, 2)}, router=lambda x: "a")})
    guard = GradientGuard(EAGER(model))
    EAGER(model)(X).sum().backward()
    report = guard.check()
    assert report.ok and report.inactive_names == ["gate.b.bias", "gate.b.weight"]


def in_place(model: nn.Module) -> nn.Module:
    model.compile(backend="eager")  # state_dict keys stay the eager ones (no "_orig_mod.")
    return model


@pytest.mark.parametrize("compiled", [EAGER, in_place], ids=["torch.compile", "Module.compile"])
def test_composite_module_trains_a_compiled_model_and_stops_on_a_cut(compiled):
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(16, 3, generator=g), torch.randint(0, 2, (16,), generator=g)), 8)
    options = dict(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False)
    options.update(enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    clean = Parallel({"a": linear(3, 2), "b": linear(3, 2)}, combine="sum")
    trainer = pl.Trainer(**options)
    trainer.fit(CompositeModule(compiled(clean), nn.CrossEntropyLoss(), partial(torch.optim.SGD, lr=0.1)), data)
    assert trainer.global_step == 2
    with pytest.raises(GradientFlowError) as caught:
        pl.Trainer(**options).fit(
            CompositeModule(compiled(BUGS["detach"]()), nn.CrossEntropyLoss(), partial(torch.optim.SGD, lr=0.1)), data
        )
    assert {(p.parameter, p.cause) for p in caught.value.problems} == {
        ("enc.fc1.weight", "detached"),
        ("enc.fc1.bias", "detached"),
    }


@pytest.mark.slow
def test_inductor_compiled_model_gets_the_same_causes_as_eager():
    eager = problems(BUGS["no_grad"](), steps=1)
    assert problems(torch.compile(BUGS["no_grad"]()), steps=1) == eager


class NoisyLayer(nn.Module):
    """A layer with dropout: compiled, a graph of its own whose random numbers Inductor makes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.fc(x), 0.25, self.training)


class LayerDrop(nn.Module):
    """LayerDrop as Hugging Face writes it: a ``torch.rand([])`` per layer, the skip decided in Python.

    Dynamo runs this loop eagerly (a data-dependent branch) and compiles each layer, so which
    layers run depends on how far the layers' compiled dropout moved the generator.
    """

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(NoisyLayer() for _ in range(4))
        self.head = linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            if torch.rand([]) < 0.5:
                continue
            x = layer(x)
        return self.head(x)


def layerdrop_steps(compiled: bool, steps: int = 6) -> list[tuple[dict[str, tuple[str, str]], set[str]]]:
    """Per step, the guard's {parameter: (cause, where)} and the parameters that got no gradient."""
    torch.manual_seed(0)
    model = LayerDrop()
    run = torch.compile(model) if compiled else model
    guard = GradientGuard(run)
    found = []
    for _ in range(steps):
        run(torch.ones(2, 4)).sum().backward()
        report = guard.check(raise_error=False)
        found.append(
            (
                {p.parameter: (p.cause, p.where) for p in report.problems},
                {n for n, p in model.named_parameters() if p.grad is None},
            )
        )
        model.zero_grad(set_to_none=True)
    return found


@pytest.mark.slow
def test_inductor_compiled_layerdrop_names_the_skipped_layers_unused_like_eager_on_the_same_steps():
    from torch._inductor import config as inductor

    compiled, eager = layerdrop_steps(compiled=True), layerdrop_steps(compiled=False)
    assert compiled == eager  # the compiled forward drew the numbers eager code draws, step by step
    for problems, skipped in compiled:
        assert {name: cause for name, (cause, _) in problems.items()} == dict.fromkeys(skipped, "unused")
    assert any(skipped for _, skipped in compiled) and any(len(s) < 8 for _, s in compiled)
    assert inductor.fallback_random is False  # on only while the guarded model ran


def test_inductor_draws_as_eager_code_only_while_the_guarded_model_runs_also_when_it_raises():
    from torch._inductor import config as inductor

    model, spy = LayerDrop(), CompileSpy()
    guard = GradientGuard(model, may_skip=["layers.*"])
    compiled = torch.compile(model, backend=spy)
    compiled(torch.ones(2, 4)).sum().backward()
    assert guard.check().ok
    assert spy.fallback_random and all(spy.fallback_random) and inductor.fallback_random is False
    with pytest.raises(RuntimeError):  # a shape mismatch, found while Dynamo traces
        compiled(torch.ones(2, 5))
    assert inductor.fallback_random is False
    with torch._inductor.config.patch(fallback_random=True):  # a user's own setting is kept
        compiled(torch.ones(2, 4))
        assert inductor.fallback_random is True
