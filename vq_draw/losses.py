"""Losses over a grid of proposals.

A loss takes proposals ``[N x K x *shape]`` and targets ``[N x *shape]`` and
returns one loss per sample and option, ``[N x K]``. The encoder picks the
option with the lowest value, so any per-sample distortion can be plugged in.
"""

import torch


def mse_loss(proposals, targets):
    """Per-sample mean squared error, [N x K x *shape], [N x *shape] -> [N x K]."""
    diff = proposals - targets.unsqueeze(1)
    return diff.pow(2).flatten(2).mean(-1)


LOSSES = {"mse": mse_loss}


def mse_shared_options(residual, proposals):
    """``mse_loss`` when all samples share the same K proposed changes (stage 0).

    The loss of sample n and option k is ||e_n + q_k||^2 / D with e = residual ([N x *shape])
    and q = proposals ([K x *shape]): ||e_n||^2 + 2 e_n . q_k + ||q_k||^2, one [N x D] @
    [D x K] product instead of an [N x K x D] grid of proposals.

    :return: [N x K] losses.
    """
    e, q = residual.flatten(1), proposals.flatten(1)
    cross = e @ q.t()
    return (e.pow(2).sum(1, keepdim=True) + 2 * cross + q.pow(2).sum(1)) / e.shape[1]


def mse_options(residual, deltas, scale):
    """``mse_loss`` of the proposals ``recon + scale * deltas`` without materializing them.

    With the residual e = recon - target and f_k = deltas[:, k],
    ||e + s f_k||^2 = ||e||^2 + 2 s <f_k, e> + s^2 ||f_k||^2: one batched matrix
    product and one squared norm instead of several passes over [N x K x *shape]
    temporaries, and a hand-written backward that makes the gradient of ``deltas`` in
    three passes, in the memory layout of ``deltas`` (channels_last from the last
    convolution). The choice (argmin over k) does not depend on ||e||^2, so it loses
    no precision to that common term.

    :param residual: [N x *shape], the current reconstruction minus the target.
    :param deltas: [N x K x *shape] refiner outputs (any memory layout).
    :param scale: scalar tensor, the output scale s.
    :return: [N x K] losses.
    """
    return _OptionMSE.apply(residual, deltas, scale)


class _OptionMSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, residual, deltas, scale):
        n, k = deltas.shape[:2]
        f = deltas.reshape(n, k, -1)  # a view for one channel or contiguous deltas
        e = residual.reshape(n, 1, -1)
        # [1 x D] @ [D x K] per sample: with the vector on the left the CPU's batched
        # matrix-vector product is 2-5x faster than [K x D] @ [D x 1] in either layout.
        cross = torch.bmm(e, f.transpose(1, 2)).squeeze(1)  # [N x K]
        # One pass without an [N x K x D] temporary (whose fresh memory pages cost more than
        # the arithmetic); squaring the norm rounds differently from summing squares only at
        # the level of float precision.
        norms = torch.linalg.vector_norm(f, dim=2).square()  # [N x K]
        ctx.save_for_backward(residual, deltas, scale, cross, norms)
        size = f.shape[2]
        return (e.pow(2).sum((1, 2)).unsqueeze(1) + (2 * scale) * cross + scale.pow(2) * norms) / size

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        residual, deltas, scale, cross, norms = ctx.saved_tensors
        n, k = deltas.shape[:2]
        size = residual[0].numel()
        grad = grad * (2 / size)  # [N x K]
        grad_residual = grad_deltas = grad_scale = None
        if ctx.needs_input_grad[0]:
            # sum_k g_k (e + s f_k)
            weighted = torch.bmm(grad.unsqueeze(1), deltas.reshape(n, k, -1)).view_as(residual)
            grad_residual = residual * grad.sum(1).view((n,) + (1,) * (residual.dim() - 1)) \
                + scale * weighted
        if ctx.needs_input_grad[1]:
            grad_deltas = _grad_deltas(residual, deltas, scale, grad)
        if ctx.needs_input_grad[2]:
            grad_scale = (grad * (cross + scale * norms)).sum()
        return grad_residual, grad_deltas, grad_scale


def _grad_deltas(residual, deltas, scale, grad):
    """g_k s (e + s f_k) = (g_k s^2) f_k + (g_k s) e: two passes over [N x K x *shape], in the
    memory layout of ``deltas`` (channels_last from the last convolution)."""
    expand = grad.shape + (1,) * (deltas.dim() - 2)
    grad_deltas = deltas * (grad * scale.pow(2)).view(expand)
    return grad_deltas.addcmul_((grad * scale).view(expand), residual.unsqueeze(1))


def mse_options_pick(residual, deltas, scale, choose):
    """``mse_options`` and the chosen option in one autograd node, for training.

    The losses choose the option (``choose``: losses [N x K] -> choices [N], e.g. argmin),
    and the chosen deltas continue to the next stage. Autograd would give ``deltas`` one
    zero-filled gradient from the pick and add it to the one from the losses; here the
    pick's gradient goes straight into the losses' gradient buffer.

    :return: (losses [N x K], choices [N] long, deltas[i, choices[i]] [N x *shape]).
    """
    return _OptionMSEPick.apply(residual, deltas, scale, choose)


class _OptionMSEPick(torch.autograd.Function):
    @staticmethod
    def forward(ctx, residual, deltas, scale, choose):
        losses = _OptionMSE.forward(ctx, residual, deltas, scale)
        choices = choose(losses)
        rows = torch.arange(len(choices), device=choices.device)
        ctx.rows_choices = rows, choices
        ctx.mark_non_differentiable(choices)
        return losses, choices, deltas[rows, choices]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_losses, grad_choices, grad_chosen):
        # Unused outputs arrive as zeros (autograd materializes them for Functions).
        grad_residual, grad_deltas, grad_scale = _OptionMSE.backward(ctx, grad_losses)
        if grad_deltas is not None:
            grad_deltas.index_put_(ctx.rows_choices, grad_chosen.to(grad_deltas.dtype), accumulate=True)
        return grad_residual, grad_deltas, grad_scale, None
