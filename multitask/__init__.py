"""multitask: one frozen BERT/RoBERTa encoder serving many NLU tasks through P-Tuning v2 deep prompts."""

__version__ = "0.1.0"
