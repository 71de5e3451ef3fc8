"""The per-dataset table, and building a model from a config (loading one: ``checkpoint``).

Dataset differences are data: one ``DATASETS`` entry per dataset gives the image
shape (the images' own, from ``data.IMAGE_SHAPES``), normalization, refiner,
published stages/segment/output scale and the published training recipe.
Everything else is shared.
"""

from .data import IMAGE_SHAPES
from .encoder import VQDraw
from .refiners import build_refiner

DATASETS = {
    "mnist": dict(
        shape=IMAGE_SHAPES["mnist"], mean=0.1307, std=0.3081, stages=10, segment=None, output_scale=0.1,
        # 50,000 steps of batch 32, lr linearly from 1e-3 to 0.
        train=dict(batch=32, step_limit=50000, step_interval=1, lr_final=0.0, grad_checkpoint=False),
    ),
    "svhn": dict(
        shape=IMAGE_SHAPES["svhn"], mean=0.5, std=0.5, stages=20, segment=5, output_scale=0.1,
        # The original's --lr-final defaults to 0, and its SVHN command does not set it.
        train=dict(batch=32, step_limit=70000, step_interval=16, lr_final=0.0, grad_checkpoint=False),
    ),
    "cifar10": dict(
        shape=IMAGE_SHAPES["cifar10"], mean=0.5, std=0.5, stages=100, segment=10, output_scale=0.01,
        train=dict(batch=32, step_limit=34811, step_interval=16, lr_final=None, grad_checkpoint=True),
    ),
    "celeba": dict(
        shape=IMAGE_SHAPES["celeba"], mean=0.5, std=0.5, stages=100, segment=10, output_scale=0.01,
        train=dict(batch=32, step_limit=36194, step_interval=16, lr_final=None, grad_checkpoint=True),
    ),
}

def default_segment(dataset, stages):
    """Stages per refiner network when none is given: the published segment, or ``stages`` when
    that is smaller (one network for all of them); None for one network (MNIST)."""
    published = DATASETS[dataset]["segment"]
    return None if published is None else min(published, stages)


def create_model(dataset, options=64, stages=None, segment=None, aux_coeff=0.01, final_coeff=0.0,
                 epsilon=0.0, grad_decay=0.0, grad_checkpoint=False, output_scale=None, loss="mse"):
    """Build a VQ-DRAW model with the published settings of ``dataset``.

    :param dataset: "mnist", "svhn", "cifar10" or "celeba".
    :param options: K, proposals per stage (>= 2).
    :param stages: S (>= 1); None gives the published value.
    :param segment: stages per refiner network; None gives the published value, or ``stages``
                    when that is smaller (MNIST: one network for all stages). An int between 1
                    and ``stages``, or a list of block sizes summing to ``stages`` for networks
                    of unequal length (e.g. [4, 1, 5]).
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
        segment = check_segment(segment, stages)
    for name, value in dict(aux_coeff=aux_coeff, final_coeff=final_coeff).items():
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    for name, value in dict(epsilon=epsilon, grad_decay=grad_decay).items():
        if not 0 <= value <= 1:
            raise ValueError(f"{name} must be between 0 and 1, got {value}")
    refiner = build_refiner(dataset, options, stages, segment)
    model = VQDraw(refiner, spec["shape"], stages, options, loss=loss, output_scale=output_scale,
                   aux_coeff=aux_coeff, final_coeff=final_coeff, epsilon=epsilon,
                   grad_decay=grad_decay, grad_checkpoint=grad_checkpoint,
                   mean=spec["mean"], std=spec["std"])
    model.config = dict(dataset=dataset, options=options, stages=stages, segment=segment,
                        aux_coeff=aux_coeff, final_coeff=final_coeff, epsilon=epsilon,
                        grad_decay=grad_decay, grad_checkpoint=grad_checkpoint,
                        output_scale=output_scale, loss=loss)
    return model


def describe_segment(segment):
    """``segment`` as the --segment flag spells it: "5" or "4,1,5"."""
    return ",".join(map(str, segment)) if isinstance(segment, (list, tuple)) else str(segment)


def check_segment(segment, stages):
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
