"""Every config value is checked against its target's signature before anything is built: key, value, type wanted."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from composites_hydra import ConfigError, build
from composites_hydra.signatures import target_problems
from tests import ROOT
from tests.scripts.train_helpers import compose_train


def refusal(tmp_path, *overrides: str, composite: str = "sequential") -> str:
    """The ConfigError's message for a composed config with ``overrides``, and that nothing was written."""
    cfg = compose_train(tmp_path / "run", [f"+composite={composite}", *overrides])
    with pytest.raises(ConfigError) as info:
        build(cfg)
    assert not (tmp_path / "run").exists()  # refused before any object (a logger, a checkpoint dir) was made
    return str(info.value)


@pytest.mark.parametrize(
    "overrides, line",
    [
        (
            ["optimizer.lr='0.001'"],
            "optimizer.lr='0.001': torch.optim.Adam's lr wants float | Tensor, got the str '0.001' (write a number without quotes)",
        ),
        (
            ["model.stages.head.hidden=5"],
            "model.stages.head.hidden=5: composites.presets.models.MLP's hidden wants Sequence[int], got the int 5",
        ),
        (
            ["model.stages.head.hidden=[64,x]"],
            "model.stages.head.hidden[1]='x': composites.presets.models.MLP's hidden wants Sequence[int], "
            "so model.stages.head.hidden[1] must be int, got the str 'x'",
        ),
        (
            ["data.batch_size='64'"],
            "data.batch_size='64': composites.presets.DigitsDataModule's batch_size wants int, "
            "got the str '64' (write a number without quotes)",
        ),
        (
            ["optimizer.weight_decay=[0.1]"],
            "optimizer.weight_decay=[0.1]: torch.optim.Adam's weight_decay wants float, got the list [0.1]",
        ),
        (
            ["+optimizer.betas=[0.9]"],
            "optimizer.betas=[0.9]: torch.optim.Adam's betas wants tuple[float | Tensor, float | Tensor], got 1 items, not 2",
        ),
        (
            ["model.stages.encoder.out_features=64.5"],
            "model.stages.encoder.out_features=64.5: composites.presets.models.ConvEncoder's out_features wants int, "
            "got the float 64.5",
        ),
        (
            ["callbacks.checkpoint.save_top_k='1'"],
            "callbacks.checkpoint.save_top_k='1': pytorch_lightning.callbacks.ModelCheckpoint's save_top_k wants int, "
            "got the str '1' (write a number without quotes)",
        ),
        (
            ["trainer.precision=33"],
            "trainer.precision=33: pytorch_lightning.Trainer's precision wants None | one of 64, 32, 16, "
            "'transformer-engine', 'transformer-engine-float16', '16-true', '16-mixed', 'bf16-true', 'bf16-mixed', "
            "'32-true', '64-true', '64', '32', '16', 'bf16', got the int 33",
        ),
        (
            ["module.load_balancing=[0.1]"],
            "module.load_balancing=[0.1]: composites.CompositeModule's load_balancing wants float, got the list [0.1]",
        ),
        (
            ["+model.stages.head.hiden=[3]"],
            "model.stages.head.hiden: not an argument of composites.presets.models.MLP; did you mean hidden? "
            "(its arguments: in_features, out_features, hidden, dropout)",
        ),
        (
            ["~model.stages.head.in_features"],
            "model.stages.head: composites.presets.models.MLP needs in_features (missing)",
        ),
        (
            ["model.stages.head._target_=torch.optim.Adam"],
            "model.stages.head._target_=torch.optim.Adam builds an object of class Adam; a Module is wanted here",
        ),
        (
            ["~model.stages.head._target_"],
            "model.stages.head={'in_features': 64, 'out_features': 10, 'hidden': []}: composites.Sequential's stages "
            "wants Mapping[str, Module] | Sequence[Module], so model.stages.head must be Module, got a mapping without "
            "_target_ (a node that builds an object names its class with _target_)",
        ),
        (
            ["logger.flush_logs_every_n_steps=ten"],
            "logger.flush_logs_every_n_steps='ten': pytorch_lightning.loggers.CSVLogger's flush_logs_every_n_steps "
            "wants int, got the str 'ten'",
        ),
    ],
    ids=[
        "quoted-float",
        "number-for-list",
        "list-item",
        "quoted-int",
        "list-for-float",
        "tuple-length",
        "float-for-int",
        "callback-arg",
        "literal",
        "module-arg",
        "unknown-key",
        "missing-required",
        "wrong-class",
        "missing-target-nested",
        "logger-arg",
    ],
)
def test_a_value_of_the_wrong_type_is_named_with_the_type_wanted_before_anything_is_built(tmp_path, overrides, line):
    message = refusal(tmp_path, *overrides)
    assert message.splitlines() == ["a config value does not fit:", f"  {line}"]


