"""The guard on real architectures from Hugging Face transformers, built from tiny configs (nothing downloaded).

Clean runs pass; an injected ``.detach()`` or ``torch.no_grad()`` names exactly the parameters
it cut off; a pooler left out of the loss is ``not_in_loss``; MoE experts and LayerDrop layers
declared ``may_skip`` are inactive when they sit a step out, and without ``may_skip`` are exactly
the layers that did not run. timm is not used: it imports torchvision, whose wheels here pull a
CUDA torch.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from composites import GradientFlowError, GradientGuard
from tests.stand_ins import TINY_TEXT as TEXT
from tests.stand_ins import CompileSpy

T = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

IDS = torch.arange(16).remainder(97).view(2, 8) + 2  # no pad (0) or special tokens
PIXELS = torch.linspace(-1, 1, 2 * 3 * 16 * 16).view(2, 3, 16, 16)
SEQ2SEQ = dict(decoder_start_token_id=0, pad_token_id=0, bos_token_id=0, eos_token_id=1)


def first(out) -> Tensor:
    return out if isinstance(out, Tensor) else out[0] if isinstance(out, tuple) else out.to_tuple()[0]


def outcome(model: nn.Module, batch: dict, loss: Callable = lambda out: first(out).float().sum(), **guard_options):
    """One training step under a guard: {} when clean, else {parameter: cause}; plus the report or error."""
    torch.manual_seed(0)
    model.train()
    guard = GradientGuard(model, **guard_options)
    try:
        loss(model(**batch)).backward()
        try:
            return {}, guard.check()
        except GradientFlowError as err:
            return {p.parameter: p.cause for p in err.problems}, err
    finally:
        guard.remove()


def names(model: nn.Module, *patterns: str) -> set[str]:
    return {n for n, _ in model.named_parameters() if any(fnmatch.fnmatchcase(n, p) for p in patterns)}


def detach_output(module: nn.Module) -> None:
    """Inject the classic bug: the module's output is detached before the next layer reads it."""

    def hook(module, args, out):
        if isinstance(out, Tensor):
            return out.detach()
        return tuple(o.detach() if isinstance(o, Tensor) else o for o in out)

    module.register_forward_hook(hook)


def run_under_no_grad(module: nn.Module) -> None:
    """Inject the other classic: the module's forward runs under torch.no_grad()."""
    forward = module.forward
    module.forward = lambda *args, **kwargs: torch.no_grad()(forward)(*args, **kwargs)


def bert() -> nn.Module:
    return T.BertForSequenceClassification(T.BertConfig(**TEXT, num_labels=3))


