"""Every rank of one run agrees, before the process group is up: one run directory, one decision, one stop.

Who starts the processes decides how they meet before ``torch.distributed`` is initialised:

- **Lightning's own DDP launcher** (``python scripts/train.py trainer=ddp trainer.devices=N``):
  rank 0 alone composes a config and decides; the ranks it starts inherit its decision through
  the environment (:data:`DECIDED_RUN_DIR`) and Lightning passes them its ``hydra.run.dir``.
  Lightning ends every rank when one child fails.
- **srun** (one process per task, each composing its own config) and **torchrun**: the ranks meet
  in a ``torch.distributed.TCPStore`` at the address and port the process group will use
  (SLURM: Lightning's ``SLURMEnvironment`` rule, the first node and ``15000 +`` the job id's last
  four digits, or ``MASTER_ADDR``/``MASTER_PORT``; torchrun: its agent's store). Under srun rank 0
  hosts it as a multi-tenant server, so the process group's own rendezvous later reuses the same
  server in the same process: no second port, nothing written to disk, no shared file system
  needed. Rank 0 publishes the run directory and its decision (fresh, resume, or the refusal's
  message); the others wait for it and follow. A rank that fails before the process group is up
  publishes its message there and every other rank prints it and exits within a second.

A file handshake in the run directory was the alternative; it was not chosen because a refused
directory must stay untouched, multi-node runs would need a shared file system for the handshake
alone, and a rank that dies leaves a stale marker behind for the next run.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

DECIDED_RUN_DIR = "COMPOSITES_DECIDED_RUN_DIR"
"""The environment variable rank 0 sets to the run directory it checked; processes it starts inherit it."""

START_TIMEOUT_S = 600.0  # how long a rank waits for rank 0 to start and decide (imports on a busy node)
ACK_TIMEOUT_S = 10.0  # how long rank 0 keeps its store up for the others to read a refusal or a failure
POLL_S = 0.2


@dataclass(frozen=True)
class Launch:
    """How this process was started with others: its global rank, the world size and where rank 0's store is.

    Attributes:
        rank: the global rank.
        world_size: how many processes the launcher started.
        address: host of the store (the process group's main address).
        port: its port (the process group's main port).
        hosts_store: rank 0 starts the store (srun); False when a launcher's agent already runs one (torchrun).
        prefix: the keys' prefix (a torchrun restart starts fresh).

    >>> Launch(rank=1, world_size=2, address="127.0.0.1", port=29500, hosts_store=True, prefix="composites/").is_zero
    False
    """

    rank: int
    world_size: int
    address: str
    port: int
    hosts_store: bool
    prefix: str

    @property
    def is_zero(self) -> bool:
        """Whether this is global rank 0, the one that decides."""
        return self.rank == 0


def detect_launch(env: dict[str, str] | None = None) -> Launch | None:
    """The :class:`Launch` of a process that srun or torchrun started among several; None otherwise.

    None for a single process and for Lightning's own launcher (whose ranks inherit rank 0's
    decision). srun is recognised as Lightning recognises it (``SLURM_NTASKS``, a job name other
    than ``bash``/``interactive``), and only inside a job step (``SLURM_STEP_ID``), not in the
    batch script.

    >>> detect_launch({}) is None
    True
    >>> detect_launch({"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_STEP_ID": "0", "SLURM_JOB_NAME": "train",
    ...                "SLURM_JOB_ID": "1234", "SLURM_NODELIST": "node[3-4]"})
    Launch(rank=1, world_size=2, address='node3', port=16234, hosts_store=True, prefix='composites/')
    >>> detect_launch({"TORCHELASTIC_RUN_ID": "x", "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "29500",
    ...                "TORCHELASTIC_RESTART_COUNT": "1"}).prefix
    'composites/restart-1/'
    """
    env = os.environ if env is None else env
    if "TORCHELASTIC_RUN_ID" in env and int(env.get("WORLD_SIZE", "1")) > 1:
        return Launch(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            address=env["MASTER_ADDR"],
            port=int(env["MASTER_PORT"]),
            hosts_store=False,
            prefix=f"composites/restart-{env.get('TORCHELASTIC_RESTART_COUNT', '0')}/",
        )
    srun = "SLURM_STEP_ID" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive")
    if srun and int(env.get("SLURM_NTASKS", "1")) > 1:
        return Launch(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            address=env.get("MASTER_ADDR") or _first_node(env.get("SLURM_NODELIST", "127.0.0.1")),
            port=int(env.get("MASTER_PORT") or 15000 + int(env.get("SLURM_JOB_ID", "0")[-4:] or 0)),
            hosts_store=True,
            prefix="composites/",
        )
    return None


def _first_node(nodelist: str) -> str:
    """The first host of a SLURM node list, as Lightning's ``SLURMEnvironment.resolve_root_node_address`` takes it."""
    from lightning_fabric.plugins.environments import SLURMEnvironment

    return SLURMEnvironment.resolve_root_node_address(nodelist)


class RankAgreement:
    """Rank 0's decision, handed to every rank through a TCPStore; failures before the process group is up, too.

    Built by :func:`agree`; at most one per process (:func:`current`).
    """

    def __init__(self, launch: Launch) -> None:
        from torch.distributed import TCPStore

        self.launch = launch
        self._failed_here = False
        try:
            self.store = TCPStore(
                launch.address,
                launch.port,
                is_master=launch.is_zero and launch.hosts_store,
                multi_tenant=True,  # the process group's own TCPStore on this port reuses this server
                wait_for_workers=False,
                timeout=datetime.timedelta(seconds=START_TIMEOUT_S),
            )
        except Exception as error:  # noqa: BLE001 (the store's errors are plain RuntimeErrors)
            raise SystemExit(
                f"error: rank {launch.rank} of {launch.world_size} could not reach rank 0 at "
                f"{launch.address}:{launch.port} within {START_TIMEOUT_S:.0f} s ({error}); rank 0's log says why"
            ) from None

    def key(self, name: str) -> str:
        """A key of this run's agreement in the store."""
        return self.launch.prefix + name

    def publish(self, decision: dict[str, Any]) -> None:
        """Rank 0: hand ``decision`` (JSON-able; ``error`` set when the run is refused) to every other rank."""
        self.store.set(self.key("decision"), json.dumps(decision))
        if decision.get("error"):
            self._wait_until_read("decision-read")

    def receive(self) -> dict[str, Any]:
        """Another rank: rank 0's decision (waits for it)."""
        try:
            self.store.wait([self.key("decision")])
            decision = json.loads(self.store.get(self.key("decision")))
        except Exception as error:  # noqa: BLE001
            raise SystemExit(f"error: rank {self.launch.rank}: rank 0 gave no run directory ({error})") from None
        self.store.add(self.key("decision-read"), 1)
        return decision

    def fail(self, message: str) -> None:
        """Tell every other rank that this one stops with ``message`` (only before the process group is up)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return
        self._failed_here = True
        try:
            self.store.set(self.key("failed"), f"rank {self.launch.rank} stopped: {message}")
        except Exception:  # noqa: BLE001 (rank 0 is gone already: nobody to tell)
            return
        self._wait_until_read("failure-read")

    def _wait_until_read(self, counter: str) -> None:
        """Rank 0 hosts the store: keep it up until the others read (or ``ACK_TIMEOUT_S`` passed)."""
        if not (self.launch.is_zero and self.launch.hosts_store):
            return
        end = time.monotonic() + ACK_TIMEOUT_S
        while self.store.add(self.key(counter), 0) < self.launch.world_size - 1 and time.monotonic() < end:
            time.sleep(POLL_S)

    def watch(self, stop: Callable[[str], None]) -> threading.Thread:
        """Until the process group is up, call ``stop(message)`` when another rank failed or rank 0 went away."""

        def run() -> None:
            import torch.distributed as dist

            while not (dist.is_available() and dist.is_initialized()) and not self._failed_here:
                try:
                    if self.store.check([self.key("failed")]):
                        message = self.store.get(self.key("failed")).decode()
                        self.store.add(self.key("failure-read"), 1)
                        if not self._failed_here:
                            stop(f"error: {message}")
                        return
                except Exception:  # noqa: BLE001 (the store's server, in rank 0, is gone)
                    if not (dist.is_initialized() or self._failed_here):
                        stop(f"error: rank 0 stopped before the process group was up (rank {self.launch.rank})")
                    return
                time.sleep(POLL_S)

        thread = threading.Thread(target=run, name="composites-rank-agreement", daemon=True)
        thread.start()
        return thread


_CURRENT: RankAgreement | None = None


def current() -> RankAgreement | None:
    """This process's agreement, when srun or torchrun started it among several ranks (None otherwise)."""
    return _CURRENT


def _exit_now(message: str) -> None:
    """Stop this process from the watcher thread: the main thread may sit in a blocking rendezvous."""
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)


