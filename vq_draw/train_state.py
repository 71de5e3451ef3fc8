"""The training state in a checkpoint: building it, restoring a run from it, and reading the
states that older versions wrote.

A training state is a checkpoint (vq_draw/checkpoint.py) with, besides the model's config
and weights, the Adam state, the step, every process's RNG states, the number of processes
that wrote it, the ``prior_steps`` of a fine-tune's source and the recipe (``"train"``:
``TrainSettings.recipe`` plus the objective's settings).
"""

from dataclasses import dataclass, field

import torch

from .checkpoint import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, CheckpointError, config_mismatch,
                         model_from_checkpoint, objective_settings, read_checkpoint)


def rng_state(device):
    """This process's RNG states: the CPU generator's, and the GPU's on CUDA."""
    rng = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def training_state(model, optimizer, step, settings, *, device, world_size=1, prior_steps=0,
                   rng_states=None, objective=None):
    """The checkpoint dict of a run at ``step``.

    :param settings: the run's ``TrainSettings``; its recipe is recorded.
    :param rng_states: every process's ``rng_state`` in rank order (default: this process's).
    :param objective: the experiment objective, whose ``settings`` dict (if any) is recorded.
    """
    rng = rng_state(device)
    rng["ranks"] = rng_states or [dict(rng)]
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": dict(model.config),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "rng": rng,
        "world_size": world_size,
        "prior_steps": prior_steps,
        "train": recorded_settings(settings, objective),
    }


def recorded_settings(settings, objective=None):
    """What a checkpoint records of a run's settings, and what a resume compares."""
    return settings.recipe() | {"objective": getattr(objective, "settings", None)}


def load_optimizer(optimizer, model, state):
    """Load an Adam state dict saved from a model of the same architecture.

    Older states kept one output scale shared by all networks (see
    ``VQDraw._load_from_state_dict``): its Adam moments then start every network's scale.
    """
    optimizer.load_state_dict(state)
    scale = model.output_scale
    moments = optimizer.state.get(scale, {})
    for key in ("exp_avg", "exp_avg_sq"):
        if key in moments and moments[key].shape != scale.shape:
            moments[key] = moments[key].expand_as(scale).clone()


@dataclass
class Resumed:
    """Where a restored run goes on: its ``step`` in this run's processes, the ``prior_steps``
    of its source, ``log_scale`` (logged steps -> this run's steps) and ``notes`` to print."""

    step: int
    prior_steps: int = 0
    log_scale: float = 1.0
    notes: list = field(default_factory=list)


def restore(path, model, optimizer, settings, *, device, rank=0, world_size=1, objective=None):
    """Load the training state at ``path`` into ``model``, ``optimizer`` and the RNG.

    Raises ``CheckpointError`` (one line) for a file that is not a training state of this
    architecture. Other settings than the file's are allowed (e.g. a longer step limit) and
    named in the notes, since a forgotten flag would silently change the recipe.
    """
    ckpt = read_checkpoint(path, map_location="cpu")
    if "optimizer" not in ckpt or "step" not in ckpt:
        raise CheckpointError(f"{path} holds weights only (no optimizer state or step), so "
                              f"training cannot resume from it; use another --run-dir")
    mismatch = config_mismatch(ckpt["config"], model.config)
    if mismatch:
        raise CheckpointError(f"{path} is for another architecture: {mismatch}; use the same "
                              f"settings or another --run-dir")
    model.load_state_dict(model_from_checkpoint(ckpt, path).state_dict())
    load_optimizer(optimizer, model, ckpt["optimizer"])
    resumed = Resumed(step=int(ckpt["step"]), prior_steps=int(ckpt.get("prior_steps", 0)))

    saved = dict(ckpt.get("train", {}))
    if settings.step_interval > 1:
        saved.setdefault("accumulate", "mean")  # states from before the setting averaged
    changed = [f"{name} {saved[name]!r} -> {value!r}"
               for name, value in recorded_settings(settings, objective).items()
               if name in saved and saved[name] != value]
    # The loss coefficients and stage weights live in the model config.
    saved_objective = objective_settings(ckpt["config"])
    changed += [f"{name} {saved_objective[name]!r} -> {value!r}"
                for name, value in objective_settings(model.config).items()
                if saved_objective[name] != value]
    if changed:
        resumed.notes.append(f"{path} was trained with other settings; this run uses "
                             f"{', '.join(changed)}")

    saved_world = int(ckpt.get("world_size", 1))
    if saved_world != world_size:
        # A step is one micro-batch per process, so a step of this run holds another number of
        # images: continue after the same number of training images.
        saved_batch = int(saved.get("batch_size", settings.batch_size))
        images = resumed.step * saved_batch * saved_world
        resumed.step = images // (settings.batch_size * world_size)
        resumed.log_scale = resumed.step / int(ckpt["step"]) if ckpt["step"] else 1.0
        resumed.notes.append(f"{path} was written by {saved_world} process(es) of micro-batch "
                             f"{saved_batch} at step {ckpt['step']} ({images} images); with "
                             f"{world_size} x {settings.batch_size} images per step this is step "
                             f"{resumed.step}")

    rng = ckpt.get("rng", {})
    states = rng.get("ranks", [rng] if "torch" in rng else [])  # older files: one state
    if saved_world == world_size and len(states) == world_size:
        torch.set_rng_state(states[rank]["torch"])
        if "cuda" in states[rank] and device.type == "cuda":
            torch.cuda.set_rng_state(states[rank]["cuda"], device)
    else:
        # Fresh, distinct streams per process and position, not a replay of step 0's.
        torch.manual_seed(settings.seed + rank + world_size * resumed.step)
    resumed.notes.append(f"resumed from {path} at step {resumed.step}")
    return resumed
