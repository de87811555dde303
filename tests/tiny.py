"""Tiny in-process encoders and tokenizers (hidden 32, 2 layers, 4 heads), as transformers' own tests build them."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import BertConfig, BertTokenizerFast, ElectraConfig, RobertaConfig, XLMRobertaConfig

from multitask.backbone import encoder_from_config

WORDS = (
    "the a an of to and in is was it that for on with as by at from this be are not good bad great movie film "
    "plot acting boring fun love hate paris france london john smith city river who what where when how why "
    "did does capital located born ##s ##ing ##ed ##ly ##er un ##believ ##able 北 京 上 海 是 中 国 的 首 都 "
    "我 爱 天 安 门 谁 在 哪 里 ? . , ! 0 1 2 3 4 5 6 7 8 9"
).split()


def tiny_config(kind: str = "bert", max_positions: int = 64):
    common = dict(
        vocab_size=len(WORDS) + 8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, max_position_embeddings=max_positions, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    if kind == "bert":
        return BertConfig(**common)
    if kind == "roberta":
        return RobertaConfig(**{**common, "max_position_embeddings": max_positions + 2}, pad_token_id=1)
    if kind == "xlm-roberta":
        return XLMRobertaConfig(**{**common, "max_position_embeddings": max_positions + 2}, pad_token_id=1)
    if kind == "electra":
        return ElectraConfig(**common, embedding_size=16)
    raise ValueError(kind)


def tiny_encoder(kind: str = "bert", attention: str = "sdpa", seed: int = 0, max_positions: int = 64):
    torch.manual_seed(seed)
    return encoder_from_config(tiny_config(kind, max_positions), attention=attention).eval()


def tiny_tokenizer(directory: Path) -> BertTokenizerFast:
    """A WordPiece tokenizer over a written vocabulary; fast, so offsets and word_ids() work."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n", encoding="utf-8")
    return BertTokenizerFast(vocab=str(vocab), do_lower_case=True, tokenize_chinese_chars=True)


# Characters of short Chinese hotel and film reviews (the Chinese quick start's sentiment example).
CHINESE_WORDS = list("酒店房间很干净服务好热情推荐值得再来差脏失望不会吵贵电影精彩无聊喜欢讨厌一般还可以的了是我们")


def tiny_chinese_model(directory: Path, seed: int = 0) -> Path:
    """A tiny BERT with a character vocabulary of Chinese reviews (as bert-base-chinese tokenizes: one piece per
    character), saved with its tokenizer under ``directory`` so the real loading code reads it."""
    directory.mkdir(parents=True, exist_ok=True)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *CHINESE_WORDS, "，", "。", "！"]
    (directory / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab=str(directory / "vocab.txt"), tokenize_chinese_chars=True).save_pretrained(directory)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokens), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=64)
    encoder_from_config(config).save_pretrained(directory)
    return directory
