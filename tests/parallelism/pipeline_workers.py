"""What the spawned ranks of the pipeline tests run: scenarios of ``tests.gloo_ranks``'s one spawn.

Each scenario runs inside a default process group of its world size and returns what this rank
found; the test reads every rank's result.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from composites import GradientFlowError, Sequential
from composites.parallelism import Pipeline
from composites.parallelism.pipeline import pipeline_groups
from composites.parallelism.pipeline_guard import PipelineGuard

BATCH, WIDTH = 8, 4


def four_stage_model() -> Sequential:
    """Four stages of Linear (+ReLU), deterministic weights: the same model on every rank."""
    torch.manual_seed(0)
    stages = {
        "encoder": nn.Sequential(nn.Linear(WIDTH, 6), nn.ReLU()),
        "mixer": nn.Sequential(nn.Linear(6, 6), nn.ReLU()),
        "proj": nn.Sequential(nn.Linear(6, 5), nn.ReLU()),
        "head": nn.Linear(5, 3),
    }
    return Sequential(stages)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, WIDTH, generator=g), torch.randn(BATCH, 3, generator=g)


def reference(lr: float = 0.1) -> tuple[float, dict[str, torch.Tensor]]:
    """The single-process step: loss, then every parameter after one SGD step."""
    model = four_stage_model()
    x, y = batch()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=lr).step()
    return loss.item(), {n: p.detach().clone() for n, p in model.named_parameters()}


def numerics() -> dict:
    """Loss and parameters after one step, per schedule, against the single-process step."""
    out: dict = {}
    ref_loss, ref_params = reference()
    x, y = batch()
    schedules = ["gpipe", "1f1b"] + (["interleaved"] if dist.get_world_size() == 2 else ["pp_x_dp"])
    for schedule in schedules:
        if schedule == "pp_x_dp":  # two copies of a two-stage pipeline, each on half of the batch
            group, replicas, replica = pipeline_groups(2)
            pipeline = Pipeline(
                four_stage_model(), nn.functional.mse_loss, n_microbatches=2, group=group, replica_group=replicas
            )
            half = slice(replica * BATCH // 2, (replica + 1) * BATCH // 2)
            loss, output = pipeline.step(x[half], y[half])
            if loss is not None:  # the batch's loss: the mean over the copies' halves
                dist.all_reduce(loss, group=replicas)
                loss /= 2
            optimizer = torch.optim.SGD(pipeline.module.parameters(), lr=0.1)
            optimizer.step()
            params = dict(pipeline.module.named_parameters())
            out[schedule] = {
                "split": pipeline.split,
                "names": sorted(params),
                "param_error": max((params[n] - ref_params[n]).abs().max().item() for n in params),
                "loss_error": abs(loss.item() - ref_loss) if loss is not None else None,
                "layout": pipeline.layout(),
            }
            continue
        pipeline = Pipeline(four_stage_model(), nn.functional.mse_loss, n_microbatches=4, schedule=schedule)
        optimizer = torch.optim.SGD(pipeline.module.parameters(), lr=0.1)
        loss, output = pipeline.step(x, y)
        optimizer.step()
        params = dict(pipeline.module.named_parameters())
        out[schedule] = {
            "split": pipeline.split,
            "names": sorted(params),
            "param_error": max((params[n] - ref_params[n]).abs().max().item() for n in params),
            "loss_error": abs(loss.item() - ref_loss) if loss is not None else None,
            "output_shape": list(output.shape) if output is not None else None,
            "layout": pipeline.layout(),
        }
    return out


class DetachedOutput(nn.Module):
    """A stage whose output leaves without its graph: the cut a pipeline boundary must name."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).detach()


def guard_verdict(model: Sequential, split) -> dict:
    """One guarded step; the problems every rank raised (or none)."""
    x, y = batch()
    pipeline = Pipeline(model, nn.functional.mse_loss, split=split, n_microbatches=2, schedule="1f1b")
    guard = PipelineGuard(pipeline)
    pipeline.step(x, y)
    try:
        guard.check()
    except GradientFlowError as error:
        return {"problems": [[p.parameter, p.cause, p.where] for p in error.problems]}
    finally:
        guard.remove()
    return {"problems": []}


