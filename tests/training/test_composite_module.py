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

from composites import CompositeModule, Conditional, GradientFlowError, GradientGuardCallback, Parallel, Sequential
from tests.processes import share_script

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
    return DataLoader(
        TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)), batch_size=batch_size
    )


def trainer(**kwargs) -> pl.Trainer:
    options = dict(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
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
    assert ids == [
        [id(shared.weight), id(shared.bias)],
        [id(model.b.weight), id(model.head.bias), id(model.head.weight)],
    ]
    flat = [i for group in ids for i in group]
    assert len(flat) == len(set(flat)) == len({id(p) for p in model.parameters()}) == 5


def test_frozen_parameters_are_left_out_and_a_fully_frozen_group_is_dropped():
    model = two_stage()
    model.encoder.requires_grad_(False)
    ids = optimizer_ids(
        CompositeModule(model, nn.CrossEntropyLoss(), ADAM, param_groups=[{"prefix": "encoder", "lr": 0.1}])
    )
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
    with pytest.raises(
        ValueError, match=r"prefix 'decoder' matches no parameter; top-level sub-models are: encoder, head$"
    ):
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
        ("encoder.weight", "encoder", "detached"),
        ("encoder.bias", "encoder", "detached"),
        ("broken.lin.weight", "broken", "detached"),
        ("broken.lin.bias", "broken", "detached"),
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

    model = Sequential(
        {
            "experts": Conditional({"a": nn.Linear(4, 4), "b": nn.Linear(4, 4)}, router=TrainEvalGate()),
            "head": nn.Linear(4, 3),
        }
    )
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
    assert module.guard is not None and not module.guard.attached


# ---------------------------------------------------------------- logging and predict
def test_grad_norms_and_lr_are_logged_exactly_when_lightning_logs_steps(tmp_path):
    model = Sequential(
        {"encoder": Parallel({"a": nn.Linear(4, 4), "b": nn.Linear(4, 4)}, combine="sum"), "head": nn.Linear(4, 3)}
    )
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


def micro_accuracy():
    from torchmetrics import MetricCollection
    from torchmetrics.classification import MulticlassAccuracy

    return MetricCollection({"acc": MulticlassAccuracy(num_classes=3, average="micro")})  # correct / seen


class Recorder(pl.Callback):
    """What every step computed, seen apart from logging: (loss, batch size, correct) per stage and epoch."""

    def __init__(self):
        self.seen: dict[tuple[str, int], list[tuple[float, int, int]]] = {}
        self.step_loss: dict[int, float] = {}
        self.balance: dict[int, list[tuple[float, int]]] = {}

    def _correct(self, module, batch) -> int:
        with torch.no_grad():
            return int((module(batch[0]).argmax(-1) == batch[1]).sum())

    def _add(self, trainer, stage, loss, batch, correct):
        self.seen.setdefault((stage, trainer.current_epoch), []).append((float(loss), len(batch[1]), correct))

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._train_correct = self._correct(module, batch)  # before the step changes the weights

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self._add(trainer, "train", outputs["loss"], batch, self._train_correct)
        self.step_loss[trainer.global_step - 1] = float(outputs["loss"])
        if module.gates:
            self.balance.setdefault(trainer.current_epoch, []).append(
                (float(module.model.load_balancing_loss()), len(batch[1]))
            )

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:  # the sanity check must leave no trace in val/*
            self._add(trainer, "val", outputs, batch, self._correct(module, batch))

    def on_test_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
        self._add(trainer, "test", outputs, batch, self._correct(module, batch))

    def loss(self, stage: str, epoch: int) -> float:
        """The sample-weighted mean over the epoch's batches, as per-step logging with batch_size=n gave."""
        rows = self.seen[(stage, epoch)]
        return sum(loss * n for loss, n, _ in rows) / sum(n for _, n, _ in rows)

    def acc(self, stage: str, epoch: int) -> float:
        rows = self.seen[(stage, epoch)]
        return sum(c for _, _, c in rows) / sum(n for _, n, _ in rows)


def csv_rows(path) -> list[dict[str, str]]:
    with open(path / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_epoch_values_are_sample_weighted_means_of_what_each_step_computed(tmp_path):
    rec = Recorder()
    module = CompositeModule(
        two_stage(), nn.CrossEntropyLoss(), partial(torch.optim.SGD, lr=0.5), metrics=micro_accuracy()
    )
    logger = pl.loggers.CSVLogger(tmp_path, name="", version="")
    t = trainer(
        logger=logger,
        max_epochs=2,
        log_every_n_steps=3,
        callbacks=[rec],
        limit_val_batches=None,
        num_sanity_val_steps=1,
    )
    t.fit(module, loader(n=30, batch_size=8), loader(n=21, batch_size=5))  # batches of 8,8,8,6 and 5,5,5,5,1
    rows = csv_rows(tmp_path)
    for epoch in (0, 1):
        row = lambda key, epoch=epoch: next(r for r in rows if r.get(key) and int(r["epoch"]) == epoch)  # noqa: E731
        assert float(row("train/loss_epoch")["train/loss_epoch"]) == pytest.approx(rec.loss("train", epoch), rel=1e-6)
        assert float(row("train/acc")["train/acc"]) == pytest.approx(rec.acc("train", epoch), rel=1e-6)
        assert float(row("val/loss")["val/loss"]) == pytest.approx(rec.loss("val", epoch), rel=1e-6)
        assert float(row("val/acc")["val/acc"]) == pytest.approx(rec.acc("val", epoch), rel=1e-6)
    unweighted = sum(loss for loss, _, _ in rec.seen[("val", 1)]) / 5
    assert unweighted != pytest.approx(rec.loss("val", 1), rel=1e-3)  # so the check above tells the two apart
    steps = {int(r["step"]): float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")}
    assert steps == pytest.approx(
        {2: rec.step_loss[2], 5: rec.step_loss[5]}, rel=1e-6
    )  # steps 3 and 7 are never written
    assert t.callback_metrics["train/loss"].item() == pytest.approx(rec.loss("train", 1), rel=1e-6)  # monitorable
    assert t.callback_metrics["train/loss_step"].item() == pytest.approx(rec.step_loss[7], rel=1e-6)  # the last step

    done = t.current_epoch  # what the Recorder files test and validate runs after fit under
    results = t.test(module, loader(n=17, batch_size=4), verbose=False)  # 4,4,4,4,1
    assert results[0] == pytest.approx(
        {"test/loss": rec.loss("test", done), "test/acc": rec.acc("test", done)}, rel=1e-6
    )
    results = t.validate(module, loader(n=21, batch_size=5), verbose=False)
    assert results[0] == pytest.approx({"val/loss": rec.loss("val", done), "val/acc": rec.acc("val", done)}, rel=1e-6)


def test_self_log_runs_per_step_only_on_steps_lightning_writes():
    calls: list[tuple[str, int, str]] = []

    class Counting(CompositeModule):
        def log(self, name, *args, **kwargs):
            calls.append((self._current_fx_name, self.trainer.global_step, name))
            super().log(name, *args, **kwargs)

    module = Counting(two_stage(), nn.CrossEntropyLoss(), ADAM, metrics=micro_accuracy(), guard="off")
    t = trainer(max_epochs=2, log_every_n_steps=3, limit_val_batches=2)
    t.fit(module, loader(), loader())  # 4 steps an epoch: written at steps 2 and 5; 3 and 7 end an epoch
    assert [(fx, step) for fx, step, _ in calls if fx in ("training_step", "validation_step")] == [
        ("training_step", 2),
        ("training_step", 3),
        ("training_step", 5),
        ("training_step", 7),
    ]
    assert {name for fx, _, name in calls if fx == "on_train_epoch_end"} == {
        "train/loss_epoch",
        "train/loss",
        "train/acc",
    }
    assert {name for fx, _, name in calls if fx == "on_validation_epoch_end"} == {"val/loss", "val/acc"}


def test_fast_dev_run_logs_every_key():
    t = trainer(fast_dev_run=True)
    t.fit(CompositeModule(two_stage(), nn.CrossEntropyLoss(), ADAM, metrics=micro_accuracy()), loader(), loader())
    assert set(t.logged_metrics) >= {
        "train/loss_step",
        "train/loss_epoch",
        "train/acc",
        "val/loss",
        "val/acc",
        "lr/default",
    }


def test_load_balancing_is_logged_at_the_step_cadence_and_as_an_epoch_mean(tmp_path):
    model = Conditional({"a": nn.Linear(4, 3), "b": nn.Linear(4, 3)}, router=nn.Linear(4, 2))
    rec = Recorder()
    logger = pl.loggers.CSVLogger(tmp_path, name="", version="")
    t = trainer(logger=logger, log_every_n_steps=2, callbacks=[rec])
    t.fit(CompositeModule(model, nn.CrossEntropyLoss(), ADAM, load_balancing=0.1), loader(n=30, batch_size=8))
    rows = csv_rows(tmp_path)
    steps = {int(r["step"]): float(r["train/load_balancing_step"]) for r in rows if r.get("train/load_balancing_step")}
    assert steps == pytest.approx({1: rec.balance[0][1][0], 3: rec.balance[0][3][0]}, rel=1e-6)
    mean = sum(b * n for b, n in rec.balance[0]) / sum(n for _, n in rec.balance[0])
    (epoch_row,) = [r for r in rows if r.get("train/load_balancing_epoch")]
    assert float(epoch_row["train/load_balancing_epoch"]) == pytest.approx(mean, rel=1e-6)
    assert t.callback_metrics["train/load_balancing"].item() == pytest.approx(mean, rel=1e-6)


DDP_VALIDATE = """
import json, sys
from functools import partial
import pytorch_lightning as pl, torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests import ROOT
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy
from composites import CompositeModule, Sequential

class Data(pl.LightningDataModule):
    def val_dataloader(self):  # rank r: 10 + r samples in batches of 4 + r (4,4,2 and 5,5,1)
        r = self.trainer.global_rank
        g = torch.Generator().manual_seed(r)
        x, y = torch.randn(10 + r, 4, generator=g), torch.randint(0, 3, (10 + r,), generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=4 + r)

torch.manual_seed(0)
model = Sequential({"encoder": nn.Linear(4, 4), "head": nn.Linear(4, 3)})
metrics = MetricCollection({"acc": MulticlassAccuracy(num_classes=3, average="micro")})
module = CompositeModule(model, nn.CrossEntropyLoss(), partial(torch.optim.SGD, lr=0.1), metrics=metrics)
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, use_distributed_sampler=False)
data = Data()
logged = {k: float(v) for k, v in trainer.validate(module, datamodule=data, verbose=False)[0].items()}
with torch.no_grad():
    seen = [(nn.functional.cross_entropy(model(x), y).item(), len(y), int((model(x).argmax(-1) == y).sum())) for x, y in data.val_dataloader()]
json.dump({"logged": logged, "seen": seen}, open(f"{sys.argv[1]}/rank{trainer.global_rank}.json", "w"))
"""


share_script("ddp_validate", DDP_VALIDATE)  # run with the session's other 2-rank Lightning scripts


@pytest.mark.slow
def test_val_loss_and_metrics_under_ddp_are_the_global_sample_weighted_values_on_every_rank(shared_scripts):
    import json

    folder = shared_scripts("ddp_validate")
    ranks = [json.loads((folder / f"rank{r}.json").read_text()) for r in (0, 1)]
    seen = [row for rank in ranks for row in rank["seen"]]  # 21 samples over both ranks
    loss = sum(l * n for l, n, _ in seen) / sum(n for _, n, _ in seen)
    acc = sum(c for _, _, c in seen) / sum(n for _, n, _ in seen)
    for rank in ranks:
        assert rank["logged"] == pytest.approx({"val/loss": loss, "val/acc": acc}, rel=1e-6)
    said = "".join((folder / f"stderr.rank{r}.txt").read_text() for r in (0, 1))
    assert "sync_dist=True" not in said  # values are synced by torchmetrics, not left per rank


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


def test_setup_prepares_ddp_for_may_skip_parameters():
    t = trainer(strategy="ddp", devices=2)  # nothing is launched before fit
    guard = GradientGuardCallback("raise", may_skip=["encoder.*"])
    module = CompositeModule(two_stage(), nn.CrossEntropyLoss(), ADAM, guard=guard)
    module.trainer = t
    module.setup("fit")
    assert t.strategy._ddp_kwargs.get("find_unused_parameters") is True


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


def test_capacity_routing_logs_the_dropped_fraction_per_stage():
    # every sample scores expert 'a' highest; capacity ceil(0.5 * 8 / 2) = 2 of each 8 pairs
    gate = nn.Linear(4, 2)
    with torch.no_grad():
        gate.weight.zero_()
        gate.bias.copy_(torch.tensor([5.0, 0.0]))
    model = Sequential(
        {
            "experts": Conditional({"a": nn.Linear(4, 3), "b": nn.Linear(4, 3)}, router=gate, capacity_factor=0.5),
        }
    )
    t = trainer(limit_val_batches=None)
    t.fit(CompositeModule(model, nn.CrossEntropyLoss(), ADAM), loader(n=16), loader(n=16))  # the guard passes too
    assert t.callback_metrics["train/dropped_epoch"].item() == pytest.approx(6 / 8)
    assert t.callback_metrics["val/dropped"].item() == pytest.approx(6 / 8)
    t.test(t.lightning_module, loader(n=16), verbose=False)
    assert t.callback_metrics["test/dropped"].item() == pytest.approx(6 / 8)
