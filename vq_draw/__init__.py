"""VQ-DRAW: a sequential discrete auto-encoder (Nichol, 2020)."""

from .checkpoint import CheckpointError
from .config import DATASETS, create_model
from .data import load_test_images
from .encoder import VQDraw, code_usage
from .loading import load_model

__all__ = ["DATASETS", "CheckpointError", "VQDraw", "code_usage", "create_model", "load_model",
           "load_test_images"]
