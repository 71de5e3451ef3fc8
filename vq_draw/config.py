"""The per-dataset table, and building a model from a config (loading one: ``checkpoint``).

Dataset differences are data: one ``DATASETS`` entry per dataset gives the image
shape, normalization, refiner, published stages/segment/output scale and the
published training recipe. Everything else is shared.
"""

import torch

from .encoder import VQDraw
from .nn import segment_lengths, segment_sizes
from .refiners import build_refiner

DATASETS = {
    "mnist": dict(
        shape=(1, 28, 28), mean=0.1307, std=0.3081, stages=10, segment=None, output_scale=0.1,
        # 50,000 steps of batch 32, lr linearly from 1e-3 to 0.
        train=dict(batch=32, step_limit=50000, step_interval=1, lr_final=0.0, grad_checkpoint=False),
    ),
    "svhn": dict(
        shape=(3, 32, 32), mean=0.5, std=0.5, stages=20, segment=5, output_scale=0.1,
        # The original's --lr-final defaults to 0, and its SVHN command does not set it.
        train=dict(batch=32, step_limit=70000, step_interval=16, lr_final=0.0, grad_checkpoint=False),
    ),
    "cifar10": dict(
        shape=(3, 32, 32), mean=0.5, std=0.5, stages=100, segment=10, output_scale=0.01,
        train=dict(batch=32, step_limit=34811, step_interval=16, lr_final=None, grad_checkpoint=True),
    ),
    "celeba": dict(
        shape=(3, 64, 64), mean=0.5, std=0.5, stages=100, segment=10, output_scale=0.01,
        train=dict(batch=32, step_limit=36194, step_interval=16, lr_final=None, grad_checkpoint=True),
    ),
}

def default_segment(dataset, stages):
    """Stages per refiner network when none is given: the published segment, or ``stages`` when
    that is smaller (one network for all of them); None for one network (MNIST)."""
    published = DATASETS[dataset]["segment"]
    return None if published is None else min(published, stages)


