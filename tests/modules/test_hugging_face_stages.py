"""A Hugging Face model as a stage: built from a tiny config (nothing downloaded), its ModelOutput picked by field."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from composites import CompositeModule, GradientGuard, Sequential, StageError
from tests.stand_ins import TINY_TEXT, with_grad

transformers = pytest.importorskip("transformers")


def bert(pooler: bool = True) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(**TINY_TEXT | dict(vocab_size=32, num_hidden_layers=1, max_position_embeddings=16))
    return transformers.BertModel(config, add_pooling_layer=pooler)


tokens = torch.randint(0, 32, (4, 8), generator=torch.Generator().manual_seed(0))


def test_the_pooled_output_goes_to_the_head_and_every_parameter_gets_a_gradient():
    model = Sequential({"bert": bert(), "head": nn.Linear(16, 3)}, outputs={"bert": "pooler_output"})
    guard = GradientGuard(model)
    out = model(tokens)
    assert out.shape == (4, 3)
    out.sum().backward()
    report = guard.check()  # raises on any parameter without a gradient
    assert report.ok and report.checked == len(list(model.parameters()))
    assert with_grad(model) == {n for n, _ in model.named_parameters()}


def test_the_hidden_states_pooled_by_a_function():
    model = Sequential(
        {"bert": bert(pooler=False), "head": nn.Linear(16, 3)},
        outputs={"bert": lambda out: out.last_hidden_state.mean(dim=1)},
    )
    guard = GradientGuard(model)
    model(tokens).sum().backward()
    assert guard.check().ok


def test_a_field_the_model_did_not_return_is_named_with_the_ones_it_did():
    model = Sequential({"bert": bert(pooler=False), "head": nn.Linear(16, 3)}, outputs={"bert": "pooler_output"})
    with pytest.raises(
        ValueError,
        match="returned BaseModelOutputWithPoolingAndCrossAttentions .* with fields last_hidden_state; pick one",
    ):
        model(tokens)


def test_without_outputs_the_model_output_goes_on_by_keyword_and_the_error_says_how_to_pick():
    model = Sequential({"bert": bert(), "head": nn.Linear(16, 3)})
    with pytest.raises(
        StageError, match=r"unexpected keyword argument 'last_hidden_state' .*outputs=\{'bert': '<field name>'\}"
    ):
        model(tokens)


def test_trains_under_a_trainer_with_the_guard_on():
    import pytorch_lightning as pl

    model = Sequential({"bert": bert(), "head": nn.Linear(16, 3)}, outputs={"bert": "pooler_output"})
    module = CompositeModule(model, nn.CrossEntropyLoss(), partial(torch.optim.Adam, lr=1e-3))
    data = DataLoader(TensorDataset(tokens.repeat(2, 1), torch.tensor([0, 1, 2, 0] * 2)), batch_size=4)
    before = model.bert.embeddings.word_embeddings.weight.detach().clone()
    trainer = pl.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=data)  # guard="raise": a parameter without a gradient stops it
    assert trainer.global_step == 2
    assert not torch.equal(model.bert.embeddings.word_embeddings.weight, before)
