"""Fault injection with real processes: signals, a second trainer, full and read-only disks,
missing devices, damaged and hostile checkpoints. Every case must end in one line that says
what happened, lose nothing that was saved, and resume exactly."""

import os
import random
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import vq_draw
from vq_draw import train_cli
from vq_draw.checkpoint import CheckpointError, SaveError, save_checkpoint
from vq_draw.loading import load_model
from vq_draw.data import ArrayDataset
from vq_draw.train import Interrupted, RunDirError, TrainLoop
from conftest import REPO, ForkedChild, script_env, state_equal, write_npz

SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM, "SIGHUP": signal.SIGHUP}


def wait_until(condition, child, timeout=60, what="the child to get there"):
    deadline = time.time() + timeout
    while not condition():
        if child is not None and child.poll() is not None:
            pytest.fail(f"the child ended (status {child.returncode}) before {what}: {child.output()}")
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


def log_rows(run_dir):
    path = os.path.join(run_dir, "log.csv")
    return max(0, len(open(path).read().splitlines()) - 1) if os.path.exists(path) else 0


def slow_updates(seconds):
    """In a child only: every update also sleeps (the numbers stay the same), so that a signal
    lands in the middle of the run."""
    update = TrainLoop._update

    def sleepy(self, batches):
        terms = update(self, batches)
        time.sleep(seconds)
        return terms

    TrainLoop._update = sleepy


@pytest.fixture
def digits(tmp_path):
    path = str(tmp_path / "digits.npz")
    write_npz(path, 40, (1, 28, 28))
    return path


def flags(data, run_dir, steps=8, save_interval=1000, workers=0):
    return ["--data-dir", data, "--stages", "2", "--options", "4", "--batch", "2",
            "--step-limit", str(steps), "--step-interval", "2", "--save-interval", str(save_interval),
            "--eval-interval", "1000", "--log-interval", "2", "--epsilon", "0.3", "--lr-final", "0",
            "--workers", str(workers), "--device", "cpu", "--no-progress", "--run-dir", str(run_dir)]


def fails(fn, capsys):
    """Run a command that must end with one error line; returns that line."""
    with pytest.raises(SystemExit) as info:
        fn()
    message = str(info.value.code) if isinstance(info.value.code, str) else capsys.readouterr().err
    assert message.strip() and "\n" not in message.strip() and "Traceback" not in message, message
    return message.strip()


def assert_same_training(a, b):
    ca, cb = (torch.load(os.path.join(p, "checkpoint.pt"), weights_only=True) for p in (a, b))
    assert ca["step"] == cb["step"]
    for key in ("model", "optimizer", "rng"):
        assert state_equal(ca[key], cb[key]), key


# ---------------------------------------------------------------------- SIGINT and SIGTERM


@pytest.mark.parametrize("name,source", [("SIGINT", "npz"), ("SIGTERM", "npz"), ("SIGHUP", "npz"),
                                         ("SIGINT", "image files, 1 worker")])
def test_a_signal_saves_at_the_end_of_the_update_and_the_run_resumes_exactly(
        name, source, digits, tmp_path, capsys, no_plots):
    """No periodic checkpoint falls in the run (save interval 1000): the one the signal makes
    is the only one, and resuming from it ends bitwise where an uninterrupted run does. SIGHUP
    (a closed terminal or ssh session) saves as SIGTERM does."""
    sig, steps, workers, data = SIGNALS[name], 40, 0, digits
    if source != "npz":
        # A Ctrl-C in a terminal reaches the DataLoader workers too (the process group).
        data, workers = str(tmp_path / "images"), 1
        os.makedirs(data)
        for i, image in enumerate(np.load(digits)["images"]):
            Image.fromarray(image[..., 0]).save(os.path.join(data, f"{i:03d}.png"))
    reference, run = tmp_path / "reference", tmp_path / "run"
    train_cli.main("mnist", flags(data, reference, steps, workers=workers))

    def interrupted_command():
        slow_updates(0.05)
        train_cli.main("mnist", flags(data, run, steps, workers=workers))

    child = ForkedChild(interrupted_command, str(tmp_path / "child.txt"), group=workers > 0)
    wait_until(lambda: log_rows(run) >= 2, child, what="two log rows")
    (os.killpg if workers else os.kill)(child.pid, sig)
    assert child.wait() == 128 + sig, child.output()
    lines = child.output().strip().splitlines()
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    step = ckpt["step"]
    assert 4 <= step < steps and step % 2 == 0, step  # an update boundary, before the end
    assert lines[-1] == (f"stopped by {name} at step {step}, saved to {run / 'checkpoint.pt'}; run "
                         f"the same command again to resume from there"), lines
    assert "Traceback" not in child.output() and "last checkpoint" not in child.output()
    assert any(line.startswith(f"{name}: finishing this update") for line in lines)
    assert not [f for f in os.listdir(run) if ".tmp." in f]
    capsys.readouterr()
    train_cli.main("mnist", flags(data, run, steps, workers=workers))
    assert f"resumed from {run / 'checkpoint.pt'} at step {step}" in capsys.readouterr().out
    assert_same_training(run, reference)


