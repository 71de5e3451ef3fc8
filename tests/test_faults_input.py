"""Bad input found by an adversarial pass (issue 30, item 7): each is refused in one line,
before it costs memory or time, and nothing is overwritten.

Memory and hangs are tested with real processes: peak memory from ``os.wait4``'s resource
usage of that one child, a named pipe under a timeout.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import vq_draw
from conftest import REPO, SHARED_DATA, script_env, tiny_model, write_npz
from vq_draw.checkpoint import CheckpointError, checksum, export_model, save_checkpoint
from vq_draw.data import DataError, ImageReadError, load_dataset, load_image


def fails(fn, capsys=None):
    """The one-line message of a command that must exit with an error."""
    with pytest.raises(SystemExit) as info:
        fn()
    code = info.value.code
    message = code if isinstance(code, str) else capsys.readouterr().err.strip() if capsys else ""
    assert code not in (0, None), message
    assert message.startswith("error: ") and "\n" not in message.strip(), message
    return message


def run(args, timeout=120):
    """``python ARGS`` in the repository: (CompletedProcess, peak resident memory in MB of that
    one child, from ``os.wait4``)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen([sys.executable, *args], cwd=REPO, env=script_env(),
                                   stdout=out, stderr=err, text=True)
        deadline = time.time() + timeout
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.time() > deadline:
                process.kill()
                process.wait()
                pytest.fail(f"python {' '.join(args)} did not end within {timeout} s")
            time.sleep(0.02)
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        err.seek(0)
        result = subprocess.CompletedProcess(args, process.returncode, out.read(), err.read())
    return result, usage.ru_maxrss / 1024


def run_measured(module, args, timeout=120):
    """``python -m module args``: (exit status, stderr, peak resident memory in MB)."""
    result, peak = run(["-m", module, *args], timeout)
    return result.returncode, result.stderr.strip(), peak


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("faults") / "model.pt"
    export_model(tiny_model("mnist", options=8, stages=3), path)
    return str(path)


def digit(size=28):
    """A smooth test picture [size x size] in [0, 1] (a bright disc on a dark ground)."""
    y, x = np.mgrid[:size, :size] / (size - 1)
    return np.clip(1.2 - 4 * np.hypot(x - 0.5, y - 0.5), 0, 1)


# ---------------------------------------------------------------------- export and convert


def test_export_refuses_its_input_and_training_states(tmp_path, capsys):
    from vq_draw import convert, export

    model = tiny_model("mnist", options=4, stages=2)
    state = {"format": "vq-draw-checkpoint", "version": 1, "config": dict(model.config),
             "model": model.state_dict(), "optimizer": {"state": {}, "param_groups": []}, "step": 7}
    run_ckpt, other_run = str(tmp_path / "checkpoint.pt"), str(tmp_path / "other.pt")
    save_checkpoint(run_ckpt, state)
    save_checkpoint(other_run, state)
    before = open(run_ckpt, "rb").read(), open(other_run, "rb").read()
    message = fails(lambda: export.main([run_ckpt, run_ckpt]))
    assert "is the input" in message
    link = str(tmp_path / "link.pt")
    os.symlink(run_ckpt, link)
    assert "is the input" in fails(lambda: export.main([run_ckpt, link]))
    message = fails(lambda: export.main([run_ckpt, other_run]))
    assert "training checkpoint (step 7)" in message and "resume" in message
    assert (open(run_ckpt, "rb").read(), open(other_run, "rb").read()) == before
    # An earlier export may be replaced, and a new file written.
    out = str(tmp_path / "export.pt")
    export.main([run_ckpt, out])
    export.main([run_ckpt, out])
    assert "trained 7 steps" in capsys.readouterr().out
    # convert refuses the same: its input, or a run's checkpoint, as output.
    assert "is the input" in fails(lambda: convert.main([out, out]))
    assert "training checkpoint" in fails(lambda: convert.main([out, other_run]))
    assert open(other_run, "rb").read() == before[1]


# ---------------------------------------------------------------------- elongated images


