"""Prefix depth (`layers`), running the encoder in two stages, and the split it allows: layers below every prefix see
no prefix (so they equal the plain encoder), tasks of different depths mix in one batch, and `layers: all` is
exactly the classic layout."""

from __future__ import annotations

import pytest
import torch

from multitask.backbone import encoder_from_config
from multitask.encoder_stages import lower_states, pad_states, upper_output
from multitask.errors import ConfigError
from multitask.heads import HEADS, HeadConfig
from multitask.model import ModelInputs, MultiTaskModel
from multitask.prefix.bank import TaskPrefixRequest, plan_layout
from multitask.prefix.config import PrefixBankConfig, PrefixConfig, resolve_layers
from tests.tiny import tiny_config

LAYERS = 4


def deep_encoder(kind: str = "bert", attention: str = "sdpa", seed: int = 0):
    config = tiny_config(kind)
    config.num_hidden_layers = LAYERS
    torch.manual_seed(seed)
    return encoder_from_config(config, attention=attention).eval()


def heads() -> dict[str, torch.nn.Module]:
    return {"cls": HEADS.get("sequence")(HeadConfig(dropout=0.0), 32, 3),
            "ner": HEADS.get("token")(HeadConfig(dropout=0.0), 32, 5)}


def model_with(config: PrefixBankConfig, requests=None, kind="bert", attention="sdpa") -> MultiTaskModel:
    requests = requests or [TaskPrefixRequest("cls"), TaskPrefixRequest("ner")]
    torch.manual_seed(3)
    model = MultiTaskModel(deep_encoder(kind, attention), heads(), plan_layout(config, requests))
    with torch.no_grad():
        for prefix in model.prefix_bank.encoders.values():
            prefix.embedding.normal_(0, 1.0)  # large random prefixes: any misplaced one shows in the outputs
    return model.eval()


def inputs(task_ids, length=7, seed=0) -> ModelInputs:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (len(task_ids), length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1:, length - 2:] = 0
    return ModelInputs(ids, mask, torch.tensor(task_ids))


def flat(length=4, layers="all") -> PrefixConfig:
    return PrefixConfig(length=length, reparameterize=False, dropout=0.0, layers=layers)


@pytest.mark.parametrize("spec, expected", [("all", (0, 1, 2, 3)), ({"top": 1}, (3,)), ({"top": 2}, (2, 3)),
                                            ({"bottom": 3}, (0, 1, 2)), ([3, 0], (0, 3))])
def test_layers_name_the_encoder_layers(spec, expected):
    assert resolve_layers(spec, LAYERS) == expected


@pytest.mark.parametrize("spec, message", [({"top": 5}, "the encoder has only 4 layers"),
                                           ([1, 4], "layer 4 does not exist")])
def test_layers_beyond_the_encoder_are_refused(spec, message):
    with pytest.raises(ConfigError, match=message):
        resolve_layers(spec, LAYERS)


@pytest.mark.parametrize("spec", [{"middle": 2}, {"top": 0}, [], [1, 1], [-1], {"top": 1, "bottom": 1}])
def test_malformed_layers_are_refused(spec):
    with pytest.raises(ValueError, match="layers"):
        PrefixConfig(layers=spec)


def test_layers_all_is_the_classic_layout_bit_for_bit():
    classic = model_with(PrefixBankConfig(mode="per_task", prefix=PrefixConfig(length=4, reparameterize=False)))
    explicit = model_with(PrefixBankConfig(mode="per_task", prefix=flat(4, "all")))
    assert {k: v.shape for k, v in classic.state_dict().items()} == {k: v.shape for k, v in explicit.state_dict().items()}
    explicit.load_state_dict(classic.state_dict())
    batch = inputs([0, 1, 0])
    for task, (logits, rows) in classic(batch).items():
        assert torch.equal(logits, explicit(batch)[task][0]) and torch.equal(rows, explicit(batch)[task][1])


