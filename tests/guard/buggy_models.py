"""Models with the gradient bugs users actually write, shared by the guard tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from composites import GradientFlowError, GradientGuard
from tests.stand_ins import linear

FIELDS = ("module", "cause", "where")


def problems(guard: GradientGuard, *fields: str) -> dict:
    """``{parameter: (module, cause, where)}`` of a check that must raise; ``fields`` picks other Problem fields.

    With one field the values are that field alone (``problems(guard, "cause")`` -> ``{parameter: cause}``);
    ``set(problems(guard))`` is the set of parameter names.
    """
    with pytest.raises(GradientFlowError) as caught:
        guard.check()
    fields = fields or FIELDS
    pick = (lambda p: getattr(p, fields[0])) if len(fields) == 1 else (lambda p: tuple(getattr(p, f) for f in fields))
    return {p.parameter: pick(p) for p in caught.value.problems}


class NumpyEncoder(nn.Module):
    """Hands its features on through numpy, as in 'chain a pretrained encoder' snippets."""

    def __init__(self) -> None:
        super().__init__()
        self.net = linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.net(x).detach().numpy())


class NoGradInside(nn.Module):
    """Runs its first layer under torch.no_grad() inside forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = linear(3, 3), linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            h = self.fc1(x)
        return self.fc2(h)


class Detaching(nn.Module):
    """Detaches its own layer's output and passes its input on: ``fc`` never gets a gradient where it runs."""

    def __init__(self, width: int = 3) -> None:
        super().__init__()
        self.fc = linear(3, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).detach() + x[:, : self.fc.out_features]


class DetachInside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = linear(3, 3), linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x).detach())


class ItemRoundTrip(nn.Module):
    """Turns an activation into Python floats and back (``.tolist()`` + ``torch.tensor``)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder, self.head = linear(3, 3), linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tensor(self.encoder(x).tolist())
        return self.head(h)


class CustomLayer(nn.Module):
    """The classic: a weight made with torch.randn(..., requires_grad=True), not nn.Parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = linear(3, 2)
        self.scale = torch.ones(2, requires_grad=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * self.scale


class ForgotAux(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder, self.aux, self.head = linear(3, 3), linear(3, 3), linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class ArgmaxRouter(nn.Module):
    """A learned rule that picks a branch name by argmax: no gradient reaches it."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = linear(3, 2)

    def forward(self, x: torch.Tensor) -> str:
        return ("a", "b")[int(self.gate(x).mean(0).argmax())]


class NaNBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * torch.tensor(float("nan"))