@pytest.mark.parametrize("name,periodic", [("SIGINT", False), ("SIGINT", True), ("SIGTERM", True)])
def test_a_second_ctrl_c_stops_at_once(name, periodic, digits, tmp_path):
    """The first Ctrl-C asks for a save at the end of the update; a second one before that
    save stops at once, and the message names a checkpoint only when there is one. The exit
    status is that of the second signal: 130 for Ctrl-C, 143 for a scheduler's SIGTERM."""
    run = tmp_path / "run"
    saves_started = tmp_path / "save_started"

    def command():
        slow_updates(0.05)
        interrupted = TrainLoop._interrupted

        def slow_interrupted(self, signum, during=None):  # before the save: wait for the second
            open(saves_started, "w").close()
            time.sleep(30)
            return interrupted(self, signum, during)

        TrainLoop._interrupted = slow_interrupted
        train_cli.main("mnist", flags(digits, run, 200, save_interval=2 if periodic else 1000))

    child = ForkedChild(command, str(tmp_path / "child.txt"))
    wait_until(lambda: log_rows(run) >= 2 and (not periodic or (run / "checkpoint.pt").exists()),
               child, what="training")
    os.kill(child.pid, SIGNALS[name])
    wait_until(saves_started.exists, child, what="the first signal's save")
    os.kill(child.pid, SIGNALS[name])
    assert child.wait(timeout=20) == 128 + SIGNALS[name], child.output()
    last = child.output().strip().splitlines()[-1]
    if periodic:
        assert last == (f"stopped at once; run the same command again to resume from the last "
                        f"checkpoint, {run / 'checkpoint.pt'}")
        assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] % 2 == 0
    else:
        assert last == ("stopped at once, before any checkpoint was saved; the same command "
                        "starts from the beginning")
        assert not (run / "checkpoint.pt").exists()
    assert "Traceback" not in child.output()
    assert not [f for f in os.listdir(run) if ".tmp." in f]


def test_sigterm_during_the_final_evaluation_loses_nothing(digits, tmp_path, capsys, no_plots):
    """The whole-test-set evaluation at the step limit can outlast a scheduler's grace period:
    the checkpoint is saved before it starts, and a SIGTERM stops it between chunks."""
    run, started = tmp_path / "run", tmp_path / "evaluating"

    def command():
        import vq_draw.evaluate
        import vq_draw.train
        evaluate = vq_draw.evaluate.evaluate

        def slow_evaluate(*args, **kwargs):
            open(started, "w").close()
            time.sleep(0.3)
            return evaluate(*args, **kwargs)

        vq_draw.evaluate.evaluate = slow_evaluate
        vq_draw.train.EVAL_CHUNK = 2  # many chunks, a check for a stop between each
        train_cli.main("mnist", flags(digits, run, 8))

    child = ForkedChild(command, str(tmp_path / "child.txt"))
    wait_until(started.exists, child, what="the final evaluation")
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 8  # saved before it
    os.kill(child.pid, signal.SIGTERM)
    assert child.wait(timeout=30) == 143, child.output()
    assert child.output().strip().splitlines()[-1] == (
        f"stopped by SIGTERM during the held-out evaluation at step 8, which "
        f"{run / 'checkpoint.pt'} already holds; run the same command again to resume from there")
    assert "Traceback" not in child.output() and not (run / "final_eval.json").exists()
    # The same command trains no more and evaluates the whole test set.
    capsys.readouterr()
    train_cli.main("mnist", flags(digits, run, 8))
    assert "held-out evaluation on all" in capsys.readouterr().out and (run / "final_eval.json").exists()
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 8


