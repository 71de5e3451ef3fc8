"""Losses over a grid of proposals.

A loss takes proposals ``[N x K x *shape]`` and targets ``[N x *shape]`` and
returns one loss per sample and option, ``[N x K]``. The encoder picks the
option with the lowest value, so any per-sample distortion can be plugged in.
"""


def mse_loss(proposals, targets):
    """Per-sample mean squared error, [N x K x *shape], [N x *shape] -> [N x K]."""
    diff = proposals - targets.unsqueeze(1)
    return diff.pow(2).flatten(2).mean(-1)


LOSSES = {"mse": mse_loss}
