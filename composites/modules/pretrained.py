"""Load one sub-model's weights from an earlier run's checkpoint or a state_dict file (torch only)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

_SHOWN = 12  # keys listed per kind in an error; the rest are counted


class PretrainedKeysError(ValueError):
    """The checkpoint's keys (after the prefix mapping) do not fit the sub-model.

    ``missing`` are the sub-model's keys the checkpoint lacks, ``unexpected`` the checkpoint's
    keys the sub-model lacks, ``mismatched`` ``(key, checkpoint shape, sub-model shape)``
    triples. ``str(err)`` lists them and the fix.

    >>> err = PretrainedKeysError("run.ckpt", ["bias"], [], [], "strict: false to load what fits")
    >>> print(err)
    the weights in run.ckpt do not fit the sub-model:
      1 missing (the sub-model has them, the checkpoint not): bias
      fix: strict: false to load what fits
    """

    def __init__(
        self,
        path: str,
        missing: list[str],
        unexpected: list[str],
        mismatched: list[tuple[str, tuple, tuple]],
        hint: str,
        headline: str = "",
    ):
        self.path = path
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched
        self.hint = hint
        self.headline = headline
        lines = [headline or f"the weights in {path} do not fit the sub-model:"]
        if missing:
            lines.append(f"  {len(missing)} missing (the sub-model has them, the checkpoint not): {_listed(missing)}")
        if unexpected:
            lines.append(
                f"  {len(unexpected)} unexpected (the checkpoint has them, the sub-model not): {_listed(unexpected)}"
            )
        if mismatched:
            shapes = [f"{k} {tuple(a)} in the checkpoint, {tuple(b)} in the sub-model" for k, a, b in mismatched]
            lines.append(f"  {len(mismatched)} of another shape: {_listed(shapes)}")
        lines.append(f"  fix: {hint}")
        super().__init__("\n".join(lines))

    def __reduce__(self):
        return type(self), (self.path, self.missing, self.unexpected, self.mismatched, self.hint, self.headline)

    def __repr__(self) -> str:  # Hydra shows repr(error) of a failed _target_: keep the lists readable
        return f"{type(self).__name__}: {self}"


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f", ... ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")


def read_state_dict(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Tensor]:
    """The tensors of a checkpoint: a Lightning ``.ckpt`` (its ``state_dict``), a ``torch.save``d state_dict,
    or a ``.safetensors`` file. Read with ``weights_only=True``: no pickled code runs.

    >>> import tempfile
    >>> path = tempfile.mkdtemp() + "/run.ckpt"
    >>> torch.save({"epoch": 3, "state_dict": {"model.head.bias": torch.zeros(2)}}, path)  # Lightning's layout
    >>> list(read_state_dict(path))
    ['model.head.bias']
    """
    if str(path) == "???":  # Hydra's mandatory value, never filled in
        raise ValueError("load_pretrained: 'path' is not set (it is ??? in the config): give the checkpoint file")
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"pretrained checkpoint {file} does not exist (the 'path' of load_pretrained)")
    if file.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as error:
            raise ImportError(f"{file} is a .safetensors file: pip install safetensors to read it") from error
        return load_file(str(file), device=str(map_location))
    state = torch.load(file, map_location=map_location, weights_only=True)
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]  # a Lightning checkpoint: the LightningModule's state_dict
    if not isinstance(state, Mapping):
        raise TypeError(f"{file} holds a {type(state).__name__}, not a state_dict (a mapping name -> tensor)")
    return dict(state)


def _rename(keys: list[str], prefix: str | Mapping[str, str]) -> dict[str, str]:
    """checkpoint key -> sub-model key; keys under none of the prefixes are left out (other sub-models' weights)."""
    mapping = {prefix: ""} if isinstance(prefix, str) else {str(k): str(v) for k, v in prefix.items()}
    renamed = {}
    for key in keys:
        hits = [old for old in mapping if key.startswith(old)]
        if hits:
            old = max(hits, key=len)  # the most specific prefix wins
            renamed[key] = mapping[old] + key[len(old) :]
    return renamed


def _suggest(expected: list[str], available: list[str]) -> str:
    """A prefix that would map the checkpoint's keys onto the sub-model's, when one does."""
    for key in expected:
        for found in available:
            if found.endswith("." + key):
                return f"prefix: '{found[: -len(key)]}' (the checkpoint's keys look like that + the sub-model's)"
    tops = sorted({k.split(".")[0] + "." for k in available})[:_SHOWN]
    return f"set prefix to the part of the checkpoint's keys before the sub-model's own (they start with {', '.join(tops)})"


def load_pretrained(
    module: nn.Module,
    path: str | os.PathLike,
    prefix: str | Mapping[str, str] = "",
    strict: bool = True,
    freeze: bool = False,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Load ``module``'s weights from a checkpoint and return ``module`` (so YAML can wrap a sub-model in it).

    ``path`` is an earlier run's Lightning ``.ckpt`` (whose keys are the LightningModule's:
    ``model.<sub-model>.<parameter>`` for a :class:`~composites.CompositeModule`), a file written
    by ``torch.save(model.state_dict(), path)``, or a ``.safetensors`` file.

    Args:
        module: the sub-model to fill (built as usual: same architecture as the one saved).
        path: the checkpoint file.
        prefix: which checkpoint keys are this sub-model's: a string is cut off the keys that
            start with it (``"model.encoder."``); a mapping renames prefixes, old -> new
            (``{"model.encoder.": "", "model.proj.": "head."}``), the longest match winning.
            Keys under no prefix are other sub-models' and are ignored. ``""``: every key.
        strict: every key of the sub-model must be loaded and every selected checkpoint key used.
            With ``strict=False`` whatever fits by name is loaded and the rest left as built.
        freeze: set ``requires_grad=False`` on the loaded sub-model (for good; to unfreeze later
            in training, use :class:`~composites.training.FreezeSubmodels` instead).
        map_location: where the tensors are read to before they are copied in.

    Raises:
        PretrainedKeysError: keys missing or unexpected (under ``strict``), or any shape differs;
            the message lists them and the prefix that would fit, when one does.

    Example:
        >>> import tempfile, torch
        >>> from torch import nn
        >>> from composites import Sequential
        >>> earlier = Sequential({"encoder": nn.Linear(4, 8), "head": nn.Linear(8, 2)})
        >>> path = tempfile.mkdtemp() + "/model.pt"
        >>> torch.save(earlier.state_dict(), path)
        >>> encoder = load_pretrained(nn.Linear(4, 8), path, prefix="encoder.")
        >>> torch.equal(encoder.weight, earlier.encoder.weight)
        True
        >>> load_pretrained(nn.Linear(4, 8), path)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        composites.modules.pretrained.PretrainedKeysError: the weights in ... do not fit the sub-model:
          2 missing (the sub-model has them, the checkpoint not): weight, bias
          4 unexpected (the checkpoint has them, the sub-model not): encoder.weight, encoder.bias, head.weight, head.bias
          fix: prefix: 'encoder.' (the checkpoint's keys look like that + the sub-model's)
    """
    state = read_state_dict(path, map_location)
    renamed = _rename(list(state), prefix)
    if not renamed:
        raise PretrainedKeysError(
            str(path),
            [],
            [],
            [],
            _suggest(list(module.state_dict()), list(state)),
            headline=f"no key in {path} starts with the prefix {prefix!r}:",
        )
    selected = {new: state[old] for old, new in renamed.items()}
    own = module.state_dict()
    missing = [k for k in own if k not in selected]
    unexpected = [k for k in selected if k not in own]
    mismatched = [
        (k, tuple(v.shape), tuple(own[k].shape)) for k, v in selected.items() if k in own and v.shape != own[k].shape
    ]
    if mismatched or (strict and (missing or unexpected)):
        if mismatched:
            hint = "build the sub-model as it was saved (same sizes), or leave these keys out with a narrower prefix"
        elif missing and len(missing) == len(own):
            hint = _suggest(missing, list(state))
        else:
            hint = "choose the prefix that selects exactly this sub-model's keys, or strict: false to load what fits"
        raise PretrainedKeysError(str(path), missing, unexpected, mismatched, hint)
    module.load_state_dict({k: v for k, v in selected.items() if k in own}, strict=strict)
    if freeze:
        module.requires_grad_(False)
    return module
