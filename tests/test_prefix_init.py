"""Prefix initialisation: distinct initial virtual tokens for every option, real scales, real-word activations."""

from __future__ import annotations

import pytest
import torch

from multitask.model import ModelInputs, MultiTaskModel
from multitask.heads import HEADS, HeadConfig
from multitask.prefix.bank import TaskPrefixRequest, plan_layout
from multitask.prefix.config import PrefixBankConfig, PrefixConfig
from multitask.prefix.encoder import PrefixEncoder
from multitask.prefix.initialization import (
    frequent_tokens, initialize_prefixes, key_value_scale, mean_pairwise_cosine, real_key_values,
)
from tests.tiny import tiny_encoder, tiny_tokenizer

LENGTH = 6


def model_with(prefix: PrefixConfig, kind: str = "bert", attention: str = "joint") -> MultiTaskModel:
    layout = plan_layout(PrefixBankConfig(mode="per_task", prefix=prefix, attention=attention),
                         [TaskPrefixRequest("cls")])
    head = HEADS.get("sequence")(HeadConfig(dropout=0.0), 32, 2)
    return MultiTaskModel(tiny_encoder(kind), {"cls": head}, layout)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def sequences(tokenizer) -> dict[str, list[list[int]]]:
    texts = ["the movie was good", "the plot was boring and the acting bad", "paris is the capital of france",
             "john smith was born in london", "a great film with great acting", "the city river"]
    return {"cls": [tokenizer(t)["input_ids"] for t in texts]}


def test_reparameterised_prefix_no_longer_starts_as_one_token():
    # The old default: N(0, 0.02) embedding through an MLP with PyTorch's output bias gave cosine ~0.97.
    torch.manual_seed(0)
    prefix = PrefixEncoder(PrefixConfig(length=16, reparameterize=True, mlp_hidden_size=64, dropout=0.0), 2, 4, 8)
    assert mean_pairwise_cosine(prefix().detach()) < 0.2


# Real words' keys/values share each layer's projection biases and the position embeddings' share of the hidden
# states, so activations of real words are never orthogonal (MiniLM: 0.30 for 16 frequent words; docs/tuning.md).
# A prefix started from them keeps exactly that similarity: removing the shared part would change how much
# attention the prefix draws next to real tokens. Random options start near 0.
MAX_COSINE = {"normal": 0.2, "uniform": 0.2, "vocab": 0.5}


@pytest.mark.parametrize("reparameterize", [False, True])
@pytest.mark.parametrize("init", ["normal", "uniform", "vocab"])
def test_initial_virtual_tokens_are_distinct(init, reparameterize, tokenizer):
    torch.manual_seed(0)
    config = PrefixConfig(length=LENGTH, reparameterize=reparameterize, mlp_hidden_size=64, dropout=0.0, init=init)
    model = model_with(config)
    similarity = initialize_prefixes(model.prefix_bank, model.encoder, tokenizer, sequences(tokenizer))
    kv = model.prefix_bank.encoders["task_cls"]().detach()
    assert similarity["task_cls"] == pytest.approx(mean_pairwise_cosine(kv))
    assert similarity["task_cls"] < MAX_COSINE[init]


@pytest.mark.parametrize("reparameterize", [False, True])
def test_vocab_init_reproduces_the_encoders_own_keys_and_values(reparameterize, tokenizer):
    config = PrefixConfig(length=3, reparameterize=reparameterize, mlp_hidden_size=64, dropout=0.0, init="vocab",
                          init_words=["paris", "movie"])
    model = model_with(config)
    initialize_prefixes(model.prefix_bank, model.encoder, tokenizer, sequences(tokenizer))
    words = tokenizer.convert_tokens_to_ids(["paris", "movie"])
    third = frequent_tokens(sequences(tokenizer)["cls"], set(tokenizer.all_special_ids), 1)[0]  # "the"
    expected = real_key_values(model.encoder, [*words, third], tokenizer.cls_token_id, tokenizer.sep_token_id)
    torch.testing.assert_close(model.prefix_bank.encoders["task_cls"]().detach(), expected, atol=1e-4, rtol=1e-4)


