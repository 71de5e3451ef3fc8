"""Checkpoints of the original implementation (unixpickle/vq-draw) as this project's models.

``python -m vq_draw.convert ORIGINAL.pt OUT.pt [--dataset NAME]`` writes the original's
``torch.save(encoder.state_dict())`` (its released ``mnist_model.pt`` or ``svhn_model.pt``, or
a model from its training scripts) as a checkpoint of this project; ``load_model`` also reads
such a file directly.

The original's key layout, as its ``Encoder`` and refiners build it:

- ``bias`` [K x C x H x W]: the stage-0 bias (``stage0_bias`` here); ``_stages`` (int64 scalar,
  the stages it runs) and ``_grad_decay`` (float scalar) are buffers of training settings.
- The refiner is one network under ``refiner.`` or, with segments, one per block of stages
  under ``refiner.segments.J.``. Each network has a scalar ``output_scale`` and an
  ``nn.Sequential``-like ``layers`` whose numbering counts every layer, ReLUs included: a
  masked convolution is two entries, the convolution (``N.weight``, ``N.bias``) followed by
  its channel mask (``N+1.embeddings`` [stages of the network x channels]); a GroupNorm is
  one entry (``N.weight``, ``N.bias``); a residual block is one entry numbered inside
  (``N.M...``) by the same rule. The last entry emits K*C channels read as [K, C] with channel
  ``k*C + c``, the order of ``nn.OptionConv`` here, so the weights copy without permutation;
  SVHN's last entry is one 1x1 convolution per stage, ``N.module_list.S.weight``, which
  stack into the per-stage head here.

Our refiners list the same layers in the same order (a ``MaskedConv`` holding the
convolution and its mask), so the mapping is derived by walking our network and counting
the original's entries; every original key must be used and every key of ours filled.
"""

import argparse
import math
import os
import sys

import torch
import torch.nn as nn

from .checkpoint import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, CheckpointError, SaveError,
                         _check_readable, _read_error, check_model_output, model_from_checkpoint,
                         save_checkpoint)
from .config import DATASETS, create_model
from .nn import MaskedConv, OptionConv, ResidualBlock

# The original's buffers, read into the config rather than copied as weights.
SETTING_KEYS = ("_stages", "_grad_decay")
SOURCE = "unixpickle/vq-draw"


def is_original_state_dict(obj):
    """Whether ``obj`` (what ``torch.load`` returned) looks like the original's
    ``encoder.state_dict()``: tensors only, a ``bias`` and ``refiner.`` weights."""
    return (isinstance(obj, dict) and "format" not in obj and torch.is_tensor(obj.get("bias"))
            and any(isinstance(k, str) and k.startswith("refiner.") for k in obj)
            and all(torch.is_tensor(v) for v in obj.values()))


