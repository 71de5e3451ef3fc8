"""Datasets: torchvision downloads, local folders of images and .npz arrays.

Every dataset yields images in [0, 1] as float tensors ``[C x H x W]`` of the
shape asked for (by default the named dataset's, ``IMAGE_SHAPES``); the model
normalizes them itself (``model.normalize``). Where to look is decided by ``data_dir``:

- an ``.npz`` file with an ``images`` array (uint8, NHWC): train and test are
  split from it (the last tenth, at most 1,000 images, is the test split);
- a folder holding ``train*.npz`` / ``test*.npz`` files;
- a folder of image files (also ``img_align_celeba/`` inside it), split like an npz;
- otherwise a torchvision root (default ``./data``), downloaded when missing.
"""

import glob
import os
import shutil
import socket
import stat
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

# Each dataset's images as the published models see them, [C x H x W] (CelebA's aligned
# 178 x 218 faces are resized and center-cropped to 64 x 64).
IMAGE_SHAPES = {"mnist": (1, 28, 28), "svhn": (3, 32, 32), "cifar10": (3, 32, 32),
                "celeba": (3, 64, 64)}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TORCHVISION_LAYOUT = {
    "mnist": "MNIST/raw/ (torchvision.datasets.MNIST)",
    "svhn": "train_32x32.mat and test_32x32.mat (torchvision.datasets.SVHN)",
    "cifar10": "cifar-10-batches-py/ (torchvision.datasets.CIFAR10)",
    "celeba": "celeba/img_align_celeba/ with its list files (torchvision.datasets.CelebA)",
}


# Seconds a download may wait for the network (per connection attempt or read), so that a
# machine without internet fails in seconds instead of hanging.
DOWNLOAD_TIMEOUT = 10


class DataError(RuntimeError):
    """Data that is missing, unreadable or cannot be downloaded."""


class ImageReadError(DataError):
    """An image file that cannot be read (what ``skip_bad_images`` leaves out)."""


class ArrayDataset(Dataset):
    """Images held in memory as one uint8 tensor [N x C x H x W] (labels optional, [N])."""

    def __init__(self, images, labels=None):
        self.images = images
        self.labels = labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        image = self.images[index].float() / 255
        return image if self.labels is None else (image, int(self.labels[index]))

    def batch(self, indices):
        """Indices [B] -> images [B x C x H x W] in [0, 1], without per-item overhead."""
        return self.images[indices].float() / 255


class ImageFileDataset(Dataset):
    """Image files read with Pillow, converted to ``shape`` (C, H, W).

    The shorter side is resized to fit, then the center is cropped (for CelebA
    this is the published Resize(64), CenterCrop(64)). ``skipped`` lists the
    (path, reason) of files left out by ``without_unreadable``.
    """

    def __init__(self, paths, shape, skipped=()):
        self.paths = list(paths)
        self.shape = tuple(shape)
        self.skipped = list(skipped)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return load_image(self.paths[index], self.shape)

    def without_unreadable(self):
        """This dataset less the files that cannot be read, which go to ``skipped``.

        Reads every image once, in threads (Pillow decodes without holding the GIL).
        """
        def reason(path):
            try:
                load_image(path, self.shape)
            except ImageReadError as exc:
                return str(exc)
            return None

        with ThreadPoolExecutor(min(32, os.cpu_count() or 1)) as pool:
            reasons = list(pool.map(reason, self.paths, chunksize=64))
        keep = [path for path, why in zip(self.paths, reasons) if why is None]
        bad = [(path, why) for path, why in zip(self.paths, reasons) if why is not None]
        return ImageFileDataset(keep, self.shape, self.skipped + bad)


# The most elongated image read, long side : short side. Resizing the short side to the model's
# makes the long side this many times the model's size before the crop keeps 1/ratio of it;
# beyond it the crop is a sliver of the image, and a 1 x 1,000,000 PNG would become a
# 28 x 28,000,000 intermediate (gigabytes) before anything could be said.
MAX_ASPECT_RATIO = 100
# Pillow's modes of more than 8 bits per sample, and the value that is white in each: 16-bit
# files ("I;16", PNG and TIFF) and floats ("F", read as [0, 1]); 32-bit integers ("I") are
# decided by their values (``_scaled_to_float``). Converting these to "L" would clip them (a
# 16-bit digit saturates, a float image in [0, 1] comes out black), so they are scaled instead.
HIGH_DEPTH_WHITE = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "F": 1.0}