def test_every_misfit_is_listed_at_once(tmp_path):
    message = refusal(tmp_path, "optimizer.lr=fast", "data.batch_size=1.5", "model.stages.head.hidden=5")
    assert message.splitlines()[0] == "3 config values do not fit:"
    assert [line.split(":")[0] for line in message.splitlines()[1:]] == [
        "  data.batch_size=1.5",
        "  model.stages.head.hidden=5",
        "  optimizer.lr='fast'",
    ]


@pytest.mark.parametrize(
    "composite, overrides",
    [
        ("sequential", ["optimizer=sgd", "optimizer.lr=1e-3", "trainer.gradient_clip_val=1"]),
        ("parallel", ["model.stages.fuse.combine=sum", "model.stages.head.in_features=64"]),
        ("conditional", ["model.stages.experts.top_k=2", "+model.stages.experts.capacity_factor=1"]),
        ("sequential", ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=bf16-mixed"]),
        ("sequential", ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "logger=tensorboard"]),
    ],
    ids=["int-for-float", "parallel", "conditional", "ddp", "fsdp-tensorboard"],
)
def test_values_that_fit_pass_including_an_int_where_a_float_is_wanted(tmp_path, composite, overrides):
    # int for float (trainer.gradient_clip_val=1, capacity_factor=1) and 1e-3 (a float to Hydra) are fine
    cfg = compose_train(tmp_path, [f"+composite={composite}", *overrides])
    _, _, trainer = build(cfg)
    if "optimizer.lr=1e-3" in overrides:  # 1e-3 reached the optimizer as a float, the int 1 the Trainer
        assert cfg.optimizer.lr == 1e-3 and trainer.gradient_clip_val == 1


def test_a_target_whose_hints_do_not_resolve_or_that_takes_any_key_is_not_judged():
    # torch.nn.Identity takes *args/**kwargs: any key; a builtin has no signature: only its values are walked
    assert target_problems({"_target_": "torch.nn.Identity", "whatever": "x"}, "k") == []
    assert target_problems(
        {"_target_": "builtins.dict", "a": {"_target_": "torch.nn.Linear", "in_features": "2"}}, "k"
    ) == [
        "k.a.in_features='2': torch.nn.Linear's in_features wants int, got the str '2' (write a number without quotes)",
        "k.a: torch.nn.Linear needs out_features (missing)",
    ]
    # a Lightning class of the other package fits: build() swaps in the Trainer's package's classes
    ddp = {"_target_": "pytorch_lightning.strategies.DDPStrategy"}
    assert target_problems({"_target_": "lightning.Trainer", "strategy": ddp}, "trainer") == []
    # a class hint YAML cannot produce (torch.device) is left to the target, which converts a string
    assert target_problems({"_target_": "torch.zeros", "_partial_": True, "device": "cpu"}, "k") == []


@pytest.mark.slow
def test_the_script_names_the_wrong_value_and_exits_1(tmp_path):
    # One process, two misfits of different kinds: the checker lists every misfit at once, so one
    # launch (most of it importing torch and Lightning) shows the script names each.
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "train.py"),
            "+composite=sequential",
            f"hydra.run.dir={tmp_path / 'run'}",
            "optimizer.lr='0.001'",
            "+scheduler={_target_: torch.optim.lr_scheduler.StepLR, step_size: 2}",
        ],
        cwd=tmp_path,
        env={**os.environ, "HYDRA_FULL_ERROR": "0"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "error: 2 config values do not fit:\n" in done.stderr
    assert (
        "\n  optimizer.lr='0.001': torch.optim.Adam's lr wants float | Tensor, "
        "got the str '0.001' (write a number without quotes)\n" in done.stderr
    )
    assert (
        "\n  scheduler: add _partial_: true (scheduler._partial_=true): "
        "CompositeModule calls torch.optim.lr_scheduler.StepLR with the optimizer it builds" in done.stderr
    )
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "logs").exists()