@pytest.mark.parametrize("kind", ["bert", "roberta", "electra", "xlm-roberta"])
@pytest.mark.parametrize("boundary", [0, 1, 3, LAYERS])
def test_two_stages_equal_the_encoders_own_forward(kind, boundary):
    model = model_with(PrefixBankConfig(mode="per_task", prefix=flat()), kind=kind)
    batch = inputs([0, 1, 1])
    whole = model.encode(batch).hidden_states
    states = model.encode_lower(batch, boundary)
    staged = model.encode(ModelInputs(batch.input_ids, batch.attention_mask, batch.task_ids, states=states,
                                      boundary=boundary)).hidden_states
    assert torch.allclose(whole, staged, atol=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_layers_below_a_top_k_prefix_are_the_plain_encoders(attention):
    model = model_with(PrefixBankConfig(mode="per_task", prefix=flat(4, {"top": 2})), attention=attention)
    batch = inputs([0, 1, 0])
    assert model.frozen_below() == 2
    plain = model.encoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    assert torch.allclose(model.encode_lower(batch, 2), plain.hidden_states[2], atol=1e-6)
    # ... and the prefix does act on the layers above.
    assert not torch.allclose(model.encode(batch).hidden_states, plain.last_hidden_state, atol=1e-3)


def test_a_top_k_prefix_holds_only_its_layers_and_trains_only_above():
    model = model_with(PrefixBankConfig(mode="per_task", prefix=flat(4, {"top": 1})))
    prefix = model.prefix_bank.encoders["task_cls"]
    assert prefix.layers == (3,) and prefix.embedding.shape == (4, 1 * 2 * 4 * 8)
    model.train()
    batch = inputs([0, 0])
    hidden_entering = {}
    model.encoder.encoder.layer[3].register_forward_pre_hook(lambda m, args: hidden_entering.setdefault("h", args[0]))
    model(batch)["cls"][0].sum().backward()
    assert not hidden_entering["h"].requires_grad  # autograd stops at the lowest prefixed layer
    assert prefix.embedding.grad is not None and prefix.embedding.grad.abs().sum() > 0


def test_tasks_of_different_depths_mix_in_one_batch():
    requests = [TaskPrefixRequest("cls", layers="all"), TaskPrefixRequest("ner", layers={"top": 1})]
    model = model_with(PrefixBankConfig(mode="per_task", prefix=flat()), requests)
    assert model.prefix_bank.encoders["task_cls"].layers == (0, 1, 2, 3)
    assert model.prefix_bank.encoders["task_ner"].layers == (3,)
    assert model.frozen_below() == 0
    mixed = inputs([0, 1, 1, 0], seed=4)
    together = model(mixed)
    for task, task_id in (("cls", 0), ("ner", 1)):
        logits, rows = together[task]
        alone, _ = model(mixed.rows(rows))[task]
        assert torch.allclose(logits, alone, atol=1e-5)


def test_a_shared_prefix_in_every_layer_with_task_prefixes_on_top():
    config = PrefixBankConfig(mode="hybrid", prefix=flat(4, {"top": 2}), shared_length=3, shared_layers="all")
    model = model_with(config)
    bank = model.prefix_bank
    assert bank.encoders["shared"].layers == (0, 1, 2, 3) and bank.encoders["task_cls"].layers == (2, 3)
    assert bank.shared_below(["cls", "ner"]) == 2 and bank.prefixed_layers("cls") == (0, 1, 2, 3)
    prefix = bank(torch.tensor([0, 1]))
    assert prefix.joint.layer(0).keys.shape[2] == 3 and prefix.joint.layer(3).keys.shape[2] == 7  # lower layers: shared only
    assert prefix.joint.layer(0).fully_visible and prefix.joint.layer(3).fully_visible
    # Below layer 2 both tasks see the same prefix, so one lower pass serves them both.
    batch = inputs([0, 1])
    same_text = ModelInputs(batch.input_ids[[0, 0]], batch.attention_mask[[0, 0]], torch.tensor([0, 1]))
    states = model.encode_lower(same_text, 2)
    assert torch.allclose(states[0], states[1], atol=1e-6)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_joint_shared_prefix_below_separate_task_prefixes_mix_in_one_batch(attention):
    # hybrid: a shared prefix in every layer attended jointly (the tasks' defaults differ), the ner task's own
    # prefix in the top two layers attended separately, the cls task's own jointly.
    config = PrefixBankConfig(mode="hybrid", prefix=flat(4, {"top": 2}), shared_length=3, shared_layers="all")
    requests = [TaskPrefixRequest("cls", attention="joint"), TaskPrefixRequest("ner", attention="separate")]
    model = model_with(config, requests, attention=attention)
    prefix = model.prefix_bank(torch.tensor([0, 1]))
    assert prefix.separate.layer(1) is None and prefix.separate.layer(3).keys.shape[2] == 4
    assert not prefix.separate.layer(3).fully_visible  # the cls example has no separate prefix
    assert prefix.joint.layer(1).keys.shape[2] == 3 and prefix.joint.layer(3).keys.shape[2] == 7
    batch = inputs([0, 1, 1, 0])
    with torch.no_grad():
        mixed = model(batch)
        for task, (logits, rows) in mixed.items():
            torch.testing.assert_close(logits, model(batch.rows(rows))[task][0], atol=1e-5, rtol=0)


def test_tasks_sharing_a_prefix_must_agree_on_its_layers():
    requests = [TaskPrefixRequest("cls", layers={"top": 1}), TaskPrefixRequest("ner", layers={"top": 2})]
    with pytest.raises(ConfigError, match="prefix 'shared': its tasks ask for different layers"):
        plan_layout(PrefixBankConfig(mode="shared", prefix=flat()), requests)


def test_a_layer_no_example_has_a_prefix_in_attends_as_the_plain_encoder():
    model = model_with(PrefixBankConfig(mode="per_task", prefix=flat(4, [1])))
    prefix = model.prefix_bank(torch.tensor([0, 1]))
    assert prefix.joint.layer(0) is None and prefix.joint.layer(2) is None and prefix.joint.layer(1).keys.shape[2] == 4
    assert prefix.separate is None  # nothing is attended separately in this layout


def test_padded_states_keep_each_input_at_the_front():
    states = [torch.ones(3, 2), 2 * torch.ones(1, 2)]
    padded = pad_states(states, 4)
    assert padded.shape == (2, 4, 2) and padded[0, :3].eq(1).all() and padded[0, 3].eq(0).all()
    assert padded[1, 0].eq(2).all() and padded[1, 1:].eq(0).all()


def test_stage_functions_on_the_bare_encoder():
    encoder = deep_encoder()
    batch = inputs([0, 0])
    whole = encoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    last, pooled = upper_output(encoder, lower_states(encoder, batch.input_ids, batch.attention_mask, None, 2),
                                batch.attention_mask, 2)
    assert torch.allclose(last, whole.last_hidden_state, atol=1e-5)
    assert pooled is None or torch.allclose(pooled, whole.pooler_output, atol=1e-5)
