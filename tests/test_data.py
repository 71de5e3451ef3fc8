"""Datasets (vq_draw/data.py): npz files and folders, image folders, SVHN .mat, missing data,
and the deterministic, resumable, shardable batch order."""

import os
import re
import socket
import time

import numpy as np
import pytest
import torch

import vq_draw
from vq_draw import data
from vq_draw.data import (ArrayDataset, BatchSampler, DataError, ImageFileDataset, ImageReadError,
                          fixed_images, iterate_batches, load_dataset)
from conftest import run_script, write_npz

# ---------------------------------------------------------------------- npz


def test_npz_file_is_split_into_train_and_test(tmp_path):
    path = str(tmp_path / "digits.npz")
    images = write_npz(path, 30, (1, 28, 28), labels=True)
    train = load_dataset("mnist", "train", path)
    test = load_dataset("mnist", "test", path)
    assert (len(train), len(test)) == (27, 3)  # the last tenth is held out
    expected = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    image, label = train[4]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert torch.equal(image, expected[4])
    assert torch.equal(test.batch(torch.arange(3)), expected[27:])
    assert label == int(np.load(path)["labels"][4])


def test_npz_without_channel_axis_and_color_layout(tmp_path):
    # N x H x W for one channel; NHWC is read channel-first.
    gray = np.random.default_rng(0).integers(0, 256, (20, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "gray.npz", images=gray)
    train = load_dataset("mnist", "train", str(tmp_path / "gray.npz"))
    assert torch.equal(train[0], torch.from_numpy(gray[0]).float().unsqueeze(0) / 255)

    color = write_npz(str(tmp_path / "color.npz"), 20, (3, 32, 32))
    train = load_dataset("cifar10", "train", str(tmp_path / "color.npz"))
    assert train[5].shape == (3, 32, 32)
    assert torch.equal(train[5][2], torch.from_numpy(color[5, :, :, 2]).float() / 255)


def test_npz_folder_with_train_and_test_files(tmp_path):
    train_images = write_npz(str(tmp_path / "train_small.npz"), 12, (3, 32, 32), seed=1)
    test_images = write_npz(str(tmp_path / "test.npz"), 5, (3, 32, 32), seed=2)
    train = load_dataset("cifar10", "train", str(tmp_path))
    test = load_dataset("cifar10", "test", str(tmp_path))
    assert (len(train), len(test)) == (12, 5)
    assert torch.equal(test.images, torch.from_numpy(test_images).permute(0, 3, 1, 2))
    assert torch.equal(train.images, torch.from_numpy(train_images).permute(0, 3, 1, 2))
    # Also found in a subfolder named after the dataset.
    nested = tmp_path / "root" / "svhn"
    nested.mkdir(parents=True)
    write_npz(str(nested / "train.npz"), 7, (3, 32, 32))
    assert len(load_dataset("svhn", "train", str(tmp_path / "root"))) == 7


@pytest.mark.parametrize("arrays, words", [
    (dict(images=np.zeros((4, 32, 32, 3), np.uint8)), "28 x 28 x 1"),    # wrong size and channels
    (dict(images=np.zeros((4, 28, 28, 3), np.uint8)), "28 x 28 x 1"),    # wrong channels
    (dict(images=np.zeros((4, 28, 28), np.float32)), "uint8"),
    (dict(pixels=np.zeros((4, 28, 28), np.uint8)), "no 'images' array"),
])
def test_bad_npz_is_a_data_error(tmp_path, arrays, words):
    path = str(tmp_path / "bad.npz")
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=words):
        load_dataset("mnist", "train", path)


