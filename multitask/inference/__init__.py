"""Inference: a model assembled from a checkpoint, and the engine that batches and decodes (for training's evaluation
too: the engine is where training meets inference)."""

from multitask.inference.engine import Evaluation, InferenceEngine

__all__ = ["Evaluation", "InferenceEngine"]
