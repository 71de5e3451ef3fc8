"""VQ-DRAW in plain PyTorch: the stage loop, the greedy choice, the training loss, decoding.

Read this first. It is the algorithm as the paper states it, with nothing fused, shared or
special-cased: every stage materializes all K proposals, scores each against the target,
keeps the best, and moves on. ``VQDraw`` (encoder.py) computes exactly the same codes,
losses and gradients faster; tests/test_reference.py checks it against these functions and
vq_draw/tools/bench.py times it against them. Images are normalized, ``[N x C x H x W]``.
"""

import math

import torch
from torch.utils.checkpoint import checkpoint


def proposals(model, recon, stage):
    """The K proposals of ``stage`` for each reconstruction: [N x *shape] -> [N x K x *shape].

    The refiner sees only the current reconstruction and the stage index, never the target,
    so a decoder can replay it from the code alone.
    """
    deltas = model.refiner.options(model.refiner.features(recon, stage), stage)  # [N x K x *shape]
    out = recon.unsqueeze(1) + model.scale(stage) * deltas
    if stage == 0:
        out = out + model.stage0_bias  # [K x *shape]: a learned starting point per option
    return out


def stage_step(model, recon, target, stage):
    """One greedy stage: (chosen proposal [N x *shape], choices [N], losses [N x K])."""
    candidates = proposals(model, recon, stage)
    losses = model.loss_fn(candidates, target)  # per-sample MSE of every option
    choices = losses.detach().argmin(1)
    return candidates[torch.arange(len(target), device=target.device), choices], choices, losses


def _stages(model, recon, target, start, stop):
    codes, losses = [], []
    for stage in range(start, stop):
        recon, choices, stage_losses = stage_step(model, recon, target, stage)
        codes.append(choices)
        losses.append(stage_losses)
    return recon, torch.stack(codes, 1), torch.stack(losses, 1)


def run(model, x, grad_checkpoint=False):
    """Encode with gradients: (codes [N x S], final reconstruction [N x *shape], losses [N x S x K]).

    The reconstruction starts at zeros. Gradients flow through every stage with the choices
    held fixed. With ``grad_checkpoint`` the stages run in chunks of about sqrt(S), each
    recomputed in the backward pass: activation memory ~ sqrt(S) instead of S. (The
    recomputation here chooses again, which repeats the choices only where the kernels repeat
    bit for bit, as on the CPU; ``VQDraw.run`` replays the first pass's choices.)
    """
    stages = model.num_stages
    chunk = max(1, round(math.sqrt(stages))) if grad_checkpoint and torch.is_grad_enabled() else stages
    recon = torch.zeros_like(x)
    codes, losses = [], []
    for start in range(0, stages, chunk):
        stop = min(start + chunk, stages)
        if chunk < stages:
            recon, c, l = checkpoint(_stages, model, recon, x, start, stop, use_reentrant=False)
        else:
            recon, c, l = _stages(model, recon, x, start, stop)
        codes.append(c)
        losses.append(l)
    return torch.cat(codes, 1), recon, torch.cat(losses, 1)


def training_loss(model, x, grad_checkpoint=False):
    """The published objective: (loss, codes [N x S], losses [N x S x K]).

    loss = mean over stages of the chosen proposal's loss
           + aux_coeff * mean loss over all proposals (keeps unused options alive)
           + final_coeff * the last stage's chosen loss.
    """
    codes, _, losses = run(model, x, grad_checkpoint)
    stage_losses = losses.gather(2, codes.unsqueeze(2)).squeeze(2).mean(0)  # [S]
    loss = stage_losses.mean() + model.aux_coeff * losses.mean() + model.final_coeff * stage_losses[-1]
    return loss, codes, losses


@torch.no_grad()
def encode(model, x):
    """Greedy codes [N x S] and the final reconstruction [N x *shape]."""
    codes, recon, _ = run(model, x)
    return codes, recon


@torch.no_grad()
def decode(model, codes):
    """Replay the stages with the stored choices: codes [N x n] -> reconstruction [N x *shape]."""
    rows = torch.arange(len(codes), device=codes.device)
    recon = torch.zeros(len(codes), *model.shape, device=codes.device, dtype=model.stage0_bias.dtype)
    for stage in range(codes.shape[1]):
        recon = proposals(model, recon, stage)[rows, codes[:, stage]]
    return recon


@torch.no_grad()
def naive_encode(model, x):
    """Greedy encoding with one refiner call per option and a Python argmin per image: the
    slowest and plainest statement of the choice. Returns (codes [N x S], reconstruction
    [N x *shape], losses [N x S x K])."""
    n = len(x)
    recon = torch.zeros_like(x)
    codes = torch.zeros(n, model.num_stages, dtype=torch.long)
    losses = torch.zeros(n, model.num_stages, model.options, dtype=x.dtype)
    for stage in range(model.num_stages):
        options = []
        for k in range(model.options):
            delta = model.refiner(recon, stage, torch.full((n,), k, dtype=torch.long))  # [N x *shape]
            option = recon + model.scale(stage) * delta
            if stage == 0:
                option = option + model.stage0_bias[k]
            options.append(option)
            losses[:, stage, k] = ((option - x) ** 2).flatten(1).mean(1)
        for i in range(n):
            codes[i, stage] = min(range(model.options), key=lambda k: losses[i, stage, k].item())
        recon = torch.stack([options[codes[i, stage]][i] for i in range(n)])
    return codes, recon, losses
