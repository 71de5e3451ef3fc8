"""VQ-DRAW: a sequential discrete auto-encoder (Nichol, 2020)."""

from .config import DATASETS, CheckpointError, create_model, load_model
from .encoder import VQDraw, code_usage

__all__ = ["DATASETS", "CheckpointError", "VQDraw", "code_usage", "create_model", "load_model"]
