"""P-Tuning v2 deep prefixes: prefix encoders, the prefix bank, and injection into attention."""

from multitask.prefix.bank import PrefixBank, PrefixInputs, PrefixKV
from multitask.prefix.config import PrefixBankConfig, PrefixConfig
from multitask.prefix.encoder import PrefixEncoder

__all__ = ["PrefixBank", "PrefixBankConfig", "PrefixConfig", "PrefixEncoder", "PrefixInputs", "PrefixKV"]
