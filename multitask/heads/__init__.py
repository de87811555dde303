"""Task heads: small modules that turn encoder states into logits. One module per head kind, one registration each."""

from multitask.heads.base import HEADS, EncoderOutput, HeadConfig
from multitask.heads import sequence, span, token  # noqa: F401  (registration side effects)

__all__ = ["HEADS", "EncoderOutput", "HeadConfig"]