def load_image(path, shape):
    """Read one image file as a float tensor [C x H x W] in [0, 1] of the given shape.

    Images of more than 8 bits per sample are scaled by their mode's range (``HIGH_DEPTH_WHITE``),
    not clipped. Refused with ``ImageReadError``: anything but a regular file (a named pipe would
    block ``open`` forever), and images more elongated than ``MAX_ASPECT_RATIO`` (before any
    pixel is decoded).
    """
    from PIL import Image
    import torchvision.transforms.functional as TF

    try:
        _check_regular_file(path, "image")
        with Image.open(path) as img:
            width, height = img.size
            if min(width, height) < 1 or max(width, height) > MAX_ASPECT_RATIO * min(width, height):
                raise ImageReadError(
                    f"cannot read image {path}: {width} x {height} pixels is more elongated than "
                    f"{MAX_ASPECT_RATIO}:1, and only a sliver of it would remain after the center "
                    f"crop; crop it nearer to the model's {shape[2]} x {shape[1]} first")
            if img.mode in HIGH_DEPTH_WHITE or img.mode == "I":
                img = _scaled_to_float(img)  # mode "F" in [0, 1], which resize keeps
            else:
                img = img.convert("L" if shape[0] == 1 else "RGB")
            img = TF.resize(img, min(shape[1:]))
            img = TF.center_crop(img, list(shape[1:]))
            pixels = TF.to_tensor(img)
            return pixels.expand(shape[0], -1, -1).contiguous() if img.mode == "F" else pixels
    except (MemoryError, ImageReadError):
        raise
    except Exception as exc:  # Pillow raises several types (OSError, SyntaxError, ValueError, ...)
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise ImageReadError(f"cannot read image {path}: {text}") from None


def _scaled_to_float(img):
    """A high-bit-depth single-channel image as mode "F" with values in [0, 1].

    "I" (32-bit integers) is how Pillow holds 16-bit samples of several formats as well as
    true 32-bit ones, and the mode does not say which: values up to 65535 are taken as 16-bit,
    larger ones as 32-bit unsigned.
    """
    from PIL import Image

    values = np.asarray(img, dtype=np.float64)
    white = HIGH_DEPTH_WHITE.get(img.mode)
    if white is None:
        white = 65535 if values.size == 0 or values.max() <= 65535 else 2 ** 32 - 1
    values = np.nan_to_num(values / white, nan=0.0).clip(0, 1)
    return Image.fromarray(values.astype(np.float32))  # float32: mode "F"


