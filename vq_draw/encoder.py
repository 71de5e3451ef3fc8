"""The VQ-DRAW staged encoder: proposals, greedy choice, decoding and the training loss.

An image ``x`` (normalized, ``[N x *shape]``) is encoded in S stages. The
reconstruction ``r`` starts at zeros; at stage t the refiner looks at ``r`` (never
at ``x``) and proposes K variations ``r + scale * f_k(r, t)`` (plus a learned bias
at stage 0). The encoder keeps the proposal closest to ``x`` and records its index.
The code is the S indices; decoding replays the stages with the recorded indices.

``reference.py`` states the same algorithm in plain PyTorch; read it first. This module
computes the same codes, losses and gradients faster (no materialized proposals, the
refiner run once per distinct input at stages 0 and 1, only the chosen option when
decoding), and tests/test_reference.py holds it to the plain version.

Here: the model, the per-stage computations that encoding, decoding and training share,
the loss terms of training (``training_losses``), and encoding (greedy and beam search),
decoding, sampling and proposals. The training step that runs the stages with gradients
(exploration, gradient checkpointing, step plans, compiled stages) is ``train_step.py``'s
``TrainingStep``, which ``VQDraw`` inherits.
"""

import torch
import torch.nn as nn

from .losses import LOSSES, mse_options, mse_options_pick, mse_shared_options
from .train_step import GatherRows, PickOption, StepPlan, TrainingStep

# StepPlan, the type of VQDraw.step_plan, is importable with the model.
__all__ = ["StepPlan", "VQDraw", "code_usage"]


