"""Checkpoint files: reading and validating, atomic saving and exporting.

A checkpoint is a ``torch.save`` dict tagged ``"format": CHECKPOINT_FORMAT`` with the model
``"config"`` (``create_model``'s arguments) and its ``"model"`` weights. A training
checkpoint adds ``"optimizer"``, ``"step"``, ``"rng"`` and the recipe (``"train"``); an
exported one keeps only the weights, config and ``"trained_steps"``. Files are read with
``weights_only=True``, so loading one never runs code. Every file written here carries a
``"checksum"`` of its contents, checked on reading (older files without one still load).
This module knows only its own format: ``loading.load_model`` also reads the original
implementation's state dicts, through vq_draw/convert.py.
"""

import os
import re
import shutil
import stat
import warnings
import zlib

import torch

from .config import DATASETS, create_model, default_segment
from .files import atomic_write
from .refiners import REFINERS

CHECKPOINT_FORMAT = "vq-draw-checkpoint"
CHECKPOINT_VERSION = 1

# Settings that change the architecture; the others (coefficients, checkpointing) only
# change training and may differ between a checkpoint and the command that resumes it.
ARCHITECTURE_KEYS = ("dataset", "options", "stages", "segment", "loss")
# Settings that change what training optimizes but not the weights' shapes, so a resume may
# change them (and says so). grad_checkpoint is in neither: it gives the same gradients.
OBJECTIVE_KEYS = ("aux_coeff", "final_coeff", "epsilon", "grad_decay", "output_scale")
# Config keys that older files may hold but create_model no longer takes: stage weights moved
# from the model to the training objective (vq_draw/experiments.py); they never changed a code.
RETIRED_KEYS = ("stage_weights",)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: corrupt, foreign, or for another architecture."""


class SaveError(RuntimeError):
    """A checkpoint could not be written; the previous one is left intact."""


def objective_settings(config):
    """{key: value} for ``OBJECTIVE_KEYS`` in a model config; None where the config has no value."""
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

def read_checkpoint(path, map_location="cpu"):
    """Load and validate a checkpoint file of this project: a dict with "format", "config" and
    "model". Raises ``CheckpointError`` with a one-line reason for anything else (the
    original's state dicts are read by ``loading.read_model_file``)."""
    return validate_checkpoint(load_file(path, map_location), path)


def load_file(path, map_location="cpu"):
    """What ``torch.load`` (``weights_only``) reads from ``path``; ``CheckpointError`` (one line)
    for a missing, truncated, foreign or unsafe file, or one that is not a regular file."""
    _check_readable(path, map_location)
    try:
        with warnings.catch_warnings():
            # A foreign pickle also draws a warning about its protocol; the error says enough.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise _read_error(path, exc) from None


def validate_checkpoint(ckpt, path="checkpoint"):
    """``ckpt`` (what ``load_file`` read from ``path``) if it is a valid checkpoint of this
    project: tagged, not newer than this code, its checksum right; else ``CheckpointError``."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a VQ-DRAW checkpoint (no '{CHECKPOINT_FORMAT}' "
                              f"format tag); was it written by another program?")
    if ckpt.get("version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} has checkpoint version {ckpt['version']}, newer than this "
                              f"vq_draw understands ({CHECKPOINT_VERSION}); upgrade vq_draw")
    if "checksum" in ckpt and ckpt["checksum"] != checksum(ckpt):
        raise CheckpointError(f"{path} is corrupt: its contents do not match the checksum stored "
                              f"when it was written (damaged on disk or in a copy); use another "
                              f"copy or an earlier checkpoint")
    config = ckpt.get("config")
    if not isinstance(config, dict) or config.get("dataset") not in REFINERS or \
            not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(f"{path} lacks a valid model config or weights")
    return ckpt


def _check_readable(path, map_location):
    """Raise ``CheckpointError`` for what ``torch.load`` would report as a damaged file or not
    report at all: a path that is not a regular file (opening a named pipe blocks forever), and
    a CUDA ``map_location`` on a machine without CUDA."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, TypeError, ValueError):
        mode = None  # not a path (a file object, say), or missing: torch.load says which
    if mode is not None and not stat.S_ISREG(mode):
        raise CheckpointError(f"checkpoint {path} is not a regular file (a folder, a named pipe "
                              f"or a device); give the .pt file itself")
    if isinstance(map_location, (str, torch.device)):
        try:
            device = torch.device(map_location)
        except RuntimeError:
            raise CheckpointError(f"cannot load {path} onto {map_location!r}: not a device torch "
                                  f"knows (use cpu or cuda)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise CheckpointError(f"cannot load {path} onto {map_location}: this machine has no "
                                  f"CUDA device; use cpu")


def _read_error(path, exc):
    """The ``CheckpointError`` for an exception of ``torch.load``: one line, and never torch's
    advice to retry with ``weights_only=False`` (which would run the file's code)."""
    text = str(exc).strip()
    refused = re.search(r"unsupported global:?\s*(?:GLOBAL\s+)?([\w.]+)", text, re.IGNORECASE)
    if refused:
        # A readable pickle, but of arbitrary Python objects (whose unpickling may run code).
        return CheckpointError(f"{path} is not a VQ-DRAW checkpoint: it holds Python objects "
                               f"({refused.group(1)}), not only tensors, so it is not loaded, for "
                               f"safety")
    lines = [line.strip() for line in text.split("WeightsUnpickler error:")[-1].splitlines()]
    # torch's paragraph about weights_only and its pointers to the documentation are not the reason.
    lines = [line for line in lines if line and not re.search(
        r"weights.only|Check the documentation|Please file an issue", line, re.IGNORECASE)]
    reason = lines[0] if lines else type(exc).__name__
    reason = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", reason)
    return CheckpointError(f"cannot read checkpoint {path}: the file is truncated, corrupt or not a "
                           f"PyTorch checkpoint ({reason[:200]})")


def checksum(ckpt):
    """"crc32:<8 hex digits>" over every entry of a checkpoint dict but "checksum", in order:
    each tensor's dtype, shape and raw bytes, and the ``repr`` of every other value.

    CRC-32 finds any few damaged bytes; at about 1 GB/s it costs a fraction of what
    ``torch.save`` of the same state does (SHA-256 takes twice as long). Tensors on a GPU are
    copied to the CPU for it.
    """
    crc = 0

    def feed(value):
        nonlocal crc
        if torch.is_tensor(value):
            value = value.detach()
            crc = zlib.crc32(f"tensor {value.dtype} {tuple(value.shape)}".encode(), crc)
            if value.numel():
                raw = value.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                crc = zlib.crc32(raw, crc)
        elif isinstance(value, dict):
            crc = zlib.crc32(f"dict {len(value)}".encode(), crc)
            for key, item in value.items():
                feed(key)
                feed(item)
        elif isinstance(value, (list, tuple)):
            crc = zlib.crc32(f"{type(value).__name__} {len(value)}".encode(), crc)
            for item in value:
                feed(item)
        else:
            crc = zlib.crc32(repr(value).encode(), crc)

    feed({key: value for key, value in ckpt.items() if key != "checksum"})
    return f"crc32:{crc:08x}"


def check_weights_fit_config(ckpt, path="checkpoint"):
    """Raise ``CheckpointError`` unless the weights of a checkpoint dict have exactly the keys
    and shapes of the model its config describes, found before the model is built: a small
    file whose config asks for millions of stages would otherwise allocate gigabytes.

    The config is first bounded by the file itself (every stage has rows of its own in the
    channel masks, so S stages need at least S numbers, and every refiner network has keys of
    its own), then the model is built on the meta device, which allocates nothing, and the
    weights are loaded into it by the model's own rules (shapes only).
    """
    config = {k: v for k, v in ckpt["config"].items() if k not in RETIRED_KEYS}
    weights = ckpt["model"]
    bad = [k for k, v in weights.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise CheckpointError(f"{path}: its weights hold {bad[0]!r}, which is not a named tensor; "
                              f"the file is damaged or was written by another program")
    numbers = sum(v.numel() for v in weights.values())
    stages, segment = config.get("stages"), config.get("segment")
    if isinstance(stages, int) and stages > numbers:
        raise CheckpointError(f"{path}: its config asks for {stages:,} stages but its weights hold "
                              f"only {numbers:,} numbers (each stage has weights of its own); the "
                              f"config does not belong to these weights")
    networks = _networks(config)
    held = len({k.split(".")[2] for k in weights if k.startswith("refiner.refiners.")}) or 1
    if networks is not None and networks > held:
        raise CheckpointError(f"{path}: its config asks for {networks:,} refiner networks (stages "
                              f"{stages}, segment {segment}) but its weights hold {held}; the "
                              f"config does not belong to these weights")
    try:
        with torch.device("meta"):
            skeleton = create_model(**config)
    except (TypeError, ValueError, KeyError) as exc:  # KeyError: an unknown loss
        raise CheckpointError(f"{path} has an invalid model config: {exc}") from None
    try:  # the model's own loading rules (older layouts included), on shapes alone
        skeleton.load_state_dict(weights, assign=True)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
        raise CheckpointError(f"{path}: weights do not match its config "
                              f"({(lines or [type(exc).__name__])[0][:200]}); the file is damaged "
                              f"or its config was changed") from None


def _networks(config):
    """The number of refiner networks a config describes, or None
    where its stages or segment are not valid (``create_model`` then says why)."""
    stages, segment = config.get("stages"), config.get("segment")
    if config.get("dataset") not in DATASETS or isinstance(stages, bool) or not isinstance(stages, int) \
            or stages < 1:
        return None
    segment = default_segment(config["dataset"], stages) if segment is None else segment
    if segment is None:
        return 1
    if isinstance(segment, (list, tuple)):
        return len(segment)
    return -(-stages // segment) if isinstance(segment, int) and segment >= 1 else None


def model_from_checkpoint(ckpt, path="checkpoint"):
    """Rebuild the model described by a validated checkpoint dict and load its weights
    (checked against the config first, ``check_weights_fit_config``)."""
    check_weights_fit_config(ckpt, path)
    config = {k: v for k, v in ckpt["config"].items() if k not in RETIRED_KEYS}
    try:
        model = create_model(**config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} has an invalid model config: {exc}") from None
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match its config "
                              f"({str(exc).splitlines()[0][:200]})") from None
    return model


# ---------------------------------------------------------------------- writing

def save_checkpoint(path, state):
    """Write ``state`` to ``path`` atomically (``files.atomic_write``).

    A crash or a full disk in the middle leaves the previous checkpoint untouched. ``state``
    gets a ``"checksum"`` (``checksum``) that ``read_checkpoint`` verifies. Raises
    ``SaveError`` with one line for anything that stops the write.
    """
    folder = os.path.dirname(os.path.abspath(path))
    state = {key: value for key, value in state.items() if key != "checksum"}
    state["checksum"] = checksum(state)
    try:
        os.makedirs(folder, exist_ok=True)
        atomic_write(path, lambda f: torch.save(state, f))
    except (OSError, RuntimeError) as exc:
        # A full disk reaches torch.save's zip writer as a RuntimeError ("unexpected pos"),
        # not an OSError, so say what the disk holds.
        if isinstance(exc, OSError):
            reason = exc.strerror or str(exc)
        else:
            reason = "torch.save failed (" + re.sub(
                r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "",
                (str(exc).strip().splitlines() or [type(exc).__name__])[0])[:200] + ")"
        try:
            free = shutil.disk_usage(folder).free
            need = _tensor_bytes(state)
            if free < need:
                reason += (f": the disk is full, {free / 1e6:,.1f} MB free where the checkpoint "
                           f"needs about {need / 1e6:,.1f} MB")
        except OSError:
            pass
        raise SaveError(f"could not write checkpoint {path}: {reason}; the previous "
                        f"checkpoint is intact") from None


def _tensor_bytes(value):
    """Bytes of all tensors in a nested state: about the size of its file."""
    if torch.is_tensor(value):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def check_model_output(output, sources):
    """Raise ``CheckpointError`` when writing ``output`` would replace one of ``sources`` (the
    files being read) or a training checkpoint (one with an optimizer state or a step)."""
    for source in sources:
        try:
            same = os.path.samefile(output, source)
        except OSError:  # one of them does not exist
            same = os.path.realpath(output) == os.path.realpath(source)
        if same:
            raise CheckpointError(f"the output {output} is the input {source}; it would be "
                                  f"replaced by what is read from it; give another output")
    if not os.path.isfile(output):
        return
    try:  # only the keys matter: map the file instead of reading its tensors
        existing = torch.load(output, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return  # not a checkpoint that loads: nothing of a run is lost by replacing it
    if isinstance(existing, dict) and ("optimizer" in existing or "step" in existing):
        raise CheckpointError(f"{output} is a training checkpoint (step {existing.get('step', '?')}); "
                              f"replacing it would end that run's resume; give another output")


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