def agree(decide: Callable[[], dict[str, Any]], launch: Launch | None = None) -> dict[str, Any]:
    """Take ``decide()`` on rank 0 only and return it on every rank.

    ``decide`` returns a JSON-able mapping; one with ``error`` set refuses the run: every rank
    prints it and exits 1 at once (rank 0 after the others have read it). Without a multi-process
    launch (:func:`detect_launch`) it simply calls ``decide``. After the agreement, a failure of
    any rank before the process group is up stops every rank (:func:`stop_together`).

    >>> agree(lambda: {"run_dir": "/runs/a", "error": None}, launch=None)
    {'run_dir': '/runs/a', 'error': None}
    """
    global _CURRENT
    if launch is None:
        decision = decide()
    else:
        if _CURRENT is None or _CURRENT.launch != launch:
            _CURRENT = RankAgreement(launch)
        if launch.is_zero:
            try:
                decision = decide()
            except BaseException as error:  # the others must not wait for a decision that never comes
                _CURRENT.publish({"error": f"rank 0 could not decide: {_message(error)}"})
                raise
            _CURRENT.publish(decision)
        else:
            decision = _CURRENT.receive()
        if not decision.get("error"):
            _CURRENT.watch(_exit_now)
    if decision.get("error"):
        who = (
            f" (rank {launch.rank} of {launch.world_size}, as rank 0 decided)" if launch and not launch.is_zero else ""
        )
        raise SystemExit(f"error{who}: {decision['error']}")
    return decision


@contextmanager
def stop_together() -> Iterator[None]:
    """Around a rank's work: an exception before the process group is up stops the other ranks too, with its message.

    Without an agreement (one process, Lightning's launcher) it only lets the exception through.

    >>> with stop_together():
    ...     pass
    """
    try:
        yield
    except BaseException as error:
        agreement = current()
        if agreement is not None and not (isinstance(error, SystemExit) and error.code in (0, None)):
            agreement.fail(_message(error))
        raise


def _message(error: BaseException) -> str:
    if isinstance(error, SystemExit):
        return str(error.code).removeprefix("error: ")
    return f"{type(error).__name__}: {error}"