def _check_regular_file(path, what, error=ImageReadError):
    """Raise ``error`` unless ``path`` is a regular file (or a link to one): opening a
    named pipe blocks until something writes to it, and a device or folder is no ``what``."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):
        kind = "a named pipe" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode) else \
            "a device or socket"
        raise error(f"cannot read {what} {path}: it is {kind}, not a regular file")


def load_dataset(name, split="train", data_dir=None, download=True, shape=None,
                 skip_bad_images=False):
    """The ``split`` ("train" or "test") of dataset ``name``, found as described above.

    :param shape: (C, H, W) every image is converted to, e.g. ``model.shape``; default
                  ``IMAGE_SHAPES[name]``. An .npz must hold images of this shape already.
    :param skip_bad_images: leave out image files that cannot be read (each is read once
                  here to find them; see ``skipped_images_note``) instead of failing on the
                  first when it is reached. The train/test split is made before, so it stays
                  the same.
    """
    if name not in IMAGE_SHAPES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(IMAGE_SHAPES)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    shape = tuple(IMAGE_SHAPES[name] if shape is None else shape)
    dataset = _find(name, split, data_dir, download, shape)
    if isinstance(dataset, ArrayDataset) and tuple(dataset.images.shape[1:]) != shape:
        found = "x".join(map(str, dataset.images.shape[1:]))
        raise DataError(f"the {name} {split} images are {found}, not the "
                        f"{'x'.join(map(str, shape))} asked for")
    if skip_bad_images and isinstance(dataset, ImageFileDataset):
        dataset = dataset.without_unreadable()
    return dataset


def skipped_images_note(*datasets):
    """One line on the image files ``skip_bad_images`` left out of ``datasets``; None if none."""
    skipped = [item for d in datasets for item in getattr(d, "skipped", ())]
    if not skipped:
        return None
    total = len(skipped) + sum(len(d) for d in datasets)
    more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
    return f"skipped {len(skipped)} of {total} image files: {skipped[0][1]}{more}"


def _find(name, split, data_dir, download, shape):
    root = data_dir or "data"
    if data_dir is not None and not os.path.exists(data_dir):
        raise DataError(f"--data-dir {data_dir} does not exist; give a torchvision root, a folder "
                        f"of images or an .npz file")
    if os.path.isfile(root):
        if not root.endswith(".npz"):
            raise DataError(f"{root} is a file but not an .npz archive with an 'images' array")
        return _split(_load_npz(root, shape), split)
    for folder in (root, os.path.join(root, name)):
        npz = sorted(glob.glob(os.path.join(folder, f"{split}*.npz")))
        if npz:
            return _load_npz(npz[0], shape)
    images = _image_folder(name, root)
    if images:
        return _split(ImageFileDataset(images, shape), split)
    return _torchvision(name, split, root, download, shape)


def _load_npz(path, shape):
    _check_regular_file(path, "array file", DataError)
    try:
        with np.load(path) as archive:
            if "images" not in archive.files:
                raise DataError(f"{path} has no 'images' array (expected uint8 N x H x W x C)")
            keys = ["images"] + ["labels"] * ("labels" in archive.files)
            for key in keys:
                _check_npz_member(archive, key)
            images = archive["images"]
            labels = archive["labels"] if "labels" in keys else None
    except DataError:
        raise
    except Exception as exc:  # zipfile, zlib and numpy raise many types for a cut or foreign file
        raise DataError(f"cannot read {path}: it is truncated, corrupt or not an .npz archive "
                        f"({_reason(exc, 200)})") from None
    if images.ndim == 3:
        images = images[..., None]
    expected = (shape[1], shape[2], shape[0])
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected:
        raise DataError(f"{path}: 'images' must be uint8 of shape N x {' x '.join(map(str, expected))}"
                        f", got {images.dtype} {images.shape}")
    labels = None if labels is None else torch.as_tensor(labels).long()
    return ArrayDataset(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels)


def _check_npz_member(archive, key):
    """Raise ``ValueError`` when the header of array ``key`` in an open .npz claims more bytes
    than the archive holds for it, before numpy allocates them (a damaged or hostile header
    can claim hundreds of GiB)."""
    info = archive.zip.getinfo(key + ".npy")
    with archive.zip.open(info) as member:
        version = np.lib.format.read_magic(member)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        array_shape, _, dtype = read_header(member)
        header_size = member.tell()
    claimed = int(np.prod(array_shape, dtype=object)) * dtype.itemsize
    if claimed > info.file_size - header_size:
        raise ValueError(
            f"its '{key}' array claims {' x '.join(map(str, array_shape)) or 'a scalar'} {dtype} "
            f"({claimed / 2 ** 30:,.1f} GiB) but the archive holds "
            f"{max(0, info.file_size - header_size):,} bytes for it")


def _image_folder(name, root):
    """Image files directly in ``root``, or in CelebA's img_align_celeba/ without list files."""
    candidates = [root]
    if name == "celeba":
        for base in (root, os.path.join(root, "celeba")):
            if not os.path.exists(os.path.join(base, "list_eval_partition.txt")):
                candidates.append(os.path.join(base, "img_align_celeba"))
    for folder in candidates:
        if os.path.isdir(folder):
            files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
            if files:
                return [os.path.join(folder, f) for f in files]
    return None


