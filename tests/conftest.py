"""Shared helpers for the tests: tiny models, synthetic data, running the scripts."""

import multiprocessing.util
import os
import signal
import subprocess
import sys
import time
import traceback

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import vq_draw  # noqa: E402

# One thread: the models are tiny, and on a shared or loaded machine extra threads
# mostly wait for each other (a CIFAR-10 stage runs several times faster this way).
torch.set_num_threads(1)

SHARED_DATA = os.path.join(REPO, "..", "shared", "data")
DATASET_NAMES = ("mnist", "svhn", "cifar10", "celeba")

# The smallest settings that still exercise every part of each architecture:
# several stages, K > 2, a segment boundary (stage 1 of CIFAR-10 and CelebA runs the
# second network; SVHN also has local stages 0 and 1 of two networks).
TINY = {
    "mnist": dict(options=4, stages=3),
    "svhn": dict(options=4, stages=4, segment=2),
    "cifar10": dict(options=4, stages=2, segment=1),
    "celeba": dict(options=4, stages=2, segment=1),
}


def tiny_model(dataset, seed=0, **overrides):
    """A small randomly initialized model; the stage-0 bias is made non-zero so it matters."""
    torch.manual_seed(seed)
    model = vq_draw.create_model(dataset, **(TINY[dataset] | overrides))
    with torch.no_grad():
        model.stage0_bias.normal_(0, 0.3)
    return model


def random_images(model, count=2, seed=0):
    """Normalized images [count x *shape] of the model's shape (pixels uniform in [0, 1])."""
    generator = torch.Generator().manual_seed(seed)
    return model.normalize(torch.rand(count, *model.shape, generator=generator))


def write_npz(path, count, shape, seed=0, labels=False):
    """An .npz with a uint8 NHWC ``images`` array of ``count`` random images of shape (C, H, W)."""
    rng = np.random.default_rng(seed)
    c, h, w = shape
    images = rng.integers(0, 256, size=(count, h, w, c), dtype=np.uint8)
    arrays = {"images": images}
    if labels:
        arrays["labels"] = rng.integers(0, 10, size=count)
    np.savez(path, **arrays)
    return images


def script_env():
    """Environment for a script subprocess: this repository importable, same thread count."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_script(script, args, timeout=120, cwd=None):
    """Run ``python <script> args`` from the repository; returns the CompletedProcess."""
    return subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=cwd or REPO,
                          env=script_env(), capture_output=True, text=True, timeout=timeout)


class ForkedChild:
    """``fn()`` in a forked process: a real process to signal or kill, that starts without
    importing torch again. Its stdout and stderr go to ``log``; ``sys.exit`` codes pass through.

    :param group: give the child a process group of its own, so that ``killpg`` reaches it and
                  its DataLoader workers as a Ctrl-C in a terminal would.
    """

    def __init__(self, fn, log, group=False):
        self.log = log
        self.returncode = None
        self.pid = os.fork()
        if self.pid == 0:  # the child: never return into pytest
            code = 1
            try:
                # What multiprocessing does in the children it forks itself: without it a
                # DataLoader worker of this child asks pytest's resource sharer for its tensors.
                multiprocessing.util._run_after_forkers()
                if group:
                    os.setpgid(0, 0)
                out = open(log, "a", buffering=1)
                os.dup2(out.fileno(), 1)
                os.dup2(out.fileno(), 2)
                sys.stdout = sys.stderr = out
                fn()
                code = 0
            except SystemExit as exc:
                if exc.code is None or isinstance(exc.code, int):
                    code = exc.code or 0
                else:  # sys.exit("message") prints it and exits with 1
                    print(exc.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, sig):
        os.kill(self.pid, sig)

    def wait(self, timeout=120):
        deadline = time.time() + timeout
        while self.poll() is None:
            if time.time() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                self.wait()
                pytest.fail(f"the child did not end within {timeout} s: {self.output()}")
            time.sleep(0.01)
        return self.returncode

    def output(self):
        return open(self.log).read() if os.path.exists(self.log) else ""


def state_equal(a, b):
    """Whether two (nested) state dicts hold bitwise-equal tensors and equal values."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(state_equal, a, b))
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


@pytest.fixture
def no_plots(monkeypatch):
    """No loss plot at each save (matplotlib is slow) where a test is about something else."""
    import vq_draw.images

    monkeypatch.setattr(vq_draw.images, "plot_log", lambda *args, **kwargs: None)


def mnist_test_root():
    """A torchvision root that holds the MNIST test set ($VQ_DRAW_DATA, then ../shared/data),
    or None."""
    from vq_draw.data import DataError, load_dataset

    for folder in (os.environ.get("VQ_DRAW_DATA"), SHARED_DATA):
        if folder and os.path.isdir(folder):
            try:
                load_dataset("mnist", "test", folder, download=False)
                return os.path.abspath(folder)
            except DataError:
                continue
    return None


@pytest.fixture
def shared_data():
    """The real data folder of the project (../shared/data); skips when it is absent."""
    if not os.path.isdir(SHARED_DATA):
        pytest.skip("no ../shared/data on this machine")
    return os.path.abspath(SHARED_DATA)


@pytest.fixture
def no_downloads(monkeypatch):
    """Point every torchvision download at a closed local port, whether or not there is internet."""
    import torchvision.datasets as tvd
    import torchvision.datasets.celeba as celeba

    closed = "http://127.0.0.1:9/"
    monkeypatch.setattr(tvd.MNIST, "mirrors", [closed])
    monkeypatch.setattr(tvd.CIFAR10, "url", closed + "cifar.tar.gz")
    monkeypatch.setattr(tvd.SVHN, "split_list", {k: [closed + v[1], v[1], v[2]]
                                                 for k, v in tvd.SVHN.split_list.items()})

    def no_drive(*args, **kwargs):
        raise RuntimeError("Google Drive is not reachable")

    monkeypatch.setattr(celeba, "download_file_from_google_drive", no_drive)