class VQDraw(TrainingStep, nn.Module):
    """
    :param refiner: module with ``features(r, stage)`` and ``options(h, stage, choices=None)``
                    (see ``nn.Refiner``).
    :param shape: the image shape (C, H, W).
    :param num_stages: S, the number of stages (code length).
    :param options: K, the number of proposals per stage.
    :param loss: name of a per-sample loss in ``losses.LOSSES``.
    :param output_scale: initial value of the learned scale of the refiner output; a refiner
                         of several networks (``nn.SegmentRefiner``) has one scale per network,
                         as in the original.
    :param aux_coeff: weight of the mean loss over all proposals (keeps options alive).
    :param final_coeff: weight of the last stage's loss.
    :param epsilon: probability of a random choice per sample and stage while training.
    :param grad_decay: 0 lets gradients flow through the reconstruction into earlier
                       stages; 1 blocks them; values between scale them by 1 - grad_decay.
    :param grad_checkpoint: recompute chunks of about sqrt(S) stages in the backward pass.
    :param mean, std: per-channel normalization, ``x = (pixels - mean) / std``.
    """

    def __init__(self, refiner, shape, num_stages, options, loss="mse", output_scale=0.1,
                 aux_coeff=0.01, final_coeff=0.0, epsilon=0.0, grad_decay=0.0,
                 grad_checkpoint=False, mean=0.0, std=1.0):
        super().__init__()
        self.refiner = refiner
        self.shape = tuple(shape)
        self.num_stages = num_stages
        self.options = options
        self.loss_name = loss
        self.loss_fn = LOSSES[loss]
        self.aux_coeff = aux_coeff
        self.final_coeff = final_coeff
        self.epsilon = epsilon
        self.grad_decay = grad_decay
        self.grad_checkpoint = grad_checkpoint
        # Run the refiner on channels_last activations: faster convolutions (oneDNN on the
        # CPU, tensor cores on a GPU); the values are the same either way.
        self.channels_last = True
        # How training steps are computed (StepPlan); None: StepPlan.for_device of the images.
        self.step_plan = None
        self._compiled_stage = None  # set by compile_step
        # One scalar for one network; [networks] for a SegmentRefiner, each stage scaled by the
        # entry of the network that runs it (``scale``).
        self._scale_index = getattr(refiner, "network_of_stage", None)
        networks = () if self._scale_index is None else (len(refiner.refiners),)
        self.output_scale = nn.Parameter(torch.full(networks, float(output_scale)))
        self.stage0_bias = nn.Parameter(torch.zeros(options, *self.shape))
        channels = self.shape[0]
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).expand(channels)
                             .reshape(channels, 1, 1).clone(), persistent=False)
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).expand(channels)
                             .reshape(channels, 1, 1).clone(), persistent=False)
        self.config = {}  # filled by config.create_model; saved in checkpoints

    # ------------------------------------------------------------------ pixels

    def normalize(self, images):
        """Images in [0, 1], [N x *shape] -> the model's normalized space."""
        return (images - self.mean) / self.std

    def denormalize(self, x):
        """The model's normalized space -> images in [0, 1] (not clamped)."""
        return x * self.std + self.mean

    # ------------------------------------------------------------------ stages

    def scale(self, stage):
        """The output scale of the network that runs ``stage``: a scalar tensor."""
        if self._scale_index is None:
            return self.output_scale
        return self.output_scale[self._scale_index[stage]]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before each network had its own scale hold one scalar shared by
        # all networks: every network starts from it, so the outputs are unchanged.
        key = prefix + "output_scale"
        old = state_dict.get(key)
        if old is not None and old.dim() == 0 and self.output_scale.dim() == 1:
            state_dict[key] = old.expand_as(self.output_scale).clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _layout(self, recon):
        """The reconstruction as the refiner's input, in channels_last when enabled."""
        if self.channels_last and recon.dim() == 4 and recon.stride(1) != 1:
            # clone, not .contiguous(): with one channel both layouts count as contiguous,
            # and only the strides tell the convolutions which layout to use.
            return recon.clone(memory_format=torch.channels_last)
        return recon

    def _next(self, recon, delta, stage, choices):
        """The chosen proposal: [N x *shape] + scale * [N x *shape] (+ bias[choices] at stage 0).

        Encoding and decoding both go through here, so they compute bit-identical
        reconstructions.
        """
        out = recon + self.scale(stage) * delta
        if stage == 0:
            out = out + self.stage0_bias.index_select(0, choices)
        return out

    def _proposals(self, recon, deltas, stage):
        """All proposals: [N x *shape], [N x K x *shape] -> [N x K x *shape]."""
        out = recon.unsqueeze(1) + self.scale(stage) * deltas
        if stage == 0:
            out = out + self.stage0_bias
        return out

    def _option_losses(self, recon, deltas, stage, target, choose=None):
        """The loss of every proposal, [N x K], in at least float32 (also under autocast), so
        that the choices do not depend on the precision of the network.

        MSE never materializes the proposals: ``losses.mse_options`` after stage 0, and at
        stage 0, where all images share the same K proposals, ``losses.mse_shared_options``.
        With ``choose`` (losses [N x K] -> choices [N]) it returns (losses, choices,
        chosen deltas [N x *shape]), for training.
        """
        with torch.autocast(recon.device.type, enabled=False):
            # Half-precision outputs are widened; a float64 model stays in float64.
            dtype = torch.promote_types(target.dtype, torch.float32)
            deltas, recon, target = deltas.to(dtype), recon.to(dtype), target.to(dtype)
            scale = self.scale(stage)
            if self.loss_name == "mse" and stage > 0:
                if choose is not None:
                    return mse_options_pick(recon - target, deltas, scale, choose)
                return mse_options(recon - target, deltas, scale)
            if self.loss_name == "mse":
                # Stage 0: every image starts from zeros, so all rows of deltas are the same
                # K options and the proposals differ from the reconstruction by a shared change.
                shared = scale * deltas[0] + self.stage0_bias.to(dtype)
                losses = mse_shared_options(recon - target, shared)
            else:
                losses = self.loss_fn(self._proposals(recon, deltas, stage), target)
            if choose is None:
                return losses
            choices = choose(losses.detach())
            # Only the chosen proposal is formed; its values equal proposals[i, choices[i]].
            if stage == 0:
                return losses, choices, deltas[0].index_select(0, choices)
            return losses, choices, PickOption.apply(deltas, choices)

    def _distinct_features(self, recon, stage, first_choices):
        """Refiner features for the distinct inputs of a stage (training and inference).

        Every image enters stage 0 as zeros and stage 1 as one of K reconstructions (set
        by its first choice), so there the refiner runs once per distinct input.

        :param recon: [N x *shape] reconstructions entering ``stage``.
        :param first_choices: [N] the stage-0 choices (used at stage 1; None runs all rows).
        :return: (features [U x ...], inverse [N] mapping images to rows, or None when U = N).
        """
        n = len(recon)
        if stage == 0:
            features = self.refiner.features(self._layout(recon[:1]), 0)
            return features, torch.zeros(n, dtype=torch.long, device=recon.device)
        if stage == 1 and first_choices is not None:
            unique, inverse = torch.unique(first_choices, return_inverse=True)
            if len(unique) < n:
                first = torch.empty_like(unique).scatter_(0, inverse,
                                                          torch.arange(n, device=recon.device))
                return self.refiner.features(self._layout(recon.index_select(0, first)), 1), inverse
        return self.refiner.features(self._layout(recon), stage), None

    def _every_option(self, features, inverse, stage):
        """Every image's K refiner outputs, [N x K x *shape], from ``_distinct_features``'s
        (features [U x ...], inverse [N] or None)."""
        deltas = self.refiner.options(features, stage)  # [U x K x *shape]
        if inverse is None:
            return deltas
        if stage == 0:
            return deltas.expand(len(inverse), *deltas.shape[1:])  # one row for all: a view
        return GatherRows.apply(deltas, inverse)

    def _chosen_option(self, features, inverse, stage, choices):
        """The chosen refiner output of every image, [N x *shape] (encode and decode share it)."""
        if stage == 0:
            # One image's K options.
            return self.refiner.options(features, 0)[0].index_select(0, choices)
        if inverse is not None:
            features = features[inverse]  # keeps channels_last; index_select would not
        return self.refiner.options(features, stage, choices)

    # ------------------------------------------------------------------ training
    # run, compile_step and the stages with gradients: train_step.TrainingStep.

    def training_losses(self, x):
        """The training objective and its parts.

        :param x: [N x *shape] normalized images.
        :return: dict with "loss" (the scalar to minimize), its differentiable parts
                 "chosen_loss" (mean over stages of the chosen proposal's loss), "stage_losses"
                 [S] (that loss per stage), "aux_loss" (mean over all proposals) and
                 "final_loss" (last stage), and, without gradients, "code_entropy" [S] (nats,
                 of the batch's codes), "options_used" [S] and "codes" [N x S]. While
                 exploring (epsilon > 0) a stage may continue from a random option, but its
                 loss is still the best option's, as in the original.
        """
        codes, _, losses = self.run(x)
        best = losses.detach().argmin(2) if self.training and self.epsilon > 0 else codes
        stage_losses = losses.gather(2, best.unsqueeze(2)).squeeze(2).mean(0)  # [S]
        chosen_loss = stage_losses.mean()
        aux_loss = losses.mean()
        final_loss = stage_losses[-1]
        loss = chosen_loss + self.aux_coeff * aux_loss + self.final_coeff * final_loss
        entropy, used = code_usage(codes, self.options)
        return {
            "loss": loss,
            "chosen_loss": chosen_loss,
            "stage_losses": stage_losses,
            "aux_loss": aux_loss,
            "final_loss": final_loss,
            "code_entropy": entropy,
            "options_used": used,
            "codes": codes,
        }

    def forward(self, x):
        """``training_losses(x)``: calling the module (or its DDP wrapper) computes the loss."""
        return self.training_losses(x)

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def encode(self, x, num_stages=None, return_all=False, beam=1):
        """Greedy encoding (no exploration), or beam search with ``beam`` > 1.

        :param x: [N x *shape] normalized images.
        :param num_stages: encode only the first n stages (default all S).
        :param return_all: also return the reconstruction after each stage.
        :param beam: B, partial codes kept per image after each stage (see ``_encode_beam``);
                     1 is the paper's greedy choice.
        :return: codes [N x n] long; with return_all, (codes, reconstructions [N x n x *shape]).
        """
        self._check_images(x)
        n = self._check_num_stages(num_stages)
        if isinstance(beam, bool) or not isinstance(beam, int) or beam < 1:
            raise ValueError(f"beam must be an integer >= 1, got {beam!r}")
        if beam > 1:
            return self._encode_beam(x, n, beam, return_all)
        recon = torch.zeros_like(x)
        codes, recons = [], []
        for stage in range(n):
            features, inverse = self._distinct_features(recon, stage, codes[0] if codes else None)
            deltas = self._every_option(features, inverse, stage)
            choices = self._option_losses(recon, deltas, stage, x).argmin(1)
            # Compute the chosen option the way decode does, so that decoding the code
            # reproduces this reconstruction bit for bit.
            delta = deltas[0, choices] if stage == 0 else \
                self._chosen_option(features, inverse, stage, choices)
            recon = self._next(recon, delta, stage, choices)
            codes.append(choices)
            recons.append(recon)
        codes = torch.stack(codes, 1)
        if return_all:
            return codes, torch.stack(recons, 1)
        return codes

    @torch.no_grad()
    def _encode_beam(self, x, n, beam, return_all=False):
        """Beam search: after each stage keep the ``beam`` partial codes with the lowest loss.

        Every kept code of every image proposes K continuations; the best ``beam`` of those
        (ties to the lower parent, then option index) survive. The result is the best code
        after stage n; its prefixes need not be the best codes of their own length. With
        beam=1 this is exactly the greedy choice. Costs about ``beam`` times greedy encoding.

        :return: as ``encode``; the reconstructions are ``decode(codes)``'s, so that a file
                 decodes exactly to what the encoder reports.
        """
        count, k = len(x), self.options
        recon = torch.zeros_like(x)  # [count * width x *shape], image-major
        codes = torch.zeros(count, 1, 0, dtype=torch.long, device=x.device)  # [count x width x t]
        width = 1  # all codes start equal, so one beam until there are more distinct ones
        for stage in range(n):
            # The same computations as greedy encoding, over count * width rows.
            first = codes[:, :, 0].reshape(-1) if stage else None
            features, inverse = self._distinct_features(recon, stage, first)
            deltas = self._every_option(features, inverse, stage)
            losses = self._option_losses(recon, deltas, stage, x.repeat_interleave(width, 0))
            new_width = min(beam, width * k)
            order = losses.view(count, width * k).argsort(dim=1, stable=True)[:, :new_width]
            parent, choice = order // k, order % k  # [count x new_width]
            rows = (torch.arange(count, device=x.device).unsqueeze(1) * width + parent).view(-1)
            choices = choice.reshape(-1)
            # The feature row of each survivor's parent (None: row i, as greedy has it).
            source = rows if inverse is None else inverse[rows]
            if len(source) == len(features) and \
                    torch.equal(source, torch.arange(len(source), device=x.device)):
                source = None
            delta = deltas[0, choices] if stage == 0 else \
                self._chosen_option(features, source, stage, choices)
            recon = self._next(recon[rows], delta, stage, choices)
            codes = torch.cat([codes.gather(1, parent.unsqueeze(2).expand(-1, -1, stage)),
                               choice.unsqueeze(2)], 2)
            width = new_width
        best = codes[:, 0]  # sorted by the last stage's loss
        if return_all:
            return best, self.decode(best, return_all=True)
        return best

    @torch.no_grad()
    def reconstruct(self, x, num_stages=None, beam=1):
        """[N x *shape] -> the reconstruction [N x *shape] after n stages (default S)."""
        _, recons = self.encode(x, num_stages, return_all=True, beam=beam)
        return recons[:, -1]

    @torch.no_grad()
    def decode(self, codes, num_stages=None, return_all=False):
        """Replay the stages with the given choices.

        :param codes: [N x n] integers in [0, K), n <= S (a prefix of a full code).
        :param num_stages: decode only the first m <= n stages.
        :param return_all: return every stage's reconstruction, [N x m x *shape].
        :return: [N x *shape] normalized reconstructions (or [N x m x *shape]).
        """
        codes = self._check_codes(codes)
        m = codes.shape[1] if num_stages is None else num_stages
        if not 1 <= m <= codes.shape[1]:
            raise ValueError(f"num_stages must be between 1 and the code length {codes.shape[1]}, "
                             f"got {m}")
        param = self.output_scale
        recon = torch.zeros(len(codes), *self.shape, device=param.device, dtype=param.dtype)
        recons = []
        for stage in range(m):
            choices = codes[:, stage]
            features, inverse = self._distinct_features(recon, stage, codes[:, 0])
            recon = self._next(recon, self._chosen_option(features, inverse, stage, choices), stage,
                               choices)
            recons.append(recon)
        return torch.stack(recons, 1) if return_all else recon

    @torch.no_grad()
    def sample(self, count, num_stages=None, generator=None):
        """Decode ``count`` uniformly random codes: [count x *shape] normalized images."""
        n = self._check_num_stages(num_stages)
        codes = torch.randint(0, self.options, (count, n), generator=generator)
        return self.decode(codes.to(self.output_scale.device))

    def sample_images(self, count, num_stages=None, generator=None):
        """``sample`` as pixels to save or show: [count x *shape] in [0, 1]. Decodings can
        overshoot the data's range a little (about -0.2 to 1.25 for MNIST), so they are clamped."""
        return self.denormalize(self.sample(count, num_stages, generator)).clamp(0, 1)

    @torch.no_grad()
    def proposals(self, codes):
        """The K proposals of stage t after code prefixes of t stages.

        Row k of image i is exactly ``decode(cat(codes[i], k))`` (the same computations, so
        bit for bit): the reconstruction the encoder gets by choosing option k at stage t.
        For images, take the prefix from the encoder: ``proposals(encode(x, num_stages=t))``
        are the options the greedy encoder chooses among at stage t. An empty prefix
        ([N x 0]) gives stage 0's proposals, the same for every image.

        :param codes: [N x t] integers in [0, K), 0 <= t < S.
        :return: [N x K x *shape] normalized proposals of stage t.
        """
        codes = torch.as_tensor(codes)
        if codes.dim() != 2 or not 0 <= codes.shape[1] < self.num_stages or len(codes) == 0:
            raise ValueError(f"codes must be prefixes [N x t] with N >= 1 and 0 <= t < "
                             f"{self.num_stages} stages, got shape {list(codes.shape)}")
        stage = codes.shape[1]
        param = self.output_scale
        if stage == 0:
            if codes.dtype.is_floating_point or codes.dtype == torch.bool or codes.dtype.is_complex:
                raise TypeError(f"codes must be integers, got {codes.dtype}")
            recon = torch.zeros(len(codes), *self.shape, device=param.device, dtype=param.dtype)
            first_choices = None
        else:
            codes = self._check_codes(codes)
            recon = self.decode(codes)
            first_choices = codes[:, 0]
        features, inverse = self._distinct_features(recon, stage, first_choices)
        if stage == 0:
            # All images share stage 0's K options: run the head once and pick from it, as
            # _chosen_option does for each choice.
            every = self.refiner.options(features, 0)[0]  # [K x *shape]
        rows = []
        for k in range(self.options):
            # One option for the whole batch: the shapes decode runs for this choice.
            choices = torch.full((len(codes),), k, dtype=torch.long, device=param.device)
            delta = every.index_select(0, choices) if stage == 0 else \
                self._chosen_option(features, inverse, stage, choices)
            rows.append(self._next(recon, delta, stage, choices))
        return torch.stack(rows, 1)

    # ------------------------------------------------------------------ checks

    def _check_images(self, x, finite=True):
        """Shape and type checks (on the host); with ``finite`` also a check of the values,
        which on a GPU waits for the device (the training step: ``StepPlan.check_finite``)."""
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise TypeError(f"expected a float tensor of images [N x {' x '.join(map(str, self.shape))}]"
                            f", got {type(x).__name__} {getattr(x, 'dtype', '')}")
        if x.dim() != 1 + len(self.shape) or tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"expected images of shape [N x {' x '.join(map(str, self.shape))}], got "
                             f"{list(x.shape)}; this model is for {self.shape[0]}-channel "
                             f"{self.shape[1]}x{self.shape[2]} images")
        if len(x) == 0:
            raise ValueError("expected at least one image, got an empty batch")
        if finite:
            self._check_finite(x)

    def _check_finite(self, x):
        if not torch.isfinite(x).all():
            raise ValueError("images contain NaN or infinite values")

    def _check_num_stages(self, num_stages):
        if num_stages is None:
            return self.num_stages
        if not 1 <= num_stages <= self.num_stages:
            raise ValueError(f"num_stages must be between 1 and {self.num_stages}, got {num_stages}")
        return num_stages

    def _check_codes(self, codes):
        codes = torch.as_tensor(codes)
        if codes.dtype.is_floating_point or codes.dtype == torch.bool or codes.dtype.is_complex:
            raise TypeError(f"codes must be integers, got {codes.dtype}")
        if codes.dim() != 2:
            raise ValueError(f"codes must have shape [N x stages], got {list(codes.shape)}")
        if not 1 <= codes.shape[1] <= self.num_stages:
            raise ValueError(f"codes have {codes.shape[1]} stages; this model decodes 1 to "
                             f"{self.num_stages}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.options):
            raise ValueError(f"codes must be in [0, {self.options}), got values from "
                             f"{int(codes.min())} to {int(codes.max())}")
        return codes.long().to(self.output_scale.device)


def code_usage(codes, options):
    """Per-stage statistics of a batch of codes [N x S].

    :return: (entropy [S] in nats of the empirical distribution of options,
              number of distinct options used [S]).
    """
    counts = torch.zeros(codes.shape[1], options, device=codes.device)
    counts.scatter_add_(1, codes.t(), torch.ones_like(codes.t(), dtype=counts.dtype))
    probs = counts / counts.sum(1, keepdim=True)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1)
    return entropy, (counts > 0).sum(1)