def test_elongated_images_are_refused_before_resizing(tmp_path):
    wide = tmp_path / "wide.png"
    Image.new("L", (1_000_000, 1)).save(wide)
    assert os.path.getsize(wide) < 5000
    with pytest.raises(ImageReadError, match=r"1000000 x 1 pixels is more elongated than 100:1"):
        load_image(wide, (1, 28, 28))
    # Up to the limit an image is read as before.
    Image.new("L", (100 * 28, 28), 255).save(tmp_path / "long.png")
    assert torch.equal(load_image(tmp_path / "long.png", (1, 28, 28)), torch.ones(1, 28, 28))


def test_elongated_image_costs_no_memory_in_encode_and_is_skipped_in_training(tmp_path, model_file):
    """The CLI in a real process: its peak memory with a 1 x 1,000,000 PNG is that of a normal
    image (before: 2.4 GB, from a 28 x 28,000,000 intermediate)."""
    Image.new("L", (1, 1_000_000)).save(tmp_path / "tall.png")
    Image.fromarray((digit() * 255).astype(np.uint8)).save(tmp_path / "digit.png")
    code, normal, normal_mb = run_measured("vq_draw", ["encode", str(tmp_path / "digit.png"), "-m",
                                                       model_file, "-o", str(tmp_path / "ok")])
    assert code == 0, normal
    code, message, tall_mb = run_measured("vq_draw", ["encode", str(tmp_path / "tall.png"), "-m",
                                                      model_file, "-o", str(tmp_path / "codes")])
    assert code == 1 and message.startswith("error: ") and "\n" not in message, message
    assert "more elongated than 100:1" in message and not os.path.exists(tmp_path / "codes")
    assert tall_mb < normal_mb + 100, (tall_mb, normal_mb)
    # Training with --skip-bad-images leaves it out instead of raising MemoryError.
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(20):
        Image.fromarray((digit() * 255).astype(np.uint8)).save(folder / f"{i:02d}.png")
    Image.new("L", (3_000_000, 1)).save(folder / "05b.png")
    train = load_dataset("mnist", "train", str(folder), skip_bad_images=True)
    assert len(train) + len(train.skipped) == 19 and "05b.png" in train.skipped[0][0]


# ---------------------------------------------------------------------- checkpoint configs


def _with_config(model_file, tmp_path, name, **changes):
    ckpt = torch.load(model_file, weights_only=True)
    ckpt["config"].update(changes)
    path = str(tmp_path / name)
    save_checkpoint(path, ckpt)  # a valid checksum over the changed config
    return path


def test_config_is_checked_against_the_weights_before_building(tmp_path, model_file):
    huge = _with_config(model_file, tmp_path, "huge.pt", stages=25_000_000)
    start = time.time()
    with pytest.raises(CheckpointError, match=r"asks for 25,000,000 stages but its weights hold only"):
        vq_draw.load_model(huge)
    assert time.time() - start < 30  # seconds on a busy machine; before, minutes and 3.6 GB
    # Segmented: more networks than the file has output scales.
    svhn = str(tmp_path / "svhn.pt")
    export_model(tiny_model("svhn"), svhn)
    many = _with_config(svhn, tmp_path, "many.pt", stages=2000, segment=1)
    with pytest.raises(CheckpointError, match=r"2,000 refiner networks .* its weights hold 2;"):
        vq_draw.load_model(many)
    # Within the bound: the shapes tell (built on the meta device, nothing allocated).
    for name, change, words in [("k.pt", dict(options=16), "stage0_bias"),
                                ("s.pt", dict(stages=5), "mask"),
                                ("d.pt", dict(dataset="cifar10"), "")]:
        with pytest.raises(CheckpointError, match="weights do not match its config") as info:
            vq_draw.load_model(_with_config(model_file, tmp_path, name, **change))
        assert words in str(info.value) and "\n" not in str(info.value)


