"""Image grids and figures: reconstructions, samples, stage-by-stage decoding, loss curves."""

import csv
import os

import torch
from torchvision.utils import make_grid, save_image


def to_pixels(model, x):
    """Normalized [N x *shape] -> [N x *shape] in [0, 1], clamped."""
    return model.denormalize(x).clamp(0, 1)


@torch.no_grad()
def reconstruction_grid(model, images, pairs_per_row=8):
    """Originals beside their reconstructions: [3 x H' x W'] grid in [0, 1].

    :param images: [N x *shape] in [0, 1]; each original is followed by its reconstruction.
    """
    device = next(model.parameters()).device
    images = images.to(device)
    recons = to_pixels(model, model.reconstruct(model.normalize(images)))
    both = torch.stack([images, recons], 1).flatten(0, 1)
    return make_grid(both.cpu(), nrow=2 * pairs_per_row, padding=2, pad_value=1.0)


@torch.no_grad()
def sample_grid(model, count=64, num_stages=None, seed=0, nrow=8):
    """Decodings of uniformly random codes (a fixed seed, so grids are comparable over time)."""
    generator = torch.Generator().manual_seed(seed)
    samples = to_pixels(model, model.sample(count, num_stages, generator=generator))
    return make_grid(samples.cpu(), nrow=nrow, padding=2, pad_value=1.0)


@torch.no_grad()
def stage_grid(model, images):
    """Each row decodes one image stage by stage; the last column is the original.

    :param images: [N x *shape] in [0, 1] -> grid of N rows and S + 1 columns.
    """
    device = next(model.parameters()).device
    images = images.to(device)
    codes = model.encode(model.normalize(images))
    stages = to_pixels(model, model.decode(codes, return_all=True).flatten(0, 1))
    stages = stages.view(len(images), model.num_stages, *model.shape)
    rows = torch.cat([stages, images.unsqueeze(1)], 1).flatten(0, 1)
    return make_grid(rows.cpu(), nrow=model.num_stages + 1, padding=2, pad_value=1.0)


def save_progress_images(model, images, run_dir):
    """The images written at every save: reconstructions.png and samples.png."""
    was_training = model.training
    model.eval()
    save_image(reconstruction_grid(model, images), os.path.join(run_dir, "reconstructions.png"))
    save_image(sample_grid(model), os.path.join(run_dir, "samples.png"))
    model.train(was_training)


def plot_log(csv_path, png_path):
    """Plot train and held-out loss and code entropy from a run's log.csv."""
    if not os.path.exists(csv_path):
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return

    def column(name):
        pairs = [(int(r["step"]), float(r[name])) for r in rows if r.get(name) not in (None, "")]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    fig, (ax_loss, ax_entropy) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax_loss.plot(*column("final_loss"), label="train (last stage)", alpha=0.7)
    ax_loss.plot(*column("test_mse"), label="held-out (last stage)", marker=".")
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("MSE")
    ax_loss.legend()
    ax_entropy.plot(*column("code_entropy"), label="train batch", alpha=0.7)
    ax_entropy.plot(*column("test_entropy"), label="held-out", marker=".")
    ax_entropy.set_xlabel("step")
    ax_entropy.set_ylabel("code entropy (nats, mean over stages)")
    ax_entropy.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
