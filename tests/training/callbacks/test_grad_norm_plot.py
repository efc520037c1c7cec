"""Gradient-flow views: the per-sub-model tree and table, the tree PNG, and the grad-norm callback."""

from __future__ import annotations

import csv
from functools import partial
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from composites import CompositeModule, Conditional, Parallel, Sequential
from composites.training import GradNormPlot
from composites.views import check_gradient_flow, draw_flow_tree, format_flow, rows
from tests import ROOT  # noqa: E402
from tests.stand_ins import check_png


class Cut(nn.Module):
    def forward(self, x):
        return x.detach()


class Aux(nn.Module):
    """A user model holding a composite, with a head and an auxiliary layer it never calls."""

    def __init__(self):
        super().__init__()
        self.body = Parallel({"a": nn.Linear(4, 3), "b": nn.Linear(4, 3)}, combine="sum")
        self.head = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
        self.aux = nn.Linear(4, 4)

    def forward(self, x):
        return self.head(self.body(x))


def batch(n=8, classes=2):
    torch.manual_seed(0)
    return torch.randn(n, 4), torch.randint(0, classes, (n,))


def statuses(tree):
    return {n.label: n.status for n in rows(tree)}


def test_conditional_inactive_frozen_and_parameterless(tmp_path):
    moe = Conditional({"e0": nn.Linear(4, 4), "e1": nn.Linear(4, 4), "e2": nn.Linear(4, 4)}, router=lambda x: "e1")
    model = Sequential({"embed": nn.Linear(4, 4), "act": nn.ReLU(), "experts": moe, "head": nn.Linear(4, 2)})
    model.embed.requires_grad_(False)
    tree, report = check_gradient_flow(model, nn.CrossEntropyLoss(), batch())
    assert report.ok
    assert statuses(tree) == {
        "embed": "frozen",
        "act": "no params",
        "experts.e0": "inactive",
        "experts.e1": "ok",
        "experts.e2": "inactive",
        "head": "ok",
    }
    e0 = next(n for n in tree.walk() if n.path == "experts.e0")
    assert (e0.parameters, e0.trainable, e0.inactive, e0.grad_norm) == (2, 2, 2, None)
    assert [n.role for n in tree.children] == ["stage 1", "stage 2", "stage 3", "stage 4"]
    table = format_flow(tree).splitlines()
    assert table[0].split() == [
        "sub-model",
        "type",
        "size",
        "parameters",
        "trainable",
        "frozen",
        "inactive",
        "grad",
        "norm",
        "status",
    ]
    assert [line.split()[0] for line in table[1:]] == ["embed", "act", "experts.e0", "experts.e1", "experts.e2", "head"]
    check_png(draw_flow_tree(tree, tmp_path / "conditional.png"))


def test_user_model_tree_opens_only_what_holds_a_composite(tmp_path):
    tree, report = check_gradient_flow(Aux(), nn.CrossEntropyLoss(), batch())
    assert [c.path for c in tree.children] == ["body", "head", "aux"]
    assert [c.path for c in tree.children[0].children] == ["body.a", "body.b"]
    assert tree.children[1].children == []  # a plain nn.Sequential is one sub-model
    assert statuses(tree) == {"body.a": "ok", "body.b": "ok", "head": "ok", "aux": "unused"}
    assert not report.ok and tree.children[1].grad_norm > 0
    check_png(draw_flow_tree(tree, tmp_path / "user.png"))


def test_plain_module_is_its_top_level_children():
    model = nn.Sequential(nn.Linear(4, 4), Cut(), nn.Linear(4, 2))
    tree, report = check_gradient_flow(model, nn.CrossEntropyLoss(), batch())
    assert statuses(tree) == {"0": "detached", "1": "no params", "2": "ok"}
    assert [p.cause for p in report.problems] == ["detached", "detached"]


def test_missing_from_optimizer_is_a_problem():
    model = Sequential({"encoder": nn.Linear(4, 4), "head": nn.Linear(4, 2)})
    optimizer = torch.optim.SGD(model.head.parameters(), lr=0.1)
    tree, report = check_gradient_flow(model, nn.CrossEntropyLoss(), batch(), optimizer)
    assert statuses(tree) == {"encoder": "not_in_optimizer", "head": "ok"}