def test_a_config_of_millions_of_stages_costs_no_memory(tmp_path, model_file):
    """A real process (evaluate): one line, at the memory of loading a good file."""
    huge = _with_config(model_file, tmp_path, "huge.pt", stages=25_000_000)
    missing = str(tmp_path / "no-data")
    code, good, good_mb = run_measured("vq_draw.evaluate", [model_file, "--data-dir", missing,
                                                           "--device", "cpu"])
    assert code == 1 and "no-data does not exist" in good, good
    code, message, huge_mb = run_measured("vq_draw.evaluate", [huge, "--data-dir", missing,
                                                              "--device", "cpu"])
    assert code == 1 and "asks for 25,000,000 stages" in message and "\n" not in message, message
    assert huge_mb < good_mb + 100, (huge_mb, good_mb)


# ---------------------------------------------------------------------- named pipes


def test_named_pipes_are_refused_not_waited_on(tmp_path, model_file):
    """As a .vqd file, an image, an image inside a data folder and a checkpoint: one line each,
    in a real process that would otherwise block in open() forever."""
    os.mkfifo(tmp_path / "pipe.vqd")
    os.mkfifo(tmp_path / "pipe.png")
    os.mkfifo(tmp_path / "pipe.pt")
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(10):
        Image.fromarray((digit() * 255).astype(np.uint8)).save(folder / f"{i:02d}.png")
    os.mkfifo(folder / "99.png")  # the last file: in the test split
    cases = [
        (["-m", "vq_draw", "info", str(tmp_path / "pipe.vqd")], "not a regular file"),
        (["-m", "vq_draw", "decode", str(tmp_path / "pipe.vqd"), "-m", model_file, "-o",
          str(tmp_path / "out")], "not a regular file"),
        (["-m", "vq_draw", "encode", str(tmp_path / "pipe.png"), "-m", model_file, "-o",
          str(tmp_path / "codes")], "it is a named pipe"),
        (["-m", "vq_draw.evaluate", model_file, "--data-dir", str(folder), "--device", "cpu"],
         "99.png: it is a named pipe"),
        (["-m", "vq_draw", "info", str(tmp_path / "x.vqd"), "-m", str(tmp_path / "pipe.pt")],
         "not a regular file"),
    ]
    for args, words in cases:
        result, _ = run(args, timeout=60)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert result.returncode == 1 and "Traceback" not in result.stderr, (args, result.stderr)
        assert len(errors) == 1 and words in errors[0], (args, result.stderr)
    train = load_dataset("mnist", "train", str(folder), skip_bad_images=True)
    assert len(train) == 10 and not train.skipped  # the test split holds the pipe
    test = load_dataset("mnist", "test", str(folder), skip_bad_images=True)
    assert len(test) == 0 and "named pipe" in test.skipped[0][1]


# ---------------------------------------------------------------------- shipped models


@pytest.mark.parametrize("name", ["mnist_model.pt", "mnist_model_finetuned_3net.pt"])
def test_shipped_models_carry_a_valid_checksum(name):
    path = os.path.join(REPO, "pretrained", name)
    if not os.path.exists(path):
        pytest.skip(f"pretrained/{name} is absent")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt.get("checksum") == checksum(ckpt)
    # A damaged copy no longer loads silently.
    ckpt["model"]["stage0_bias"].view(-1)[0] += 1e-3
    assert checksum(ckpt) != ckpt["checksum"]


# Final-stage MSE of the shipped models on the first 1,000 MNIST test digits, measured on the
# files before they were re-exported with a checksum (the weights are the same bit for bit).
SHIPPED_MSE_1000 = {"mnist_model.pt": 0.07631586456298828,
                    "mnist_model_finetuned_3net.pt": 0.06711330032348632}


@pytest.mark.parametrize("name", sorted(SHIPPED_MSE_1000))
def test_shipped_models_keep_their_error(name):
    from vq_draw.data import fixed_images
    from vq_draw.evaluate import evaluate

    path = os.path.join(REPO, "pretrained", name)
    roots = [root for root in (os.environ.get("VQ_DRAW_DATA"), SHARED_DATA)
             if root and os.path.isdir(os.path.join(root, "MNIST"))]
    if not os.path.exists(path) or not roots:
        pytest.skip(f"pretrained/{name} or MNIST ($VQ_DRAW_DATA or ../shared/data) is absent")
    images = fixed_images(load_dataset("mnist", "test", roots[0], download=False), 1000)
    result = evaluate(vq_draw.load_model(path), images, 500)
    assert result["final_mse"] == pytest.approx(SHIPPED_MSE_1000[name], abs=1e-7)


