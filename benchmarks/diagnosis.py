"""Section diagnosis: what a failing check costs on a deep model, in clean train steps.

A guard pays for its diagnosis only when a check fails: it replays the step's forward with a
hook on every module and works out, per parameter without a gradient, where it was cut off.
On a deep model (hundreds of module calls, thousands of graph nodes) that used to walk the
graph once per call and the trace once per parameter: 36-73 s on torchvision's Mask R-CNN.
Here a ResNet-152-shaped conv net and a 24-layer transformer encoder (torch only) get a
``.detach()`` or a ``torch.no_grad()`` injected halfway, and a step whose check fails and
names the cause is timed against a clean guarded step of the same model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from benchmarks import Row, Settings, compared, interleave
from composites import GradientGuard

# a failing step replays one forward and reads the graph once: a few clean steps' worth
TARGET = 6.0


class Bottleneck(nn.Module):
    """ResNet's bottleneck block: 1x1, 3x3, 1x1 convolutions with batch norm, and a shortcut."""

    def __init__(self, cin: int, mid: int, stride: int):
        super().__init__()
        cout = mid * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.down = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.relu(self.bn2(self.conv2(h)))
        return self.relu(self.bn3(self.conv3(h)) + self.down(x))


def deep_convnet(depths: tuple[int, ...] = (3, 8, 36, 3), width: int = 8, classes: int = 10) -> nn.Sequential:
    """A ResNet-shaped conv net (ResNet-152's depths by default: 425 modules, 467 parameters).

    >>> net = deep_convnet((1, 1), width=4)
    >>> net(torch.zeros(1, 3, 16, 16)).shape
    torch.Size([1, 10])
    """
    stem = nn.Sequential(
        nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
    )
    stages, cin = [], width
    for i, depth in enumerate(depths):
        blocks = []
        for j in range(depth):
            blocks.append(Bottleneck(cin, width * 2**i, 2 if j == 0 and i > 0 else 1))
            cin = width * 2**i * 4
        stages.append(nn.Sequential(*blocks))
    return nn.Sequential(stem, *stages, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))


def deep_transformer(layers: int = 24, width: int = 64, classes: int = 10) -> nn.Sequential:
    """An embedding, ``layers`` transformer encoder layers (``nn.MultiheadAttention`` inside), a head.

    >>> deep_transformer(2, 16)(torch.zeros(2, 5, dtype=torch.long)).shape
    torch.Size([2, 10])
    """
    layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
    return nn.Sequential(nn.Embedding(100, width), encoder, _MeanTokens(), nn.Linear(width, classes))


class _MeanTokens(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=1)


def inject(bug: str, module: nn.Module) -> None:
    """Break ``module`` the way users do: ``"detach"`` its output, or run it under ``"no_grad"``."""
    if bug == "detach":
        module.register_forward_hook(lambda m, args, out: out.detach())
    else:
        forward = module.forward
        module.forward = lambda *args, **kwargs: torch.no_grad()(forward)(*args, **kwargs)


def guarded_step(model: nn.Module, x: Tensor) -> Callable[[], int]:
    """Forward, backward and ``guard.check()`` (no raise) on ``model``; returns the number of problems found."""
    guard = GradientGuard(model)

    def step() -> int:
        model.zero_grad(set_to_none=True)
        model(x).float().sum().backward()
        return len(guard.check(raise_error=False).problems)

    step.guard = guard  # kept alive with the closure: the model's hooks hold it only weakly
    return step


def models(quick: bool) -> dict[str, tuple[nn.Module, Tensor, Callable[[nn.Module], nn.Module]]]:
    """name -> (model, input, where in it to inject the bug)."""
    torch.manual_seed(0)
    conv = deep_convnet((2, 2, 6, 2) if quick else (3, 8, 36, 3))
    text = deep_transformer(6 if quick else 24)
    return {
        f"conv net, {len(list(conv.modules()))} modules": (conv, torch.randn(2, 3, 64, 64), lambda m: m[3]),
        f"transformer, {len(text[1].layers)} layers": (
            text,
            torch.randint(0, 100, (4, 32)),
            lambda m: m[1].layers[len(m[1].layers) // 2],
        ),
    }


def run(s: Settings) -> list[Row]:
    """A failing, diagnosed step against a clean step of the same model, for a detach and a no_grad halfway."""
    rows = []
    for name, (model, x, where) in models(s.quick).items():
        for bug in ("detach", "no_grad"):
            broken = copy.deepcopy(model)
            inject(bug, where(broken))
            clean, failing = guarded_step(copy.deepcopy(model), x), guarded_step(broken, x)
            found = failing()
            assert clean() == 0 and found > 0, (name, bug)
            t = interleave({"clean": clean, "failing": failing}, s.scaled(0.5), warmup=1)
            note = f"{found} parameters named; diagnosis {(t.median('failing') - t.median('clean')) * 1e3:.0f} ms"
            rows.append(
                compared("diagnosis", f"{name}, {bug}: failing / clean step", t, "failing", "clean", TARGET, note)
            )
    return rows
