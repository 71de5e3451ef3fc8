"""Fine-tuning experiments, kept apart from the core: the library never imports this module.

They found the fine-tuned three-network MNIST model (docs/experiments/mnist.md) and reach the
training loop only through its two hooks, ``TrainLoop(objective=..., start=...)``:

- ``StageWeightedLoss``: the average over stages weighted per stage instead of the plain mean;
- ``split_segments``: a model with a network for every finer block of stages, each a copy
  of the one that ran them (more parameters, same compute per stage, same codes at first);
- ``FineTuneFrom``: a new run that starts from another checkpoint's weights (split when
  the run asks for finer segments) and Adam state.

Command line: the published training flags plus ``--init-from`` and ``--stage-weights``::

    python -m vq_draw.experiments mnist --init-from pretrained/mnist_model.pt --segment 5 \\
        --stage-weights 12,16,6,8,64,1,3,1,1,1 --lr 1e-4 --lr-final 0 --step-limit 4000 \\
        --run-dir runs/ft
"""

import sys

import torch

from . import train_cli
from .checkpoint import CheckpointError, config_mismatch, model_from_checkpoint, steps_behind
from .config import DATASETS, check_segment, create_model, describe_segment
from .loading import read_model_file
from .nn import segment_lengths, segment_sizes


class StageWeightedLoss:
    """The training objective with the chosen-loss average over stages weighted per stage.

    ``loss = sum_t w_t L_t / sum_t w_t + aux_coeff * aux + final_coeff * final``, where
    L_t is stage t's chosen loss; equal weights give the published objective. The logged
    ``chosen_loss`` stays the plain mean, so runs remain comparable.

    :param weights: one non-negative weight per stage, not all zero.
    """

    def __init__(self, weights, stages):
        weights = [float(w) for w in weights]
        if len(weights) != stages:
            raise ValueError(f"stage weights has {len(weights)} values but the model has {stages} "
                             f"stages; give one weight per stage")
        if not all(w >= 0 for w in weights) or not sum(weights) > 0:
            raise ValueError(f"stage weights must be >= 0 and not all zero, got {weights}")
        self.weights = weights
        self.settings = {"stage_weights": weights}  # recorded in checkpoints, compared on resume

    def __call__(self, model, terms):
        """The scalar to minimize, from ``VQDraw.training_losses``'s differentiable parts."""
        stage_losses = terms["stage_losses"]  # [S]
        weights = torch.tensor(self.weights, dtype=stage_losses.dtype, device=stage_losses.device)
        weighted = (stage_losses * weights).sum() / weights.sum()
        return weighted + model.aux_coeff * terms["aux_loss"] + model.final_coeff * terms["final_loss"]


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
        segment = check_segment(segment, stages)
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


class FineTuneFrom:
    """``TrainLoop(start=FineTuneFrom(path))``: a new run starts from ``path``'s weights.

    It starts at step 0 with its own schedule and RNG, from the source's Adam state too when
    the source has one and the architecture is the same; a source with more stages per
    network than the run's model is split into copies (``split_segments``) and Adam starts
    fresh. Checkpoints record the source's training steps as ``prior_steps``. Once the run
    has saved a checkpoint, it resumes from that instead (the loop calls ``start`` only for
    a run without one).
    """

    def __init__(self, path):
        self.path = path

    def __call__(self, loop):
        path, model = self.path, loop.model
        ckpt = read_model_file(path, map_location="cpu")
        segment = model.config["segment"]
        # Stages per network may differ (the source is then split below); nothing else may.
        mismatch = config_mismatch(dict(ckpt["config"], segment=segment), model.config)
        if mismatch:
            raise CheckpointError(f"cannot fine-tune from {path}: it is for another architecture "
                                  f"({mismatch}); use the same settings")
        source = model_from_checkpoint(ckpt, path)
        split = ckpt["config"].get("segment") != segment
        if split:
            try:
                source = split_segments(source, segment)
            except ValueError as exc:
                raise CheckpointError(f"cannot fine-tune from {path} with segment={segment!r}: "
                                      f"{exc} (networks can be split, not merged)") from None
        model.load_state_dict(source.state_dict())
        what = "weights"
        if split:
            # Adam starts fresh: the source's moments are for fewer parameters.
            loop.log(f"split the refiner of {path} into {len(model.refiner.refiners)} networks of "
                     f"{describe_segment(segment)} stages, each a copy of the one that ran its stages")
        elif "optimizer" in ckpt:
            # Adam's moment estimates carry over, so a small learning rate continues smoothly
            # instead of taking full-size first steps from fresh statistics.
            loop.load_optimizer(ckpt["optimizer"])
            what = "weights and optimizer state"
        loop.prior_steps = steps_behind(ckpt)
        loop.log(f"started from the {what} of {path} ({loop.prior_steps} steps of training); "
                 f"this run counts its own steps from 0")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in DATASETS:
        sys.exit(f"usage: python -m vq_draw.experiments {{{','.join(DATASETS)}}} [training flags] "
                 f"[--init-from CHECKPOINT] [--stage-weights W1,...,WS]")
    dataset, argv = argv[0], argv[1:]
    parser = train_cli.build_parser(dataset, prog=f"python -m vq_draw.experiments {dataset}")
    parser.add_argument("--init-from", default=None,
                        help="fine-tune: start a new run at step 0 from this checkpoint's weights "
                             "(and optimizer state, if saved)")
    parser.add_argument("--stage-weights", default=None,
                        help="comma-separated weight per stage for the loss's average over stages "
                             "(default: the plain mean)")
    args = train_cli.check_args(parser, parser.parse_args(argv))
    objective = None
    if args.stage_weights is not None:
        try:
            objective = StageWeightedLoss([float(w) for w in args.stage_weights.split(",")], args.stages)
        except ValueError as exc:
            parser.error(f"--stage-weights {args.stage_weights!r}: {exc}")
    start = FineTuneFrom(args.init_from) if args.init_from else None
    train_cli.train(args, objective=objective, start=start)


if __name__ == "__main__":
    main()
