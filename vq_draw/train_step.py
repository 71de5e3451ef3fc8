"""The training step of the staged encoder: every stage with gradients, gradient
checkpointing, the step plans and the compiled stages.

``VQDraw`` (encoder.py) inherits ``TrainingStep``, so ``model.run``, ``model.compile_step``
and ``model.training_losses`` (which calls ``run``) are the model's methods. The per-stage
computations shared with encoding and decoding stay in encoder.py; this module runs them
stage after stage with gradients, and chooses with exploration.

Shapes: x and the reconstructions are [N x *shape] normalized images; a stage's losses are
[N x K] (K options), its choices [N] long; a step's codes are [N x S] and its losses
[N x S x K] (S stages). The two autograd Functions at the end keep the backward pass
deterministic and in the activations' memory layout; encoder.py uses them too.
"""

import math
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from .losses import mse_options
from .nn import fold_all_stages, stage_weights


@dataclass
class StepPlan:
    """How the training step is computed. Every plan gives the same codes, losses and
    gradients (tests/test_reference.py); they differ in speed per device.

    :param fold_all_stages: fold every stage's channel masks into the weights once per
        micro-batch (``nn.fold_all_stages``) instead of at every stage: far fewer kernels (on
        a GPU, launches), at the memory of one copy of the masked weights per stage, held
        through the backward pass (also under checkpointing: folding per chunk would be
        recomputed, and its gradient would fill the other stages' rows with zeros).
    :param distinct_stage1: run stage 1's refiner once per distinct first choice, which
        needs ``torch.unique`` (on a GPU a wait for the device, and a batch size that changes
        with the data); otherwise on all rows, a fixed shape.
    :param check_finite: check the images for NaN and infinite values at every step (on a
        GPU a wait for the device); otherwise a non-finite image gives a non-finite loss,
        which the training loop stops on at its next log.
    """
    fold_all_stages: bool = False
    distinct_stage1: bool = True
    check_finite: bool = True

    @classmethod
    def for_device(cls, device):
        """The CPU's fastest plan there (fold per stage, distinct inputs), and elsewhere the
        one with the fewest kernel launches and no host synchronization."""
        cpu = torch.device(device).type == "cpu"
        return cls(fold_all_stages=not cpu, distinct_stage1=cpu, check_finite=cpu)