def test_a_signal_before_the_first_update_saves_nothing_and_says_so(tmp_path, no_plots):
    model = vq_draw.create_model("mnist", stages=1, options=2)
    data = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    loop = TrainLoop(model=model, train_data=ArrayDataset(data), run_dir=str(tmp_path),
                     batch_size=2, step_limit=4, quiet=True)
    loop._update = lambda batches: pytest.fail("an update ran after the signal")
    check = loop._stop_signal

    def signal_then_check():  # the signal arrives just before the loop's first check
        loop.signals.receive(signal.SIGTERM)
        return check()

    loop._stop_signal = signal_then_check
    with pytest.raises(Interrupted, match="before the first update; nothing was saved"):
        loop.run()
    assert not (tmp_path / "checkpoint.pt").exists()


def test_run_restores_the_previous_signal_handlers(tmp_path, no_plots):
    def mine(signum, frame):
        pass

    previous = {sig: signal.signal(sig, mine) for sig in SIGNALS.values()}
    try:
        model = vq_draw.create_model("mnist", stages=1, options=2)
        data = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
        TrainLoop(model=model, train_data=ArrayDataset(data), run_dir=str(tmp_path),
                  batch_size=2, step_limit=2, quiet=True).run()
        assert all(signal.getsignal(sig) is mine for sig in SIGNALS.values())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@pytest.mark.slow
def test_sigterm_to_the_real_script(digits, tmp_path):
    """``python train_mnist.py`` itself, as a scheduler stops it: exit status 143, one line.
    (Slow: a fresh interpreter imports torch; the forked tests above cover the same code.)"""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "train_mnist.py"),
                             *flags(digits, run, 100000)], env=script_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: log_rows(run) >= 1 or proc.poll() is not None, None, timeout=120,
                   what="the script's first log row")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    step = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == (f"stopped by SIGTERM at step {step}, saved to "
                                            f"{run / 'checkpoint.pt'}; run the same command again "
                                            f"to resume from there"), err
    assert "Traceback" not in err


# ---------------------------------------------------------------------- one trainer per folder


@pytest.mark.parametrize("workers", [0, 1])
def test_a_second_trainer_stops_at_once_and_kill_9_leaves_no_stale_lock(workers, digits, tmp_path,
                                                                        capsys, no_plots):
    data = digits
    if workers:  # its forked DataLoader worker must not keep the lock after a kill -9
        data = str(tmp_path / "images")
        os.makedirs(data)
        for i, image in enumerate(np.load(digits)["images"]):
            Image.fromarray(image[..., 0]).save(os.path.join(data, f"{i:03d}.png"))
    run = tmp_path / "run"

    def first():
        slow_updates(0.2)
        train_cli.main("mnist", flags(data, run, 100000, save_interval=2, workers=workers))

    child = ForkedChild(first, str(tmp_path / "first.txt"))
    wait_until(lambda: log_rows(run) >= 1, child, what="the first trainer's first log row")
    rows = log_rows(run)
    message = fails(lambda: train_cli.main("mnist", flags(data, run, 8, workers=workers)), capsys)
    assert message == (f"error: {run} is in use by another training process (PID {child.pid}, "
                       f"which holds {run / '.lock'}); wait for it to end or stop it, or choose "
                       f"another --run-dir"), message
    assert log_rows(run) >= rows  # the second one wrote nothing: no duplicate rows
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    # At once: the lock died with the process.
    capsys.readouterr()
    train_cli.main("mnist", flags(data, run, 8, workers=workers))
    out = capsys.readouterr().out
    assert "held-out evaluation" in out
    with open(run / "log.csv") as f:
        steps = [int(line.split(",")[0]) for line in f.read().splitlines()[1:]]
    assert steps == sorted(set(steps)), steps  # one row per step


