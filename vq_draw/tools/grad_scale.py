"""How the gradient of a published model compares with Adam's eps, for summed and averaged
accumulation.

``python -m vq_draw.tools.grad_scale cifar10 [--data-dir DIR] [--stages 10 --segment 10]``

Adam divides each gradient element by its running RMS plus eps (1e-5 here, as in the
original). Its first update is ``lr * g / (|g| + eps)`` per element: about ``lr`` where
``|g|`` is well above eps, and only ``lr * |g| / eps`` where it is below. So the scale of the
gradient matters, and an update that averages its micro-batches' gradients instead of summing
them (as the original does) moves most weights less when the elements are near eps.

This computes the gradient of one micro-batch of the freshly initialized model (the first
``--batch`` training images of ``--data-dir``, or uniform noise) and reports, for that
gradient taken once (what an average of the update's micro-batches is, at most) and
``step_interval`` times (what their sum is when they agree), the median ``|g|``, the share of
elements below eps and the mean first-step update relative to the learning rate.
"""

import time

import torch

from ..arguments import Parser, fail, positive_int
from ..config import DATASETS, create_model
from ..data import DataError, load_dataset
from ..train import ADAM_EPS


def gradient_magnitudes(dataset, data_dir=None, stages=None, segment=None, batch=None, seed=0):
    """|gradient| of every parameter element for one micro-batch, flattened: [P] float32."""
    torch.manual_seed(seed)
    recipe = DATASETS[dataset]["train"]
    model = create_model(dataset, stages=stages, segment=segment,
                         grad_checkpoint=recipe["grad_checkpoint"]).train()
    batch = batch or recipe["batch"]
    if data_dir is None:
        images = torch.rand(batch, *model.shape, generator=torch.Generator().manual_seed(seed))
    else:
        train = load_dataset(dataset, "train", data_dir, download=False, shape=model.shape)
        if len(train) < batch:
            raise DataError(f"--batch {batch} is more than the {len(train)} training images of "
                            f"{data_dir}; use at most {len(train)}")
        items = [train[i] for i in range(batch)]
        images = torch.stack([item[0] if isinstance(item, tuple) else item for item in items])
    model(model.normalize(images))["loss"].backward()
    return torch.cat([p.grad.flatten().abs() for p in model.parameters() if p.grad is not None])


def adam_step_table(magnitudes, scales, eps=ADAM_EPS):
    """Rows (name, scale, median |g|, share below eps, mean |first Adam step| / lr)."""
    rows = []
    for name, scale in scales:
        g = magnitudes * scale
        rows.append((name, scale, g.median().item(), (g < eps).float().mean().item(),
                     (g / (g + eps)).mean().item()))
    return rows


def main(argv=None):
    parser = Parser(prog="python -m vq_draw.tools.grad_scale",
                    description="The gradient of a published model against Adam's "
                                "eps, summed or averaged over micro-batches.")
    parser.add_argument("dataset", choices=sorted(DATASETS))
    parser.add_argument("--data-dir", default=None,
                        help="training images (default: uniform noise); nothing is downloaded")
    parser.add_argument("--stages", type=positive_int, default=None)
    parser.add_argument("--segment", type=positive_int, default=None)
    parser.add_argument("--batch", type=positive_int, default=None,
                        help="default: the published micro-batch")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    interval = DATASETS[args.dataset]["train"]["step_interval"]
    start = time.time()
    try:
        magnitudes = gradient_magnitudes(args.dataset, args.data_dir, args.stages, args.segment,
                                         args.batch, args.seed)
    except (DataError, ValueError) as exc:  # ValueError: settings create_model refuses
        fail(exc)
    source = "uniform noise" if args.data_dir is None else "training images"
    print(f"{args.dataset}: gradient of one micro-batch of {source}, {len(magnitudes):,} elements, "
          f"{time.time() - start:.0f} s; Adam eps {ADAM_EPS:g}")
    scales = [("one micro-batch (mean)", 1)]
    if interval > 1:
        scales += [(f"x {interval} (sum, agreeing)", interval),
                   (f"x {round(interval ** 0.5)} (sum, independent)", round(interval ** 0.5))]
    print(f"{'gradient':<28} {'median |g|':>10} {'below eps':>10} {'first step / lr':>16}")
    for name, _, median, below, step in adam_step_table(magnitudes, scales):
        print(f"{name:<28} {median:>10.3e} {below:>9.1%} {step:>16.3f}")


if __name__ == "__main__":
    main()