class TrainingStep:
    """The training step of ``VQDraw``, which inherits it.

    It runs the model's per-stage computations (``_distinct_features``, ``_every_option``,
    ``_option_losses``, ``_next``, ``_layout``, ``scale``) with its settings (``options``,
    ``num_stages``, ``epsilon``, ``grad_decay``, ``grad_checkpoint``, ``channels_last``,
    ``step_plan``, ``training``) and the ``refiner``; see ``VQDraw``'s docstring.
    """

    def run(self, x):
        """Encode with gradients, as in training (with exploration when ``epsilon`` > 0).

        :param x: [N x *shape] normalized images.
        :return: (codes [N x S] long, final reconstruction [N x *shape], losses [N x S x K]).
        """
        self._check_images(x, finite=False)
        plan = self._plan(x.device)
        if plan.check_finite:
            self._check_finite(x)
        folds = fold_all_stages(self.refiner, self.channels_last) if plan.fold_all_stages else None
        recon = torch.zeros_like(x)
        codes, losses = [], []
        chunk = self.num_stages
        if self.grad_checkpoint and torch.is_grad_enabled():
            chunk = max(1, round(math.sqrt(self.num_stages)))
        for start in range(0, self.num_stages, chunk):
            stop = min(start + chunk, self.num_stages)
            first_choices = codes[0][:, 0] if codes and plan.distinct_stage1 else None
            if chunk < self.num_stages:
                recon, c, l = checkpoint(self._train_chunk, recon, x, start, stop, first_choices,
                                         [], folds, plan.distinct_stage1, use_reentrant=False)
            else:
                recon, c, l = self._train_chunk(recon, x, start, stop, first_choices, None, folds,
                                                plan.distinct_stage1)
            codes.append(c)
            losses.append(l)
        return torch.cat(codes, 1), recon, torch.cat(losses, 1)

    def _plan(self, device):
        """The ``StepPlan`` of training steps on ``device``."""
        return self.step_plan or StepPlan.for_device(device)

    def _train_chunk(self, recon, target, start, stop, first_choices=None, made=None, folds=None,
                     distinct=True):
        """Stages ``start`` to ``stop`` - 1 with gradients: returns (recon, codes [N x stages],
        losses [N x stages x K]).

        :param first_choices: [N] the stage-0 choices when ``distinct`` (see
            ``_distinct_features``); with ``distinct`` False stage 1 runs all rows.
        :param folds: every stage's folded weights (``nn.fold_all_stages``), or None to fold
            each stage's masks as it runs.

        :param made: a list for gradient checkpointing, empty on the first call: that call
            appends each stage's choices [N], and the recomputation in the backward pass
            makes the same choices again instead of choosing anew. GPU kernels are not
            bit-reproducible, so a recomputed stage can rank two nearly equal options the
            other way; the gradients would then belong to another code than the loss, or,
            when the number of distinct first choices changes, the recomputation fails.
        """
        replay = made is not None and len(made) == stop - start
        codes, losses = [], []
        with stage_weights(folds or {}):
            for i, stage in enumerate(range(start, stop)):
                if self._compiled_stage is not None and stage > 0 and torch.is_grad_enabled():
                    recon, choices, stage_losses = self._run_compiled_stage(
                        recon, target, stage, made[i] if replay else None)
                else:
                    choose = (lambda _, chosen=made[i]: chosen) if replay else None
                    recon, choices, stage_losses = self._train_stage(recon, target, stage,
                                                                     first_choices, choose)
                if made is not None and not replay:
                    made.append(choices)
                if stage == 0 and distinct:
                    first_choices = choices
                codes.append(choices)
                losses.append(stage_losses)
        return recon, torch.stack(codes, 1), torch.stack(losses, 1)

    def _train_stage(self, recon, target, stage, first_choices=None, choose=None):
        """One stage with gradients: returns (next recon, choices [N], losses [N x K]).

        :param first_choices: [N] the stage-0 choices, which let stage 1 run the refiner once
                              per distinct input (see ``_distinct_features``).
        :param choose: losses [N x K] -> choices [N]; default ``_choose``.
        """
        if stage > 0 and self.grad_decay:
            # Same value, gradient into earlier stages scaled by (1 - grad_decay).
            recon = recon.detach() + (1 - self.grad_decay) * (recon - recon.detach())
        # As in encode: the refiner runs on the distinct inputs only (one image at stage 0,
        # one per distinct first choice at stage 1); the gradients of the images that share
        # an input add up, as they would if each image had run the refiner itself.
        features, inverse = self._distinct_features(recon, stage, first_choices)
        deltas = self._every_option(features, inverse, stage)
        losses, choices, delta = self._option_losses(recon, deltas, stage, target,
                                                      choose or self._choose)
        return self._next(recon, delta, stage, choices), choices, losses

    def _choose(self, losses):
        """Losses [N x K] -> choices [N]: the best option, or with probability ``epsilon`` while
        training a random one."""
        choices = losses.argmin(1)
        if self.training and self.epsilon > 0:
            # The original's order of draws (randint, then rand), so that one seed explores
            # the same way in both.
            random = torch.randint(0, self.options, choices.shape, device=choices.device)
            explore = torch.rand(choices.shape, device=choices.device) < self.epsilon
            choices = torch.where(explore, random, choices)
        return choices

    # ------------------------------------------------------------------ compiled training

    def compile_step(self, **options):
        """Train with every stage after the first compiled by ``torch.compile(fullgraph=True)``.

        A stage after the first runs the same computation on every network (``_stage_body``:
        all rows, the stage index a tensor, no host synchronization), so each graph compiles
        once, whatever the stage; stage 0 (the refiner on one image) stays eager. The choices
        of the exploration (epsilon) are drawn outside the graph, in the eager order, so one
        seed gives the same codes as eager training. Checkpointing replays the first pass's
        choices through the same graph. Without gradients (evaluation), encoding and decoding
        the stages run eagerly.

        :param options: passed to ``torch.compile`` (e.g. ``backend``, ``mode``).
        :return: self.
        """
        self.step_plan = StepPlan(fold_all_stages=False, distinct_stage1=False, check_finite=False)
        # NCHW: the compiler picks layouts itself, and eager convolutions (oneDNN) may return
        # another layout than the one traced, which breaks the graph's views.
        self.channels_last = False
        self._compiled_stage = torch.compile(self._stage_body, fullgraph=True, **options)
        self._stage_indices = {}  # (local stage, device) -> 0-dim long tensor
        return self

    def _network(self, stage):
        """(network, its local stage) that runs ``stage``."""
        where = getattr(self.refiner, "_where", None)
        if where is None:
            return self.refiner, stage
        j, local = where[stage]
        return self.refiner.refiners[j], local

    def _run_compiled_stage(self, recon, target, stage, replay=None):
        """A stage after the first through the compiled ``_stage_body``; as ``_train_stage``.

        :param replay: [N] choices to make again (checkpointing's recomputation), or None.
        """
        network, local = self._network(stage)
        n, device = len(recon), recon.device
        if replay is not None:
            forced = replay
        elif self.training and self.epsilon > 0:
            # The draws of ``_choose``, in its order.
            random = torch.randint(0, self.options, (n,), device=device)
            explore = torch.rand((n,), device=device) < self.epsilon
            forced = torch.where(explore, random, -1)
        else:
            forced = torch.full((n,), -1, dtype=torch.long, device=device)
        # The stage index as a tensor made once per device: copying it from the host at every
        # stage would wait for the GPU.
        key = (local, device)
        if key not in self._stage_indices:
            self._stage_indices[key] = torch.tensor(local, device=device)
        # Under DDP, dynamo would split the graph at the gradient buckets to overlap their
        # communication; a stage's gradients are not final (later stages add to them), so
        # there is nothing to overlap, and the split fails on this graph.
        with torch._dynamo.config.patch(optimize_ddp=False):
            return self._compiled_stage(network, recon, target, self._stage_indices[key],
                                        self.scale(stage), forced)

    def _stage_body(self, network, recon, target, stage, scale, forced):
        """One stage after the first, for compiling: the same values as ``_train_stage``.

        :param network: the refiner network that runs the stage (a ``nn.Refiner``).
        :param stage: 0-dim long tensor, the stage within ``network``.
        :param scale: scalar tensor, the network's output scale.
        :param forced: [N] long, a choice to make per image, or -1 for the best option.
        :return: (next recon [N x *shape], choices [N], losses [N x K]).
        """
        if self.grad_decay:
            recon = recon.detach() + (1 - self.grad_decay) * (recon - recon.detach())
        deltas = network.options(network.features(self._layout(recon), stage), stage)
        with torch.autocast(recon.device.type, enabled=False):
            dtype = torch.promote_types(target.dtype, torch.float32)
            deltas, residual = deltas.to(dtype), (recon - target).to(dtype)
            losses = mse_options(residual, deltas, scale)
            choices = torch.where(forced >= 0, forced, losses.detach().argmin(1))
            rows = torch.arange(len(choices), device=choices.device)
            return recon + scale * deltas[rows, choices], choices, losses


