"""load_pretrained: a sub-model's weights from a real run's checkpoint, in Python and from YAML."""

from __future__ import annotations

import pytest
import torch
from hydra.errors import InstantiationException
from torch import nn

from composites import Sequential
from composites.modules import PretrainedKeysError, load_pretrained
from composites_hydra import build_node
from tests.tiny_runs import fit, model, module_for


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory):
    """An earlier run's Lightning checkpoint (keys model.encoder.*, model.head.*) and its model."""
    module = module_for(model())
    trainer = fit(module, epochs=1)
    path = tmp_path_factory.mktemp("run") / "last.ckpt"
    trainer.save_checkpoint(path)
    return path, module.model


def test_a_sub_model_loads_from_an_earlier_runs_checkpoint_by_key_prefix(earlier_run):
    path, trained = earlier_run
    encoder = load_pretrained(nn.Linear(4, 8), path, prefix="model.encoder.")
    assert torch.equal(encoder.weight, trained.encoder.weight) and torch.equal(encoder.bias, trained.encoder.bias)
    assert encoder.weight.requires_grad  # loading does not freeze unless asked
    assert not load_pretrained(nn.Linear(8, 3), path, prefix="model.head.", freeze=True).weight.requires_grad


def pretrained_encoder_node(path, prefix: str) -> dict:
    """The YAML of an encoder sub-model wrapped in load_pretrained, as a config holds it."""
    module = {"_target_": "torch.nn.Linear", "in_features": 4, "out_features": 8}
    return {"_target_": "composites.modules.load_pretrained", "module": module, "path": str(path), "prefix": prefix}


def test_yaml_wraps_the_sub_model_node_in_load_pretrained(earlier_run):
    path, trained = earlier_run
    node = pretrained_encoder_node(path, prefix="model.encoder.")
    encoder = build_node(node)
    assert isinstance(encoder, nn.Linear) and torch.equal(encoder.weight, trained.encoder.weight)


def test_through_hydra_the_error_keeps_its_lines(earlier_run):
    path, _ = earlier_run
    node = pretrained_encoder_node(path, prefix="encoder.")
    with pytest.raises(InstantiationException) as caught:  # Hydra shows repr(error) of a failed _target_
        build_node(node)
    assert (
        f"PretrainedKeysError: no key in {path} starts with the prefix 'encoder.':\n"
        "  fix: prefix: 'model.encoder.' (the checkpoint's keys look like that + the sub-model's)" in str(caught.value)
    )


def test_a_prefix_mapping_renames_keys_of_a_state_dict_file(tmp_path):
    source = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))
    path = tmp_path / "weights.pt"
    torch.save({**{f"backbone.{k}": v for k, v in source.state_dict().items()}, "other.w": torch.ones(1)}, path)
    target = Sequential({"first": nn.Linear(4, 8), "second": nn.Linear(8, 3)})
    load_pretrained(target, path, prefix={"backbone.0.": "first.", "backbone.1.": "second."})
    assert torch.equal(target.first.weight, source[0].weight) and torch.equal(target.second.bias, source[1].bias)


def test_strict_by_default_the_error_lists_missing_and_unexpected_keys(earlier_run):
    path, trained = earlier_run
    wider = Sequential({"encoder": nn.Linear(4, 8), "extra": nn.Linear(8, 8)})  # no head, an extra stage
    with pytest.raises(PretrainedKeysError) as caught:
        load_pretrained(wider, path, prefix="model.")
    err = caught.value
    assert err.missing == ["extra.weight", "extra.bias"] and err.unexpected == ["head.weight", "head.bias"]
    assert str(err).splitlines() == [
        f"the weights in {path} do not fit the sub-model:",
        "  2 missing (the sub-model has them, the checkpoint not): extra.weight, extra.bias",
        "  2 unexpected (the checkpoint has them, the sub-model not): head.weight, head.bias",
        "  fix: choose the prefix that selects exactly this sub-model's keys, or strict: false to load what fits",
    ]
    load_pretrained(wider, path, prefix="model.", strict=False)  # what fits is loaded, the rest stays as built
    assert torch.equal(wider.encoder.weight, trained.encoder.weight)


def test_a_wrong_prefix_and_a_wrong_shape_are_named(earlier_run):
    path, _ = earlier_run
    with pytest.raises(PretrainedKeysError, match=r"fix: prefix: 'model\.encoder\.'"):
        load_pretrained(nn.Linear(4, 8), path)  # the keys are model.encoder.*: the prefix that fits is named
    with pytest.raises(PretrainedKeysError, match=r"no key in .* starts with the prefix 'model\.enc\.'"):
        load_pretrained(nn.Linear(4, 8), path, prefix="model.enc.")
    with pytest.raises(PretrainedKeysError) as caught:
        load_pretrained(nn.Linear(4, 16), path, prefix="model.encoder.", strict=False)  # shapes never pass
    assert caught.value.mismatched == [("weight", (8, 4), (16, 4)), ("bias", (8,), (16,))]