class DetachedInput(nn.Module):
    """A stage that drops the gradient of what it receives: the receiving side of a cut boundary."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.detach())


class Halves(nn.Module):
    """Returns a tuple: the next stage takes it positionally."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(WIDTH, 6)

    def forward(self, x):
        h = self.lin(x)
        return h[:, :2], h[:, 2:]


class Join(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 3)

    def forward(self, a, b):
        return self.lin(torch.cat([a * 2, b], dim=-1))


class Encoder(nn.Module):
    """Returns a mapping, like a Hugging Face ModelOutput."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(WIDTH, 5)

    def forward(self, x):
        h = self.lin(x)
        return {"last_hidden_state": h.unsqueeze(1).repeat(1, 2, 1), "pooler_output": h}


class KeywordHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)

    def forward(self, last_hidden_state, pooler_output):
        return self.lin(last_hidden_state.mean(dim=1) + pooler_output)


class Labelled(nn.Module):
    """Returns a tensor and a string: nothing a pipeline can send."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(WIDTH, 3)

    def forward(self, x):
        return self.lin(x), "label"


def handoff_models() -> dict[str, Sequential]:
    torch.manual_seed(0)
    return {
        "tuple": Sequential({"halves": Halves(), "join": Join()}),
        "mapping": Sequential({"encoder": Encoder(), "head": KeywordHead()}),
        "picked": Sequential({"encoder": Encoder(), "head": nn.Linear(5, 3)}, outputs={"encoder": "pooler_output"}),
    }


def handoff_cases() -> dict:
    """Tuples, mappings and picked fields cross a boundary and give the single-process numbers; a string cannot."""
    out: dict = {}
    x, y = batch()
    for kind in ("tuple", "mapping", "picked"):
        reference = handoff_models()[kind]
        ref_loss = nn.functional.mse_loss(reference(x), y)
        ref_loss.backward()
        grads = {n: p.grad for n, p in reference.named_parameters()}
        pipeline = Pipeline(handoff_models()[kind], nn.functional.mse_loss, n_microbatches=2, schedule="gpipe")
        loss, _ = pipeline.step(x, y)
        own = dict(pipeline.module.named_parameters())
        out[kind] = {
            "loss_error": abs(loss.item() - ref_loss.item()) if loss is not None else None,
            "grad_error": max((own[n].grad - grads[n]).abs().max().item() for n in own),
        }
    pipeline = Pipeline(
        Sequential({"labelled": Labelled(), "head": nn.Identity()}), lambda o, t: o.sum(), n_microbatches=2
    )
    try:
        pipeline.step(x, y)
        out["unsendable"] = None
    except RuntimeError as error:
        out["unsendable"] = str(error)
    return out


def guard_cases() -> dict:
    """The guard's verdict on a clean pipeline, on a cut on each side of a stage boundary, on one inside a stage."""
    out: dict = {}
    out["clean"] = guard_verdict(four_stage_model(), None)
    # the boundary cut: 'mixer' (end of pipeline stage 0) detaches what it sends to 'proj'
    model = four_stage_model()
    model.mixer = DetachedOutput(model.mixer)
    out["boundary"] = guard_verdict(model, [["encoder", "mixer"], ["proj", "head"]])
    # a cut inside a pipeline stage: 'encoder' detaches before 'mixer', in the same stage
    model = four_stage_model()
    model.encoder = DetachedOutput(model.encoder)
    out["inside"] = guard_verdict(model, [["encoder", "mixer"], ["proj", "head"]])
    # the receiving side: 'proj' (start of pipeline stage 1) drops the gradient of what it receives
    model = four_stage_model()
    model.proj = DetachedInput(model.proj)
    out["received"] = guard_verdict(model, [["encoder", "mixer"], ["proj", "head"]])
    return out