def _split(dataset, split):
    """Hold out the last tenth (at most 1,000 images) of a single collection as the test split."""
    n = len(dataset)
    held_out = min(1000, max(1, n // 10))
    if n < 2:
        raise DataError(f"need at least 2 images to split into train and test, found {n}")
    indices = range(n - held_out, n) if split == "test" else range(n - held_out)
    if isinstance(dataset, ArrayDataset):
        labels = None if dataset.labels is None else dataset.labels[indices.start:indices.stop]
        return ArrayDataset(dataset.images[indices.start:indices.stop], labels)
    return ImageFileDataset(dataset.paths[indices.start:indices.stop], dataset.shape)


def _torchvision(name, split, root, download, shape):
    import torchvision.datasets as tvd

    if name == "mnist" and os.path.basename(os.path.normpath(root)) == "MNIST":
        root = os.path.dirname(os.path.normpath(root))  # accept the MNIST folder itself
    try:
        if name == "svhn" and os.path.isfile(os.path.join(root, f"{split}_32x32.mat")):
            return _load_svhn_mat(os.path.join(root, f"{split}_32x32.mat"))
        with _socket_timeout(DOWNLOAD_TIMEOUT), _removed_on_failure(root):
            return _torchvision_dataset(tvd, name, split, root, download, shape)
    except DataError:
        raise
    except Exception as exc:
        what = "could not be downloaded" if download else "is missing (download disabled)"
        raise DataError(f"{name} {split} data not found in {os.path.abspath(root)} and {what} "
                        f"({_reason(exc)}); put {TORCHVISION_LAYOUT[name]} there, or point to a "
                        f"torchvision root, a folder of images or an .npz file with --data-dir "
                        f"(in Python: the data_dir argument; the notebooks read "
                        f"$VQ_DRAW_DATA)") from None


@contextmanager
def _removed_on_failure(root, depth=2):
    """Remove what a failing block created under ``root`` (down to ``depth`` levels: a download
    makes ``MNIST/raw/``), never what existed before: a failed download leaves no empty or
    partial folders behind."""
    def entries():
        found, level = {root} if os.path.lexists(root) else set(), [root]
        for _ in range(depth):
            deeper = []
            for folder in level:
                if os.path.isdir(folder) and not os.path.islink(folder):
                    try:
                        deeper += [os.path.join(folder, e) for e in os.listdir(folder)]
                    except OSError:
                        pass
            found.update(deeper)
            level = deeper
        return found

    before = entries()
    try:
        yield
    except BaseException:
        # Shallowest first: removing a new folder removes what the attempt put inside it.
        for path in sorted(entries() - before, key=lambda p: p.count(os.sep)):
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                elif os.path.lexists(path):
                    os.remove(path)
            except OSError:
                pass  # a cleanup that fails must not hide the reason the block failed
        raise


def _reason(exc, limit=240):
    """An exception's whole message on one line, shortened to ``limit`` characters.

    Not just its first line: torchvision's MNIST download puts "Error downloading FILE:" there
    and what went wrong at each mirror on the lines after it.
    """
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _torchvision_dataset(tvd, name, split, root, download, shape):
    """The split from torchvision's own layout under ``root`` (downloaded when allowed); CelebA's
    image files are converted to ``shape``."""
    if name == "mnist":
        ds = tvd.MNIST(root, train=split == "train", download=download)
        return ArrayDataset(ds.data.unsqueeze(1).contiguous(), ds.targets)
    if name == "cifar10":
        ds = tvd.CIFAR10(root, train=split == "train", download=download)
        return ArrayDataset(torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(),
                            torch.as_tensor(ds.targets))
    if name == "svhn":
        ds = tvd.SVHN(root, split=split, download=download)
        return ArrayDataset(torch.from_numpy(ds.data).contiguous(), torch.as_tensor(ds.labels))
    ds = tvd.CelebA(root, split=split, target_type=[], download=download)
    folder = os.path.join(root, ds.base_folder, "img_align_celeba")
    return ImageFileDataset([os.path.join(folder, f) for f in ds.filename], shape)


def _load_svhn_mat(path):
    """An SVHN file in torchvision's layout: ``X`` uint8 [32 x 32 x 3 x N], ``y`` [N x 1].

    Read directly rather than through ``torchvision.datasets.SVHN``, whose checksum
    would reject a subset or any other file in the same layout.
    """
    try:
        import scipy.io
    except ImportError:
        raise DataError(f"reading {path} needs scipy: pip install scipy") from None
    try:
        mat = scipy.io.loadmat(path)
        images, labels = mat["X"], mat["y"]
    except KeyError:
        raise DataError(f"{path} lacks the 'X' or 'y' array of an SVHN .mat file") from None
    except Exception as exc:  # scipy raises several types for truncated or foreign files
        raise DataError(f"cannot read {path}: {str(exc).strip()[:200] or type(exc).__name__}") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[:3] != (32, 32, 3):
        raise DataError(f"{path}: 'X' must be uint8 of shape 32 x 32 x 3 x N, got {images.dtype} "
                        f"{images.shape}")
    labels = labels.astype(np.int64).reshape(-1) % 10  # SVHN's label 10 is the digit 0
    if len(labels) != images.shape[3]:
        raise DataError(f"{path}: {len(labels)} labels for {images.shape[3]} images")
    return ArrayDataset(torch.from_numpy(images).permute(3, 2, 0, 1).contiguous(),
                        torch.from_numpy(labels))


@contextmanager
def _socket_timeout(seconds):
    """Give sockets opened inside a timeout (torchvision's downloads set none)."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


class BatchSampler:
    """Deterministic shuffled batches that can start at any position.

    Epoch e visits the examples in ``randperm(n)`` drawn from a generator seeded with
    ``seed + e``; batch i of the whole run is therefore a function of (seed, i)
    alone, which is what makes a resumed run see exactly the same data.
    An epoch ends with its last partial batch, as the original's DataLoader (no
    ``drop_last``) does: CIFAR-10's 50,000 images make 1,562 batches of 32 and one of 16.
    With ``rank``/``world_size`` each process takes every world_size-th example of
    the global batch of ``batch_size * world_size`` examples; a last partial batch too
    small to give every process an image is dropped, since a process cannot train on none.
    """

    def __init__(self, n, batch_size, seed=0, start=0, rank=0, world_size=1):
        if n < batch_size * world_size:
            raise DataError(f"the dataset has {n} images, fewer than one global batch "
                            f"({batch_size} x {world_size} processes)")
        self.n = n
        self.batch_size = batch_size
        self.seed = seed
        self.start = start
        self.rank = rank
        self.world_size = world_size

    @property
    def batches_per_epoch(self):
        """Whole global batches per epoch, plus the partial one when every process gets an image."""
        whole, left = divmod(self.n, self.batch_size * self.world_size)
        return whole + (left >= self.world_size)

    def __iter__(self):
        global_batch = self.batch_size * self.world_size
        per_epoch = self.batches_per_epoch
        index = self.start
        while True:
            epoch, offset = divmod(index, per_epoch)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
            for b in range(offset, per_epoch):
                chunk = perm[b * global_batch:(b + 1) * global_batch]
                yield chunk[self.rank::self.world_size]
            index = (epoch + 1) * per_epoch


def iterate_batches(dataset, sampler, num_workers=0):
    """Endless iterator of image batches [B x C x H x W] in [0, 1] for a BatchSampler.

    An image that cannot be read ends it with the one-line ``DataError`` naming the file,
    whether it was read here or in a DataLoader worker process.
    """
    if isinstance(dataset, ArrayDataset):
        return (dataset.batch(indices) for indices in sampler)
    # A generator of its own: DataLoader otherwise draws its worker seed from the global RNG,
    # which would shift the exploration (epsilon) draws of a resumed run.
    loader = DataLoader(_ErrorsAsItems(dataset), batch_sampler=sampler, num_workers=num_workers,
                        persistent_workers=num_workers > 0, generator=torch.Generator(),
                        collate_fn=_stack_or_error)
    return _raise_errors(iter(loader))


class _ErrorsAsItems(Dataset):
    """A dataset whose ``DataError`` is returned as the item instead of raised: a worker
    process passes it back whole, where a raised one would arrive as a worker traceback."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        try:
            return self.dataset[index]
        except DataError as exc:
            return exc


def _stack_or_error(items):
    """Images -> a batch [B x C x H x W], or the first DataError among them."""
    for item in items:
        if isinstance(item, DataError):
            return item
    return torch.stack(items)


def _raise_errors(batches):
    """Yield the batches; raise a DataError item, and anything else the loader raises (a worker
    that died or failed otherwise, reported with its whole traceback) as one line."""
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            what = lines[-1] if lines else type(exc).__name__  # a traceback ends with its error
            raise DataError(f"loading images failed: {what}") from None
        if isinstance(batch, DataError):
            raise batch
        yield batch


def fixed_images(dataset, count):
    """The first ``count`` images of a dataset as one tensor [count x C x H x W] in [0, 1]."""
    count = min(count, len(dataset))
    if isinstance(dataset, ArrayDataset):
        return dataset.batch(torch.arange(count))
    return torch.stack([dataset[i] for i in range(count)])


def load_test_images(name, count, data_dir=None):
    """The first ``count`` test images of dataset ``name``: [count x C x H x W] in [0, 1], found
    as ``load_dataset`` finds them (default ``./data``, downloaded when missing)."""
    return fixed_images(load_dataset(name, "test", data_dir), count)