# ---------------------------------------------------------------------- high bit depths


def test_16_bit_int_and_float_images_are_scaled_by_their_range(tmp_path):
    picture = digit(40)
    eight = tmp_path / "eight.png"
    Image.fromarray((picture * 255).round().astype(np.uint8)).save(eight)
    reference = load_image(eight, (1, 28, 28))
    files = {
        "16.png": (picture * 65535).round().astype(np.uint16),  # Pillow mode I;16
        "16.tif": (picture * 65535).round().astype(np.uint16),
        "i32.tif": (picture * 65535).round().astype(np.int32),  # mode I holding 16-bit values
        "f.tif": picture.astype(np.float32),  # mode F in [0, 1]
    }
    for name, array in files.items():
        Image.fromarray(array).save(tmp_path / name)
        assert Image.open(tmp_path / name).mode in ("I;16", "I", "F"), name
        gray = load_image(tmp_path / name, (1, 28, 28))
        assert gray.shape == (1, 28, 28) and gray.dtype == torch.float32
        # The same picture as the 8-bit file, to its rounding; neither saturated nor black.
        assert (gray - reference).abs().max() < 2 / 255, name
        assert gray.max() > 0.9 and gray.min() < 0.1, name
        rgb = load_image(tmp_path / name, (3, 32, 32))
        assert rgb.shape == (3, 32, 32) and torch.equal(rgb[0], rgb[2]) and rgb.max() > 0.9, name
    # Out-of-range floats are clipped, NaN is black.
    wild = np.full((28, 28), 7.0, dtype=np.float32)
    wild[:, :14] = np.nan
    Image.fromarray(wild).save(tmp_path / "wild.tif")
    out = load_image(tmp_path / "wild.tif", (1, 28, 28))
    assert out[0, :, :13].max() == 0 and out[0, :, 15:].min() == 1


def test_encode_of_a_16_bit_digit_matches_its_8_bit_copy(tmp_path, model_file):
    from vq_draw.cli import main

    picture = digit()
    Image.fromarray((picture * 255).round().astype(np.uint8)).save(tmp_path / "d8.png")
    Image.fromarray((picture * 65535).round().astype(np.uint16)).save(tmp_path / "d16.png")
    main(["encode", str(tmp_path / "d8.png"), str(tmp_path / "d16.png"), "-m", model_file,
          "-o", str(tmp_path / "codes")])
    a, b = (open(tmp_path / "codes" / f"{n}.vqd", "rb").read() for n in ("d8", "d16"))
    assert a == b


# ---------------------------------------------------------------------- .npz files


def _truncated_npz(tmp_path):
    path = tmp_path / "cut.npz"
    write_npz(path, 50, (1, 28, 28))
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: len(raw) // 2])
    return str(path)


def _lying_npz(tmp_path):
    """A small .npz whose 'images' header claims 1,000,000,000 x 28 x 28 uint8 (730 GiB)."""
    path = tmp_path / "huge.npz"
    header = {"descr": "|u1", "fortran_order": False, "shape": (10 ** 9, 28, 28)}
    with zipfile.ZipFile(path, "w") as archive, archive.open("images.npy", "w") as member:
        np.lib.format.write_array_header_1_0(member, header)
        member.write(bytes(28 * 28 * 3))
    return str(path)


