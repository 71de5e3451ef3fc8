"""Stage-conditioned building blocks for the refiner networks.

Every module here takes ``(x, stage)`` where ``stage`` is a Python int shared by
the whole batch: all images of a batch are refined at the same stage.
"""

from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F


class StageModule(nn.Module):
    """Marker base class: ``forward(x, stage)`` instead of ``forward(x)``."""


class MaskedConv(StageModule):
    """A convolution followed by a learned per-stage channel mask.

    ``mask(conv(x))`` multiplies output channel ``c`` by ``mask[stage, c]``.
    Because the mask is linear in the output it is folded into the weight and
    bias instead (``conv(x, w * m, b * m)``): the product is the same, but the
    multiplication touches the small weight instead of the large activation.
    """

    def __init__(self, in_channels, out_channels, kernel_size, num_stages, stride=1,
                 transpose=False):
        super().__init__()
        if transpose:
            # k4 s2 p1 exactly doubles the spatial size.
            self.conv = nn.ConvTranspose2d(in_channels, out_channels, kernel_size, stride=stride,
                                           padding=1)
        else:
            self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                                  padding=kernel_size // 2)
        self.mask = nn.Parameter(torch.randn(num_stages, out_channels))
        self.transpose = transpose
        self.fold_mask = True  # False computes conv then multiply (the benchmark's reference)
        # Every stage's folded (weight, bias) while ``stage_weights`` is active, else None.
        self._stage_weights = None

    def forward(self, x, stage):
        conv = self.conv
        if self._stage_weights is not None:
            weights, biases = self._stage_weights
            w, b = weights[stage], biases[stage]
        elif not self.fold_mask:
            return conv(x) * self.mask[stage].view(1, -1, 1, 1)
        elif self.transpose:
            # ConvTranspose2d weights are [in, out, k, k].
            m = self.mask[stage]
            w, b = conv.weight * m.view(1, -1, 1, 1), conv.bias * m
        else:
            m = self.mask[stage]
            w, b = conv.weight * m.view(-1, 1, 1, 1), conv.bias * m
        if self.transpose:
            return F.conv_transpose2d(x, w, b, conv.stride, conv.padding)
        return F.conv2d(x, w, b, conv.stride, conv.padding)

    def fold_stages(self, channels_last=False):
        """Every stage's folded weight and bias in one product each, for ``stage_weights``.

        Folding per stage costs two products in the forward pass and about eight kernels in
        the backward pass (the masks' and the weights' gradients, and their sums over stages)
        per stage; folded once, the backward pass sums over all stages in a few kernels.
        It holds S copies of the weights, so it suits a device bound by kernel launches.

        :return: (weights, biases): tuples of S views, [out x in x k x k] ([in x out x k x k]
                 transposed; channels_last with ``channels_last``) and [out].
        """
        m = self.mask  # [S x out]
        if self.transpose:  # weights [in x out x k x k]
            scale = m[:, None, :, None, None]
        else:  # [out x in x k x k]
            scale = m[:, :, None, None, None]
        weights = self.conv.weight.unsqueeze(0) * scale  # [S x *weight.shape]
        if channels_last and weights.shape[-1] > 1:
            # Each stage's weight in channels_last, as the activations are, so that the
            # convolutions do not convert it on every call.
            weights = weights.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
        biases = self.conv.bias.unsqueeze(0) * m
        return weights.unbind(0), biases.unbind(0)


def fold_all_stages(module, channels_last=False):
    """``MaskedConv.fold_stages`` of every masked convolution in ``module``: a dict from
    module to its stages' (weights, biases), for ``stage_weights``."""
    return {m: m.fold_stages(channels_last) for m in module.modules() if isinstance(m, MaskedConv)}


@contextmanager
def stage_weights(folds):
    """While active, the masked convolutions in ``folds`` (from ``fold_all_stages``) use
    their stages' folded weights instead of folding a stage's mask on each call."""
    for m, weights in folds.items():
        m._stage_weights = weights
    try:
        yield
    finally:
        for m in folds:
            m._stage_weights = None


class StageSequential(nn.Sequential):
    """``nn.Sequential`` that passes the stage to the layers that take one."""

    def forward(self, x, stage):
        for layer in self:
            x = layer(x, stage) if isinstance(layer, StageModule) else layer(x)
        return x


class ResidualBlock(StageModule):
    """[ReLU, GN, conv k3, M, ReLU, GN, conv k1 up, M, ReLU, GN, conv k1 down, M] + input."""

    def __init__(self, channels, hidden, groups, num_stages):
        super().__init__()
        g1, g2, g3 = groups
        self.body = StageSequential(
            nn.ReLU(),
            nn.GroupNorm(g1, channels),
            MaskedConv(channels, channels, 3, num_stages),
            nn.ReLU(),
            nn.GroupNorm(g2, channels),
            MaskedConv(channels, hidden, 1, num_stages),
            nn.ReLU(),
            nn.GroupNorm(g3, hidden),
            MaskedConv(hidden, channels, 1, num_stages),
        )

    def forward(self, x, stage):
        return x + self.body(x, stage)