def test_unreadable_or_foreign_files_are_data_errors(tmp_path):
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(os.urandom(300))
    with pytest.raises(DataError, match="cannot read"):
        load_dataset("mnist", "train", str(corrupt))
    other = tmp_path / "images.txt"
    other.write_text("hello")
    with pytest.raises(DataError, match="not an .npz"):
        load_dataset("mnist", "train", str(other))
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("mnist", "train", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet", "train", str(tmp_path))
    with pytest.raises(ValueError, match="split"):
        load_dataset("mnist", "validation", str(tmp_path))


# ---------------------------------------------------------------------- image folders


def write_images(folder, count, size=(40, 30), mode="RGB"):
    """``count`` solid-color image files; image i has the color (i, 2i, 3i)."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    colors = []
    for i in range(count):
        color = (i, 2 * i, 3 * i)
        Image.new(mode, size, color if mode == "RGB" else i).save(os.path.join(folder, f"{i:03d}.png"))
        colors.append(color)
    return colors


def test_image_folder_is_resized_cropped_and_split(tmp_path):
    colors = write_images(str(tmp_path), 20, size=(50, 40))
    (tmp_path / "notes.txt").write_text("not an image")
    train = load_dataset("cifar10", "train", str(tmp_path))
    test = load_dataset("cifar10", "test", str(tmp_path))
    assert isinstance(train, ImageFileDataset)
    assert (len(train), len(test)) == (18, 2)
    image = train[3]
    assert image.shape == (3, 32, 32)
    expected = torch.tensor(colors[3], dtype=torch.float32).view(3, 1, 1) / 255
    torch.testing.assert_close(image, expected.expand(3, 32, 32))
    torch.testing.assert_close(test[1], torch.tensor(colors[19], dtype=torch.float32).view(3, 1, 1)
                               .expand(3, 32, 32) / 255)
    # Color files become one-channel images for MNIST.
    assert load_dataset("mnist", "train", str(tmp_path))[0].shape == (1, 28, 28)


def test_images_take_the_shape_asked_for_not_the_model_table(tmp_path):
    import ast
    # data.py knows images, not models: it imports nothing of the package.
    tree = ast.parse(open(data.__file__).read())
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level > 0]
    assert vq_draw.DATASETS["celeba"]["shape"] == data.IMAGE_SHAPES["celeba"] == (3, 64, 64)
    write_images(str(tmp_path / "folder"), 10, size=(50, 40))
    assert load_dataset("celeba", "train", str(tmp_path / "folder"), shape=(1, 16, 8))[0].shape == \
        (1, 16, 8)
    write_npz(tmp_path / "d.npz", 20, (1, 28, 28))
    with pytest.raises(DataError, match="must be uint8 of shape N x 16 x 16 x 1"):
        load_dataset("mnist", "train", str(tmp_path / "d.npz"), shape=(1, 16, 16))
    pytest.importorskip("scipy")
    write_svhn(str(tmp_path), 4)
    with pytest.raises(DataError, match="svhn train images are 3x32x32, not the 3x16x16 asked for"):
        load_dataset("svhn", "train", str(tmp_path), shape=(3, 16, 16))


def test_center_crop_keeps_the_middle(tmp_path):
    from PIL import Image

    # A 96 x 64 image: left and right thirds black, middle white. Resize(64), CenterCrop(64)
    # keeps exactly the middle.
    pixels = np.zeros((64, 96, 3), np.uint8)
    pixels[:, 16:80] = 255
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(pixels).save(tmp_path / "b.png")
    image = load_dataset("celeba", "train", str(tmp_path))[0]
    assert image.shape == (3, 64, 64)
    assert image.min() == 1.0


def test_celeba_img_align_folder_and_unreadable_image(tmp_path):
    write_images(str(tmp_path / "img_align_celeba"), 10, size=(89, 109))
    train = load_dataset("celeba", "train", str(tmp_path))
    assert len(train) == 9 and train[0].shape == (3, 64, 64)
    (tmp_path / "img_align_celeba" / "000.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot read image"):
        train[0]


def test_image_batches_through_the_loader_match_items(tmp_path):
    write_images(str(tmp_path), 12)
    train = load_dataset("cifar10", "train", str(tmp_path))
    sampler = BatchSampler(len(train), 4, seed=3)
    torch.manual_seed(0)
    expected_draw = torch.rand(3)
    torch.manual_seed(0)
    batches = iterate_batches(train, sampler)
    indices = iter(BatchSampler(len(train), 4, seed=3))
    for _ in range(4):
        batch, index = next(batches), next(indices)
        assert torch.equal(batch, torch.stack([train[int(i)] for i in index]))
    # Loading data does not consume the global RNG, which drives exploration (epsilon)
    # and is restored on resume.
    assert torch.equal(torch.rand(3), expected_draw)
    assert torch.equal(fixed_images(train, 3), torch.stack([train[i] for i in range(3)]))


def _bad_images_folder(folder, count=30):
    """``count`` gray PNGs in ``folder``: 005.png truncated, 020.png garbage, the rest good
    (with the default split, the last 3 are the test split and the rest train)."""
    write_images(str(folder), count, mode="L")
    data = (folder / "005.png").read_bytes()
    (folder / "005.png").write_bytes(data[:len(data) // 2])
    (folder / "020.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(60))
    return folder


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_image_in_a_batch_is_one_line_naming_the_file(tmp_path, workers):
    train = load_dataset("mnist", "train", str(_bad_images_folder(tmp_path)))
    batches = iterate_batches(train, BatchSampler(len(train), 27, seed=0), workers)
    with pytest.raises(ImageReadError) as info:  # worker or not: the error itself, not its traceback
        next(batches)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message and "worker" not in message
    assert re.fullmatch(r"cannot read image .*(005|020)\.png: .+", message), message


def test_skip_bad_images_leaves_them_out_and_counts_them(tmp_path):
    folder = str(_bad_images_folder(tmp_path, count=40))  # test split: 036 to 039
    (tmp_path / "037.png").write_bytes(b"not a png")
    plain = load_dataset("mnist", "train", folder)
    train = load_dataset("mnist", "train", folder, skip_bad_images=True)
    test = load_dataset("mnist", "test", folder, skip_bad_images=True)
    names = [os.path.basename(p) for p in train.paths]
    assert len(plain) == 36 and len(train) == 34 and "005.png" not in names and "020.png" not in names
    assert [os.path.basename(p) for p in test.paths] == ["036.png", "038.png", "039.png"]
    assert [os.path.basename(p) for p, _ in train.skipped + test.skipped] == \
        ["005.png", "020.png", "037.png"]
    # The split is made first: the good images are where they were.
    assert train.paths == [p for p in plain.paths if os.path.basename(p) not in ("005.png", "020.png")]
    note = data.skipped_images_note(train, test)
    assert re.fullmatch(r"skipped 3 of 40 image files: cannot read image .*005\.png: .+ "
                        r"\(and 2 more\)", note), note
    assert data.skipped_images_note(plain) is None
    batches = iterate_batches(train, BatchSampler(len(train), 17, seed=0), 2)
    assert next(batches).shape == (17, 1, 28, 28) and next(batches).shape == (17, 1, 28, 28)
    # Nothing to skip in arrays; and the flag is harmless there.
    write_npz(tmp_path / "d.npz", 20, (1, 28, 28))
    assert data.skipped_images_note(load_dataset("mnist", "train", str(tmp_path / "d.npz"),
                                                 skip_bad_images=True)) is None


@pytest.mark.parametrize("workers", ["0", "2"])
def test_training_script_on_a_folder_with_a_bad_image(tmp_path, workers):
    """The real command: one error line naming the file, or with --skip-bad-images one
    warning line with the count, and training goes on (a process each: ~10 s)."""
    folder = str(_bad_images_folder(tmp_path / "images"))
    flags = ["--data-dir", folder, "--stages", "2", "--options", "4", "--batch", "2",
             "--step-limit", "14", "--save-interval", "14", "--log-interval", "1000",
             "--eval-size", "3", "--workers", workers, "--device", "cpu", "--no-progress"]
    failed = run_script("train_mnist.py", [*flags, "--run-dir", str(tmp_path / "a")])
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1, failed.stderr  # an epoch of 13 batches reaches 005.png and 020.png
    assert re.fullmatch(r"error: cannot read image .*(005|020)\.png: .+; --skip-bad-images leaves "
                        r"such files out", lines[0]), lines[0]
    skipped = run_script("train_mnist.py", [*flags, "--run-dir", str(tmp_path / "b"),
                                            "--skip-bad-images", "--step-limit", "2",
                                            "--save-interval", "2"])
    assert skipped.returncode == 0, skipped.stderr
    warnings = [line for line in skipped.stderr.splitlines() if "skipped" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: skipped 2 of 30 image files: "
                                                         "cannot read image "), skipped.stderr
    assert os.path.exists(tmp_path / "b" / "checkpoint.pt")


# ---------------------------------------------------------------------- SVHN


def write_svhn(folder, count, seed=0):
    """A synthetic SVHN file pair in torchvision's layout; returns the train arrays."""
    import scipy.io

    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", count), ("test", max(2, count // 4))):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, (n, 1)).astype(np.uint8)  # 10 stands for the digit 0
        scipy.io.savemat(os.path.join(folder, f"{split}_32x32.mat"), {"X": x, "y": y})
        arrays[split] = (x, y)
    return arrays


def test_svhn_mat_in_torchvision_layout(tmp_path):
    pytest.importorskip("scipy")
    arrays = write_svhn(str(tmp_path), 12)
    train = load_dataset("svhn", "train", str(tmp_path), download=False)
    test = load_dataset("svhn", "test", str(tmp_path), download=False)
    x, y = arrays["train"]
    assert (len(train), len(test)) == (12, 3)
    image, label = train[5]
    assert image.shape == (3, 32, 32)
    # Channel c, row h, column w of image i is X[h, w, c, i].
    assert torch.equal(image, torch.from_numpy(x[:, :, :, 5]).permute(2, 0, 1).float() / 255)
    assert label == int(y[5, 0]) % 10
    assert torch.equal(train.labels, torch.from_numpy(y[:, 0].astype(np.int64)) % 10)
    assert 10 in y and train.labels.max() <= 9


def test_svhn_corrupt_mat_is_a_data_error(tmp_path):
    pytest.importorskip("scipy")
    write_svhn(str(tmp_path), 4)
    (tmp_path / "train_32x32.mat").write_bytes(b"MATLAB 5.0" + os.urandom(100))
    with pytest.raises(DataError, match="train_32x32.mat"):
        load_dataset("svhn", "train", str(tmp_path), download=False)


# ---------------------------------------------------------------------- missing data


@pytest.mark.parametrize("dataset", ["mnist", "svhn", "cifar10", "celeba"])
@pytest.mark.parametrize("download", [True, False])
def test_missing_data_fails_fast_naming_dataset_and_folder(tmp_path, no_downloads, dataset, download):
    start = time.time()
    with pytest.raises(DataError) as info:
        load_dataset(dataset, "train", str(tmp_path), download=download)
    assert time.time() - start < 10
    message = str(info.value)
    assert "\n" not in message
    assert dataset in message and str(tmp_path) in message
    assert data.TORCHVISION_LAYOUT[dataset] in message  # what to put there
    # The reason in brackets says what failed (MNIST's used to be cut to an empty "...gz:").
    reason = message.split("); put ", 1)[0].rsplit(" (", 1)[1]
    if download:
        assert "refused" in reason or "not reachable" in reason, reason
    else:
        assert "not found" in reason, reason


def test_unresponsive_server_times_out(tmp_path, monkeypatch):
    """A network that accepts connections but never answers fails after the timeout, not never."""
    import torchvision.datasets as tvd

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)  # connections complete in the backlog but are never answered
    try:
        monkeypatch.setattr(tvd.CIFAR10, "url", f"http://127.0.0.1:{server.getsockname()[1]}/c.tar.gz")
        monkeypatch.setattr(data, "DOWNLOAD_TIMEOUT", 0.5)
        start = time.time()
        with pytest.raises(DataError, match="could not be downloaded"):
            load_dataset("cifar10", "train", str(tmp_path))
        assert time.time() - start < 8
    finally:
        server.close()
    assert socket.getdefaulttimeout() is None  # restored afterwards


