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
        # Squares in slices of the batch: a full [N x K x D] temporary of a large batch
        # costs more in fresh memory pages than in arithmetic.
        norms = torch.cat([part.pow(2).sum(2) for part in f.split(32)])  # [N x K]
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
        expand = (n, k) + (1,) * (deltas.dim() - 2)
        grad_residual = grad_deltas = grad_scale = None
        if ctx.needs_input_grad[0]:
            # sum_k g_k (e + s f_k)
            weighted = torch.bmm(grad.unsqueeze(1), deltas.reshape(n, k, -1)).view_as(residual)
            grad_residual = residual * grad.sum(1).view((n,) + (1,) * (residual.dim() - 1)) \
                + scale * weighted
        if ctx.needs_input_grad[1]:
            # g_k s (e + s f_k), computed in place in the layout of deltas.
            grad_deltas = deltas * scale
            grad_deltas += residual.unsqueeze(1)
            grad_deltas *= (grad * scale).view(expand)
        if ctx.needs_input_grad[2]:
            grad_scale = (grad * (cross + scale * norms)).sum()
        return grad_residual, grad_deltas, grad_scale