class OptionConv(nn.Module):
    """The last layer of a refiner: a convolution that emits K options of C channels.

    Output channel ``k * C + c`` is channel ``c`` of option ``k``. With
    ``per_stage=True`` every stage has its own weights (SVHN's 1x1 heads).
    ``select`` computes only the chosen option of each sample, which is all that
    decoding needs: 1/K of the work of the full layer.
    """

    def __init__(self, in_channels, channels, options, kernel_size, num_stages=1, per_stage=False):
        super().__init__()
        heads = num_stages if per_stage else 1
        self.channels = channels
        self.options = options
        self.per_stage = per_stage
        self.weight = nn.Parameter(torch.empty(heads, options * channels, in_channels,
                                               kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(heads, options * channels))
        for w, b in zip(self.weight, self.bias):
            # The default initialization of nn.Conv2d, per head.
            nn.init.kaiming_uniform_(w, a=5 ** 0.5)
            bound = 1 / (in_channels * kernel_size ** 2) ** 0.5
            nn.init.uniform_(b, -bound, bound)

    def _head(self, stage):
        return (self.weight[stage], self.bias[stage]) if self.per_stage else (self.weight[0], self.bias[0])

    def forward(self, h, stage):
        """[N x in x H x W] -> [N x K x C x H x W], all options."""
        w, b = self._head(stage)
        out = F.conv2d(h, w, b, padding=w.shape[-1] // 2)
        return out.view(h.shape[0], self.options, self.channels, *out.shape[2:])

    def select(self, h, stage, choices):
        """[N x in x H x W], choices [N] -> [N x C x H x W], the chosen option only.

        Each sample has its own weights, so this is not one ordinary convolution. A
        grouped convolution with a group per sample is slow on the CPU (5x the time
        of the product below), so the taps are split: one batched matrix product
        gives every kernel tap's response at every pixel, ``z[n, c, tap] = w[k_n, c,
        :, tap] . h[n, :, pixel]``, and the shifted taps are then summed.
        """
        w, b = self._head(stage)
        n, c, size = h.shape[0], self.channels, w.shape[-1]
        height, width = h.shape[2:]
        pad = size // 2
        taps = w.view(self.options, c, w.shape[1], size * size)[choices]  # [N x C x in x k*k]
        taps = taps.transpose(2, 3).reshape(n, c * size * size, w.shape[1])
        z = torch.bmm(taps.to(h.dtype), h.flatten(2))  # [N x C*k*k x H*W]; a view in either layout
        z = z.view(n, c, size, size, height, width)
        out = b.view(self.options, c)[choices].to(z.dtype)[:, :, None, None]
        out = out.expand(n, c, height, width).contiguous()
        for dy in range(size):
            for dx in range(size):
                # Output pixel (y, x) takes tap (dy, dx) from input pixel (y + dy - pad, x + dx - pad).
                y0, y1 = max(0, pad - dy), min(height, height + pad - dy)
                x0, x1 = max(0, pad - dx), min(width, width + pad - dx)
                out[:, :, y0:y1, x0:x1] += z[:, :, dy, dx, y0 + dy - pad:y1 + dy - pad,
                                             x0 + dx - pad:x1 + dx - pad]
        return out


class Refiner(nn.Module):
    """A body (reconstruction -> features) and an option head (features -> K proposals).

    The encoder calls ``features`` once per stage and ``options`` once for all K
    options (to choose) and, when decoding, only for the chosen one.
    """

    def __init__(self, body, head):
        super().__init__()
        self.body = body
        self.head = head

    def features(self, x, stage):
        """[N x C x H x W] -> features [N x F x H x W]."""
        return self.body(x, stage)

    def options(self, h, stage, choices=None):
        """Features -> [N x K x C x H x W], or [N x C x H x W] for the given choices [N]."""
        if choices is None:
            return self.head(h, stage)
        return self.head.select(h, stage, choices)

    def forward(self, x, stage, choices=None):
        return self.options(self.features(x, stage), stage, choices)


def segment_sizes(num_stages, segment):
    """Stages per network: ``segment`` as a list of block sizes.

    :param segment: an int (every network runs that many stages, the last one the rest) or a
                    sequence of positive ints that sum to ``num_stages`` (unequal blocks, e.g.
                    [4, 1, 5] gives stage 5 a network of its own).
    :return: a list of ints summing to ``num_stages``.
    """
    if isinstance(segment, int):
        return [min(segment, num_stages - start) for start in range(0, num_stages, segment)]
    return [int(size) for size in segment]


def segment_lengths(num_stages, segment):
    """The stages each network is built for: its block's size, except that with an int
    ``segment`` a shorter last block still gets a network of ``segment`` stages (unused rows),
    which keeps the parameter shapes of existing checkpoints."""
    sizes = segment_sizes(num_stages, segment)
    return [segment] * len(sizes) if isinstance(segment, int) else sizes


class SegmentRefiner(nn.Module):
    """Gives each block of consecutive stages its own refiner.

    With an int ``segment``, stage t runs network ``t // segment`` at its local stage
    ``t % segment``; a list of block sizes gives the blocks unequal lengths.
    """

    def __init__(self, make_refiner, num_stages, segment):
        super().__init__()
        sizes = segment_sizes(num_stages, segment)
        self.refiners = nn.ModuleList(make_refiner(n) for n in segment_lengths(num_stages, segment))
        # stage -> (network, local stage), looked up on every call.
        self._where = [(j, local) for j, size in enumerate(sizes) for local in range(size)]
        self.network_of_stage = [j for j, _ in self._where]

    def features(self, x, stage):
        j, local = self._where[stage]
        return self.refiners[j].features(x, local)

    def options(self, h, stage, choices=None):
        j, local = self._where[stage]
        return self.refiners[j].options(h, local, choices)

    def forward(self, x, stage, choices=None):
        return self.options(self.features(x, stage), stage, choices)
