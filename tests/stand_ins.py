"""Deterministic stand-ins shared by the tests: plain functions, importable anywhere.

A stand-in builds or inspects something (a layer with known weights, the set of parameters that
got a gradient); fixtures in ``tests/conftest.py`` set up and undo state around one test (seeds,
Dynamo's caches). Spawned worker processes and module-level builders use these functions
directly, since fixtures reach only test functions.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

# A tiny BERT-like text model, as Hugging Face config keywords: built in a blink, nothing downloaded, no dropout.
TINY_TEXT = dict(vocab_size=99, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
TINY_TEXT |= dict(max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def linear(n_in: int, n_out: int, w: float = 0.1, b: float = 0.0) -> nn.Linear:
    """A Linear with constant weight ``w`` and bias ``b``: exact outputs, no dead unit by accident."""
    layer = nn.Linear(n_in, n_out)
    nn.init.constant_(layer.weight, w)
    nn.init.constant_(layer.bias, b)
    return layer


def identity_linear(n: int, bias: bool = True) -> nn.Linear:
    """An n -> n Linear that returns its input (identity weight, zero bias).

    As a gate its scores are the input itself, so a test picks the routing by hand.
    """
    layer = nn.Linear(n, n, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(n))
        if bias:
            layer.bias.zero_()
    return layer


def with_grad(model: nn.Module) -> set[str]:
    """Names of the parameters that hold a gradient."""
    return {n for n, p in model.named_parameters() if p.grad is not None}


def record_inputs(model: nn.Module) -> dict[str, list[Tensor]]:
    """branch name -> the first input of each call of that branch of a Conditional or Parallel, from now on."""
    calls: dict[str, list[Tensor]] = {name: [] for name in model.branch_names}
    for name in model.branch_names:
        model.get_submodule(name).register_forward_hook(lambda m, args, out, name=name: calls[name].append(args[0]))
    return calls


def seeded_batches(count: int, *shape: int) -> list[Tensor]:
    """``count`` fresh normal batches of ``shape``, batch i drawn from a generator seeded with i."""
    return [torch.randn(*shape, generator=torch.Generator().manual_seed(i)) for i in range(count)]


class CompileSpy:
    """A ``torch.compile`` backend that notes Inductor's ``fallback_random`` as each graph reaches it, then runs the graph eagerly.

    What Inductor would compile there, it would compile under that setting, without the minutes
    Inductor takes for a real model on a CPU.
    """

    def __init__(self) -> None:
        self.fallback_random: list[bool] = []

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list) -> object:
        from torch._inductor import config

        self.fallback_random.append(config.fallback_random)
        return graph.forward


def check_png(path: Path, min_width: int = 900, min_height: int = 300) -> None:
    """``path`` is a real picture: a PNG over 10 kB, RGB(A), between the given size and 4000 px a side."""
    from matplotlib.image import imread  # here, so the stand-ins import without matplotlib

    path = Path(path)
    assert path.is_file() and path.stat().st_size > 10_000
    height, width, channels = imread(path).shape
    assert channels in (3, 4)
    assert min_width <= width <= 4000 and min_height <= height <= 4000
