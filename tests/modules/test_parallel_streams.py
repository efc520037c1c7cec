"""Parallel(streams=True): the same results as serial; on CUDA each branch on its own stream."""

import pytest
import torch
from torch import nn

from composites import Parallel, StageError
from tests.stand_ins import linear, with_grad

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def branches():
    return {"a": linear(3, 2, w=1.0), "b": linear(3, 2, w=-2.0, b=1.0), "c": linear(3, 4, w=0.5)}


def run(model, x):
    out = model(x)
    out.square().sum().backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_on_cpu_streams_change_nothing_but_the_repr():
    x = torch.arange(6.0).reshape(2, 3)
    serial, streamed = Parallel(branches()), Parallel(branches(), streams=True)
    out_s, grads_s = run(serial, x)
    out_t, grads_t = run(streamed, x)
    assert torch.equal(out_t, out_s)
    assert grads_t.keys() == grads_s.keys() == with_grad(streamed)
    assert all(torch.equal(grads_t[n], grads_s[n]) for n in grads_s)
    assert "combine='concat', streams=True" in repr(streamed)
    assert "streams" not in repr(serial)


def test_a_failing_branch_is_still_named_with_streams():
    model = Parallel({"ok": nn.Identity(), "bad": nn.Linear(5, 2)}, streams=True)
    with pytest.raises(StageError, match="branch 'bad'"):
        model(torch.ones(2, 3))


@cuda
def test_on_cuda_branches_run_on_their_own_streams_without_a_host_sync():
    x = torch.arange(6.0, device="cuda").reshape(2, 3)
    serial = Parallel(branches()).cuda()
    streamed = Parallel(branches(), streams=True).cuda()
    seen = {}
    for name in streamed.branch_names:
        streamed.get_submodule(name).register_forward_pre_hook(
            lambda m, args, name=name: seen.__setitem__(name, torch.cuda.current_stream().stream_id)
        )
    main = torch.cuda.current_stream().stream_id
    torch.cuda.set_sync_debug_mode("error")  # any host sync in the forward raises
    try:
        out_t = streamed(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert seen["a"] == main and len({seen["b"], seen["c"], main}) == 3
    assert torch.cuda.current_stream().stream_id == main
    out_s, grads_s = run(serial, x)
    out_t.square().sum().backward()
    torch.testing.assert_close(out_t, out_s)
    for n, p in streamed.named_parameters():
        torch.testing.assert_close(p.grad, grads_s[n])


def test_side_streams_wait_for_the_inputs_before_the_first_branch_is_queued(monkeypatch):
    # Logged stand-ins for the CUDA stream calls: a side stream that started waiting only
    # after branch 1 was queued on the current stream would wait for branch 1 as well, and
    # nothing would overlap. Runs on CPU; the real streams are exercised by the CUDA test.
    from composites.modules.streams import run_on_streams

    log = []

    class FakeStream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            log.append(f"{self.name} waits for {other.name}")

    current = FakeStream("current")
    pool = iter(FakeStream(f"side{i}") for i in range(1, 3))
    active = [current]

    class Using:
        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            active.append(self.stream)

        def __exit__(self, *exc):
            active.pop()

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: next(pool))
    monkeypatch.setattr(torch.cuda, "stream", Using)
    jobs = {name: (lambda name=name: log.append(f"{name} on {active[-1].name}") or name) for name in "abc"}
    assert run_on_streams(jobs, (), torch.device("cpu")) == {"a": "a", "b": "b", "c": "c"}
    assert log == [
        "side1 waits for current",
        "side2 waits for current",
        "a on current",
        "b on side1",
        "c on side2",
        "current waits for side1",
        "current waits for side2",
    ]