def test_a_checkpoint_file_in_use_by_a_running_trainer_is_refused(digits, tmp_path, capsys, no_plots):
    """The lock covers the checkpoint file too: another run folder with the same --checkpoint,
    or with --checkpoint inside a running run's folder, stops at once and writes nothing."""
    shared, run = tmp_path / "shared" / "checkpoint.pt", tmp_path / "run"

    def first():
        slow_updates(0.2)
        train_cli.main("mnist", flags(digits, run, 100000, save_interval=2) + ["--checkpoint", str(shared)])

    child = ForkedChild(first, str(tmp_path / "first.txt"))
    wait_until(lambda: log_rows(run) >= 1 and shared.exists(), child, what="the first trainer's save")
    holder = f"(PID {child.pid}, which holds"
    for checkpoint, what, lock in ((shared, shared, shared.parent / ".checkpoint.pt.lock"),
                                   (run / "mine.pt", f"{run}, the folder of the checkpoint,", run / ".lock")):
        message = fails(lambda: train_cli.main("mnist", flags(digits, tmp_path / "other", 8)
                                               + ["--checkpoint", str(checkpoint)]), capsys)
        assert message == (f"error: {what} is in use by another training process {holder} {lock}); "
                           f"wait for it to end or stop it, or choose another --checkpoint"), message
        assert not (tmp_path / "other" / "log.csv").exists() and not (run / "mine.pt").exists()
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    train_cli.main("mnist", flags(digits, tmp_path / "other", 8) + ["--checkpoint", str(shared)])
    assert torch.load(shared, weights_only=True)["step"] == 8


def test_a_malformed_log_is_one_line_that_names_it(digits, tmp_path, capsys, no_plots):
    run = tmp_path / "run"
    train_cli.main("mnist", flags(digits, run, 4, save_interval=2))
    with open(run / "log.csv", "w") as f:
        f.write("step,loss\n2,0.5\n4,\x00oops\nfour,0.4\n")
    message = fails(lambda: train_cli.main("mnist", flags(digits, run, 8, save_interval=2)), capsys)
    assert message == (f"error: {run / 'log.csv'} line 4 has step 'four', not a number, so the run "
                       f"cannot resume its log; move it away (or delete it) and run the same "
                       f"command again"), message
    os.remove(run / "log.csv")
    train_cli.main("mnist", flags(digits, run, 8, save_interval=2))
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 8


def test_a_full_disk_while_writing_the_images_names_the_file_and_keeps_the_checkpoint(
        digits, tmp_path, monkeypatch, capsys):
    import vq_draw.images

    def full(grid, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(vq_draw.images, "save_image", full)
    run = tmp_path / "run"
    message = fails(lambda: train_cli.main("mnist", flags(digits, run, 4, save_interval=2)), capsys)
    assert message == (f"error: could not write {run / 'reconstructions.png'}: No space left on device; "
                       f"the checkpoint {run / 'checkpoint.pt'} was saved at step 2, so the same "
                       f"command resumes from it"), message
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 2


@pytest.mark.slow
def test_ctrl_c_while_the_script_imports_torch_is_no_traceback(tmp_path):
    """(Slow: a fresh interpreter.) Ctrl-C in the first second, while torch is imported."""
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "train_mnist.py"), "--run-dir",
                             str(tmp_path / "run")], env=script_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err


def test_the_lock_is_released_when_run_ends(tmp_path, no_plots):
    model = vq_draw.create_model("mnist", stages=1, options=2)
    data = ArrayDataset(torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8))
    settings = dict(train_data=data, run_dir=str(tmp_path), batch_size=2, quiet=True)
    first = TrainLoop(model=model, step_limit=2, **settings)
    with pytest.raises(RunDirError, match=f"PID {os.getpid()}"):
        TrainLoop(model=vq_draw.create_model("mnist", stages=1, options=2), step_limit=2, **settings)
    first.run()
    # The same loop runs again (it locks the folder again), and another one can take over.
    first.settings = first.settings.replace(step_limit=4)
    first.run()
    assert TrainLoop(model=model, step_limit=6, **settings).run() is None and first.step == 4


# ---------------------------------------------------------------------- disks and devices


def tmpfs(path, size):
    """Mount a tmpfs of ``size`` at ``path``; skips when this process may not mount."""
    os.makedirs(path, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'not root'})")


