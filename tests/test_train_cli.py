"""The training command line (vq_draw/train_cli.py, train_*.py) and the evaluation command on bad input:
each mistake ends the command with one `error:` line, no traceback, and loses nothing."""

import errno
import json
import os
import shutil
import time

import pytest
import torch

import vq_draw
from vq_draw import evaluate, train_cli
from vq_draw.checkpoint import CheckpointError
from vq_draw.loading import load_model
from conftest import REPO, run_script, write_npz

TINY_FLAGS = ["--stages", "2", "--options", "4", "--batch", "2", "--step-limit", "2",
              "--save-interval", "2", "--log-interval", "1000", "--workers", "0", "--device", "cpu"]


def fails(call, capsys):
    """Run a command's main(); return its one-line error message (asserting there is one)."""
    with pytest.raises(SystemExit) as info:
        call()
    code, err = info.value.code, capsys.readouterr().err
    assert code not in (0, None)
    if isinstance(code, str):  # sys.exit("error: ..."): Python prints it, exit status 1
        message = code
    else:  # argparse: usage, then "prog: error: ..."
        message = err.strip().splitlines()[-1]
        assert code == 2
    assert "Traceback" not in err
    assert "\n" not in message and "error:" in message, message
    return message


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A small MNIST-shaped .npz (36 train and 4 test images)."""
    path = str(tmp_path_factory.mktemp("data") / "digits.npz")
    write_npz(path, 40, (1, 28, 28))
    return path


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, digits):
    """A finished tiny MNIST run: its folder holds checkpoint.pt."""
    run_dir = str(tmp_path_factory.mktemp("run"))
    train_cli.main("mnist", ["--data-dir", digits, "--run-dir", run_dir, *TINY_FLAGS])
    assert os.path.exists(os.path.join(run_dir, "checkpoint.pt"))
    return run_dir


@pytest.mark.parametrize("dataset, flags, words", [
    ("mnist", ["--batch", "0"], "batch_size must be an integer >= 1"),
    ("mnist", ["--step-interval", "0"], "step_interval"),
    ("mnist", ["--options", "1"], "options must be an integer >= 2"),
    ("mnist", ["--stages", "0"], "stages"),
    ("mnist", ["--save-interval", "0"], "save_interval"),
    ("mnist", ["--eval-size", "0"], "eval_size"),
    ("mnist", ["--stop-at", "0"], "stop_at must be a positive integer"),
    ("mnist", ["--step-limit", "-1"], "--step-limit"),
    ("svhn", ["--stages", "4", "--segment", "5"], "segment (5) must not exceed stages (4)"),
    ("cifar10", ["--segment", "0"], "--segment"),
    ("celeba", ["--stages", "5", "--segment", "10"], "segment (10) must not exceed stages (5)"),
    ("mnist", ["--segment", "4,1"], "summing to stages (10)"),
    ("mnist", ["--segment", "4,x,5"], "--segment"),
    ("mnist", ["--segment", "0,10"], "--segment"),
    ("mnist", ["--batch", "two"], "--batch"),
    ("mnist", ["--epsilon", "1.5"], "epsilon"),
    ("mnist", ["--aux-coeff", "nan"], "aux_coeff"),
])
def test_invalid_flags(dataset, flags, words, capsys):
    message = fails(lambda: train_cli.main(dataset, flags + ["--run-dir", "unused-run"]), capsys)
    assert words in message
    assert not os.path.exists("unused-run")


@pytest.mark.parametrize("flags, words", [
    (["--lr", "0"], "learning rate"),
    (["--lr", "nan"], "learning rate"),
    (["--batch", "40"], "fewer than one global batch"),
])
def test_invalid_training_settings(flags, words, digits, tmp_path, capsys):
    args = ["--data-dir", digits, "--run-dir", str(tmp_path), *TINY_FLAGS, *flags]
    assert words in fails(lambda: train_cli.main("mnist", args), capsys)
    assert not os.path.exists(tmp_path / "checkpoint.pt")


def test_images_of_the_wrong_shape(tmp_path, capsys):
    write_npz(str(tmp_path / "color.npz"), 20, (3, 32, 32))
    args = ["--data-dir", str(tmp_path / "color.npz"), "--run-dir", str(tmp_path / "run"), *TINY_FLAGS]
    message = fails(lambda: train_cli.main("mnist", args), capsys)
    assert "28 x 28 x 1" in message and "color.npz" in message


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_missing_data_that_cannot_be_downloaded(dataset, tmp_path, no_downloads, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = ["--data-dir", str(empty), "--run-dir", str(tmp_path / "run"), *TINY_FLAGS,
            "--segment", "1" if dataset != "mnist" else "2"]
    start = time.time()
    message = fails(lambda: train_cli.main(dataset, args), capsys)
    assert time.time() - start < 10
    assert dataset in message and str(empty) in message
    assert "--data-dir" in message  # says what to do
    missing = fails(lambda: train_cli.main(dataset, ["--data-dir", str(tmp_path / "nowhere")]), capsys)
    assert "does not exist" in missing


@pytest.mark.parametrize("flags, words", [
    (["--options", "8"], "options=4 in the checkpoint but options=8"),
    (["--stages", "3"], "stages=2 in the checkpoint but stages=3"),
    (["--segment", "1"], "segment=None in the checkpoint but segment=1"),
])
def test_checkpoint_of_another_architecture(trained_run, digits, flags, words, capsys):
    path = os.path.join(trained_run, "checkpoint.pt")
    before = open(path, "rb").read()
    args = ["--data-dir", digits, "--run-dir", trained_run, *TINY_FLAGS, *flags]
    message = fails(lambda: train_cli.main("mnist", args), capsys)
    assert words in message and "another architecture" in message
    assert open(path, "rb").read() == before  # nothing lost


def test_checkpoint_of_another_dataset(trained_run, capsys, tmp_path):
    path = os.path.join(trained_run, "checkpoint.pt")
    write_npz(str(tmp_path / "color.npz"), 20, (3, 32, 32))
    args = ["--data-dir", str(tmp_path / "color.npz"), "--checkpoint", path, "--segment", "2",
            "--run-dir", str(tmp_path / "run"), *TINY_FLAGS]
    message = fails(lambda: train_cli.main("svhn", args), capsys)
    assert "dataset='mnist' in the checkpoint but dataset='svhn'" in message


def test_resume_with_other_training_settings_is_allowed(trained_run, digits, tmp_path, capsys):
    # Coefficients and checkpointing do not change the architecture.
    run_dir = str(tmp_path / "run")
    shutil.copytree(trained_run, run_dir)
    train_cli.main("mnist", ["--data-dir", digits, "--run-dir", run_dir, *TINY_FLAGS,
                           "--step-limit", "4", "--aux-coeff", "0.02", "--grad-checkpoint",
                           "--bf16"])
    assert torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)["step"] == 4
    # The changed recipe settings are named, so a forgotten flag does not go unnoticed.
    out = capsys.readouterr().out
    assert "was trained with other settings; this run uses step_limit 2 -> 4, " \
           "bf16 False -> True, aux_coeff 0.01 -> 0.02" in out
    assert "grad_checkpoint" not in out  # the same gradients, so no change of recipe


def test_stop_at_saves_and_stops_then_the_same_command_goes_on(digits, tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    train_cli.main("mnist", ["--data-dir", digits, "--run-dir", run_dir, *TINY_FLAGS, "--stop-at", "1"])
    assert torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)["step"] == 1
    assert "stopped at step 1" in capsys.readouterr().out
    train_cli.main("mnist", ["--data-dir", digits, "--run-dir", run_dir, *TINY_FLAGS])
    assert torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)["step"] == 2


def test_resume_with_the_same_settings_names_no_change(trained_run, digits, tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    shutil.copytree(trained_run, run_dir)
    train_cli.main("mnist", ["--data-dir", digits, "--run-dir", run_dir, *TINY_FLAGS])
    out = capsys.readouterr().out
    assert "resumed from" in out and "other settings" not in out


def bad_files(folder, good):
    """Files that are not usable checkpoints, by name."""
    data = open(good, "rb").read()
    files = {
        "truncated": data[: len(data) // 2],
        "cut short": data[:-100],
        "empty": b"",
        "random bytes": os.urandom(4096),
        "zip with garbage": data[:200] + os.urandom(len(data) - 200),
    }
    paths = {}
    for name, content in files.items():
        paths[name] = os.path.join(folder, name.replace(" ", "_") + ".pt")
        with open(paths[name], "wb") as f:
            f.write(content)
    paths["a plain tensor"] = os.path.join(folder, "tensor.pt")
    torch.save(torch.zeros(3), paths["a plain tensor"])
    paths["a foreign dict"] = os.path.join(folder, "dict.pt")
    torch.save({"model": {}, "step": 3}, paths["a foreign dict"])
    paths["pickled objects"] = os.path.join(folder, "objects.pt")
    torch.save({"format": "vq-draw-checkpoint", "model": torch.nn.Linear(2, 2)}, paths["pickled objects"])
    ckpt = torch.load(good, weights_only=True)
    del ckpt["model"]["output_scale"]
    del ckpt["checksum"]  # as if edited by another program: no checksum to contradict
    paths["missing weights"] = os.path.join(folder, "missing.pt")
    torch.save(ckpt, paths["missing weights"])
    return paths


BAD_CHECKPOINT_WORDS = {
    "truncated": "truncated, corrupt",
    "cut short": "truncated, corrupt",
    "empty": "truncated, corrupt",
    "random bytes": "truncated, corrupt",
    "zip with garbage": "truncated, corrupt",
    "a plain tensor": "not a VQ-DRAW checkpoint",
    "a foreign dict": "not a VQ-DRAW checkpoint",
    "pickled objects": "not a VQ-DRAW checkpoint: it holds Python objects",
    "missing weights": "weights do not match",
}


def test_corrupt_or_foreign_checkpoints(trained_run, digits, tmp_path, capsys):
    paths = bad_files(str(tmp_path), os.path.join(trained_run, "checkpoint.pt"))
    assert paths.keys() == BAD_CHECKPOINT_WORDS.keys()
    for name, path in paths.items():
        before = open(path, "rb").read()
        words = BAD_CHECKPOINT_WORDS[name]
        # Resuming training from it ...
        args = ["--data-dir", digits, "--checkpoint", path, "--run-dir", str(tmp_path / "run"),
                *TINY_FLAGS]
        message = fails(lambda: train_cli.main("mnist", args), capsys)
        assert words in message and path in message, (name, message)
        # ... evaluating it ...
        message = fails(lambda: evaluate.main([path, "--data-dir", digits, "--device", "cpu"]), capsys)
        assert words in message and path in message, (name, message)
        # ... and loading it in Python all say what is wrong, and leave the file as it was.
        with pytest.raises(CheckpointError, match=words):
            load_model(path)
        assert open(path, "rb").read() == before, name
    assert not os.path.exists(tmp_path / "run" / "checkpoint.pt")


def test_missing_checkpoint_for_evaluation(tmp_path, capsys):
    message = fails(lambda: evaluate.main([str(tmp_path / "none.pt"), "--device", "cpu"]), capsys)
    assert "does not exist" in message


def test_disk_full_while_training(digits, tmp_path, monkeypatch, capsys):
    def full(obj, f, *args, **kwargs):
        f.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    args = ["--data-dir", digits, "--run-dir", str(tmp_path), *TINY_FLAGS]
    message = fails(lambda: train_cli.main("mnist", args), capsys)
    assert "No space left on device" in message and "checkpoint" in message
    assert not [f for f in os.listdir(tmp_path) if f.startswith("checkpoint")]


def test_scripts_end_to_end_without_traceback(trained_run, digits, tmp_path):
    """The real command line: a corrupt checkpoint and a bad flag each end in one error line."""
    corrupt = tmp_path / "checkpoint.pt"
    data = open(os.path.join(trained_run, "checkpoint.pt"), "rb").read()
    corrupt.write_bytes(data[: len(data) // 3])
    result = run_script("train_mnist.py", ["--data-dir", digits, "--run-dir", str(tmp_path),
                                           *TINY_FLAGS], timeout=120)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot read checkpoint"), result.stderr
    assert corrupt.read_bytes() == data[: len(data) // 3]


def test_scripts_are_thin_and_differ_only_in_the_dataset():
    for name, dataset in (("train_mnist.py", "mnist"), ("train_svhn.py", "svhn"),
                          ("train_cifar.py", "cifar10"), ("train_celeba.py", "celeba")):
        text = open(os.path.join(REPO, name)).read()
        assert len(text.splitlines()) <= 40
        assert f'main("{dataset}")' in text


def test_published_defaults_of_the_scripts():
    mnist = train_cli.parse_args("mnist", [])
    assert (mnist.batch, mnist.step_limit, mnist.step_interval, mnist.lr, mnist.lr_final) == \
        (32, 50000, 1, 1e-3, 0.0)
    assert (mnist.stages, mnist.options, mnist.segment, mnist.aux_coeff) == (10, 64, None, 0.01)
    cifar = train_cli.parse_args("cifar10", [])
    assert (cifar.stages, cifar.step_interval, cifar.lr_final, cifar.grad_checkpoint) == \
        (100, 16, None, True)
    assert cifar.accumulate == "sum"  # the original sums the micro-batches' gradients
    svhn = train_cli.parse_args("svhn", [])
    assert (svhn.stages, svhn.grad_checkpoint, svhn.step_limit, svhn.lr_final) == (20, False, 70000, 0.0)
    celeba = train_cli.parse_args("celeba", ["--no-grad-checkpoint"])
    assert (celeba.stages, celeba.grad_checkpoint, celeba.step_limit) == (100, False, 36194)
    # No --segment: create_model's published one (test_refiners), or one network for fewer stages.
    assert cifar.segment is None and celeba.segment is None
    with torch.device("meta"):
        assert vq_draw.create_model("celeba", stages=4).config["segment"] == 4
    assert train_cli.parse_args("mnist", ["--segment", "4,1,5"]).segment == [4, 1, 5]
    assert train_cli.parse_args("mnist", ["--segment", "5"]).segment == 5


def test_evaluate_writes_the_table_and_json_also_under_bf16(trained_run, digits, tmp_path, capsys):
    path = os.path.join(trained_run, "checkpoint.pt")
    results = {}
    for flags in ([], ["--bf16"]):
        out = tmp_path / f"eval{len(flags)}.json"
        evaluate.main([path, "--data-dir", digits, "--device", "cpu", "--json", str(out), *flags])
        printed = capsys.readouterr().out
        assert "4 test images" in printed and "MSE" in printed
        assert ("bf16 autocast" in printed) == bool(flags)
        results[bool(flags)] = json.loads(out.read_text())
        assert results[bool(flags)]["bf16"] == bool(flags)
        assert len(results[bool(flags)]["mse"]) == 2
    # Same model and images, the network in bf16: nearly the same distortion.
    for fp32, bf16 in zip(results[False]["mse"], results[True]["mse"]):
        assert bf16 == pytest.approx(fp32, rel=0.05)