def create_model(dataset, options=64, stages=None, segment=None, aux_coeff=0.01, final_coeff=0.0,
                 epsilon=0.0, grad_decay=0.0, grad_checkpoint=False, output_scale=None, loss="mse",
                 stage_weights=None):
    """Build a VQ-DRAW model with the published settings of ``dataset``.

    :param dataset: "mnist", "svhn", "cifar10" or "celeba".
    :param options: K, proposals per stage (>= 2).
    :param stages: S (>= 1); None gives the published value.
    :param segment: stages per refiner network; None gives the published value, or ``stages``
                    when that is smaller (MNIST: one network for all stages). An int between 1
                    and ``stages``, or a list of block sizes summing to ``stages`` for networks
                    of unequal length (e.g. [4, 1, 5]).
    :param stage_weights: one non-negative weight per stage for the training loss's average
                          over stages (not all zero); None for the published plain mean.
    :return: a ``VQDraw`` module in training mode, with ``model.config`` holding these arguments.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    spec = DATASETS[dataset]
    stages = spec["stages"] if stages is None else stages
    output_scale = spec["output_scale"] if output_scale is None else output_scale
    _check_int("options", options, 2)
    _check_int("stages", stages, 1)
    segment = default_segment(dataset, stages) if segment is None else segment
    if segment is not None:
        segment = _check_segment(segment, stages)
    for name, value in dict(aux_coeff=aux_coeff, final_coeff=final_coeff).items():
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    for name, value in dict(epsilon=epsilon, grad_decay=grad_decay).items():
        if not 0 <= value <= 1:
            raise ValueError(f"{name} must be between 0 and 1, got {value}")
    if stage_weights is not None:
        stage_weights = [float(w) for w in stage_weights]
        if len(stage_weights) != stages:
            raise ValueError(f"stage_weights has {len(stage_weights)} values but the model has "
                             f"{stages} stages; give one weight per stage")
        if not all(w >= 0 for w in stage_weights) or not sum(stage_weights) > 0:
            raise ValueError(f"stage_weights must be >= 0 and not all zero, got {stage_weights}")
    refiner = build_refiner(dataset, options, stages, segment)
    model = VQDraw(refiner, spec["shape"], stages, options, loss=loss, output_scale=output_scale,
                   aux_coeff=aux_coeff, final_coeff=final_coeff, epsilon=epsilon,
                   grad_decay=grad_decay, grad_checkpoint=grad_checkpoint,
                   mean=spec["mean"], std=spec["std"], stage_weights=stage_weights)
    model.config = dict(dataset=dataset, options=options, stages=stages, segment=segment,
                        aux_coeff=aux_coeff, final_coeff=final_coeff, epsilon=epsilon,
                        grad_decay=grad_decay, grad_checkpoint=grad_checkpoint,
                        output_scale=output_scale, loss=loss)
    if stage_weights is not None:  # only when set, so published configs stay as they were
        model.config["stage_weights"] = stage_weights
    return model


def split_segments(model, segment):
    """A copy of ``model`` with a refiner network for every block of ``segment`` stages, each
    starting as a copy of the network that ran those stages, so that its codes and
    reconstructions are exactly those of ``model``.

    Every stage still runs one network of the same size, so training the copy costs the same
    per step while the copies specialize: more parameters at the same compute. Each new block
    must lie inside one network of ``model``: ``segment`` an int dividing its stages per network
    (all its stages when it has one network), or a list of block sizes such as [4, 1, 5] for a
    model of two networks of 5.
    """
    config = dict(model.config)
    stages = config["stages"]
    source_segment = config["segment"] or stages
    old = describe_segment(source_segment)
    refused = ValueError(f"cannot split networks of {old} stages into networks of "
                         f"{describe_segment(segment)} stages; choose a divisor of {old}, or stage "
                         f"counts (e.g. 4,1,5) whose networks each take their stages from one old network")
    try:
        segment = _check_segment(segment, stages)
    except (TypeError, ValueError):
        raise refused from None
    source_starts = _block_starts(segment_sizes(stages, source_segment))
    starts = _block_starts(segment_sizes(stages, segment))
    # Each new network copies the one that ran its first stage, so it must also have run the
    # rest: no old network may start inside a new one, and the copy's per-stage rows must fit
    # in the ones its source was built with.
    sources = [max(i for i, s in enumerate(source_starts) if s <= first) for first in starts]
    source_lengths = segment_lengths(stages, source_segment)
    if not set(source_starts) <= set(starts) or any(
            first - source_starts[i] + length > source_lengths[i]
            for first, i, length in zip(starts, sources, segment_lengths(stages, segment))):
        raise refused
    config["segment"] = segment
    with torch.random.fork_rng(devices=[]):
        # Its random initial weights are overwritten below; drawing them must not move the
        # caller's random stream (a fine-tune's data order would depend on how it started).
        split = create_model(**config)
    source_nets = getattr(model.refiner, "refiners", [model.refiner])  # SegmentRefiner or one
    state = {k: v for k, v in model.state_dict().items()
             if not k.startswith("refiner.") and k != "output_scale"}
    # Each network keeps the output scale of the network it copies.
    scale = model.output_scale.detach()
    state["output_scale"] = torch.stack([scale if scale.dim() == 0 else scale[i] for i in sources])
    for j, (net, first, source_index) in enumerate(zip(split.refiner.refiners, starts, sources)):
        source = source_nets[source_index].state_dict()
        offset = first - source_starts[source_index]
        for key, wanted in net.state_dict().items():
            value = source[key]
            if value.shape != wanted.shape:
                # A per-stage parameter (channel mask, per-stage head): [source stages x ...]
                # becomes the rows of this network's stages.
                value = value[offset:offset + wanted.shape[0]]
            state[f"refiner.refiners.{j}.{key}"] = value.clone()
    split.load_state_dict(state)
    split.train(model.training)
    return split


def _block_starts(sizes):
    return [sum(sizes[:i]) for i in range(len(sizes))]


def describe_segment(segment):
    """``segment`` as the --segment flag spells it: "5" or "4,1,5"."""
    return ",".join(map(str, segment)) if isinstance(segment, (list, tuple)) else str(segment)


def _check_segment(segment, stages):
    """``segment`` checked: an int in [1, stages], or a list of positive ints summing to stages."""
    if isinstance(segment, (list, tuple)):
        if not segment or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in segment) \
                or sum(segment) != stages:
            raise ValueError(f"segment {list(segment)} must be positive stage counts summing to "
                             f"stages ({stages}), one per network")
        return list(segment)  # a list, so configs compare and save alike
    _check_int("segment", segment, 1)
    if segment > stages:
        raise ValueError(f"segment ({segment}) must not exceed stages ({stages}): each block of "
                         f"'segment' stages gets its own network")
    return segment


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
