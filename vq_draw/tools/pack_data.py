"""Copy the first training images of a dataset into a small folder that the train scripts read
as it is: what a short run needs, small enough to travel (to a GPU machine, say).

``python -m vq_draw.tools.pack_data cifar10 --data-dir ./data --count 8192 --out data/gpu_check/cifar10``

The source is anything ``--data-dir`` accepts (a torchvision root, a folder of images, .npz
files). Images held as arrays (CIFAR-10, MNIST, SVHN, .npz) are written as ``train.npz`` (the
first ``count`` images of the training split) and ``test.npz`` (the first ``--test-count`` of the
test split). Image files (CelebA) are copied unchanged, the first ones of the training split,
enough of them that the folder's own split (the last tenth is held out as its test split, see
vq_draw/data.py) leaves ``count`` for training; the run then reads the same pixels as from the
source. ``BatchSampler`` visits every training image once per epoch, so a run of ``count /
batch`` micro-batches sees each packed image once, as it would see different images of the full
set.
"""

import argparse
import json
import math
import os
import shutil
import sys

import numpy as np

from ..data import ArrayDataset, DataError, ImageFileDataset, load_dataset

MARKER = "PACKED.json"  # written last; a folder holding it may be replaced by a new pack


def pack(dataset, data_dir, count, out, test_count=32):
    """Write the first ``count`` training images of ``dataset`` (and a few test images) to ``out``.

    :return: dict with dataset, train (images the train scripts will find there), bytes, files.
    """
    if count < 1 or test_count < 1:
        raise ValueError(f"count and test_count must be >= 1, got {count} and {test_count}")
    train = load_dataset(dataset, "train", data_dir, download=False)
    if len(train) < count:
        raise DataError(f"the {dataset} training split of {data_dir} has {len(train)} images, "
                        f"fewer than the {count} asked for")
    _clear(out)
    if isinstance(train, ArrayDataset):
        test = load_dataset(dataset, "test", data_dir, download=False)
        _write_npz(os.path.join(out, "train.npz"), train.images[:count])
        _write_npz(os.path.join(out, "test.npz"), test.images[:test_count])
    elif isinstance(train, ImageFileDataset):
        # The folder's split holds out min(1000, n // 10) images: n = ceil(count * 10 / 9)
        # leaves at least count, and the check below reads the folder as training will.
        files = math.ceil(count * 10 / 9)
        if len(train) < files:
            raise DataError(f"the {dataset} training split of {data_dir} has {len(train)} image "
                            f"files; packing {count} for training needs {files}")
        names = set()
        for path in train.paths[:files]:
            name = os.path.basename(path)
            if name in names:
                raise DataError(f"two source images are both named {name}; pack needs distinct "
                                f"file names")
            names.add(name)
            shutil.copyfile(path, os.path.join(out, name))
    else:
        raise DataError(f"cannot pack {type(train).__name__}; expected images held as arrays or "
                        f"image files")
    found = len(load_dataset(dataset, "train", out, download=False))
    if found < count:
        raise DataError(f"{out} holds {found} training images, not the {count} packed; "
                        f"has data.py's train/test split changed?")
    files = sorted(os.listdir(out))
    size = sum(os.path.getsize(os.path.join(out, f)) for f in files)
    result = {"dataset": dataset, "train": found, "requested": count, "bytes": size,
              "files": len(files)}
    with open(os.path.join(out, MARKER), "w") as f:
        json.dump(result, f, indent=1)
    return result


def _clear(out):
    """Create ``out``, or empty it if an earlier pack made it; anything else is left alone."""
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise DataError(f"--out {out} is a file; choose a folder")
        if os.listdir(out) and not os.path.exists(os.path.join(out, MARKER)):
            raise DataError(f"--out {out} is not empty and was not written by pack_data; "
                            f"choose a new folder")
        shutil.rmtree(out)
    os.makedirs(out)


def _write_npz(path, images):
    """uint8 images [N x C x H x W] -> ``path`` with an ``images`` array N x H x W x C."""
    # Uncompressed: CIFAR-10 compresses by only 8 %, and loading stays instant.
    np.savez(path, images=images.permute(0, 2, 3, 1).contiguous().numpy())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=("mnist", "svhn", "cifar10", "celeba"))
    parser.add_argument("--data-dir", required=True,
                        help="where the dataset is: a torchvision root, an image folder or .npz")
    parser.add_argument("--count", type=int, required=True, help="training images to pack")
    parser.add_argument("--test-count", type=int, default=32,
                        help="test images (arrays only; the run's sample grids use 32)")
    parser.add_argument("--out", required=True, help="the folder to write (--data-dir of the run)")
    args = parser.parse_args(argv)
    try:
        result = pack(args.dataset, args.data_dir, args.count, args.out, args.test_count)
    except (DataError, ValueError, OSError) as exc:
        sys.exit(f"error: {exc}")
    print(f"{args.out}: {result['train']} {args.dataset} training images, {result['files']} files, "
          f"{result['bytes'] / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