# ---------------------------------------------------------------------- batch order


def take(sampler, count):
    iterator = iter(sampler)
    return [next(iterator).tolist() for _ in range(count)]


def test_batch_order_is_a_function_of_seed_and_step():
    a = take(BatchSampler(10, 3, seed=5), 16)
    assert a == take(BatchSampler(10, 3, seed=5), 16)
    assert a != take(BatchSampler(10, 3, seed=6), 16)
    # Four batches per epoch, the last of one image (kept, as the original's DataLoader keeps
    # it); each epoch visits every example once in a new order.
    for epoch in range(4):
        batches = a[4 * epoch:4 * epoch + 4]
        assert [len(b) for b in batches] == [3, 3, 3, 1]
        assert sorted(sum(batches, [])) == list(range(10))
    assert a[0:4] != a[4:8]
    # Starting at step k continues exactly where a run stopped, also across epochs.
    for start in (1, 3, 4, 5, 8, 11):
        assert take(BatchSampler(10, 3, seed=5, start=start), 16 - start) == a[start:]


def test_an_epoch_of_cifar10_ends_with_its_partial_batch_as_in_the_original():
    # The original's DataLoader(batch_size=32, shuffle=True) keeps the last 16 of 50,000 images.
    sampler = BatchSampler(50_000, 32)
    assert sampler.batches_per_epoch == 1_563
    iterator = iter(BatchSampler(50_000, 32, start=1_561))
    assert [len(next(iterator)) for _ in range(3)] == [32, 16, 32]


