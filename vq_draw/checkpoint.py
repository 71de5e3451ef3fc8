"""Checkpoint files: reading and validating, atomic saving, exporting and ``load_model``.

A checkpoint is a ``torch.save`` dict tagged ``"format": CHECKPOINT_FORMAT`` with the model
``"config"`` (``create_model``'s arguments) and its ``"model"`` weights. A training
checkpoint adds ``"optimizer"``, ``"step"``, ``"rng"`` and the recipe (``"train"``); an
exported one keeps only the weights, config and ``"trained_steps"``. Files are read with
``weights_only=True``, so loading one never runs code.
"""

import os

import torch

from .config import create_model
from .files import atomic_write
from .refiners import REFINERS

CHECKPOINT_FORMAT = "vq-draw-checkpoint"
CHECKPOINT_VERSION = 1

# Settings that change the architecture; the others (coefficients, checkpointing) only
# change training and may differ between a checkpoint and the command that resumes it.
ARCHITECTURE_KEYS = ("dataset", "options", "stages", "segment", "loss")
# Settings that change what training optimizes but not the weights' shapes, so a resume may
# change them (and says so). grad_checkpoint is in neither: it gives the same gradients.
OBJECTIVE_KEYS = ("aux_coeff", "final_coeff", "epsilon", "grad_decay", "output_scale", "stage_weights")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: corrupt, foreign, or for another architecture."""


class SaveError(RuntimeError):
    """A checkpoint could not be written; the previous one is left intact."""


def objective_settings(config):
    """{key: value} for ``OBJECTIVE_KEYS`` in a model config; None where the config has no value
    (``stage_weights`` is absent for the published plain mean)."""
    return {key: config.get(key) for key in OBJECTIVE_KEYS}


def config_mismatch(saved, wanted):
    """The first architecture setting that differs, as 'name: saved vs wanted', or None."""
    for key in ARCHITECTURE_KEYS:
        if saved.get(key) != wanted.get(key):
            return f"{key}={saved.get(key)!r} in the checkpoint but {key}={wanted.get(key)!r} requested"
    return None


def steps_behind(ckpt):
    """All the training steps behind a checkpoint dict: a training checkpoint's ``step`` plus
    the ``prior_steps`` of the run it was fine-tuned from, or an export's ``trained_steps``
    (which already include them); 0 when the file does not say."""
    if "step" in ckpt:
        return int(ckpt.get("prior_steps", 0)) + int(ckpt["step"])
    return int(ckpt.get("trained_steps", 0))


# ---------------------------------------------------------------------- reading

def read_checkpoint(path, map_location="cpu", dataset=None):
    """Load and validate a checkpoint file: a dict with "format", "config" and "model".

    A state dict of the original implementation (unixpickle/vq-draw) is converted into one
    (``convert.convert_state_dict``; ``dataset`` names its dataset where the shapes do not).
    Raises ``CheckpointError`` with a one-line reason for anything else.
    """
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as exc:  # torch raises many types for truncated or foreign files
        text = str(exc).strip()
        if "Unsupported global" in text:
            # A readable pickle, but of arbitrary Python objects: never unpickled here.
            raise CheckpointError(f"{path} is not a VQ-DRAW checkpoint: it holds Python objects, not "
                                  f"only tensors, and is not loaded for safety") from None
        if "WeightsUnpickler error:" in text:  # skip torch's paragraph about weights_only
            text = text.split("WeightsUnpickler error:", 1)[1].strip()
        reason = text.splitlines()[0] if text else type(exc).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: the file is truncated, corrupt or "
                              f"not a PyTorch checkpoint ({reason[:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        from .convert import convert_state_dict, is_original_state_dict  # convert imports this module
        if is_original_state_dict(ckpt):
            return convert_state_dict(ckpt, dataset, path)
        raise CheckpointError(f"{path} is not a VQ-DRAW checkpoint (no '{CHECKPOINT_FORMAT}' "
                              f"format tag); was it written by another program?")
    if ckpt.get("version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} has checkpoint version {ckpt['version']}, newer than this "
                              f"vq_draw understands ({CHECKPOINT_VERSION}); upgrade vq_draw")
    config = ckpt.get("config")
    if not isinstance(config, dict) or config.get("dataset") not in REFINERS or \
            not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(f"{path} lacks a valid model config or weights")
    return ckpt


def model_from_checkpoint(ckpt, path="checkpoint"):
    """Rebuild the model described by a validated checkpoint dict and load its weights."""
    try:
        model = create_model(**ckpt["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} has an invalid model config: {exc}") from None
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match its config "
                              f"({str(exc).splitlines()[0][:200]})") from None
    return model


def load_model(path, map_location="cpu", dataset=None):
    """Rebuild a model from a checkpoint alone; returned in eval mode on ``map_location``.

    Also reads the original implementation's state dicts (``dataset`` where the shapes leave
    it open, as ``read_checkpoint``).
    """
    model = model_from_checkpoint(read_checkpoint(path, map_location, dataset), path)
    return model.to(map_location).eval()


# ---------------------------------------------------------------------- writing

def save_checkpoint(path, state):
    """Write ``state`` to ``path`` atomically (``files.atomic_write``).

    A crash or a full disk in the middle leaves the previous checkpoint untouched.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    try:
        atomic_write(path, lambda f: torch.save(state, f))
    except OSError as exc:
        raise SaveError(f"could not write checkpoint {path}: {exc.strerror or exc}; the previous "
                        f"checkpoint is intact") from None


def export_model(model, path):
    """Save weights and config only (no optimizer state): a small file for ``load_model``."""
    save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                           "config": dict(model.config), "model": model.state_dict()})


def export_checkpoint(source, output):
    """Write the weights and config of checkpoint ``source`` to ``output`` (``load_model``'s file).

    The optimizer and RNG state are dropped; a training checkpoint's steps are kept for the
    record as ``trained_steps`` (including the ``prior_steps`` of a fine-tune's source).

    :return: (the model, the dict written).
    """
    ckpt = read_checkpoint(source)
    model = model_from_checkpoint(ckpt, source)
    state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
             "config": dict(model.config), "model": model.state_dict()}
    if "step" in ckpt:
        state["trained_steps"] = steps_behind(ckpt)
        if ckpt.get("prior_steps"):
            state["prior_steps"] = int(ckpt["prior_steps"])
        state["train"] = ckpt.get("train", {})
    save_checkpoint(output, state)
    return model, state