class GatherRows(torch.autograd.Function):
    """``x[index]``: [U x ...], [N] -> [N x ...], for index with repeats (images sharing a row).

    The gradient of plain indexing adds the repeated rows with ``index_put_``, whose
    order of addition on the CPU varies between runs with more than one thread, so
    two identical training runs drifted apart in the last bits. ``index_add_`` adds
    in a fixed order, and the gradient keeps the layout of ``x``.
    """

    @staticmethod
    def forward(ctx, x, index):
        ctx.save_for_backward(index)
        ctx.layout = x.shape, x.stride()
        return x[index]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        shape, stride = ctx.layout
        out = torch.empty_strided(shape, stride, dtype=grad.dtype, device=grad.device).zero_()
        return out.index_add_(0, index, grad), None


class PickOption(torch.autograd.Function):
    """``deltas[i, choices[i]]``: [N x K x *shape], [N] -> [N x *shape].

    Plain indexing returns its gradient as a contiguous (NCHW) tensor, which turns the
    gradient of the last convolution away from channels_last and makes it convert
    layouts every stage; this keeps the layout of ``deltas``.
    """

    @staticmethod
    def forward(ctx, deltas, choices):
        rows = torch.arange(len(choices), device=choices.device)
        ctx.save_for_backward(rows, choices)
        ctx.layout = deltas.shape, deltas.stride()
        return deltas[rows, choices]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        rows, choices = ctx.saved_tensors
        shape, stride = ctx.layout
        out = torch.empty_strided(shape, stride, dtype=grad.dtype, device=grad.device).zero_()
        out[rows, choices] = grad
        return out, None
