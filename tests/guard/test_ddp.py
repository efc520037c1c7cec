"""The guard under two-rank gloo DDP: one verdict on every rank, never a rank raising alone."""

import json
import socket
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from tests.guard import ddp_workers

TIMEOUT_S = 180  # a hang fails here; a slow, busy 2-core machine does not


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(scenario: str, out_dir: Path) -> dict[int, list]:
    """Each rank's verdicts, as soon as both have written them; fails (never hangs) past the deadline.

    What is under test is what the ranks report; a rank slow to tear its process group down
    afterwards is not waited for.
    """
    procs = mp.start_processes(
        ddp_workers.run, args=(2, free_port(), scenario, str(out_dir)), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    paths = {rank: out_dir / f"rank{rank}.json" for rank in (0, 1)}
    try:
        while not all(path.exists() for path in paths.values()):
            reported = sorted(rank for rank, path in paths.items() if path.exists())
            if time.monotonic() > deadline:
                pytest.fail(f"DDP scenario '{scenario}': only ranks {reported} reported within {TIMEOUT_S}s")
            codes = [p.exitcode for p in procs.processes]
            if any(code not in (None, 0) for code in codes) and not all(path.exists() for path in paths.values()):
                pytest.fail(
                    f"DDP scenario '{scenario}': a rank died (exit codes {codes}) after ranks {reported} reported"
                )
            time.sleep(0.2)
    finally:
        for p in procs.processes:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return {rank: json.loads(path.read_text()) for rank, path in paths.items()}


@pytest.mark.slow
def test_branch_active_on_one_rank_only_passes_and_routed_out_branch_is_listed(tmp_path):
    outcomes = run_two_ranks("one_rank", tmp_path)
    # 'a' runs on rank 0, 'b' on rank 1, so both are reached somewhere; 'c' runs nowhere
    inactive = ["experts.c.bias", "experts.c.weight"]
    for rank in (0, 1):
        assert [status for status, _ in outcomes[rank]] == ["ok"] * 3
    assert outcomes[0][0][1] == ["experts.b.bias", "experts.b.weight"] + inactive
    assert outcomes[1][0][1] == ["experts.a.bias", "experts.a.weight"] + inactive


@pytest.mark.slow
def test_parameter_unused_on_every_rank_raises_the_same_error_on_every_rank_at_the_first_step(tmp_path):
    outcomes = run_two_ranks("unused_everywhere", tmp_path)
    expected = [["error", [["aux.bias", "aux", "unused"], ["aux.weight", "aux", "unused"]]]]
    assert outcomes[0] == outcomes[1] == expected


@pytest.mark.slow
def test_cause_comes_from_the_rank_that_ran_the_branch_not_from_one_that_routed_it_out(tmp_path):
    outcomes = run_two_ranks("detached_where_routed", tmp_path)
    expected = [
        ["error", [["experts.b.fc.bias", "experts.b", "detached"], ["experts.b.fc.weight", "experts.b", "detached"]]]
    ]
    assert outcomes[0] == outcomes[1] == expected
