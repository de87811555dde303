"""Input prompts: trainable soft tokens in front of the input embeddings (prompt tuning, P-Tuning v1).

The ancestors of P-Tuning v2's deep prefixes, kept so that a user can compare the lineage on their own tasks
(``multitask compare --methods prompt_tuning,p_tuning_v1,prefix_tuning,...``).
"""

from multitask.prompt.bank import PromptBank
from multitask.prompt.config import PromptConfig
from multitask.prompt.encoder import PromptEncoder

__all__ = ["PromptBank", "PromptConfig", "PromptEncoder"]