def original_settings(state, dataset=None, name="checkpoint"):
    """``create_model`` arguments for an original state dict, inferred from its shapes.

    K is the stage-0 bias's first dimension, the stages are ``_stages``, a network's stages
    (the segment) are its channel masks' rows, and the dataset is the one whose image shape
    and layers match (``dataset`` picks it where two datasets share an image shape and the
    keys do not decide, e.g. a damaged SVHN / CIFAR-10 file).

    :return: dict(dataset, options, stages, segment, grad_decay).
    """
    odd = next((k for k in state if not isinstance(k, str)), None)
    if odd is not None:
        raise CheckpointError(f"{name} has the key {odd!r} ({type(odd).__name__}), where a state "
                              f"dict of the original names every tensor; it is damaged or not one")
    bias = state["bias"]
    if bias.dim() != 4:
        raise CheckpointError(f"{name}: the original's stage-0 'bias' should be [K x C x H x W], "
                              f"got {list(bias.shape)}")
    options, shape = int(bias.shape[0]), tuple(bias.shape[1:])
    fits = [d for d, spec in DATASETS.items() if tuple(spec["shape"]) == shape]
    if dataset is not None:
        if dataset not in DATASETS:
            raise CheckpointError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
        if dataset not in fits:
            raise CheckpointError(f"{name} holds {_spell(shape)} images (its 'bias' is "
                                  f"{list(bias.shape)}) but {dataset} has "
                                  f"{_spell(DATASETS[dataset]['shape'])} images")
    elif not fits:
        known = ", ".join(f"{d} {_spell(s['shape'])}" for d, s in DATASETS.items())
        raise CheckpointError(f"{name} holds {_spell(shape)} images (its 'bias' is "
                              f"{list(bias.shape)}), which fits none of the datasets ({known})")

    networks = _networks(state)
    masks = [k for k in state if k.startswith(networks[0]) and k.endswith(".embeddings")]
    if not masks:
        raise CheckpointError(f"{name} has no channel masks ('{networks[0]}layers.N.embeddings'); "
                              f"it is not a VQ-DRAW image model of the original")
    rows = int(state[masks[0]].shape[0])  # stages each network is built for
    for key in SETTING_KEYS:
        if key in state and state[key].numel() != 1:
            raise CheckpointError(f"{name}: '{key}' should be a single number, got shape "
                                  f"{list(state[key].shape)}")
        if key in state and not math.isfinite(float(state[key])):
            raise CheckpointError(f"{name}: '{key}' is {float(state[key])}, not a number it can run "
                                  f"with; the file is damaged")
    if "_stages" in state and not (float(state["_stages"]).is_integer() and float(state["_stages"]) >= 1):
        raise CheckpointError(f"{name}: '_stages' is {float(state['_stages']):g}, not a positive "
                              f"whole number of stages; the file is damaged")
    stages = int(state["_stages"]) if "_stages" in state else rows * len(networks)
    segmented = networks[0] != "refiner."
    if not segmented and rows != stages:
        raise CheckpointError(f"{name} runs {stages} stages ('_stages') but its network is built "
                              f"for {rows} (its channel masks' rows); this project's models run "
                              f"every stage they are built for, so it cannot be converted")
    if segmented and len(networks) != math.ceil(stages / rows):
        raise CheckpointError(f"{name} runs {stages} stages ('_stages') with segments of {rows} "
                              f"stages, which take {math.ceil(stages / rows)} networks, but it has "
                              f"{len(networks)}; it cannot be converted")
    grad_decay = float(state["_grad_decay"]) if "_grad_decay" in state else 0.0
    settings = dict(options=options, stages=stages, grad_decay=grad_decay,
                    # Our MNIST has one network unless told otherwise; the other datasets always
                    # run segment networks, one network being a segment of all the stages.
                    segment=rows if segmented else (None if (dataset or fits[0]) == "mnist" else stages))
    if dataset is None:
        if len(fits) > 1:
            # Same image shape (SVHN and CIFAR-10): only the layers tell them apart.
            matching = [d for d in fits if _keys_match(state, dict(settings, dataset=d))]
            if len(matching) != 1:
                raise CheckpointError(
                    f"{name} holds {_spell(shape)} images, which fits {' and '.join(fits)}, and its "
                    f"keys match {'both' if matching else 'neither'} exactly; pass dataset= (--dataset) "
                    f"{' or '.join(repr(d) for d in fits)} to convert it or see what differs")
            fits = matching
        dataset = fits[0]
    return dict(settings, dataset=dataset)


def key_mapping(model, original_segmented=None):
    """Where each weight of ``model`` comes from in the original's state dict.

    :param original_segmented: whether the original's refiner is a SegmentRefiner (keys
                               ``refiner.segments.J.``); None: when ours is. (Ours always is for
                               SVHN, CIFAR-10 and CelebA; an original built without one is read
                               as our single segment network.)
    :return: {our key: (original keys, stacked)}: one original key copied, or with ``stacked``
             the original keys stacked along a new first dimension (per-stage heads, one output
             scale per network, our single head's leading dimension of one).
    """
    refiner = model.refiner
    ours_segmented = hasattr(refiner, "refiners")
    nets = list(refiner.refiners) if ours_segmented else [refiner]
    if original_segmented is None:
        original_segmented = ours_segmented
    mapping = {"stage0_bias": (["bias"], False)}
    scales = []
    for j, net in enumerate(nets):
        ours = f"refiner.refiners.{j}." if ours_segmented else "refiner."
        theirs = f"refiner.segments.{j}." if original_segmented else "refiner."
        scales.append(theirs + "output_scale")
        end = _walk(net.body, ours + "body.", theirs + "layers.", mapping)
        _map_head(net.head, ours + "head.", f"{theirs}layers.{end}.", mapping)
    # A scalar here for one network, else one entry per network.
    mapping["output_scale"] = (scales, ours_segmented)
    return mapping


