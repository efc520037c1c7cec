"""trainer=pipeline through Lightning: two gloo processes, one launched script serves every assertion.

The script fits a three-stage Sequential split over two ranks (global-norm clipping, gradient
accumulation and validation on) for one epoch, resumes it from its checkpoint for a second, and
replays the same steps in a plain single-process loop; the checkpoints hold every stage under the
single-process keys. Then one guarded step of a model cut at the pipeline boundary.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.processes import run_script

SCRIPT = """
import json, sys
from functools import partial
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from composites import CompositeModule, Sequential
from composites.training import PipelineStrategy

root = Path(sys.argv[1])
CLIP = 0.1


def model():
    torch.manual_seed(0)
    return Sequential({"encoder": nn.Sequential(nn.Linear(4, 8), nn.ReLU()), "proj": nn.Linear(8, 8), "head": nn.Linear(8, 3)})


def loader():
    g = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g)), batch_size=8)


def fit(epochs, folder, ckpt=None):
    module = CompositeModule(model(), nn.CrossEntropyLoss(), partial(torch.optim.Adam, lr=1e-2))
    strategy = PipelineStrategy(split=[["encoder", "proj"], ["head"]], schedule="1f1b", n_microbatches=2)
    # the loader's own order (no DistributedSampler: both ranks of the one pipeline read the same batches)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=epochs, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root / folder),
                         gradient_clip_val=CLIP, accumulate_grad_batches=2, use_distributed_sampler=False)
    trainer.fit(module, train_dataloaders=loader(), val_dataloaders=loader(), ckpt_path=ckpt)
    return trainer, module


trainer, module = fit(1, "first")
held = sorted(n for n, _ in module.model.named_parameters())
first_ckpt = next((root / "first" / "checkpoints").glob("*.ckpt"))
fit(2, "resumed", ckpt=str(first_ckpt))


class Detached(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x).detach()


cut = model()
cut.proj = Detached(cut.proj)  # the last stage of pipeline stage 0 sends its output without gradient
guarded = CompositeModule(cut, nn.CrossEntropyLoss(), partial(torch.optim.Adam, lr=1e-2), guard="warn")
pl.Trainer(accelerator="cpu", devices=2, strategy=PipelineStrategy(split=[["encoder", "proj"], ["head"]]),
           max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
           enable_checkpointing=False, default_root_dir=str(root / "cut")).fit(guarded, train_dataloaders=loader())
table = [[p.parameter, p.cause, p.where] for p in guarded.report.problems]
Path(root, f"rank{trainer.global_rank}.json").write_text(json.dumps({"held": held, "table": table}))
if trainer.global_rank == 0:
    resumed = torch.load(next((root / "resumed" / "checkpoints").glob("*.ckpt")), weights_only=True)["state_dict"]
    reference = model()  # the same steps in a plain loop, one process
    optimizer = torch.optim.Adam(reference.parameters(), lr=1e-2)
    norms = []
    for _ in range(2):
        for i, (x, y) in enumerate(loader()):
            (nn.functional.cross_entropy(reference(x), y) / 2).backward()
            if i % 2 == 1:
                norms.append(float(nn.utils.clip_grad_norm_(reference.parameters(), CLIP)))
                optimizer.step()
                optimizer.zero_grad()
    single = CompositeModule(model(), nn.CrossEntropyLoss(), partial(torch.optim.Adam, lr=1e-2))
    single.load_state_dict(resumed)  # strict: the full-state export is the single-process module's
    expected = {f"model.{n}": p for n, p in reference.named_parameters()}
    Path(root, "found.json").write_text(json.dumps({
        "keys": sorted(k for k in resumed if k.startswith("model.")),
        "expected_keys": sorted(expected),
        "resumed_error": max((resumed[k] - p).abs().max().item() for k, p in expected.items()),
        "clipped": sum(n > CLIP for n in norms),
    }))
"""


@pytest.fixture(scope="module")
def found(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("pipeline_strategy")
    done = run_script(folder / "fit.py", SCRIPT, str(folder), timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(Path(folder, "found.json").read_text())
    result["ranks"] = [json.loads(Path(folder, f"rank{r}.json").read_text()) for r in range(2)]
    result["stdout"] = done.stdout + done.stderr
    return result


@pytest.mark.slow
def test_each_rank_keeps_and_steps_its_own_stage(found: dict) -> None:
    assert found["ranks"][0]["held"] == ["encoder.0.bias", "encoder.0.weight", "proj.bias", "proj.weight"]
    assert found["ranks"][1]["held"] == ["head.bias", "head.weight"]
    assert "pipeline: stage 0 [encoder, proj] on rank 0 | stage 1 [head] on rank 1" in found["stdout"]


@pytest.mark.slow
def test_resumed_training_matches_the_single_process_loop_with_global_norm_clipping(found: dict) -> None:
    assert found["clipped"] > 0  # the clipping did act, so a per-stage norm would have given other numbers
    assert found["resumed_error"] <= 1e-5


@pytest.mark.slow
def test_checkpoint_holds_every_stage_under_the_single_process_keys(found: dict) -> None:
    assert found["keys"] == found["expected_keys"]


@pytest.mark.slow
def test_guard_names_the_cut_boundary_on_every_rank(found: dict) -> None:
    tables = [r["table"] for r in found["ranks"]]
    assert tables[0] == tables[1]
    upstream = {"encoder.0.weight", "encoder.0.bias", "proj.inner.weight", "proj.inner.bias"}
    assert {name for name, _, _ in tables[0]} == upstream
    assert all(cause == "detached" for _, cause, _ in tables[0])
    boundary = "between stage 'proj' (rank 0) and stage 'head' (rank 1)"
    assert all(where.startswith(boundary) for _, _, where in tables[0])
