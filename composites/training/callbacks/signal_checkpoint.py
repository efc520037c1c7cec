"""SIGTERM, Ctrl-C or a cluster's requeue signal mid-run: finish the step, save a checkpoint, say how to resume, exit.

- ``SignalCheckpoint(dirpath, filename="last.ckpt", requeue_signal="SIGUSR1", requeue=None, resume_hint=None)``
  is a Lightning callback. During ``fit`` it owns the handlers of SIGTERM, SIGINT and
  ``requeue_signal`` (``SIGUSR1``, or ``SIGUSR2`` as submitit sends); a handler only records the
  signal. At the next step boundary (after a batch that stepped the optimizer, never inside
  gradient accumulation; after an epoch's last batch, the end of its validation or epoch) every
  rank agrees on "some rank got a signal" with one collective (``reduce_boolean_decision``), all
  ranks save ``dirpath/filename`` atomically (:class:`AtomicCheckpointIO`), rank zero says where it is and
  how to resume, and once that step's logs are written (the next hook) every rank raises
  :class:`TrainingInterrupted` (a ``SystemExit``; exit status ``128 + signal number``: 143 for
  SIGTERM, 130 for SIGINT, 138 for SIGUSR1, 140 for SIGUSR2) before another batch trains.
  Resuming with ``ckpt_path=auto`` continues exactly as the uninterrupted run (:class:`ResumeState`).
- Catch :class:`TrainingInterrupted` (``.signal_name``, ``.checkpoint``, ``.step``) to act on
  it; uncaught, the process exits with its code. A signal during the sanity check or validation
  is acted on at the next boundary; after ``fit`` the previous handlers are back.
- With the requeue signal and ``requeue`` true (``None``: when ``$SLURM_JOB_ID`` is set), rank
  zero runs ``scontrol requeue $SLURM_JOB_ID`` after the save: the requeued job resumes with
  ``ckpt_path=auto``. Lightning's own SLURM auto-requeue is turned off for the run
  (``SLURMEnvironment.auto_requeue = False``): its handler saves from inside the signal handler.
- A second Ctrl-C stops at once (exit 130), without saving the step under way, and says which checkpoint is the
  newest on disk. Configured as ``callbacks.signal_checkpoint``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from ..packages import check_same_package
from .checkpoints import use_atomic_io

if TYPE_CHECKING:
    import pytorch_lightning as pl

STOP_SIGNALS = ("SIGTERM", "SIGINT")
REQUEUE_SIGNALS = ("SIGUSR1", "SIGUSR2")


def submitit_signal() -> str | None:
    """The requeue signal of a job that submitit started (Hydra's submitit launcher), else ``None``.

    submitit's job script asks SLURM for ``--signal=USR2@<delay>`` (``$SUBMITIT_PREEMPT_SIGNAL``
    changes it) and exports ``SUBMITIT_EXECUTOR=slurm``.

    >>> os.environ.get("SUBMITIT_EXECUTOR") == "slurm" or submitit_signal() is None
    True
    """
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return None
    return "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").removeprefix("SIG")


class StoppedAtOnce(SystemExit):
    """A second Ctrl-C: training stopped at once, without saving the step under way; exit status 130.

    Attributes:
        checkpoint: the newest checkpoint on disk (what a resume starts from), or ``None``.

    Example:
        >>> StoppedAtOnce(None).code
        130
    """

    def __init__(self, checkpoint: Path | None):
        super().__init__(128 + int(signal.SIGINT))
        self.checkpoint = checkpoint

    def __reduce__(self):
        return type(self), (self.checkpoint,)


class TrainingInterrupted(SystemExit):
    """Training stopped on a signal after saving a checkpoint; ``code`` is ``128 + signal number``.

    Attributes:
        signal_name: e.g. ``"SIGTERM"``.
        checkpoint: the path of the saved checkpoint.
        step: the global step the checkpoint holds.

    Example:
        >>> error = TrainingInterrupted("SIGTERM", Path("run/checkpoints/last.ckpt"), 12)
        >>> error.code, error.step
        (143, 12)
    """

    def __init__(self, signal_name: str, checkpoint: Path, step: int):
        super().__init__(128 + int(getattr(signal, signal_name)))
        self.signal_name = signal_name
        self.checkpoint = checkpoint
        self.step = step


class SignalCheckpointBase:
    """On SIGTERM / SIGINT / a requeue signal: save a checkpoint at the next step boundary and exit non-zero.

    See the module docstring for the whole interface. The callback is
    ``composites.training.SignalCheckpoint`` (``pytorch_lightning``) or
    ``composites.training.lightning.SignalCheckpoint``.

    Args:
        dirpath: folder of the checkpoint (the run's ``checkpoints/``).
        filename: its file name; ``last.ckpt`` is what ``ckpt_path=auto`` resumes.
        requeue_signal: the cluster's "time is nearly up" signal, ``"SIGUSR1"`` or ``"SIGUSR2"``.
        requeue: requeue the SLURM job after saving on ``requeue_signal``; ``None``: when
            ``$SLURM_JOB_ID`` is set.
        resume_hint: a line printed after the checkpoint's path (e.g. the command that resumes);
            ``None`` prints ``trainer.fit(..., ckpt_path=<path>)``.

    Example:
        >>> from composites.training import SignalCheckpoint
        >>> callback = SignalCheckpoint("/tmp/run/checkpoints")
        >>> callback.path, callback.signals
        (PosixPath('/tmp/run/checkpoints/last.ckpt'), ('SIGTERM', 'SIGINT', 'SIGUSR1'))
    """

    def __init__(
        self,
        dirpath: str | os.PathLike,
        filename: str = "last.ckpt",
        requeue_signal: str = "SIGUSR1",
        requeue: bool | None = None,
        resume_hint: str | None = None,
    ):
        if requeue_signal not in REQUEUE_SIGNALS:
            raise ValueError(
                f"requeue_signal={requeue_signal!r} must be one of {', '.join(REQUEUE_SIGNALS)} "
                "(callbacks.signal_checkpoint.requeue_signal)"
            )
        self.path = Path(dirpath) / filename
        self.signals = (*STOP_SIGNALS, requeue_signal)
        self.requeue_signal = requeue_signal
        self.requeue = requeue
        self.resume_hint = resume_hint
        self.received: str | None = None  # the first signal this process got
        self._pending: TrainingInterrupted | None = None  # saved; raised at the next hook
        self._step_at_start = -1  # global step when the current training batch began
        self._previous: dict[int, Any] = {}

    # ---------------------------------------------------------------- handlers: only a flag
    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.received == "SIGINT":  # Ctrl-C twice: stop now, not at the step's end
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a third one changes nothing while this unwinds
            raise StoppedAtOnce(self.path if self.path.exists() else None)
        if self.received is None or name == self.requeue_signal:  # a requeue wins (submitit's preemption: TERM, USR2)
            self.received = name

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for name in self.signals:
            signal.signal(int(getattr(signal, name)), self._handle)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_same_package(self, trainer)
        use_atomic_io(trainer)
        environment = getattr(trainer.strategy, "cluster_environment", None)
        if type(environment).__name__ == "SLURMEnvironment":  # lightning_fabric's or lightning.fabric's
            environment.auto_requeue = False  # ours saves at a step boundary, not inside the handler
        submitit = submitit_signal()
        if submitit in REQUEUE_SIGNALS and submitit != self.requeue_signal:  # a submitit job: its signal
            self.requeue_signal = submitit
            self.signals = (*STOP_SIGNALS, submitit)
        if stage == "fit" and threading.current_thread() is threading.main_thread():
            # the handlers from before Lightning's, put back when the fit ends
            self._previous = {int(getattr(signal, n)): signal.getsignal(int(getattr(signal, n))) for n in self.signals}
        self.received = None
        self._pending = None

    # Lightning registers its own SIGTERM handler after `on_fit_start`, just before the sanity
    # check; these replace it (and the default SIGINT) for the rest of the fit.
    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()
        # Ctrl-C twice, or once when these handlers are no longer on (the end-of-fit plot): say what is on disk
        if isinstance(exception, (StoppedAtOnce, KeyboardInterrupt)) and trainer.is_global_zero:
            print(self._stopped_message(), flush=True)

    def _stopped_message(self) -> str:
        if not self.path.exists():
            return "Ctrl-C: stopped at once; no checkpoint was saved yet"
        hint = self.resume_hint or f"trainer.fit(..., ckpt_path='{self.path}')"
        return (
            f"Ctrl-C: stopped at once, without saving the step under way; the newest checkpoint is "
            f"{self.path}\nresume with: {hint}"
        )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore()

    # ---------------------------------------------------------------- step boundaries
    def _agreed(self, trainer: pl.Trainer) -> bool:
        got = self.received is not None
        if trainer.world_size > 1:  # one collective, outside any handler: every rank reaches it
            got = trainer.strategy.reduce_boolean_decision(got, all=False)
        return got

    def _save(self, trainer: pl.Trainer) -> TrainingInterrupted:
        """Save, print, requeue if asked; return the exception that stops every rank."""
        name = self.received
        if trainer.world_size > 1:  # the signal rank zero got (SLURM signals every task)
            name = trainer.strategy.broadcast(name, src=0) or name
        name = name or "SIGTERM"
        trainer.save_checkpoint(self.path, weights_only=False)  # the whole state: a resume needs it
        if trainer.is_global_zero:
            hint = self.resume_hint or f"trainer.fit(..., ckpt_path='{self.path}')"
            print(
                f"{name} received: checkpoint of step {trainer.global_step} saved to {self.path}\nresume with: {hint}",
                flush=True,
            )
            if name == self.requeue_signal and self._should_requeue() and not self._submitit_requeues(name):
                job = os.environ.get("SLURM_ARRAY_JOB_ID")
                job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job else os.environ["SLURM_JOB_ID"]
                done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
                print(f"scontrol requeue {job}: " + ("done" if done.returncode == 0 else done.stderr.strip()))
        return TrainingInterrupted(name, self.path, trainer.global_step)

    def _submitit_requeues(self, name: str) -> bool:
        """Under submitit, hand over to its own handler of the signal, now that the checkpoint is saved.

        It requeues the job (counting time-outs against ``max_num_timeout``) and exits; from inside
        the signal it would have exited mid-step, without a checkpoint.
        """
        signum = int(getattr(signal, name))
        previous = self._previous.get(signum)
        if submitit_signal() != name or not callable(previous):
            return False
        print("submitit requeues the job", flush=True)
        previous(signum, None)  # rank zero: requeue + SystemExit; a time-out too many: UncompletedJobError
        return True

    def _should_requeue(self) -> bool:
        return self.requeue if self.requeue is not None else "SLURM_JOB_ID" in os.environ

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # The end of a batch that stepped the optimizer (not mid-accumulation: no checkpoint holds gradients) is
        # where Lightning resumes mid-epoch from; the exit waits for the next hook so this step's logs are written first. An
        # epoch's last batch is left to the epoch's end (after validation), where the epoch-end checkpoint is too.
        if not trainer.is_last_batch and trainer.global_step != self._step_at_start:
            self._check(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._check(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer)  # the exit comes at the next epoch's start: this epoch's logs are written first

    def _check(self, trainer: pl.Trainer) -> None:
        if self._pending is None and self._agreed(trainer):
            self._pending = self._save(trainer)

    def _raise_pending(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            raise pending

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._raise_pending()
        self._step_at_start = trainer.global_step

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._raise_pending()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._raise_pending()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer)  # fit is complete: the checkpoint holds the finished run
        self._raise_pending()
