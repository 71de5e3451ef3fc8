"""Regenerate the README figures from a trained MNIST model.

``python -m vq_draw.tools.make_images [--model pretrained/mnist_model.pt] [--data-dir DIR] [--out images]``
writes, from the model and the MNIST test set:

- ``mnist_stages.png``: one test digit of each class decoded stage by stage
  (columns: after stage 1, 2, ..., S, then the original);
- ``mnist_samples_30bit.png`` and ``mnist_samples_60bit.png``: decodings of
  uniformly random codes of 5 and 10 stages (6 bits a stage);
- ``mnist_reconstructions.png``: test digits, each followed by its reconstruction.

Everything is deterministic (fixed digits and a fixed sampling seed), so
re-running after the model changes replaces the figures like for like.

``--eval`` also evaluates the model on the whole test set (``vq_draw.evaluate``:
table printed, JSON written to ``OUT/mnist_eval.json``), and ``--notebooks``
re-executes ``mnist_demo.ipynb`` and ``mnist_classify.ipynb`` in place (with the
same model and data), so that one command refreshes everything the README shows;
``--notebooks --no-figures`` re-executes only the notebooks.
The notebooks also read ``VQ_DRAW_DIGITS`` / ``VQ_DRAW_QUICK`` from the environment
(a subset of the digits for the classifier notebook).
"""

import argparse
import math
import os
import sys
import time

import torch
from torchvision.utils import save_image

from ..images import reconstruction_grid, sample_grid, stage_grid


def first_of_each_class(dataset, classes=10):
    """Indices [classes] of the first test image of each label 0..classes-1."""
    labels = dataset.labels
    if labels is None:
        return torch.arange(classes)
    return torch.stack([(labels == c).nonzero()[0, 0] for c in range(classes)])


@torch.no_grad()
def make_images(model, dataset, out_dir, reconstructions=32, samples=64, seed=0):
    """Write the figures described in the module docstring; returns their paths.

    :param model: a VQ-DRAW model for 1 x 28 x 28 images (eval mode is set here).
    :param dataset: the test split as an ``ArrayDataset`` (images in [0, 1], labels [N]).
    """
    model.eval()
    os.makedirs(out_dir, exist_ok=True)
    bits = math.log2(model.options)
    paths = {}

    def save(name, grid):
        path = os.path.join(out_dir, name)
        save_image(grid, path)
        paths[name] = path

    digits = dataset.batch(first_of_each_class(dataset))
    save("mnist_stages.png", stage_grid(model, digits))
    for stages in sorted({min(5, model.num_stages), model.num_stages}):
        name = f"mnist_samples_{round(bits * stages)}bit.png"
        save(name, sample_grid(model, samples, num_stages=stages, seed=seed))
    images = dataset.batch(torch.arange(min(reconstructions, len(dataset))))
    save("mnist_reconstructions.png", reconstruction_grid(model, images))
    return list(paths.values())


def execute_notebook(path, timeout=7200):
    """Run every cell of a notebook (working directory: its folder) and save it with outputs.

    The kernel inherits this process's environment (``VQ_DRAW_MODEL``, ``VQ_DRAW_DATA``).
    """
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", coalesce_streams=True,
                            resources={"metadata": {"path": os.path.dirname(os.path.abspath(path))}})
    client.execute()
    nbformat.write(nb, path)


NOTEBOOKS = ("mnist_demo.ipynb", "mnist_classify.ipynb")


def main(argv=None):
    from ..checkpoint import CheckpointError
    from ..loading import load_model
    from ..data import DataError, load_dataset

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.path.join("pretrained", "mnist_model.pt"))
    parser.add_argument("--data-dir", default=None,
                        help="torchvision root holding MNIST/ (default ./data, downloaded)")
    parser.add_argument("--out", default="images", help="folder for the PNG files")
    parser.add_argument("--eval", action="store_true",
                        help="also evaluate on the whole test set and write OUT/mnist_eval.json")
    parser.add_argument("--notebooks", action="store_true",
                        help=f"also re-execute {' and '.join(NOTEBOOKS)} (in the current folder) in place")
    parser.add_argument("--no-figures", dest="figures", action="store_false",
                        help="do not write the PNG files (with --notebooks: only the notebooks)")
    args = parser.parse_args(argv)
    try:
        model = load_model(args.model)
        if model.config.get("dataset") != "mnist":
            raise CheckpointError(f"{args.model} is a {model.config.get('dataset')} model; "
                                  f"these figures are for MNIST")
        dataset = load_dataset("mnist", "test", args.data_dir) if args.figures else None
    except (CheckpointError, DataError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    if args.figures:
        for path in make_images(model, dataset, args.out):
            print(f"wrote {path}")
    if args.eval:
        from ..evaluate import main as evaluate_main

        eval_args = [args.model, "--json", os.path.join(args.out, "mnist_eval.json")]
        evaluate_main(eval_args + (["--data-dir", args.data_dir] if args.data_dir else []))
    if args.notebooks:
        # The notebooks read these, so they show the same model and data as the figures.
        os.environ["VQ_DRAW_MODEL"] = args.model
        if args.data_dir:
            os.environ["VQ_DRAW_DATA"] = os.path.abspath(args.data_dir)
        for path in NOTEBOOKS:
            if not os.path.exists(path):
                sys.exit(f"error: {path} not found; run from the repository root")
            start = time.time()
            try:
                execute_notebook(path)
            except Exception as exc:  # nbclient's CellExecutionError, a missing kernel, ...
                reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
                sys.exit(f"error: {path} failed ({reason[:300]}); it was not saved")
            print(f"executed {path} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
