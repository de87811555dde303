"""The core P-Tuning v2 model: prefix injection, prefix modes, freezing and mixed-task batches."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import DebertaV2Config, GPT2Config

from multitask.backbone import enable_activation_checkpointing, encoder_from_config
from multitask.errors import ConfigError, UnsupportedModelError
from multitask.heads import HEADS, HeadConfig
from multitask.model import ModelInputs, MultiTaskModel
from multitask.prefix.bank import PrefixInputs, PrefixKV, TaskPrefixRequest, plan_layout
from multitask.prefix.config import PrefixBankConfig, PrefixConfig
from tests.tiny import tiny_encoder

KINDS = ["bert", "roberta"]
MODES = ["shared", "per_task", "hybrid", "groups"]
NUM_LAYERS, NUM_HEADS, HEAD_DIM = 2, 4, 8


# prefix_attention "mixed": each task asks for its type's default (cls joint, ner and qa separate), so per_task and
# hybrid batches hold prefixes attended both ways.
MIXED = {"cls": "joint", "ner": "separate", "qa": "separate"}


def build_model(kind="bert", mode="per_task", attention="sdpa", lengths=(4, 4, 4), reparameterize=True, dropout=0.0,
                prefix_attention="joint"):
    encoder = tiny_encoder(kind, attention)
    asked = MIXED if prefix_attention == "mixed" else {}
    requests = [
        TaskPrefixRequest("cls", group="g1", length=lengths[0], attention=asked.get("cls")),
        TaskPrefixRequest("ner", group="g1" if mode != "groups" else "g2", length=lengths[1], attention=asked.get("ner")),
        TaskPrefixRequest("qa", group="g1", length=lengths[2], attention=asked.get("qa")),
    ]
    group_lengths = {}
    if mode == "groups":  # lengths come per group; tasks in one group must agree
        requests = [replace(r, length=None) for r in requests]
        group_lengths = {"g1": lengths[0], "g2": lengths[1]}
    config = PrefixBankConfig(
        mode=mode, prefix=PrefixConfig(length=4, dropout=dropout, reparameterize=reparameterize, mlp_hidden_size=16),
        shared_length=3, group_lengths=group_lengths, attention=None if prefix_attention == "mixed" else prefix_attention,
    )
    torch.manual_seed(1)
    heads = {
        "cls": HEADS.get("sequence")(HeadConfig(dropout=0.0), 32, 3),
        "ner": HEADS.get("token")(HeadConfig(dropout=0.0), 32, 5),
        "qa": HEADS.get("span")(HeadConfig(dropout=0.0), 32),
    }
    model = MultiTaskModel(encoder, heads, plan_layout(config, requests))
    # Random (non-tiny) prefixes so that any mixing error shows in the outputs.
    with torch.no_grad():
        for encoder_module in model.prefix_bank.encoders.values():
            encoder_module.embedding.normal_(0, 1.0)
    return model.eval()


def batch(task_ids, length=9, seed=0, pad_rows=(1,)):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (len(task_ids), length), generator=generator)
    mask = torch.ones_like(ids)
    for row in pad_rows:
        if row < len(task_ids):
            mask[row, length - 3:] = 0
    return ModelInputs(ids, mask, torch.tensor(task_ids))


def plain_hidden(encoder, inputs: ModelInputs, prefix_kv=None):
    if isinstance(prefix_kv, PrefixKV):  # a bare set of keys/values: attended jointly with the tokens
        prefix_kv = PrefixInputs(joint=prefix_kv)
    return encoder(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, prefix_kv=prefix_kv).last_hidden_state


@pytest.mark.parametrize("kind", KINDS)
def test_fully_masked_prefix_matches_plain_encoder(kind):
    encoder = tiny_encoder(kind)
    inputs = batch([0, 0, 0])
    expected = plain_hidden(encoder, inputs)
    shape = (3, NUM_LAYERS, NUM_HEADS, 5, HEAD_DIM)
    masked = PrefixKV(torch.randn(shape) * 5, torch.randn(shape) * 5, torch.zeros(3, 5, dtype=torch.bool))
    torch.testing.assert_close(plain_hidden(encoder, inputs, masked), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_zero_length_prefix_matches_plain_encoder(kind):
    model = build_model(kind, "per_task", lengths=(0, 0, 0))
    inputs = batch([0, 1, 2])
    torch.testing.assert_close(model.encode(inputs).hidden_states, plain_hidden(model.encoder, inputs))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["shared", "per_task", "hybrid"])
def test_training_changes_only_prefix_and_heads(kind, mode):
    model = build_model(kind, mode, dropout=0.1).train()
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    heads_before = {k: v.clone() for k, v in model.heads.state_dict().items()}
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    for step in range(3):
        optimizer.zero_grad()
        outputs = model(batch([0, 1, 2, 0, 1, 2], seed=step))
        loss = sum(logits.float().pow(2).mean() for logits, _ in outputs.values())
        loss.backward()
        for name, parameter in model.named_parameters():
            is_trainable = name.startswith(("prefix_bank.", "heads."))
            assert (parameter.grad is not None) == is_trainable, name
            assert parameter.requires_grad == is_trainable, name
        optimizer.step()
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, encoder_before[key]), f"encoder weight {key} changed"
    for key, value in model.heads.state_dict().items():
        assert not torch.equal(value, heads_before[key]), f"head weight {key} never changed"


@pytest.mark.parametrize("kind", KINDS)
def test_prefix_reaches_every_layer(kind):
    encoder = tiny_encoder(kind)
    inputs = batch([0, 0])
    shape = (2, NUM_LAYERS, NUM_HEADS, 3, HEAD_DIM)
    keys, values = torch.randn(shape), torch.randn(shape)
    base = plain_hidden(encoder, inputs, PrefixKV(keys, values, torch.ones(2, 3, dtype=torch.bool)))
    for layer in range(NUM_LAYERS):
        for tensor in ("keys", "values"):
            perturbed = {"keys": keys.clone(), "values": values.clone()}
            perturbed[tensor][:, layer] += 1.0
            out = plain_hidden(encoder, inputs, PrefixKV(**perturbed, mask=torch.ones(2, 3, dtype=torch.bool)))
            assert (out - base).abs().max() > 1e-4, f"layer {layer} {tensor} had no effect"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("lengths", [(4, 4, 4), (2, 5, 0)])
@pytest.mark.parametrize("prefix_attention", ["joint", "separate", "mixed"])
def test_mixed_task_batch_matches_separate_batches(kind, mode, lengths, prefix_attention):
    model = build_model(kind, mode, lengths=lengths, prefix_attention=prefix_attention)
    mixed = batch([0, 1, 2, 1, 0, 2])
    with torch.no_grad():
        mixed_out = model(mixed)
        for task, (logits, rows) in mixed_out.items():
            alone_logits, _ = model(mixed.rows(rows))[task]
            torch.testing.assert_close(logits, alone_logits, atol=1e-5, rtol=0)


def test_modes_share_prefixes_as_declared():
    share = lambda mode: build_model("bert", mode).prefix_bank.layout.task_prefixes  # noqa: E731
    assert share("shared") == {"cls": ("shared",), "ner": ("shared",), "qa": ("shared",)}
    assert share("per_task") == {"cls": ("task_cls",), "ner": ("task_ner",), "qa": ("task_qa",)}
    assert share("hybrid")["ner"] == ("shared", "task_ner")
    assert share("groups") == {"cls": ("group_g1",), "ner": ("group_g2",), "qa": ("group_g1",)}
    bank = build_model("bert", "hybrid", lengths=(2, 5, 1)).prefix_bank
    assert [bank.prefix_length(t) for t in ("cls", "ner", "qa")] == [5, 8, 4]


def test_each_prefix_is_attended_as_its_tasks_ask():
    attention = lambda mode: build_model("bert", mode, prefix_attention="mixed").prefix_bank.layout.attention  # noqa: E731
    assert attention("per_task") == {"task_cls": "joint", "task_ner": "separate", "task_qa": "separate"}
    # A prefix shared by tasks whose types' defaults disagree is attended jointly (P-Tuning v2's way).
    assert attention("shared") == {"shared": "joint"}
    assert attention("hybrid") == {"shared": "joint", "task_cls": "joint", "task_ner": "separate", "task_qa": "separate"}
    assert attention("groups") == {"group_g1": "joint", "group_g2": "separate"}


def test_tasks_sharing_a_prefix_that_choose_different_attention_is_an_error():
    requests = [TaskPrefixRequest("a", attention="joint", attention_chosen=True),
                TaskPrefixRequest("b", attention="separate", attention_chosen=True)]
    with pytest.raises(ConfigError, match="prefix 'shared': its tasks ask for different attention"):
        plan_layout(PrefixBankConfig(mode="shared"), requests)
    # A choice wins over a type's default; the experiment's setting applies where a task asks nothing.
    chosen = [replace(requests[0], attention_chosen=False), requests[1]]
    assert plan_layout(PrefixBankConfig(mode="shared"), chosen).attention == {"shared": "separate"}
    assert plan_layout(PrefixBankConfig(mode="per_task", attention="separate"),
                       [TaskPrefixRequest("a")]).attention == {"task_a": "separate"}


@pytest.mark.parametrize("kind", KINDS)
def test_joint_and_separate_prefixes_in_one_layer_add_up(kind):
    # A hybrid ner task: its shared prefix joins the tokens' softmax, its own prefix adds a softmax of its own. The
    # separate part adds the same thing whatever the joint part is: out(J, S) - out(J) == out(S) - out(nothing).
    encoder = tiny_encoder(kind).eval()
    hidden = torch.randn(2, 7, 32)
    shape = (2, NUM_LAYERS, NUM_HEADS, 3, HEAD_DIM)
    joint, separate = (PrefixKV(torch.randn(shape), torch.randn(shape), torch.ones(2, 3, dtype=torch.bool))
                       for _ in range(2))
    with torch.no_grad():
        both = _one_layer_attention(encoder, hidden, PrefixInputs(joint, separate))
        joint_only = _one_layer_attention(encoder, hidden, PrefixInputs(joint=joint))
        separate_only = _one_layer_attention(encoder, hidden, PrefixInputs(separate=separate))
        plain = _one_layer_attention(encoder, hidden, None)
    torch.testing.assert_close(both - joint_only, separate_only - plain, atol=1e-5, rtol=1e-5)
    assert (both - joint_only).abs().max() > 1e-3 and (joint_only - plain).abs().max() > 1e-3


def test_group_members_asking_different_lengths_is_an_error():
    config = PrefixBankConfig(mode="groups")
    requests = [TaskPrefixRequest("a", group="g", length=2), TaskPrefixRequest("b", group="g", length=3)]
    with pytest.raises(ConfigError, match="group 'g': tasks ask for different prefix lengths"):
        plan_layout(config, requests)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("prefix_attention", ["joint", "separate", "mixed"])
def test_eager_and_sdpa_agree(kind, prefix_attention):
    inputs = batch([0, 1, 2, 0])
    with torch.no_grad():
        sdpa, eager = (build_model(kind, "hybrid", attention=implementation, lengths=(2, 5, 3),
                                   prefix_attention=prefix_attention).encode(inputs).hidden_states
                       for implementation in ("sdpa", "eager"))
    torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_checkpointing_keeps_prefix_gradients(kind):
    inputs = batch([0, 1, 2])

    def prefix_grads(checkpointing: bool):
        model = build_model(kind, "per_task").train()
        if checkpointing:
            enable_activation_checkpointing(model.encoder)
        outputs = model(inputs)
        sum(logits.pow(2).mean() for logits, _ in outputs.values()).backward()
        return {n: p.grad.clone() for n, p in model.prefix_bank.named_parameters()}

    with_checkpointing, without = prefix_grads(True), prefix_grads(False)
    for name, grad in without.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(with_checkpointing[name], grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_folding_reparameterisation_keeps_outputs(kind):
    model = build_model(kind, "hybrid")
    inputs = batch([0, 1, 2])
    with torch.no_grad():
        before = model.encode(inputs).hidden_states
        model.prefix_bank.fold()
        after = model.encode(inputs).hidden_states
    assert all(encoder.mlp is None for encoder in model.prefix_bank.encoders.values())
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)


def test_full_length_input_fits_with_prefix():
    encoder = tiny_encoder("bert", max_positions=16)
    inputs = ModelInputs(torch.randint(5, 60, (2, 16)), torch.ones(2, 16, dtype=torch.long), torch.tensor([0, 0]))
    shape = (2, NUM_LAYERS, NUM_HEADS, 8, HEAD_DIM)
    out = plain_hidden(encoder, inputs, PrefixKV(torch.randn(shape), torch.randn(shape), torch.ones(2, 8, dtype=torch.bool)))
    assert out.shape == (2, 16, 32)


@pytest.mark.parametrize("kind", ["xlm-roberta", "electra"])
def test_other_supported_architectures_take_prefixes(kind):
    encoder = tiny_encoder(kind)
    inputs = batch([0, 0])
    shape = (2, NUM_LAYERS, NUM_HEADS, 3, HEAD_DIM)
    with_prefix = plain_hidden(encoder, inputs, PrefixKV(torch.randn(shape), torch.randn(shape), torch.ones(2, 3, dtype=torch.bool)))
    assert (with_prefix - plain_hidden(encoder, inputs)).abs().max() > 1e-4


@pytest.mark.parametrize(
    "config",
    [DebertaV2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=50),
     GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50)],
)
def test_unsupported_architecture_is_refused(config):
    with pytest.raises(UnsupportedModelError, match="supported model types: bert, roberta, xlm-roberta, electra"):
        encoder_from_config(config)


def test_parameter_summary_counts_trainable_parts():
    model = build_model("bert", "per_task")
    summary = model.parameter_summary()
    assert summary.encoder == sum(p.numel() for p in model.encoder.parameters())
    assert summary.encoder_trainable == 0
    assert summary.trainable == sum(p.numel() for p in model.trainable_parameters())
    assert "% of encoder" in summary.render()


@pytest.mark.parametrize("kind", KINDS)
def test_eager_and_sdpa_agree_without_padding_on_mixed_prefix_lengths(kind):
    # No padding mask at all, but tasks with prefixes of different lengths: the eager kernel adds its mask to the
    # scores, so the widened mask must be additive there (a bool one would leave padded prefix slots visible).
    inputs = batch([0, 1, 2, 1], pad_rows=())
    with torch.no_grad():
        sdpa = build_model(kind, "per_task", attention="sdpa", lengths=(2, 5, 3)).encode(inputs).hidden_states
        eager = build_model(kind, "per_task", attention="eager", lengths=(2, 5, 3)).encode(inputs).hidden_states
    torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=1e-5)


def _one_layer_attention(encoder, hidden, prefix: PrefixInputs | None):
    """Layer 0's self-attention output for ``hidden`` (no padding), computed by the prefix-aware kernel."""
    layer = encoder.encoder.layer[0].attention.self
    return layer(hidden, attention_mask=None, prefix_kv=prefix)[0]


