"""CompositeModule: one optimizer with the right parameters, the guard after every backward, logging."""

from __future__ import annotations

import csv
import warnings
from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from composites import CompositeModule, Conditional, GradientFlowError, Parallel, Sequential

ADAM = partial(torch.optim.Adam, lr=1e-3)


class Detached(nn.Module):
    """A sub-model that cuts the graph: its own parameters never get a gradient."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).detach()


def two_stage() -> Sequential:
    return Sequential({"encoder": nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)), "head": nn.Linear(4, 3)})


def loader(n: int = 32, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)), batch_size=batch_size)


def trainer(**kwargs) -> pl.Trainer:
    options = dict(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
    )
    return pl.Trainer(**{**options, **kwargs})


def optimizer_ids(module: CompositeModule) -> list[list[int]]:
    return [[id(p) for p in g["params"]] for g in module.configure_optimizers().param_groups]


# ---------------------------------------------------------------- parameter groups
def test_param_groups_split_by_prefix_first_match_wins_and_rest_is_default():
    model = two_stage()
    groups = [{"prefix": "encoder.0", "lr": 0.1}, {"prefix": "encoder", "lr": 0.2}, {"prefix": "encoder.2", "lr": 0.3}]
    optimizer = CompositeModule(model, nn.CrossEntropyLoss(), ADAM, param_groups=groups).configure_optimizers()
    got = [(g["name"], g["lr"], [id(p) for p in g["params"]]) for g in optimizer.param_groups]
    enc, head = model.encoder, model.head
    assert got == [
        ("encoder.0", 0.1, [id(enc[0].weight), id(enc[0].bias)]),
        ("encoder", 0.2, [id(enc[2].weight), id(enc[2].bias)]),  # encoder.2 is taken by "encoder" first
        ("default", 1e-3, [id(head.weight), id(head.bias)]),
    ]


def test_shared_weights_are_in_the_optimizer_once_and_matched_under_either_owner():
    shared = nn.Linear(4, 4)
    model = Sequential({"a": shared, "b": nn.Linear(4, 4), "c": shared, "head": nn.Linear(4, 3)})
    model.b.bias = model.head.bias  # a tied bias across two different sub-models
    ids = optimizer_ids(CompositeModule(model, nn.CrossEntropyLoss(), ADAM, param_groups=[{"prefix": "c", "lr": 0.5}]))
    assert ids == [[id(shared.weight), id(shared.bias)], [id(model.b.weight), id(model.head.bias), id(model.head.weight)]]
    flat = [i for group in ids for i in group]
    assert len(flat) == len(set(flat)) == len({id(p) for p in model.parameters()}) == 5


def test_frozen_parameters_are_left_out_and_a_fully_frozen_group_is_dropped():
    model = two_stage()
    model.encoder.requires_grad_(False)
    ids = optimizer_ids(CompositeModule(model, nn.CrossEntropyLoss(), ADAM, param_groups=[{"prefix": "encoder", "lr": 0.1}]))
    assert ids == [[id(model.head.weight), id(model.head.bias)]]


def test_loss_parameters_join_the_default_group():
    weighted = nn.Module()
    weighted.scale = nn.Parameter(torch.ones(()))
    weighted.forward = lambda out, y: nn.functional.cross_entropy(out * weighted.scale, y)
    model = two_stage()
    ids = optimizer_ids(CompositeModule(model, weighted, ADAM, param_groups=[{"prefix": "loss", "lr": 0.1}]))
    assert ids == [[id(weighted.scale)], [id(p) for p in model.parameters()]]


def test_a_prefix_matching_nothing_is_an_error_naming_it_and_the_sub_models():
    module = CompositeModule(two_stage(), nn.CrossEntropyLoss(), ADAM, param_groups=[{"prefix": "decoder", "lr": 0.1}])
    with pytest.raises(ValueError, match=r"prefix 'decoder' matches no parameter; top-level sub-models are: encoder, head$"):
        module.configure_optimizers()


def test_a_group_without_prefix_and_an_unknown_guard_mode_are_errors():
    with pytest.raises(ValueError, match="has no 'prefix'"):
        CompositeModule(two_stage(), nn.CrossEntropyLoss(), ADAM, param_groups=[{"lr": 0.1}]).configure_optimizers()
    with pytest.raises(ValueError, match="guard='rase' is not one of raise, warn, off"):
        CompositeModule(two_stage(), nn.CrossEntropyLoss(), ADAM, guard="rase")


# ---------------------------------------------------------------- the guard inside fit
def broken() -> Sequential:
    return Sequential({"encoder": nn.Linear(4, 4), "broken": Detached(), "head": nn.Linear(4, 3)})


def test_raise_stops_fit_at_the_first_backward_before_any_optimizer_step():
    model = broken()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    t = trainer()
    with pytest.raises(GradientFlowError) as info:
        t.fit(CompositeModule(model, nn.CrossEntropyLoss(), ADAM), loader())
    assert {(p.parameter, p.module, p.cause) for p in info.value.problems} == {
        ("encoder.weight", "encoder", "detached"), ("encoder.bias", "encoder", "detached"),
        ("broken.lin.weight", "broken", "detached"), ("broken.lin.bias", "broken", "detached"),
    }
    assert "broken.lin.weight" in str(info.value)
    assert t.global_step == 0
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # nothing stepped


def test_warn_goes_on_and_warns_once_per_distinct_set_of_problems():
    module = CompositeModule(broken(), nn.CrossEntropyLoss(), ADAM, guard="warn")
    t = trainer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(module, loader(n=32, batch_size=8))
    guard_warnings = [w for w in caught if "gradient guard" in str(w.message)]
    assert t.global_step == 4
    assert len(guard_warnings) == 1
    assert "broken.lin.weight" in str(guard_warnings[0].message)


def test_validation_between_training_steps_does_not_make_a_routed_out_branch_unused():
    class TrainEvalGate(nn.Module):
        """Scores with a gradient; training samples all go to 'a', evaluation samples to 'b'."""

        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x):
            bias = torch.tensor([5.0, 0.0] if self.training else [0.0, 5.0])
            return self.lin(x) * 0.01 + bias

    model = Sequential({"experts": Conditional({"a": nn.Linear(4, 4), "b": nn.Linear(4, 4)}, router=TrainEvalGate()), "head": nn.Linear(4, 3)})
    module = CompositeModule(model, nn.CrossEntropyLoss(), ADAM)
    t = trainer(limit_val_batches=1, num_sanity_val_steps=1, val_check_interval=2)  # eval, 2 steps, eval, 2 steps
    t.fit(module, loader(), loader())
    assert t.global_step == 4 and module.report.ok
    assert module.report.inactive_names == ["experts.b.bias", "experts.b.weight"]


def test_off_installs_no_guard_and_trains_a_broken_model():
    module = CompositeModule(broken(), nn.CrossEntropyLoss(), ADAM, guard="off")
    t = trainer()
    t.fit(module, loader())
    assert module.guard is None and t.global_step == 4


def test_the_guard_checks_every_micro_batch_under_gradient_accumulation():
    module = CompositeModule(two_stage(), nn.CrossEntropyLoss(), ADAM)
    calls = []

    class Count(pl.Callback):
        def on_after_backward(self, trainer, pl_module):  # runs just before the module's own hook
            calls.append((trainer.global_step, pl_module.guard is not None))

    t = trainer(accumulate_grad_batches=2, callbacks=[Count()])
    t.fit(module, loader(n=32, batch_size=8))
    assert calls == [(0, True), (0, True), (1, True), (1, True)]
    assert t.global_step == 2 and module.report is not None and module.report.ok


def test_a_cut_in_a_later_micro_batch_is_caught_in_that_micro_batch():
    class CutOnSecondCall(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.calls = nn.Linear(4, 4), 0

        def forward(self, x):
            self.calls += 1
            return self.lin(x).detach() if self.calls == 2 else self.lin(x)

    class Batches(pl.Callback):
        started: list[int] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.started.append(batch_idx)

    model = Sequential({"flaky": CutOnSecondCall(), "head": nn.Linear(4, 3)})
    t = trainer(accumulate_grad_batches=2, callbacks=[Batches()])
    with pytest.raises(GradientFlowError) as info:
        t.fit(CompositeModule(model, nn.CrossEntropyLoss(), ADAM), loader())
    assert {p.parameter for p in info.value.problems} == {"flaky.lin.weight", "flaky.lin.bias"}
    assert Batches.started == [0, 1] and t.global_step == 0  # micro-batch 2 of the first step


def test_manual_optimization_is_guarded_through_manual_backward():
    class Manual(CompositeModule):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            opt.zero_grad()
            x, y = batch
            self.manual_backward(self.loss_fn(self.model(x), y))
            opt.step()

    with pytest.raises(GradientFlowError, match="broken.lin.weight"):
        trainer().fit(Manual(broken(), nn.CrossEntropyLoss(), ADAM), loader())
    ok = Manual(two_stage(), nn.CrossEntropyLoss(), ADAM)
    trainer().fit(ok, loader())
    assert ok.report is not None and ok.report.ok and ok.report.checked == 6


def test_a_parameter_missing_from_the_optimizer_is_reported():
    model = two_stage()
    only_head = lambda groups: torch.optim.SGD(model.head.parameters(), lr=0.1)  # noqa: E731
    with pytest.raises(GradientFlowError) as info:
        trainer().fit(CompositeModule(model, nn.CrossEntropyLoss(), only_head), loader())
    assert {(p.parameter, p.cause) for p in info.value.problems} == {
        (n, "not_in_optimizer") for n in ("encoder.0.weight", "encoder.0.bias", "encoder.2.weight", "encoder.2.bias")
    }


def test_guard_hooks_are_removed_after_fit():
    module = CompositeModule(two_stage(), nn.CrossEntropyLoss(), ADAM)
    trainer().fit(module, loader())
    assert module.guard is not None and module.guard._handles == []


# ---------------------------------------------------------------- logging and predict
def test_grad_norms_and_lr_are_logged_exactly_when_lightning_logs_steps(tmp_path):
    model = Sequential({"encoder": Parallel({"a": nn.Linear(4, 4), "b": nn.Linear(4, 4)}, combine="sum"), "head": nn.Linear(4, 3)})
    logger = pl.loggers.CSVLogger(tmp_path, name="", version="")
    t = trainer(logger=logger, log_every_n_steps=3, max_epochs=2)  # 4 steps an epoch, 8 in all
    t.fit(CompositeModule(model, nn.CrossEntropyLoss(), ADAM), loader())
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    steps = lambda key: [int(r["step"]) for r in rows if r.get(key)]  # noqa: E731
    norms = ["grad_norm/encoder.a", "grad_norm/encoder.b", "grad_norm/head"]
    assert sorted(k for k in rows[0] if k.startswith("grad_norm/")) == norms  # one per sub-model
    assert steps("train/loss_step") == [2, 5]
    assert all(steps(key) == [2, 5] for key in [*norms, "lr/default"])
    assert all(float(r["grad_norm/head"]) > 0 for r in rows if r.get("grad_norm/head"))
    assert float(rows[0]["lr/default"]) == pytest.approx(1e-3)


def test_metrics_are_cloned_per_stage_and_logged_with_prefixes():
    from torchmetrics import MetricCollection
    from torchmetrics.classification import MulticlassAccuracy

    metrics = MetricCollection({"acc": MulticlassAccuracy(num_classes=3)})
    module = CompositeModule(two_stage(), nn.CrossEntropyLoss(), ADAM, metrics=metrics)
    assert len({id(module.train_metrics), id(module.val_metrics), id(module.test_metrics), id(metrics)}) == 4
    t = trainer(limit_val_batches=2)
    t.fit(module, loader(), loader())
    assert set(t.logged_metrics) == {"train/acc", "train/loss_step", "train/loss_epoch", "val/acc", "val/loss"}
    t.test(module, loader(), verbose=False)
    assert set(t.logged_metrics) == {"test/acc", "test/loss"}


def test_predict_step_returns_model_outputs():
    module = CompositeModule(two_stage(), nn.CrossEntropyLoss(), ADAM)
    outputs = trainer().predict(module, loader(n=10, batch_size=4))
    assert [tuple(o.shape) for o in outputs] == [(4, 3), (4, 3), (2, 3)]
    x = next(iter(loader(n=10, batch_size=4)))[0]
    assert torch.equal(outputs[0], module.model(x).detach())


def test_setup_prepares_ddp_for_routed_branches():
    routed = Sequential({"experts": Conditional({"a": nn.Linear(4, 4), "b": nn.Linear(4, 4)}, router=nn.Linear(4, 2))})
    for model, expected in [(routed, True), (two_stage(), None)]:
        t = trainer(strategy="ddp", devices=2)  # nothing is launched before fit
        module = CompositeModule(model, nn.CrossEntropyLoss(), ADAM)
        module.trainer = t
        module.setup("fit")
        assert t.strategy._ddp_kwargs.get("find_unused_parameters") is expected


def test_load_balancing_adds_the_gates_auxiliary_loss_to_the_training_loss():
    gate = nn.Linear(4, 2)
    nn.init.constant_(gate.weight, 0.0)
    gate.bias.data = torch.tensor([3.0, 0.0])  # every sample goes to branch "a": unbalanced
    model = Conditional({"a": nn.Linear(4, 3), "b": nn.Linear(4, 3)}, router=gate)
    x, y = torch.ones(6, 4), torch.zeros(6, dtype=torch.long)
    plain = CompositeModule(model, nn.CrossEntropyLoss(), partial(torch.optim.SGD, lr=0.1))
    balanced = CompositeModule(model, nn.CrossEntropyLoss(), partial(torch.optim.SGD, lr=0.1), load_balancing=0.5)
    base = plain.training_step((x, y), 0)
    aux = model.load_balancing_loss()
    assert aux.item() == pytest.approx(2 * torch.sigmoid(torch.tensor(3.0)).item())
    assert balanced.training_step((x, y), 0).item() == pytest.approx(base.item() + 0.5 * aux.item())
    assert balanced.validation_step((x, y), 0).item() == pytest.approx(base.item())