# ---------------------------------------------------------------- the training callback
def fit(tmp_path, model, guard="raise", steps=12, every=2):
    x, y = batch(n=8 * steps)
    module = CompositeModule(model, nn.CrossEntropyLoss(), partial(torch.optim.SGD, lr=0.1), guard=guard)
    callback = GradNormPlot()
    trainer = pl.Trainer(
        max_epochs=1,
        log_every_n_steps=every,
        callbacks=[callback],
        default_root_dir=tmp_path,
        logger=pl.loggers.CSVLogger(tmp_path, name="logs", version=""),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=8))
    with open(tmp_path / "logs" / "metrics.csv") as f:
        logged = [row for row in csv.DictReader(f)]
    return callback, logged


def logged_norms(logged, name):
    return [(int(r["step"]), float(r[f"grad_norm/{name}"])) for r in logged if r.get(f"grad_norm/{name}")]


def test_callback_plots_what_the_module_logs(tmp_path):
    model = Sequential({"encoder": nn.Linear(4, 4), "head": nn.Linear(4, 2)})
    callback, logged = fit(tmp_path, model)
    assert callback.path == tmp_path / "grad_norms.png"
    check_png(callback.path, min_width=1000)
    assert set(callback.history) == {"encoder", "head"} and callback.problem_steps == []
    for name in ("encoder", "head"):
        assert [s for s, _ in callback.history[name]] == [1, 3, 5, 7, 9, 11]
        assert [(s, round(v, 6)) for s, v in callback.history[name]] == [
            (s, round(v, 6)) for s, v in logged_norms(logged, name)
        ]


def test_callback_logs_norms_itself_with_guard_off_and_marks_problems_under_warn(tmp_path):
    model = Sequential({"encoder": nn.Linear(4, 4), "head": nn.Linear(4, 2)})
    callback, logged = fit(tmp_path / "off", model, guard="off")
    assert [s for s, _ in logged_norms(logged, "head")] == [1, 3, 5, 7, 9, 11]  # logged by the callback
    assert callback.history["head"] == logged_norms(logged, "head")

    model = Sequential({"encoder": nn.Linear(4, 4), "cut": Cut(), "head": nn.Linear(4, 2)})
    callback, _ = fit(tmp_path / "warn", model, guard="warn")
    assert callback.problem_steps == list(range(12))
    assert callback.history["encoder"] == []  # listed, never got a gradient
    check_png(callback.path, min_width=1000)


def test_default_callbacks_include_the_gradient_plot(tmp_path):
    from composites_hydra import register_configs  # train.yaml's defaults start with the schema

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["+composite=sequential", f"paths.output_dir={tmp_path}"])
    assert set(cfg.callbacks) >= {"checkpoint", "gradient_plot"}
    callback = instantiate(cfg.callbacks.gradient_plot)
    assert isinstance(callback, GradNormPlot) and Path(callback.dirpath) == tmp_path


def test_a_resumed_fit_keeps_the_earlier_steps_in_the_plot(tmp_path):
    x, y = batch(n=32)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)  # 4 steps per epoch

    def run(max_epochs, ckpt_path=None):
        model = Sequential({"encoder": nn.Linear(4, 4), "head": nn.Linear(4, 2)})
        callback = GradNormPlot(every_n_steps=2)
        trainer = pl.Trainer(
            max_epochs=max_epochs,
            callbacks=[callback],
            default_root_dir=tmp_path,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(
            CompositeModule(model, nn.CrossEntropyLoss(), partial(torch.optim.SGD, lr=0.1)), loader, ckpt_path=ckpt_path
        )
        return callback, trainer

    _, trainer = run(1)
    callback, _ = run(2, ckpt_path=trainer.checkpoint_callback.best_model_path)
    assert [step for step, _ in callback.history["encoder"]] == [1, 3, 5, 7]  # 1, 3 from the first fit
