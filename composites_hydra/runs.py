"""Where a run resumes from, and what it must not overwrite of an earlier run."""

from __future__ import annotations

import logging
import os
import shlex
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from .errors import ConfigError
from .ranks import DECIDED_RUN_DIR, agree, detect_launch

log = logging.getLogger(__name__)


def keep_earlier_csv_logs(logger: dict[str, Any]) -> None:
    """A resumed run that logs CSV where its first run did gets a fresh version folder.

    Lightning's CSVLogger deletes a ``metrics.csv`` it finds in its log directory, so resuming
    in the same run directory would wipe the earlier epochs' rows. The resumed run writes
    ``<name>/resume-<n>/metrics.csv`` instead; every earlier file stays.

    >>> conf = {"_target_": "pytorch_lightning.loggers.CSVLogger", "save_dir": "/nonexistent", "name": "logs", "version": ""}
    >>> keep_earlier_csv_logs(conf); conf["version"]
    ''
    """
    if not str(logger.get("_target_", "")).endswith("CSVLogger"):
        return
    logs = Path(logger["save_dir"]) / str(logger.get("name") or "")
    version = logger.get("version")
    if version is None or not (logs / str(version) / "metrics.csv").exists():
        return
    n = 1
    while (logs / f"resume-{n}").exists():
        n += 1
    logger["version"] = f"resume-{n}"


def resume_path(ckpt_path: str | None, run_dir: str) -> str | None:
    """``ckpt_path=auto`` resumes whatever the run directory holds (a requeued cluster job).

    Lightning itself resumes from the ``hpc_ckpt_*.ckpt`` its SLURM plugin writes before a time
    limit (with ``ckpt_path=None``); without one (a node failure, a submitit requeue), the
    newest ``last.ckpt``; in a fresh directory, nothing.

    >>> resume_path("auto", "/nonexistent") is None
    True
    """
    if ckpt_path != "auto":
        return ckpt_path
    run = Path(run_dir)
    if any(run.glob("hpc_ckpt_*.ckpt")):
        return None
    if any(run.glob("**/last*.ckpt")):
        return "last"
    if is_global_zero_by_env():
        log.warning(
            f"ckpt_path=auto: nothing to resume in {run.absolute()} (no last.ckpt, no hpc_ckpt_*.ckpt): "
            "training from scratch. To resume an earlier run, give its directory: hydra.run.dir=<that run's dir>"
        )
    return None


