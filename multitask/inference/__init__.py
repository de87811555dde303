"""Inference: device and precision, a model assembled from a checkpoint, and the engine that batches and decodes."""

from multitask.inference.engine import Evaluation, InferenceEngine

__all__ = ["Evaluation", "InferenceEngine"]