def unmount(path):
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_full_disk_during_a_save_is_one_line_and_the_run_resumes(digits, tmp_path, monkeypatch,
                                                                     capsys, no_plots):
    """A real full disk (a 12 MB tmpfs; a checkpoint is 5.4 MB): torch.save raises
    RuntimeError there, not OSError."""
    disk = tmp_path / "disk"
    tmpfs(disk, "12m")
    try:
        run = disk / "run"
        save = TrainLoop.save
        calls = []

        def save_then_fill(self):
            calls.append(self.step)
            if len(calls) == 2:  # fill the disk after the first checkpoint
                with open(disk / "filler", "wb", buffering=0) as f:
                    try:
                        while True:
                            f.write(b"\0" * 4096)
                    except OSError:
                        pass
            save(self)

        monkeypatch.setattr(TrainLoop, "save", save_then_fill)
        message = fails(lambda: train_cli.main("mnist", flags(digits, run, 8, save_interval=2)), capsys)
        assert message.startswith(f"error: could not write checkpoint {run / 'checkpoint.pt'}: ")
        assert "the disk is full" in message and message.endswith("the previous checkpoint is intact")
        assert load_model(str(run / "checkpoint.pt")) is not None  # still valid: checksum and all
        assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 2
        assert not [f for f in os.listdir(run) if ".tmp." in f]
        os.remove(disk / "filler")
        monkeypatch.undo()
        train_cli.main("mnist", flags(digits, run, 8, save_interval=2))
        assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 8
    finally:
        unmount(disk)