def checkpoint_to_resume(ckpt_path: str | None, run_dir: str | Path) -> Path | None:
    """The file a run with ``ckpt_path`` will resume from in ``run_dir`` (what Lightning will pick), or None.

    ``auto``/``last``: the newest ``hpc_ckpt_*.ckpt``, else the newest ``last*.ckpt``; a path: that file.

    >>> checkpoint_to_resume("auto", "/nonexistent") is None
    True
    """
    if ckpt_path is None:
        return None
    run = Path(run_dir)
    if ckpt_path in ("auto", "last", "hpc"):
        found = sorted(run.glob("hpc_ckpt_*.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found and ckpt_path != "hpc":
            found = sorted(run.glob("**/last*.ckpt"), key=lambda p: p.stat().st_mtime)
        return found[-1] if found else None
    return Path(ckpt_path)


def check_resume(checkpoint: Path, model: Any, data: dict[str, Any] | None, seed: int | None = None) -> None:
    """Refuse a resume whose checkpoint cannot be continued exactly by this config, before anything is written.

    - ``model``: the config's ``model`` node, built on the ``meta`` device (no memory, no data):
      every parameter and buffer must be in the checkpoint with the same shape, and nothing more.
    - ``data``: the ``data`` node; when the checkpoint stopped mid-epoch, every setting it carries
      (``datamodule_hyper_parameters``: batch size, split fractions, seed, ...) must be the same,
      or the rest of that epoch would not be the batches the first run had left (some samples
      trained twice, others never); so must the training ``seed`` (it shuffles the epochs), as
      the checkpoint's run recorded it (:func:`recorded_config`). Refusing loses nothing; at an
      epoch boundary they may change.

    Raises:
        ConfigError: naming the sub-models and shapes that differ, or the data settings and the
            two ways on; a checkpoint that does not exist.

    >>> check_resume(Path("/nonexistent.ckpt"), None, None)
    Traceback (most recent call last):
    ...
    composites_hydra.errors.ConfigError: ckpt_path=/nonexistent.ckpt: no such file; ...
    """
    if not checkpoint.exists():
        raise ConfigError(f"ckpt_path={checkpoint}: no such file; give a checkpoint file, or ckpt_path=auto")
    if checkpoint.is_dir():  # a sharded (distributed) checkpoint: Lightning's strategy checks it when it loads
        return
    import torch

    try:  # mmap: only what is read is loaded, however large the weights
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # noqa: BLE001 (not a zip-format file: load it whole, or say it cannot be read)
        try:
            saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
        except Exception as error:  # noqa: BLE001
            raise ConfigError(f"ckpt_path={checkpoint} cannot be read as a checkpoint ({error})") from None
    if model is not None:
        differences = _model_differences(saved.get("state_dict", {}), model)
        if differences:
            raise ConfigError(
                f"ckpt_path={checkpoint} holds another model than this config's; nothing was changed:\n"
                + "\n".join(f"  {line}" for line in differences)
                + "\n  resume with the model it was trained with (its run's .hydra/config.yaml), "
                "or start a new run without ckpt_path"
            )
    carried = saved.get("datamodule_hyper_parameters") or {}
    changed = {f"data.{k}": (v, data[k]) for k, v in carried.items() if k in (data or {}) and data[k] != v}
    recorded = recorded_config(checkpoint)
    if seed is not None and recorded is not None and recorded.get("seed", seed) != seed:
        changed["seed"] = (recorded["seed"], seed)  # the training seed shuffles the epochs
    progress = saved.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {})
    done = int(progress.get("current", {}).get("completed", 0))
    if changed and done and not progress.get("is_last_batch", False):
        settings = ", ".join(f"{k}={new} (the checkpoint's run had {old})" for k, (old, new) in changed.items())
        keep = " ".join(f"{k}={old}" for k, (old, _) in changed.items())
        raise ConfigError(
            f"ckpt_path={checkpoint} stopped mid-epoch (epoch {saved.get('epoch', '?')}, after {done} batches) and "
            f"{settings}: the rest of that epoch would not be the samples the first run left (some trained twice, "
            f"some never). Nothing was changed.\n"
            f"  resume exactly: add {keep}\n"
            f"  change them:    resume from a checkpoint taken at the end of an epoch"
        )


def recorded_config(checkpoint: Path) -> dict[str, Any] | None:
    """The config the run that wrote ``checkpoint`` recorded (its newest ``.hydra/[resume-<n>/]config.yaml``), if any.

    >>> recorded_config(Path("/nonexistent/checkpoints/last.ckpt")) is None
    True
    """
    for run in (checkpoint.parent.parent, checkpoint.parent):  # checkpoints/<name>.ckpt, or hpc_ckpt_*.ckpt
        records = sorted(run.glob(".hydra/resume-*/config.yaml"), key=lambda p: int(p.parent.name.split("-")[-1]))
        records = records or [run / ".hydra" / "config.yaml"]
        if records[-1].is_file():
            loaded = OmegaConf.to_container(OmegaConf.load(records[-1]))
            return loaded if isinstance(loaded, dict) else None
    return None


def _model_differences(state: dict[str, Any], model_node: Any) -> list[str]:
    """Lines naming what differs between a checkpoint's ``state_dict`` and the model ``model_node`` builds."""
    import torch
    from hydra.utils import instantiate

    try:
        with torch.device("meta"):
            model = instantiate(model_node, _convert_="all")
        wanted = {f"model.{k}": tuple(v.shape) for k, v in model.state_dict().items()}
    except Exception:  # noqa: BLE001 (build() reports a model that cannot be built, with its own message)
        return []
    have = {k: tuple(v.shape) for k, v in state.items() if k.startswith("model.")}

    def owner(key: str) -> str:
        return key.split(".")[1] if key.count(".") > 1 else key

    lines = []
    shapes = [k for k in wanted if k in have and wanted[k] != have[k]]
    if shapes:
        lines.append(
            "shapes: "
            + "; ".join(f"{k[6:]} {list(have[k])} in the checkpoint, {list(wanted[k])} here" for k in shapes[:6])
        )
    for what, keys in (("only in the checkpoint", have.keys() - wanted), ("only in this config", wanted.keys() - have)):
        if keys:
            subs = sorted({owner(k) for k in keys})
            lines.append(f"{what}: sub-model(s) {', '.join(subs)} ({len(keys)} tensors, e.g. {sorted(keys)[0][6:]})")
    return lines


def is_global_zero_by_env() -> bool:
    """Whether this process is global rank 0 as its launcher's variables say (before any process group).

    >>> is_global_zero_by_env()
    True
    """
    launch = detect_launch()
    if launch is not None:
        return launch.is_zero
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


def earlier_run_files(run_dir: str | Path) -> list[str]:
    """What an earlier run left in ``run_dir`` that a new run would overwrite or delete (relative paths).

    >>> earlier_run_files("/nonexistent")
    []
    """
    run = Path(run_dir)
    if not run.is_dir():
        return []
    found = [*run.glob("checkpoints/*.ckpt"), *run.glob("*.ckpt"), *run.glob("logs/**/metrics.csv")]
    return sorted(str(p.relative_to(run)) for p in found)


def decided(run_dir: str | Path) -> bool:
    """Whether rank 0 of this run has taken the run-directory decision for ``run_dir`` (:class:`KeepEarlierRuns`).

    Then this process follows it: the files there may be this very run's (another rank's, or
    Hydra's record of this run), not an earlier run's.

    >>> decided("/runs/never-decided")
    False
    """
    return os.environ.get(DECIDED_RUN_DIR) == str(Path(run_dir).absolute())


def refuse_to_overwrite(run_dir: str | Path, ckpt_path: str | None, config_subdir: str | None = None) -> None:
    """Stop a fresh run (no ``ckpt_path``) whose run directory holds an earlier run's results.

    Lightning's CSV logger would delete the earlier ``logs/metrics.csv``, the checkpoints would
    be overwritten and the test would pick the new run's "best"; Hydra would overwrite the
    recorded config (``config_subdir``: ``.hydra``, checked too when given). A resume
    (``ckpt_path`` set) keeps everything: its logs go to ``logs/resume-<n>/``.

    Raises:
        ConfigError: naming the files and the two ways on (resume, or another directory).

    >>> refuse_to_overwrite("/nonexistent", None)
    """
    if ckpt_path is not None:
        return
    files = earlier_run_files(run_dir)
    if config_subdir is not None and (Path(run_dir) / config_subdir / "config.yaml").exists():
        files.append(f"{config_subdir}/config.yaml")
    if not files:
        return
    shown = ", ".join(files[:4]) + (f" (+{len(files) - 4} more)" if len(files) > 4 else "")
    raise ConfigError(
        f"the run directory {run_dir} already holds a run ({shown}); nothing was changed.\n"
        f"  resume it:   add ckpt_path=auto (same hydra.run.dir)\n"
        f"  start fresh: leave hydra.run.dir out (a new outputs/<date>/<time>/) or choose an empty one"
    )


def resume_command(run_dir: str | Path) -> str:
    """The command line that resumes this run in ``run_dir`` (what a signal's message prints).

    Under Hydra: this run's own overrides, with ``ckpt_path=auto hydra.run.dir=<run dir>``.

    >>> resume_command("/runs/a")
    'python scripts/train.py <the same overrides> ckpt_path=auto hydra.run.dir=/runs/a'
    """
    from hydra.core.hydra_config import HydraConfig

    overrides = ["<the same overrides>"]
    if HydraConfig.initialized():
        task = HydraConfig.get().overrides.task
        overrides = [shlex.quote(o) for o in task if not o.startswith(("ckpt_path=", "hydra.run.dir="))]
    return " ".join(["python scripts/train.py", *overrides, "ckpt_path=auto", f"hydra.run.dir={run_dir}"])


class KeepEarlierRuns(Callback):
    """A Hydra callback (``hydra.callbacks`` in configs/train.yaml) run before Hydra writes into the run directory.

    A fresh run into a directory that holds an earlier run stops here, before Hydra overwrites
    ``.hydra/config.yaml`` and ``overrides.yaml``; a resume writes its own to ``.hydra/resume-<n>/``.

    Several ranks, one decision (:mod:`composites_hydra.ranks`): under srun or torchrun every
    process composes its own config, so global rank 0 alone decides (fresh, resume or refuse)
    and every rank follows it. **The run directory of every rank is rank 0's**: the
    ``hydra.run.dir`` rank 0 composed (the one given, else ``outputs/<date>/<time>/`` of rank
    0's start, ``<time>-<n>`` when another run took that second). Rank 0 records the config in
    ``.hydra/`` and logs to ``<job name>.log``, rank k to ``<job name>_rank_<k>.log``; no rank
    ever refuses a directory because another rank of the same run wrote into it. A refusal
    stops every rank at once and writes nothing.

    A ``-m`` sweep into a sweep directory that holds an earlier sweep stops before Hydra writes
    a file, unless it resumes (``ckpt_path`` set): then every job records its config in
    ``.hydra/resume-<n>/`` and the earlier ``multirun.yaml`` is kept as ``multirun-<n>.yaml``.

    >>> import tempfile
    >>> from omegaconf import OmegaConf
    >>> run = Path(tempfile.mkdtemp()) / "run"
    >>> cfg = OmegaConf.create({"hydra": {"run": {"dir": str(run)}, "output_subdir": ".hydra",
    ...                                    "job": {"name": "train"}}, "ckpt_path": None})
    >>> KeepEarlierRuns().on_run_start(cfg); cfg.hydra.output_subdir  # a fresh directory: nothing to keep
    '.hydra'
    >>> os.environ.pop(DECIDED_RUN_DIR) == str(run)  # what build() and the ranks Lightning starts follow
    True
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        subdir = None if config.hydra.output_subdir is None else str(config.hydra.output_subdir)
        try:
            run_dir = Path(str(config.hydra.run.dir)).absolute()
        except Exception:  # an interpolation Hydra resolves later: nothing to compare yet
            return
        launch = detect_launch()
        if launch is None and decided(run_dir):
            return  # started by Lightning's launcher for rank 0's run: rank 0 has decided
        timestamped = "${now:" in str(OmegaConf.to_container(config.hydra.run)["dir"])  # not chosen by the user
        decision = agree(
            lambda: decide_run(run_dir, config.get("ckpt_path"), subdir, *_model_data_seed(config), timestamped), launch
        )
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.run.dir = decision["run_dir"]  # rank 0's, the same on every rank
            if launch is None or launch.is_zero:
                config.hydra.output_subdir = decision["output_subdir"]
            else:  # rank 0 alone records the config
                config.hydra.output_subdir = None
                config.hydra.job.name = f"{config.hydra.job.name}_rank_{launch.rank}"
        os.environ[DECIDED_RUN_DIR] = decision["run_dir"]  # build() and the ranks Lightning starts follow it

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            sweep = Path(str(config.hydra.sweep.dir)).absolute()
        except Exception:  # an interpolation Hydra resolves later
            return
        try:
            subdir = str(OmegaConf.to_container(config.hydra.sweep)["subdir"])  # unresolved: ${hydra.job.num}
            n = earlier_sweep_resume(sweep, config.get("ckpt_path"), subdir)
        except ConfigError as error:
            raise SystemExit(f"error: {error}") from None
        if n is None:
            return
        subdir = config.hydra.output_subdir
        with read_write(config.hydra), open_dict(config.hydra):
            # each job's config is composed again from these overrides: its record goes beside the first
            config.hydra.overrides.hydra.append(f"hydra.output_subdir={subdir}/resume-{n}")
        if (sweep / "multirun.yaml").exists():  # Hydra writes the resumed sweep's own; the first one stays
            (sweep / "multirun.yaml").rename(sweep / f"multirun-{n}.yaml")


def _model_data_seed(config: DictConfig) -> tuple[Any, ...]:
    """The resolved ``model``, ``data`` and ``seed`` of a composed config (None where they cannot be resolved yet)."""
    values = []
    for key in ("model", "data", "seed"):
        try:
            node = config[key]
            values.append(OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node)
        except Exception:  # noqa: BLE001 (missing, or an interpolation only the job resolves: build() checks later)
            values.append(None)
    return tuple(values)


def decide_run(
    run_dir: Path,
    ckpt_path: str | None,
    subdir: str | None,
    model: Any = None,
    data: dict[str, Any] | None = None,
    seed: int | None = None,
    timestamped: bool = False,
) -> dict[str, Any]:
    """Rank 0's decision for a run into ``run_dir``: where Hydra records the config, or why the run is refused.

    ``timestamped``: ``run_dir`` is Hydra's ``outputs/<date>/<time>``, not one the user chose; a
    run that started in the same second already has it, so this run takes ``<time>-1`` (``-2``, ...),
    created atomically, instead of landing on that run's files.

    Returns ``{"run_dir", "output_subdir", "error"}``: ``error`` is None or the refusal's message.
    A directory that cannot be created is refused here too, before Hydra tries, and so is a
    resume that cannot continue the checkpoint's run (:func:`check_resume` with the config's
    ``model`` and ``data`` nodes), so a refused resume leaves no ``.hydra/resume-<n>/`` behind.

    >>> import tempfile
    >>> decide_run(Path(tempfile.mkdtemp()) / "run", None, ".hydra")["output_subdir"]
    '.hydra'
    """
    if timestamped:
        run_dir = _claim(run_dir)
    decision: dict[str, Any] = {"run_dir": str(run_dir), "output_subdir": subdir, "error": None}
    try:
        refuse_to_overwrite(run_dir, ckpt_path, subdir)
        checkpoint = checkpoint_to_resume(ckpt_path, run_dir)
        if checkpoint is not None:
            check_resume(checkpoint, model, data, seed)
    except ConfigError as error:
        return {**decision, "error": str(error)}
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as error:
        return {
            **decision,
            "error": f"hydra.run.dir={run_dir} cannot be written ({error.strerror or error}: {error.filename}); "
            "choose a directory you can write to, e.g. hydra.run.dir=outputs/<name>",
        }
    if subdir is not None and (run_dir / subdir / "config.yaml").exists():
        n = 1  # a resume: its config goes next to the first run's, not over it
        while (run_dir / subdir / f"resume-{n}").exists():
            n += 1
        decision["output_subdir"] = f"{subdir}/resume-{n}"
    return decision


def _claim(run_dir: Path) -> Path:
    """``run_dir``, or the first free ``<run_dir>-<n>``, created by this process (``mkdir`` is atomic)."""
    candidate, n = run_dir, 0
    while True:
        try:
            candidate.parent.mkdir(parents=True, exist_ok=True)
            candidate.mkdir()
            return candidate
        except FileExistsError:
            n += 1
            candidate = run_dir.with_name(f"{run_dir.name}-{n}")
        except OSError:  # not writable: the check after this says so
            return candidate


def earlier_sweep_resume(sweep_dir: Path, ckpt_path: str | None, job_subdir: str) -> int | None:
    """For a ``-m`` sweep into ``sweep_dir``: None when it holds no earlier sweep, else the resume number ``n``.

    Raises:
        ConfigError: a fresh sweep (no ``ckpt_path``) into a used sweep directory, or job directories
            that do not differ between jobs (``hydra.sweep.subdir`` without the job number).

    >>> earlier_sweep_resume(Path("/nonexistent"), None, "${hydra.job.num}") is None
    True
    """
    if "${" not in job_subdir:
        raise ConfigError(
            f"hydra.sweep.subdir={job_subdir} is the same for every job: they would overwrite each other; "
            "keep its default ${hydra.job.num} or include it"
        )
    earlier = sorted(str(p.relative_to(sweep_dir)) for p in sweep_dir.glob("*/.hydra/config.yaml"))
    if (sweep_dir / "multirun.yaml").exists():
        earlier.insert(0, "multirun.yaml")
    if not earlier:
        return None
    if ckpt_path is None:
        shown = ", ".join(earlier[:3]) + (f" (+{len(earlier) - 3} more)" if len(earlier) > 3 else "")
        raise ConfigError(
            f"the sweep directory hydra.sweep.dir={sweep_dir} already holds a sweep ({shown}); nothing was changed.\n"
            f"  resume it:   add ckpt_path=auto (same hydra.sweep.dir and sweep overrides)\n"
            f"  start fresh: leave hydra.sweep.dir out (a new multirun/<date>/<time>/) or choose an empty one"
        )
    n = 1
    while (sweep_dir / f"multirun-{n}.yaml").exists() or any(sweep_dir.glob(f"*/.hydra/resume-{n}")):
        n += 1
    return n