def convert_state_dict(state, dataset=None, name="checkpoint"):
    """An original state dict as a checkpoint dict of this project (``read_checkpoint``'s form).

    Raises ``CheckpointError`` in one line when a key is missing, left over or of another
    shape than the settings inferred from the file give.
    """
    settings = original_settings(state, dataset, name)
    layout, config = _layout(state, settings, name)
    problem = _mismatch(state, layout)
    if problem:
        raise CheckpointError(f"{name} is not the original's {_describe(settings)}: {problem}")
    weights = {}
    for key, (sources, stacked, shape, dtype) in layout.items():
        tensors = [state[k] for k in sources]
        value = torch.stack(tensors) if stacked else tensors[0]
        weights[key] = value.reshape(shape).to(dtype)
    return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": config,
            "model": weights, "converted_from": f"{SOURCE} state dict {os.path.basename(str(name))}"}


def convert_file(original, output, dataset=None):
    """Convert the original's checkpoint file ``original`` and write it to ``output``.

    :return: (the converted model, the dict written).
    """
    state = read_original(original)
    ckpt = convert_state_dict(state, dataset, original)
    model = model_from_checkpoint(ckpt, original)
    save_checkpoint(output, ckpt)
    return model, ckpt


def read_original(path):
    """Load an original state dict (``weights_only``, onto the CPU), or raise CheckpointError."""
    _check_readable(path, "cpu")  # a named pipe would block torch.load
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except Exception as exc:  # truncated, foreign or unsafe: torch raises many types
        # load_model's wording, which says when a pickle was refused for safety.
        raise _read_error(path, exc) from None
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is already a checkpoint of this project; load it with load_model")
    if not is_original_state_dict(state):
        raise CheckpointError(f"{path} is not a state dict of the original vq-draw (a dict of tensors "
                              f"with 'bias' and 'refiner.' keys)")
    return state


# ---------------------------------------------------------------------- the mapping

def _walk(seq, ours, theirs, mapping):
    """Map the layers of our ``StageSequential`` ``seq`` to the original's numbered entries.

    :return: the number of entries the original has for them (the index after the last).
    """
    index = 0
    for position, layer in enumerate(seq):
        mine, their = f"{ours}{position}.", f"{theirs}{index}."
        if isinstance(layer, MaskedConv):
            # The convolution, then its channel mask as the next entry.
            mapping[mine + "conv.weight"] = ([their + "weight"], False)
            mapping[mine + "conv.bias"] = ([their + "bias"], False)
            mapping[mine + "mask"] = ([f"{theirs}{index + 1}.embeddings"], False)
            index += 2
        elif isinstance(layer, ResidualBlock):
            _walk(layer.body, mine + "body.", their, mapping)
            index += 1
        elif isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d, nn.GroupNorm)):
            mapping[mine + "weight"] = ([their + "weight"], False)
            mapping[mine + "bias"] = ([their + "bias"], False)
            index += 1
        elif isinstance(layer, nn.ReLU):
            index += 1
        else:
            raise TypeError(f"no original layout for layer {type(layer).__name__} at {mine}")
    return index