def test_a_partial_batch_too_small_for_every_process_is_dropped():
    # 11 images, 3 processes of 3: one global batch of 9, then 2 images for 3 processes.
    assert BatchSampler(11, 3, world_size=3).batches_per_epoch == 1
    # 13 images: the 4 left over give every process one or two.
    assert BatchSampler(13, 3, world_size=3).batches_per_epoch == 2
    shards = [take(BatchSampler(13, 3, seed=1, rank=r, world_size=3), 2)[1] for r in range(3)]
    assert sorted(len(s) for s in shards) == [1, 1, 2]
    whole = take(BatchSampler(13, 9, seed=1), 2)[1]
    assert sorted(sum(shards, [])) == sorted(whole)


def test_batch_sizes_that_divide_the_data_see_the_same_examples():
    # k micro-batches of b are one batch of k * b when both divide n (accumulation tests rely on it).
    small = take(BatchSampler(12, 2, seed=1), 12)
    big = take(BatchSampler(12, 6, seed=1), 4)
    assert [sum(small[3 * i:3 * i + 3], []) for i in range(4)] == big


def test_ranks_partition_the_global_batch():
    world = 3
    whole = take(BatchSampler(24, 6, seed=2), 7)
    shards = [take(BatchSampler(24, 2, seed=2, rank=r, world_size=world), 7) for r in range(world)]
    for step in range(7):
        parts = [shards[r][step] for r in range(world)]
        assert all(len(p) == 2 for p in parts)
        assert sorted(sum(parts, [])) == sorted(whole[step])  # disjoint and complete
    resumed = take(BatchSampler(24, 2, seed=2, start=4, rank=1, world_size=world), 3)
    assert resumed == shards[1][4:7]


def test_too_few_images_for_a_batch():
    with pytest.raises(DataError, match="fewer than one global batch"):
        BatchSampler(5, 3, world_size=2)
    with pytest.raises(DataError, match="at least 2 images"):
        data._split(ArrayDataset(torch.zeros(1, 1, 28, 28, dtype=torch.uint8)), "train")


# ---------------------------------------------------------------------- the real data


def test_shared_data_layouts(shared_data):
    mnist_test = load_dataset("mnist", "test", shared_data, download=False)
    assert len(mnist_test) == 10000 and mnist_test[0][0].shape == (1, 28, 28)
    cifar = os.path.join(shared_data, "cifar10")
    if os.path.isdir(cifar):
        train = load_dataset("cifar10", "train", cifar, download=False)
        assert len(train) == 10000 and train.batch(torch.arange(2)).shape == (2, 3, 32, 32)
    celeba = os.path.join(shared_data, "celeba")
    if os.path.isdir(celeba):
        test = load_dataset("celeba", "test", celeba, download=False)
        assert len(test) == 1000 and test[0].shape == (3, 64, 64)
        assert 0 <= test[0].min() and test[0].max() <= 1