def test_torch_save_failing_with_runtime_error_is_a_save_error(tmp_path, monkeypatch):
    """The patched-writer version of the full disk, for machines that cannot mount a tmpfs."""
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1, "weights": torch.arange(5)})
    before = path.read_bytes()

    def failing(obj, f, *args, **kwargs):
        f.write(b"\0" * 700)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", failing)
    with pytest.raises(SaveError) as info:
        save_checkpoint(path, {"step": 2, "weights": torch.arange(6)})
    assert str(info.value) == (f"could not write checkpoint {path}: torch.save failed (unexpected pos "
                               f"704 vs 598); the previous checkpoint is intact")
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["checkpoint.pt"]


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder holding a finished run that cannot be written, even by root: a tmpfs remounted
    read-only (root ignores permission bits), or a chmod 555 folder for other users."""
    folder = tmp_path / "ro"
    if os.geteuid() == 0:
        tmpfs(folder, "16m")
    else:
        folder.mkdir()
    yield folder
    if os.geteuid() == 0:
        unmount(folder)
    else:
        folder.chmod(0o755)


def make_read_only(folder):
    if os.geteuid() == 0:
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
    else:
        folder.chmod(0o555)
    with pytest.raises(OSError):
        open(folder / "probe", "w")


def test_a_read_only_run_folder_is_found_before_training(read_only_folder, digits, capsys, no_plots):
    run = read_only_folder / "run"
    train_cli.main("mnist", flags(digits, run, 4, save_interval=2))
    capsys.readouterr()
    make_read_only(read_only_folder)
    # A longer run of the same folder: resuming would train, then fail at its first save.
    message = fails(lambda: train_cli.main("mnist", flags(digits, run, 8, save_interval=2)), capsys)
    assert message.startswith(f"error: cannot write to the run folder {run}: ")
    assert message.endswith("; choose a writable --run-dir")
    assert "training on" not in capsys.readouterr().out


def test_a_read_only_checkpoint_folder_is_found_before_training(read_only_folder, digits, tmp_path,
                                                                 capsys):
    make_read_only(read_only_folder)
    args = flags(digits, tmp_path / "run", 4) + ["--checkpoint", str(read_only_folder / "c.pt")]
    message = fails(lambda: train_cli.main("mnist", args), capsys)
    assert message.startswith(f"error: cannot write to {read_only_folder}, the folder of the checkpoint")


def test_a_run_folder_that_is_a_file(digits, tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("not a folder")
    message = fails(lambda: train_cli.main("mnist", flags(digits, path, 4)), capsys)
    assert message == f"error: {path} is a file, not a folder; choose another --run-dir (or --checkpoint)"
    message = fails(lambda: train_cli.main("mnist", flags(digits, path / "run", 4)), capsys)
    assert message.startswith(f"error: cannot create the folder {path / 'run'}: Not a directory")
    assert path.read_text() == "not a folder"


@pytest.mark.parametrize("device,words", [
    ("cuda", "no CUDA GPU is available on this machine"),
    ("cuda:99", "this machine has"),
    ("gpu", "unknown device 'gpu'"),
    ("meta", "holds no data, so a model cannot train on it"),
])
def test_a_device_this_machine_lacks_is_one_line_before_training(device, words, digits, tmp_path,
                                                                  capsys):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    if device == "cuda:99" and not torch.cuda.is_available():
        words = "no CUDA GPU is available on this machine"
    args = flags(digits, tmp_path / "run", 4) + ["--device", device]
    message = fails(lambda: train_cli.main("mnist", args), capsys)
    assert message.startswith("error: ") and words in message, message
    assert not (tmp_path / "run").exists()  # checked before anything else
    # Before the data too, which may be a long download.
    args = flags(str(tmp_path / "no-such-data"), tmp_path / "run", 4) + ["--device", device]
    assert words in fails(lambda: train_cli.main("mnist", args), capsys)


# ---------------------------------------------------------------------- damaged and hostile files


def damage_tensor_bytes(path, count=3, seed=0):
    """Change ``count`` random bytes inside the largest tensor record of a torch.save zip file,
    leaving its zip structure and pickle intact (so torch.load alone does not notice)."""
    with zipfile.ZipFile(path) as archive:
        record = max((info for info in archive.infolist() if "/data/" in info.filename),
                     key=lambda info: info.file_size)
    with open(path, "r+b") as f:
        f.seek(record.header_offset + 26)
        name_length, extra_length = np.frombuffer(f.read(4), dtype="<u2")
        start = record.header_offset + 30 + int(name_length) + int(extra_length)
        rng = random.Random(seed)
        for offset in rng.sample(range(record.file_size), count):
            f.seek(start + offset)
            byte = f.read(1)[0]
            f.seek(start + offset)
            f.write(bytes([byte ^ rng.randrange(1, 256)]))


def test_damaged_weights_are_reported_as_corrupt_and_training_does_not_start(digits, tmp_path,
                                                                             capsys, no_plots):
    run = tmp_path / "run"
    train_cli.main("mnist", flags(digits, run, 4, save_interval=2))
    path = run / "checkpoint.pt"
    assert torch.load(path, weights_only=True)["checksum"].startswith("crc32:")
    damage_tensor_bytes(path)
    torch.load(path, weights_only=True)  # torch alone reads it without complaint
    damaged, log = path.read_bytes(), (run / "log.csv").read_text()
    capsys.readouterr()
    message = fails(lambda: train_cli.main("mnist", flags(digits, run, 8, save_interval=2)), capsys)
    assert message.startswith(f"error: {path} is corrupt: ") and "lr" not in message, message
    assert "training on" not in capsys.readouterr().out
    assert path.read_bytes() == damaged and (run / "log.csv").read_text() == log
    with pytest.raises(CheckpointError, match="is corrupt"):
        load_model(str(path))


def test_files_without_a_checksum_still_load(digits, tmp_path, capsys, no_plots):
    run = tmp_path / "run"
    train_cli.main("mnist", flags(digits, run, 4, save_interval=2))
    path = run / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    del ckpt["checksum"]  # as written before checksums
    torch.save(ckpt, path)
    assert state_equal(load_model(str(path)).state_dict(), ckpt["model"])
    capsys.readouterr()
    train_cli.main("mnist", flags(digits, run, 8, save_interval=2))
    assert "resumed from" in capsys.readouterr().out


class RunsACommand:
    """Unpickling this calls os.system: what a hostile checkpoint would hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_would_run_code_is_refused_plainly(digits, tmp_path, capsys):
    marker = tmp_path / "code_ran"
    path = tmp_path / "hostile.pt"
    torch.save({"format": "vq-draw-checkpoint", "version": 1, "config": {"dataset": "mnist"},
                "model": {}, "payload": RunsACommand(marker)}, path)
    with pytest.raises(CheckpointError) as info:
        load_model(str(path))
    text = str(info.value)
    assert text == (f"{path} is not a VQ-DRAW checkpoint: it holds Python objects (posix.system), not "
                    f"only tensors, so it is not loaded, for safety")
    args = flags(digits, tmp_path / "run", 4) + ["--checkpoint", str(path)]
    message = fails(lambda: train_cli.main("mnist", args), capsys)
    assert message == f"error: {text}"
    for message in (text, message):
        assert "weights_only" not in message and "Re-running" not in message
    assert not marker.exists()