def _map_head(head, ours, theirs, mapping):
    if not isinstance(head, OptionConv):
        raise TypeError(f"no original layout for head {type(head).__name__} at {ours}")
    if head.per_stage:
        # One 1x1 convolution per stage in a ModuleList, stacked into our [stages x ...].
        stages = range(head.weight.shape[0])
        mapping[ours + "weight"] = ([f"{theirs}module_list.{s}.weight" for s in stages], True)
        mapping[ours + "bias"] = ([f"{theirs}module_list.{s}.bias" for s in stages], True)
    else:
        # A plain convolution; ours has a leading dimension of one head.
        mapping[ours + "weight"] = ([theirs + "weight"], True)
        mapping[ours + "bias"] = ([theirs + "bias"], True)


def _layout(state, settings, name):
    """({our key: (original keys, stacked, our shape, our dtype)}, our model config) for
    ``settings``, from a model built on the meta device (no memory, no time)."""
    try:
        with torch.device("meta"):
            model = create_model(**settings)
    except ValueError as exc:
        raise CheckpointError(f"{name}: this project cannot build its settings ({exc})") from None
    ours = model.state_dict()
    mapping = key_mapping(model, original_segmented=_networks(state)[0] != "refiner.")
    assert mapping.keys() == ours.keys(), f"unmapped keys {sorted(ours.keys() ^ mapping.keys())}"
    layout = {k: (sources, stacked, ours[k].shape, ours[k].dtype)
              for k, (sources, stacked) in mapping.items()}
    return layout, dict(model.config)


def _mismatch(state, layout):
    """A one-line account of the keys and shapes of ``state`` that ``layout`` does not
    expect, or None when every key is used exactly once and every shape fits."""
    expected = {}  # original key -> its shape
    for sources, stacked, shape, _ in layout.values():
        for key in sources:
            expected[key] = tuple(shape[1:]) if stacked else tuple(shape)
    missing = [k for k in [*expected, *SETTING_KEYS] if k not in state]
    extra = [k for k in state if k not in expected and k not in SETTING_KEYS]
    if missing or extra:
        return "; ".join([f"missing {_some(missing)}"] * bool(missing) +
                         [f"unexpected {_some(extra)}"] * bool(extra))
    for key, shape in [*expected.items(), *((k, ()) for k in SETTING_KEYS)]:
        if tuple(state[key].shape) != shape:
            return f"'{key}' has shape {list(state[key].shape)} where {list(shape)} was expected"
    return None


def _keys_match(state, settings):
    """Whether ``state`` has exactly the keys and shapes of the original model of ``settings``."""
    try:
        return _mismatch(state, _layout(state, settings, "")[0]) is None
    except CheckpointError:
        return False


def _networks(state):
    """The key prefixes of the original's refiner networks, in order."""
    segments = sorted({int(k.split(".")[2]) for k in state
                       if k.startswith("refiner.segments.") and k.split(".")[2].isdigit()})
    if segments:
        return [f"refiner.segments.{j}." for j in segments]
    return ["refiner."]


def _describe(settings):
    segment = settings["segment"]
    parts = [f"{settings['dataset']} model with K={settings['options']}", f"{settings['stages']} stages"]
    if segment is not None and segment != settings["stages"]:
        parts.append(f"segments of {segment}")
    return ", ".join(parts)


def _some(keys, shown=4):
    listed = ", ".join(keys[:shown])
    return listed + (f" and {len(keys) - shown} more" if len(keys) > shown else "")


def _spell(shape):
    return "x".join(map(str, shape))


# ---------------------------------------------------------------------- command line

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("original", help="the original's state dict (torch.save(encoder.state_dict()))")
    parser.add_argument("output", help="where to write this project's checkpoint")
    parser.add_argument("--dataset", choices=sorted(DATASETS),
                        help="the dataset, where the shapes leave it open")
    args = parser.parse_args(argv)
    try:
        check_model_output(args.output, [args.original])  # the same refusals as an export's
        model, ckpt = convert_file(args.original, args.output, args.dataset)
    except (CheckpointError, SaveError) as exc:
        sys.exit(f"error: {exc}")
    config = ckpt["config"]
    print(f"wrote {args.output}: {config['dataset']}, K={config['options']}, {config['stages']} "
          f"stages, segment {config['segment']}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters")


if __name__ == "__main__":
    main()
