"""GradientGuardCallback: the guard for a user's own LightningModule, the same one CompositeModule runs."""

from __future__ import annotations

import csv
import warnings
from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from composites import CompositeModule, Conditional, GradientFlowError, GradientGuardCallback
from composites.training import GUARD_MODES, GradNormPlot, GuardMode
from tests.processes import share_script


class Detached(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x).detach()


class UserModule(pl.LightningModule):
    """A LightningModule of a user's own: no CompositeModule, the sub-models as attributes."""

    def __init__(self, middle: nn.Module | None = None):
        super().__init__()
        self.encoder, self.middle, self.head = nn.Linear(4, 4), middle or nn.Identity(), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.middle(self.encoder(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader(n: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)), 8)


def trainer(callbacks, **kwargs) -> pl.Trainer:
    options = dict(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    return pl.Trainer(callbacks=callbacks, enable_model_summary=False, **{**options, **kwargs})


def test_raise_stops_a_users_lightning_module_before_the_optimizer_steps_naming_its_parameters():
    module = UserModule(Detached())
    before = module.encoder.weight.detach().clone()
    t = trainer([GradientGuardCallback("raise")])
    with pytest.raises(GradientFlowError) as info:
        t.fit(module, loader())
    assert {(p.parameter, p.module, p.cause) for p in info.value.problems} == {
        ("encoder.weight", "encoder", "detached"),
        ("encoder.bias", "encoder", "detached"),
        ("middle.lin.weight", "middle.lin", "detached"),
        ("middle.lin.bias", "middle.lin", "detached"),
    }
    assert t.global_step == 0 and torch.equal(module.encoder.weight, before)


def test_warn_trains_on_warns_once_and_logs_sub_model_grad_norms_at_lightnings_cadence(tmp_path):
    callback = GradientGuardCallback("warn")
    logger = pl.loggers.CSVLogger(tmp_path, name="", version="")
    t = trainer([callback], logger=logger, log_every_n_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(UserModule(Detached()), loader())
    assert t.global_step == 4
    assert len([w for w in caught if "gradient guard" in str(w.message)]) == 1
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows if r.get("grad_norm/head")] == [1, 3]
    assert sorted(k for k in rows[0] if k.startswith("grad_norm/")) == ["grad_norm/head"]  # the only one reached
    assert callback.attached is False  # hooks removed when fit ends


def test_off_does_nothing_and_the_guard_is_never_built():
    callback = GradientGuardCallback("off")
    trainer([callback]).fit(UserModule(Detached()), loader())
    assert callback.guard is None and callback.report is None


def test_may_skip_patterns_reach_the_guard_and_excuse_those_parameters():
    class SkipsMiddle(UserModule):
        def forward(self, x):
            return self.head(self.encoder(x))  # 'middle' never runs: LayerDrop-like, on purpose

    callback = GradientGuardCallback("raise", may_skip=["middle.*"], starved_after=None)
    trainer([callback]).fit(SkipsMiddle(nn.Linear(4, 4)), loader())
    assert callback.report.ok and callback.report.inactive == 2
    with pytest.raises(GradientFlowError, match="middle.weight"):
        trainer([GradientGuardCallback("raise")]).fit(SkipsMiddle(nn.Linear(4, 4)), loader())


def test_the_plot_records_what_the_guard_callback_computed_for_a_users_module(tmp_path):
    plot = GradNormPlot(dirpath=tmp_path, every_n_steps=1)
    trainer([GradientGuardCallback("warn"), plot]).fit(UserModule(), loader())
    assert sorted(plot.history) == ["encoder", "head"]
    assert [s for s, _ in plot.history["head"]] == [0, 1, 2, 3]


def test_composite_module_runs_the_same_callback_and_refuses_a_second_guard():
    module = CompositeModule(
        nn.Sequential(nn.Linear(4, 3)), nn.CrossEntropyLoss(), partial(torch.optim.SGD, lr=0.1), guard="warn"
    )
    assert isinstance(module.guard_callback, GradientGuardCallback) and module.guard_mode == "warn"
    with pytest.raises(
        ValueError, match=r"runs the gradient guard itself \(guard='warn'\).*guard=GradientGuardCallback"
    ):
        trainer([GradientGuardCallback("raise")]).fit(module, loader())


def test_composite_module_takes_a_configured_callback_and_keeps_its_mode_in_hparams():
    callback = GradientGuardCallback("warn", non_finite_patience=2)
    module = CompositeModule(
        nn.Sequential(nn.Linear(4, 3)), nn.CrossEntropyLoss(), partial(torch.optim.SGD, lr=0.1), guard=callback
    )
    trainer([]).fit(module, loader())
    assert module.guard_callback is callback and module.hparams.guard == "warn" and callback.report.ok


def test_one_list_of_guard_modes_serves_the_module_the_callback_and_the_hydra_schema():
    from composites_hydra.schema import GuardMode as SchemaGuardMode

    assert GUARD_MODES == ("raise", "warn", "off") and SchemaGuardMode is GuardMode
    assert [m.value for m in GuardMode] == list(GUARD_MODES)
    with pytest.raises(ValueError, match="guard='rase' is not one of raise, warn, off"):
        GradientGuardCallback("rase")


def test_a_routed_users_module_under_ddp_gets_find_unused_parameters_from_the_callback():
    class Routed(UserModule):
        def __init__(self):
            super().__init__(Conditional({"a": nn.Linear(4, 4), "b": nn.Linear(4, 4)}, router=nn.Linear(4, 2)))

    t = pl.Trainer(strategy="ddp", devices=2, accelerator="cpu", logger=False)  # nothing launched before fit
    GradientGuardCallback("raise").setup(t, Routed(), "fit")
    assert t.strategy._ddp_kwargs.get("find_unused_parameters") is True


DDP_SCRIPT = """
import json, sys
import lightning as L, torch, torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from composites import Conditional, GradientFlowError
from composites.training.lightning import GradientGuardCallback  # the Trainer is lightning's

class Routed(L.LightningModule):  # rank 0 routes every batch to 'a', rank 1 to 'b'
    def __init__(self, cut=False):
        super().__init__()
        self.cut = cut
        self.encoder = nn.Linear(4, 4)
        self.experts = Conditional({"a": nn.Linear(4, 4), "b": nn.Linear(4, 4)}, router=lambda x: "ab"[dist.get_rank()])
        self.head = nn.Linear(4, 3)
    def training_step(self, batch, batch_idx):
        h = self.encoder(batch[0])
        h = h.detach() if self.cut else h
        return nn.functional.cross_entropy(self.head(self.experts(h)), batch[1])
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

g = torch.Generator().manual_seed(0)
data = DataLoader(TensorDataset(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)), batch_size=4)
def fit(module, callback):
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False, callbacks=[callback],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data)
    return trainer
callback = GradientGuardCallback("raise")
trainer = fit(Routed(), callback)
out = {"steps": trainer.global_step, "ok": callback.report.ok, "inactive": callback.report.inactive_names}
json.dump(out, open(f"{sys.argv[1]}/rank{trainer.global_rank}.json", "w"))
try:
    fit(Routed(cut=True), GradientGuardCallback("raise"))
except GradientFlowError as error:
    json.dump(sorted((p.parameter, p.cause) for p in error.problems), open(f"{sys.argv[1]}/raised.json", "w"))
"""


share_script("ddp_guard", DDP_SCRIPT)  # run with the session's other 2-rank Lightning scripts


@pytest.mark.slow
def test_under_lightning_ddp_a_routed_users_module_trains_and_a_cut_raises_on_rank_zero(shared_scripts):
    import json

    folder = shared_scripts("ddp_guard")
    ranks = [json.loads((folder / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == {"steps": 2, "ok": True, "inactive": ["experts.b.bias", "experts.b.weight"]}
    assert ranks[1] == {"steps": 2, "ok": True, "inactive": ["experts.a.bias", "experts.a.weight"]}
    raised = json.loads((folder / "raised.json").read_text())
    # the parameters exactly; the cause is G1's to pin: single-process says "detached", Lightning DDP "unused" (reported)
    assert [parameter for parameter, _ in raised] == ["encoder.bias", "encoder.weight"]