@pytest.mark.parametrize("make", [_truncated_npz, _lying_npz])
def test_bad_npz_is_one_line_in_every_command(tmp_path, make, model_file, capsys):
    from vq_draw import evaluate
    from vq_draw.tools import grad_scale

    path = make(tmp_path)
    start = time.time()
    with pytest.raises(DataError, match="truncated, corrupt or not an .npz") as info:
        load_dataset("mnist", "train", path)
    assert time.time() - start < 30 and "\n" not in str(info.value)
    if make is _lying_npz:
        assert "claims 1000000000 x 28 x 28 uint8 (730.2 GiB)" in str(info.value)
    assert path in fails(lambda: evaluate.main([model_file, "--data-dir", path, "--device", "cpu"]))
    assert path in fails(lambda: grad_scale.main(["mnist", "--data-dir", path, "--stages", "2"]))
    # Training, as a user runs it.
    result, _ = run(["train_mnist.py", "--data-dir", path, "--run-dir", str(tmp_path / "run"),
                  "--device", "cpu", "--no-progress"], timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and path in lines[0], result.stderr


# ---------------------------------------------------------------------- evaluate


def test_evaluate_rejects_bad_flags_and_outputs_before_working(tmp_path, model_file, capsys):
    from vq_draw import evaluate

    npz = str(tmp_path / "digits.npz")
    write_npz(npz, 40, (1, 28, 28))
    base = [model_file, "--data-dir", npz, "--device", "cpu"]
    for flags in (["--limit", "0"], ["--limit", "-5"], ["--batch", "0"], ["--batch", "-3"]):
        assert "expected a positive integer" in fails(lambda: evaluate.main(base + flags))
    # --json is checked first: before the model or the data (missing here) are even read.
    nowhere = [model_file, "--data-dir", str(tmp_path / "absent"), "--device", "cpu"]
    message = fails(lambda: evaluate.main(nowhere + ["--json", str(tmp_path / "no" / "r.json")]))
    assert "the folder" in message and "does not exist" in message
    # A folder that cannot be written (root writes anywhere but where the system refuses).
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    target = str(locked / "r.json") if os.geteuid() != 0 else "/proc/r.json"
    assert "cannot write there" in fails(lambda: evaluate.main(nowhere + ["--json", target]))
    # --limit 3 evaluates 3 images, and the JSON says so.
    evaluate.main(base + ["--limit", "3", "--json", str(tmp_path / "r.json")])
    assert json.load(open(tmp_path / "r.json"))["count"] == 3
    # A corrupt image of the test split: one line naming it.
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(20):
        Image.fromarray((digit() * 255).astype(np.uint8)).save(folder / f"{i:02d}.png")
    (folder / "19.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    message = fails(lambda: evaluate.main([model_file, "--data-dir", str(folder), "--device", "cpu"]))
    assert "cannot read image" in message and "19.png" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_on_a_machine_without_it_says_so(model_file, capsys):
    from vq_draw import evaluate

    message = fails(lambda: evaluate.main([model_file, "--device", "cuda"]))
    assert "no CUDA GPU is available on this machine" in message and "corrupt" not in message
    with pytest.raises(CheckpointError, match="this machine has no CUDA device") as info:
        vq_draw.load_model(model_file, map_location="cuda")
    assert "corrupt" not in str(info.value)


# ---------------------------------------------------------------------- tools


def test_profile_step_rejects_bad_flags_at_parse_time(tmp_path):
    from vq_draw.tools import profile_step

    cases = [(["--batch", "0"], "positive integer"), (["--batch", "-4"], "positive integer"),
             (["--stages", "0"], "positive integer"), (["--threads", "-2"], "positive integer"),
             (["--stages", "2", "--segment", "5"], "more than the 2 stages"),
             (["--device", "foo"], "unknown device 'foo'"),
             (["--json", str(tmp_path / "no" / "p.json")], "does not exist")]
    for flags, words in cases:  # each fails before a model is built (its output would show)
        message = fails(lambda: profile_step.main(["cifar10", "--stages", "2", *flags]))
        assert words in message, (flags, message)


def test_grad_scale_rejects_bad_flags(tmp_path):
    from vq_draw.tools import grad_scale

    assert "positive integer" in fails(lambda: grad_scale.main(["mnist", "--stages", "0"]))
    assert "positive integer" in fails(lambda: grad_scale.main(["mnist", "--batch", "-1"]))
    npz = str(tmp_path / "digits.npz")
    write_npz(npz, 30, (1, 28, 28))
    message = fails(lambda: grad_scale.main(["mnist", "--data-dir", npz, "--stages", "2",
                                             "--batch", "64"]))
    assert "--batch 64 is more than the 27 training images" in message
    assert "must not exceed stages" in fails(lambda: grad_scale.main(["svhn", "--stages", "2",
                                                                       "--segment", "3"]))


# ---------------------------------------------------------------------- the CLI's outputs


def test_cli_never_overwrites_an_input_and_asks_before_replacing(tmp_path, model_file, capsys):
    from vq_draw.cli import main

    Image.fromarray((digit() * 255).astype(np.uint8)).save(tmp_path / "digit0.png")
    folder = tmp_path / "again"
    folder.mkdir()
    Image.fromarray((digit() * 255).astype(np.uint8)).save(folder / "digit0.png")
    encode = ["encode", str(tmp_path / "digit0.png"), "-m", model_file, "-o"]
    # Two inputs of one name: the .vqd name once, not digit0.vqd.vqd.
    message = fails(lambda: main(encode[:2] + [str(folder / "digit0.png")] + encode[2:]
                                 + [str(tmp_path / "codes")]))
    assert message.endswith(f"would both write {tmp_path / 'codes' / 'digit0.vqd'}; rename one or run "
                            f"them separately")
    main(encode + [str(tmp_path / "codes")])
    written = open(tmp_path / "codes" / "digit0.vqd", "rb").read()
    message = fails(lambda: main(encode + [str(tmp_path / "codes")]))
    assert "digit0.vqd exists; choose another -o, or pass --force" in message
    main(encode + [str(tmp_path / "codes"), "--force"])
    assert open(tmp_path / "codes" / "digit0.vqd", "rb").read() == written
    # decode: the PNG the line before encoded is not replaced without --force.
    decode = ["decode", str(tmp_path / "codes" / "digit0.vqd"), "-m", model_file, "-o"]
    image = open(tmp_path / "digit0.png", "rb").read()
    assert "digit0.png exists" in fails(lambda: main(decode + [str(tmp_path / "digit0.png")]))
    assert open(tmp_path / "digit0.png", "rb").read() == image
    assert "digit0.png exists" in fails(lambda: main(decode + [str(tmp_path)]))  # the folder
    main(decode + [str(tmp_path / "digit0-decoded.png")])
    # An output that is an input: refused even with --force (an image read from a .vqd name).
    disguised = tmp_path / "in" / "x.vqd"
    disguised.parent.mkdir()
    Image.fromarray((digit() * 255).astype(np.uint8)).save(disguised, format="PNG")
    message = fails(lambda: main(["encode", str(disguised), "-m", model_file, "-o",
                                  str(disguised.parent), "--force"]))
    assert "is also an input of this command" in message
    assert Image.open(disguised).format == "PNG"


# ---------------------------------------------------------------------- data messages


def test_missing_data_names_the_notebook_setting(tmp_path, no_downloads):
    with pytest.raises(DataError) as info:
        load_dataset("mnist", "test", str(tmp_path), download=False)
    assert "--data-dir" in str(info.value) and "$VQ_DRAW_DATA" in str(info.value)


def test_failed_download_removes_only_what_it_created(tmp_path, no_downloads):
    fresh = tmp_path / "fresh"
    with pytest.raises(DataError):
        load_dataset("mnist", "train", str(fresh), download=True)
    assert not os.path.exists(fresh)
    # A root that existed, with files of its own: they stay, the attempt's folders go.
    kept = tmp_path / "kept"
    (kept / "MNIST").mkdir(parents=True)
    (kept / "notes.txt").write_text("mine")
    (kept / "MNIST" / "mine.txt").write_text("mine")
    for name in ("mnist", "cifar10"):
        with pytest.raises(DataError):
            load_dataset(name, "train", str(kept), download=True)
    assert sorted(os.listdir(kept)) == ["MNIST", "notes.txt"]
    assert os.listdir(kept / "MNIST") == ["mine.txt"]