def vit() -> nn.Module:
    config = T.ViTConfig(**{k: TEXT[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads")})
    config.update(dict(intermediate_size=32, image_size=16, patch_size=8, num_labels=3))
    return T.ViTForImageClassification(config)


def resnet() -> nn.Module:
    return T.ResNetForImageClassification(
        T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    )


# --- clean runs: every trainable parameter gets its gradient --------------------------------------------------------

CLEAN: dict[str, Callable[[], tuple[nn.Module, dict]]] = {
    "bert": lambda: (bert(), dict(input_ids=IDS)),
    "roberta": lambda: (
        T.RobertaForMaskedLM(T.RobertaConfig(**TEXT, pad_token_id=0, type_vocab_size=1)),
        dict(input_ids=IDS),
    ),
    "distilbert": lambda: (
        T.DistilBertForSequenceClassification(
            T.DistilBertConfig(vocab_size=99, dim=16, n_layers=2, n_heads=2, hidden_dim=32, max_position_embeddings=32)
        ),
        dict(input_ids=IDS),
    ),
    "gpt2 (tied embeddings)": lambda: (
        T.GPT2LMHeadModel(T.GPT2Config(vocab_size=99, n_embd=16, n_layer=2, n_head=2, n_positions=32, **SEQ2SEQ)),
        dict(input_ids=IDS),
    ),
    "t5": lambda: (
        T.T5ForConditionalGeneration(
            T.T5Config(vocab_size=99, d_model=16, d_ff=32, d_kv=8, num_layers=2, num_heads=2, **SEQ2SEQ)
        ),
        dict(input_ids=IDS, labels=IDS),
    ),
    "vit": lambda: (vit(), dict(pixel_values=PIXELS)),
    "resnet": lambda: (resnet(), dict(pixel_values=PIXELS)),
    "convnext": lambda: (
        T.ConvNextForImageClassification(
            T.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=3)
        ),
        dict(pixel_values=PIXELS),
    ),
}


@pytest.mark.parametrize("arch", sorted(CLEAN))
def test_a_clean_real_model_passes_with_every_parameter_checked(arch):
    model, batch = CLEAN[arch]()
    found, report = outcome(model, batch)
    assert found == {}
    assert report.checked == len(list(model.parameters())) and report.inactive == 0


# --- injected bugs: exact parameter sets and causes ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "layer", "bug", "cause", "cut_off"),
    [
        ("bert", "bert.encoder.layer.0", detach_output, "detached", ["bert.embeddings.*", "bert.encoder.layer.0.*"]),
        ("vit", "vit.layers.1", run_under_no_grad, "no_grad", ["vit.embeddings.*", "vit.layers.0.*", "vit.layers.1.*"]),
        (
            "resnet",
            "resnet.encoder.stages.0",
            detach_output,
            "detached",
            ["resnet.embedder.*", "resnet.encoder.stages.0.*"],
        ),
    ],
    ids=[
        "a detach injected after the first bert layer cuts off exactly the embeddings and that layer",
        "no_grad injected around a vit layer names it and everything before it no_grad",
        "a detach inside a resnet stage names the stem and the first stage",
    ],
)
def test_an_injected_bug_names_exactly_the_parameters_it_cut_off_with_its_cause(arch, layer, bug, cause, cut_off):
    model, batch = CLEAN[arch]()
    bug(model.get_submodule(layer))
    found, _ = outcome(model, batch)
    assert found == dict.fromkeys(names(model, *cut_off), cause)


def test_a_bert_pooler_left_out_of_the_loss_is_not_in_loss():
    model = T.BertModel(T.BertConfig(**TEXT))
    found, _ = outcome(model, dict(input_ids=IDS), loss=lambda out: out.last_hidden_state.sum())
    assert found == {"pooler.dense.weight": "not_in_loss", "pooler.dense.bias": "not_in_loss"}


# the tiny speech encoder both wav2vec2 and WavLM are built with: TEXT's transformer behind a two-layer conv front end
SPEECH = dict(
    **{k: TEXT[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")},
    conv_dim=(8, 8),
    conv_stride=(5, 2),
    conv_kernel=(10, 3),
    num_conv_pos_embeddings=4,
    num_conv_pos_embedding_groups=2,
)


def wav2vec2(layerdrop: float) -> nn.Module:
    config = T.Wav2Vec2Config(
        **SPEECH,
        mask_time_prob=0.05,
        layerdrop=layerdrop,
    )
    return T.Wav2Vec2Model(config)


AUDIO = dict(input_values=torch.linspace(-1, 1, 2 * 400).view(2, 400))


def test_a_wav2vec2_mask_embedding_not_read_once_masking_is_off_is_unused():
    model = wav2vec2(layerdrop=0.0)
    model.config.mask_time_prob = 0.0  # fine-tuning without SpecAugment: masked_spec_embed is never read
    found, _ = outcome(model, AUDIO)
    assert found == {"masked_spec_embed": "unused"}


def test_wav2vec2_layerdrop_with_may_skip_passes_and_lists_the_dropped_layers_inactive():
    model = wav2vec2(layerdrop=0.5)
    ran = ran_layers(model.encoder.layers)
    found, report = outcome(model, AUDIO, may_skip=["encoder.layers.*"])
    dropped = {i for i in range(2) if i not in ran}
    assert dropped and found == {}
    assert set(report.inactive_names) == names(model, *(f"encoder.layers.{i}.*" for i in dropped))


class AttentionBlock(nn.Module):
    """nn.MultiheadAttention reads out_proj.weight without calling out_proj; a .detach() after it."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(99, 16)
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids: Tensor) -> Tensor:
        h = self.embed(input_ids)
        attended, _ = self.attention(h, h, h)
        return self.head(attended.detach())


def test_multihead_attention_cut_after_it_names_every_weight_it_read_detached():
    model = AttentionBlock()
    found, _ = outcome(model, dict(input_ids=IDS))
    assert found == dict.fromkeys(names(model, "embed.*", "attention.*"), "detached")


# --- routing the guard does not own: may_skip ----------------------------------------------------------------------


def ran_layers(layers: nn.ModuleList) -> set[int]:
    ran: set[int] = set()
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda m, a, i=i: ran.add(i))
    return ran


def bart(layerdrop: float) -> nn.Module:
    sizes = dict(vocab_size=99, d_model=16, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32)
    layers = dict(encoder_layers=4, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2)
    drop = dict(encoder_layerdrop=layerdrop, decoder_layerdrop=0.0, dropout=0.0)
    return T.BartForConditionalGeneration(T.BartConfig(**sizes, **layers, **drop, **SEQ2SEQ))


def test_bart_layerdrop_without_may_skip_names_exactly_the_dropped_layers_unused():
    model = bart(layerdrop=0.5)
    ran = ran_layers(model.model.encoder.layers)
    found, _ = outcome(model, dict(input_ids=IDS, labels=IDS), loss=lambda out: out.loss)
    dropped = {i for i in range(4) if i not in ran}
    assert dropped  # seed 0 drops some of the four
    assert found == dict.fromkeys(names(model, *(f"model.encoder.layers.{i}.*" for i in dropped)), "unused")


def test_bart_layerdrop_with_may_skip_passes_and_lists_the_dropped_layers_inactive():
    model = bart(layerdrop=0.5)
    ran = ran_layers(model.model.encoder.layers)
    found, report = outcome(
        model, dict(input_ids=IDS, labels=IDS), loss=lambda out: out.loss, may_skip=["model.encoder.layers.*"]
    )
    dropped = {i for i in range(4) if i not in ran}
    assert found == {}
    assert set(report.inactive_names) == names(model, *(f"model.encoder.layers.{i}.*" for i in dropped))


def switch_transformer() -> nn.Module:
    sizes = dict(vocab_size=99, d_model=16, d_ff=32, d_kv=8, num_layers=2, num_decoder_layers=2, num_heads=2)
    experts = dict(num_experts=8, encoder_sparse_step=1, decoder_sparse_step=1)  # every layer sparse
    return T.SwitchTransformersForConditionalGeneration(T.SwitchTransformersConfig(**sizes, **experts, **SEQ2SEQ))


def expert_params_that_got_no_gradient(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if ".experts." in n and p.grad is None}


def test_switch_transformer_experts_its_router_left_out_are_exactly_the_problems_without_may_skip():
    model = switch_transformer()
    batch = dict(input_ids=IDS[:1, :4], labels=IDS[:1, :4])  # 4 tokens, 8 experts per layer: some get none
    found, _ = outcome(model, batch, loss=lambda out: out.loss)
    idle = expert_params_that_got_no_gradient(model)
    assert idle and found == dict.fromkeys(idle, "unused")  # an expert no token was routed to never ran


def test_switch_transformer_with_may_skip_experts_passes_and_lists_the_idle_experts_inactive():
    model = switch_transformer()
    batch = dict(input_ids=IDS[:1, :4], labels=IDS[:1, :4])
    found, report = outcome(model, batch, loss=lambda out: out.loss, may_skip=["*.experts.*"])
    assert found == {}
    assert set(report.inactive_names) == expert_params_that_got_no_gradient(model) != set()


def nllb_moe(decoder_layerdrop: float) -> nn.Module:
    sizes = dict(vocab_size=99, d_model=16, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32)
    layers = dict(encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2)
    experts = dict(num_experts=4, expert_capacity=8, encoder_sparse_step=0, decoder_sparse_step=2)  # dense encoder
    drop = dict(encoder_layerdrop=0.0, decoder_layerdrop=decoder_layerdrop, dropout=0.0)
    return T.NllbMoeForConditionalGeneration(T.NllbMoeConfig(**sizes, **layers, **experts, **drop, **SEQ2SEQ))


def test_nllb_moe_with_every_decoder_layer_dropped_calls_the_encoder_not_in_loss_not_detached():
    model = nllb_moe(decoder_layerdrop=1.0)  # every decoder layer dropped: nothing reads the encoder's output
    found, err = outcome(model, dict(input_ids=IDS, labels=IDS), loss=lambda out: out.loss)
    encoder, decoder = names(model, "model.encoder.layer*"), names(model, "model.decoder.layers.*")
    assert found == {**dict.fromkeys(encoder, "not_in_loss"), **dict.fromkeys(decoder, "unused")}
    assert {p.where for p in err.problems if p.cause == "not_in_loss"} == {
        "'model.encoder' returned an output that depends on it, but 'model.decoder', which received it, "
        "never read it in this forward"
    }


# --- compiled: every graph compiled for the guarded model draws random numbers as eager code does --------------------
# (Inductor itself, minutes per real model on this CPU, runs on a LayerDrop stand-in in tests/guard/test_compiled.py)


def wavlm() -> nn.Module:
    config = T.WavLMConfig(
        **SPEECH,
        num_buckets=8,
        max_bucket_distance=16,
        mask_time_prob=0.0,
        layerdrop=0.5,
    )
    return T.WavLMModel(config)


RANDOM_SKIPPING: dict[str, Callable[[], tuple[nn.Module, dict, Callable]]] = {
    "wavlm layerdrop": lambda: (wavlm(), AUDIO, lambda out: first(out).sum()),
    "wav2vec2 layerdrop": lambda: (wav2vec2(layerdrop=0.5), AUDIO, lambda out: first(out).sum()),
    "switch transformers router noise": lambda: (
        switch_transformer(),
        dict(input_ids=IDS[:1, :4], labels=IDS[:1, :4]),
        lambda out: out.loss,
    ),
}


@pytest.mark.parametrize("arch", sorted(RANDOM_SKIPPING))
def test_every_graph_compiled_for_a_guarded_real_model_with_random_skipping_draws_as_eager_code(arch):
    from torch._inductor import config

    torch._dynamo.reset()
    model, batch, loss = RANDOM_SKIPPING[arch]()
    model.train()
    spy = CompileSpy()
    compiled = torch.compile(model, backend=spy)
    guard = GradientGuard(compiled, may_skip=["*"])
    try:
        loss(compiled(**batch)).backward()
        assert guard.check().ok
    finally:
        guard.remove()
        torch._dynamo.reset()
    assert spy.fallback_random and all(spy.fallback_random)
    assert config.fallback_random is False  # only while the guarded model ran