@pytest.mark.parametrize("kind", KINDS)
def test_separate_prefix_adds_its_own_softmax_to_the_tokens_attention(kind):
    # attention: separate = the plain attention over the real tokens + softmax(q k_prefix) v_prefix, per head.
    encoder = tiny_encoder(kind).eval()
    hidden = torch.randn(2, 7, 32)
    shape = (2, NUM_LAYERS, NUM_HEADS, 3, HEAD_DIM)
    keys, values = torch.randn(shape), torch.randn(shape)
    with torch.no_grad():
        plain = _one_layer_attention(encoder, hidden, None)
        out = _one_layer_attention(encoder, hidden, PrefixInputs(separate=PrefixKV(
            keys, values, torch.ones(2, 3, dtype=torch.bool))))
        attention = encoder.encoder.layer[0].attention.self
        query = attention.query(hidden).view(2, 7, NUM_HEADS, HEAD_DIM).transpose(1, 2)
        weights = torch.softmax(query @ keys[:, 0].transpose(-1, -2) * HEAD_DIM ** -0.5, dim=-1)
        expected = plain + (weights @ values[:, 0]).transpose(1, 2).reshape(2, 7, 32)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_separate_prefix_with_zero_values_leaves_the_encoder_unchanged(kind):
    # The point of separate attention: however large its keys, a prefix whose values are zero takes no attention
    # from the real tokens, so training starts from the frozen encoder's own output (joint attention would not).
    encoder = tiny_encoder(kind)
    inputs = batch([0, 0, 0])
    shape = (3, NUM_LAYERS, NUM_HEADS, 5, HEAD_DIM)
    keys, zeros, visible = torch.randn(shape) * 5, torch.zeros(shape), torch.ones(3, 5, dtype=torch.bool)
    with torch.no_grad():
        plain = plain_hidden(encoder, inputs)
        separate = plain_hidden(encoder, inputs, PrefixInputs(separate=PrefixKV(keys, zeros, visible)))
        joint = plain_hidden(encoder, inputs, PrefixInputs(PrefixKV(keys, zeros, visible)))
    torch.testing.assert_close(separate, plain, atol=1e-6, rtol=0)
    assert (joint - plain).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_separate_prefix_hidden_from_an_example_gives_it_the_plain_output(kind):
    encoder = tiny_encoder(kind)
    inputs = batch([0, 0, 0])
    shape = (3, NUM_LAYERS, NUM_HEADS, 5, HEAD_DIM)
    visible = torch.tensor([[True] * 5, [False] * 5, [True, True, False, False, False]])
    with torch.no_grad():
        plain = plain_hidden(encoder, inputs)
        out = plain_hidden(encoder, inputs, PrefixInputs(separate=PrefixKV(torch.randn(shape), torch.randn(shape), visible)))
    torch.testing.assert_close(out[1], plain[1], atol=1e-6, rtol=0)
    assert (out[0] - plain[0]).abs().max() > 1e-3 and (out[2] - plain[2]).abs().max() > 1e-3


def test_separate_prefix_learns_from_zero_values():
    # Zero values are not a dead start: the values get gradients at once, the keys as soon as the values differ.
    model = build_model("bert", "per_task", prefix_attention="separate", reparameterize=False).train()
    with torch.no_grad():
        for prefix in model.prefix_bank.encoders.values():
            kv = prefix().clone()
            kv[:, 1] = 0.0
            prefix.set_initial(kv)
    optimizer = torch.optim.Adam(model.prefix_bank.parameters(), lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        outputs = model(batch([0, 1, 2]))
        sum(logits.pow(2).mean() for logits, _ in outputs.values()).backward()
        optimizer.step()
    for prefix in model.prefix_bank.encoders.values():
        kv = prefix().detach()
        assert kv[:, 1].abs().max() > 1e-3  # values moved off zero
        assert prefix.embedding.grad.view(prefix.length, NUM_LAYERS, 2, -1)[:, :, 0].abs().max() > 0  # keys learn