def test_default_scale_is_the_encoders_key_value_scale(tokenizer):
    torch.manual_seed(0)
    model = model_with(PrefixConfig(length=256, reparameterize=False, dropout=0.0))
    initialize_prefixes(model.prefix_bank, model.encoder, tokenizer, sequences(tokenizer))
    pool = frequent_tokens(sequences(tokenizer)["cls"], set(tokenizer.all_special_ids), 64)
    reference = key_value_scale(real_key_values(model.encoder, pool, tokenizer.cls_token_id, tokenizer.sep_token_id))
    measured = key_value_scale(model.prefix_bank.encoders["task_cls"]().detach())
    torch.testing.assert_close(measured, reference, rtol=0.15, atol=0.0)


def test_explicit_init_std_wins(tokenizer):
    torch.manual_seed(0)
    model = model_with(PrefixConfig(length=256, reparameterize=False, dropout=0.0, init="uniform", init_std=0.5))
    initialize_prefixes(model.prefix_bank, model.encoder, tokenizer, sequences(tokenizer))
    values = model.prefix_bank.encoders["task_cls"]().detach()
    assert values.std().item() == pytest.approx(0.5, rel=0.05)
    assert values.abs().max().item() <= 0.5 * 3 ** 0.5 + 1e-6


def test_frequent_tokens_skip_special_tokens_and_break_ties_by_id():
    assert frequent_tokens([[101, 5, 7, 7, 102], [101, 9, 5, 7]], exclude={101, 102}, count=3) == [7, 5, 9]


def test_folding_keeps_the_initial_prefix(tokenizer):
    torch.manual_seed(0)
    model = model_with(PrefixConfig(length=LENGTH, reparameterize=True, mlp_hidden_size=64, dropout=0.0))
    initialize_prefixes(model.prefix_bank, model.encoder, tokenizer, sequences(tokenizer))
    before = model.prefix_bank.encoders["task_cls"]().detach()
    model.prefix_bank.fold()
    torch.testing.assert_close(model.prefix_bank.encoders["task_cls"]().detach(), before)


@pytest.mark.parametrize("reparameterize", [False, True])
@pytest.mark.parametrize("init", ["normal", "uniform", "vocab"])
def test_separate_attention_starts_from_the_frozen_encoders_output(init, reparameterize, tokenizer):
    # attention: separate starts every prefix with zero values (its keys as the init option makes them), so the
    # first step sees the frozen encoder's own output, and the virtual tokens are still distinct (by their keys).
    torch.manual_seed(0)
    config = PrefixConfig(length=LENGTH, reparameterize=reparameterize, mlp_hidden_size=64, dropout=0.0, init=init)
    model = model_with(config, attention="separate").eval()
    similarity = initialize_prefixes(model.prefix_bank, model.encoder, tokenizer, sequences(tokenizer))
    kv = model.prefix_bank.encoders["task_cls"]().detach()
    assert kv[:, 1].abs().max() < 1e-5 and kv[:, 0].abs().max() > 0.1
    assert similarity["task_cls"] < MAX_COSINE[init]
    ids = torch.tensor([tokenizer("the movie was good")["input_ids"]])
    inputs = ModelInputs(ids, torch.ones_like(ids), torch.tensor([0]))
    with torch.no_grad():
        with_prefix = model.encode(inputs).hidden_states
        plain = model.encoder(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    torch.testing.assert_close(with_prefix, plain, atol=1e-5, rtol=0)


def test_only_separately_attended_prefixes_start_with_zero_values(tokenizer):
    # A hybrid ner task with a joint shared prefix: zero values would make the joint prefix a sink that only
    # dilutes the tokens' attention, so only the separate one starts from zero.
    torch.manual_seed(0)
    layout = plan_layout(PrefixBankConfig(mode="hybrid", prefix=PrefixConfig(length=LENGTH)),
                         [TaskPrefixRequest("cls", attention="joint"), TaskPrefixRequest("ner", attention="separate")])
    heads = {"cls": HEADS.get("sequence")(HeadConfig(dropout=0.0), 32, 2),
             "ner": HEADS.get("token")(HeadConfig(dropout=0.0), 32, 3)}
    model = MultiTaskModel(tiny_encoder("bert"), heads, layout)
    initialize_prefixes(model.prefix_bank, model.encoder, tokenizer, {**sequences(tokenizer), "ner": []})
    values = {name: prefix().detach()[:, 1].abs().max() for name, prefix in model.prefix_bank.encoders.items()}
    assert values["task_ner"] < 1e-5 and values["task_cls"] > 0.1 and values["shared"] > 0.1
