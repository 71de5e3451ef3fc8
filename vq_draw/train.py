"""The training loop: accumulation, checkpoints with exact resume, evaluation, logging, DDP.

A *step* is one micro-batch (forward and backward), as in the original's flags;
the optimizer updates once every ``step_interval`` steps with the gradients of
those micro-batches summed, as in the original (``accumulate="mean"`` averages
them instead). ``step_limit``, ``save_interval``, ``eval_interval``
and the learning-rate schedule all count steps, so the published commands mean
what they meant in the original.

Under ``torchrun`` every process runs a micro-batch of ``batch_size`` per step;
one update then covers ``batch_size * step_interval * world_size`` images
(DDP averages the processes' gradients).
Steps are counted per process, so ``step_limit`` micro-steps train on
``step_limit * batch_size * world_size`` images. A checkpoint resumed by a
different number of processes continues after the same number of images (its
step is rescaled). Every process runs the same evaluations and collectives; only
rank 0 writes files.
"""

import csv
import math
import os
import signal
import sys
import tempfile
import threading
import time
import warnings
from contextlib import nullcontext

import torch
import torch.distributed as dist

from .checkpoint import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, CheckpointError, SaveError,
                         config_mismatch, model_from_checkpoint, objective_settings, read_checkpoint,
                         save_checkpoint)
from .data import ArrayDataset, BatchSampler, fixed_images, iterate_batches
from .evaluate import evaluate, format_table, merge_results
from .files import FolderInUse, FolderLock


class RunDirError(RuntimeError):
    """The run folder cannot be used: not a folder, not writable, or locked by another trainer."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped ``TrainLoop.run`` at an update boundary, after it saved.

    ``signum`` is the signal; the message says where the checkpoint is.
    """

    def __init__(self, signum, message):
        super().__init__(message)
        self.signum = signum


def check_device(device):
    """``device`` as a ``torch.device``, after checking that this machine has it.

    Raises ``ValueError`` with one line for an unknown device string, CUDA without a GPU, or a
    GPU index this machine does not have.
    """
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r} ({str(exc).splitlines()[0][:150]}); use "
                         f"'cpu', 'cuda' or 'cuda:N'") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {device!r}: no CUDA GPU is available on this machine "
                             f"(torch.cuda.is_available() is False); use device 'cpu'")
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device {device!r}: this machine has {count} CUDA GPU(s), "
                             f"cuda:0 to cuda:{count - 1}")
    elif resolved.type != "cpu":
        try:
            torch.empty(1, device=resolved)
        except Exception as exc:  # torch raises several types for a missing backend
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:150]
            raise ValueError(f"device {device!r} is not usable on this machine ({reason})") from None
    return resolved


def compile_refiners(model):
    """``--compile``: compile each training stage of ``model`` (``VQDraw.compile_step``: one
    graph per network, no graph breaks); the modules and state_dict keys are unchanged."""
    return model.compile_step()


# The original's Adam settings; the published learning rate is TrainLoop's lr.
ADAM_BETAS = (0.9, 0.99)
ADAM_EPS = 1e-5


def make_adam(model, lr=1e-3):
    """The original's Adam for ``model``, foreach on every device: one kernel per operation for
    all parameters instead of one per parameter (the same update, to float rounding)."""
    return torch.optim.Adam(model.parameters(), lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, foreach=True)

# How an update combines the gradients of its micro-batches (each the gradient of the mean loss
# over its images): "sum", as the original, or "mean", so that k micro-batches of b images give
# the gradient of one batch of k * b. Adam is not scale-free: its eps (1e-5) is larger than most
# gradient elements of the published CIFAR-10 model, so the mean trains visibly slower there
# (docs/experiments/cifar_celeba.md).
ACCUMULATE = ("sum", "mean")


def check_settings(*, batch_size, step_interval, save_interval, log_interval, eval_size, step_limit,
                   stop_at, lr, lr_final, accumulate="sum"):
    """Raise ValueError with one line for a training setting out of range. ``TrainLoop`` calls it,
    and the command line before it loads any data."""
    for name, value in dict(batch_size=batch_size, step_interval=step_interval,
                            save_interval=save_interval, log_interval=log_interval,
                            eval_size=eval_size).items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    for name, value in dict(step_limit=step_limit, stop_at=stop_at).items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not lr > 0 or (lr_final is not None and not lr_final >= 0):
        raise ValueError(f"learning rates must be positive (lr={lr}, lr_final={lr_final})")
    if accumulate not in ACCUMULATE:
        raise ValueError(f"accumulate must be one of {', '.join(ACCUMULATE)}, got {accumulate!r}")


def learning_rate(step, lr, lr_final, step_limit):
    """Linear from ``lr`` at step 0 to ``lr_final`` at ``step_limit`` (constant without either)."""
    if lr_final is None or not step_limit:
        return lr
    return lr + (lr_final - lr) * min(step, step_limit) / step_limit


class TrainLoop:
    """Train a ``VQDraw`` model; everything is a keyword argument, nothing reads argv.

    :param model: the model (``create_model``); moved to ``device``.
    :param train_data: dataset of images in [0, 1] (``data.load_dataset``).
    :param test_data: held-out dataset; its first ``eval_size`` images are evaluated every
                      ``eval_interval`` steps, and all of it when the run reaches ``step_limit``.
    :param run_dir: folder for the checkpoint, images and the CSV log.
    :param checkpoint_path: checkpoint file (default ``run_dir/checkpoint.pt``); resumed from
                            when it exists.
    :param progress: show a tqdm bar on stderr (rank 0); None shows it when stderr is a terminal.
    :param accumulate: "sum" (the original's) or "mean": how an update combines the gradients of
                       its ``step_interval`` micro-batches (see ``ACCUMULATE``).
    :param bf16: bfloat16 autocast (the choices are still made on float32 losses).
    :param compile: ``torch.compile`` the refiner networks (``compile_refiners``).
    :param stop_at: save a checkpoint and return at the first update boundary at or past this
                    step, while the learning rate still follows ``step_limit``: resuming with
                    other settings (an ``objective``, ...) then changes a recipe mid-run
                    reproducibly, and a long run can be trained in slices.
    :param objective: experiment hook (vq_draw/experiments.py): ``objective(model, terms)`` ->
                      the scalar to minimize from ``VQDraw.training_losses``'s terms, instead
                      of ``terms["loss"]``; its ``settings`` dict, if any, is recorded in
                      checkpoints and compared on resume.
    :param start: experiment hook: ``start(loop)`` is called once for a run that has no
                  checkpoint yet, to set its starting weights (e.g. ``experiments.FineTuneFrom``).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is initialized here (NCCL for
    CUDA devices, gloo otherwise) and every process must construct and run the loop.
    """

    def __init__(self, *, model, train_data, test_data=None, run_dir="runs/run", checkpoint_path=None,
                 batch_size=32, step_interval=1, accumulate="sum", lr=1e-3, lr_final=None,
                 step_limit=None, save_interval=500, eval_interval=None, eval_size=1000, log_interval=50,
                 device="cpu", seed=0, num_workers=0, bf16=False, final_eval=True, quiet=False,
                 progress=None, compile=False, stop_at=None, objective=None, start=None):
        check_settings(batch_size=batch_size, step_interval=step_interval, save_interval=save_interval,
                       log_interval=log_interval, eval_size=eval_size, step_limit=step_limit,
                       stop_at=stop_at, lr=lr, lr_final=lr_final, accumulate=accumulate)
        device = str(device)
        check_device(device)  # before the process group, whose NCCL setup would fail less clearly
        self.rank, self.world_size, self.local_rank = _distributed_env(device)
        if self.world_size > 1 and device.startswith("cuda"):
            device = f"cuda:{self.local_rank}"
        self.device = check_device(device)
        self.model = model.to(self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # the same shapes come back every step
        if compile:
            compile_refiners(self.model)
        self.train_data = train_data
        self.test_data = test_data
        self.run_dir = run_dir
        self.checkpoint_path = checkpoint_path or os.path.join(run_dir, "checkpoint.pt")
        self.batch_size = batch_size
        self.step_interval = step_interval
        self.accumulate = accumulate
        self.lr = lr
        self.lr_final = lr_final
        self.step_limit = step_limit
        self.stop_at = stop_at
        self.save_interval = save_interval
        self.eval_interval = eval_interval or save_interval
        self.eval_size = eval_size
        self.log_interval = log_interval
        self.seed = seed
        self.num_workers = num_workers
        self.bf16 = bf16
        self.objective = objective
        self.final_eval = final_eval
        self.quiet = quiet
        self.is_main = self.rank == 0
        self.progress = self.is_main and not quiet and (sys.stderr.isatty() if progress is None
                                                         else progress)
        self._bar = None
        self.step = 0
        self.prior_steps = 0  # training steps behind the weights this run started from (start)
        self._log_scale = 1.0  # rescales log.csv steps when a resume rescales the step
        self.last_eval = None
        self.optimizer = make_adam(model, lr)
        # Each process draws its own exploration randomness (epsilon); the weights still
        # start equal everywhere, since DDP copies rank 0's when it wraps the model.
        torch.manual_seed(seed + self.rank)
        self._lock = None  # rank 0's FolderLock on run_dir while this loop uses it
        self._claimed = False  # the same on every process, unlike _lock
        self._signal = None  # the first SIGINT/SIGTERM received during run()
        self._flag_group = None  # under DDP: the gloo group that agrees on stopping
        self._saved_step = None  # the step the checkpoint file holds, when this loop knows it
        # Before reading the checkpoint: a second trainer on this folder stops here.
        self._claim_run_dir()
        try:
            if os.path.exists(self.checkpoint_path):
                self._resume()
                self._saved_step = self.step
            elif start is not None:
                start(self)
            if self.world_size > 1:
                steps = self._all_gather(self.step)
                if len(set(steps)) > 1:
                    raise CheckpointError(f"the processes start at different steps {steps}: every "
                                          f"node must read the same {self.checkpoint_path}; put "
                                          f"--run-dir on a filesystem shared by all nodes")
        except BaseException:
            self._release_run_dir()
            raise
        self.ddp_model = self.model
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = DistributedDataParallel(self.model, device_ids=ids)
            # A 1-channel conv weight (MNIST's first layer) can get a gradient whose stride
            # differs in the size-1 dimension; DDP then copies it into its bucket, which is
            # correct, yet warns on every process and breaks the progress bar.
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")

    # ------------------------------------------------------------------ checkpoints

    def _resume(self):
        ckpt = read_checkpoint(self.checkpoint_path, map_location="cpu")
        if "optimizer" not in ckpt or "step" not in ckpt:
            raise CheckpointError(f"{self.checkpoint_path} holds weights only (no optimizer state or "
                                  f"step), so training cannot resume from it; use another --run-dir")
        mismatch = config_mismatch(ckpt["config"], self.model.config)
        if mismatch:
            raise CheckpointError(f"{self.checkpoint_path} is for another architecture: {mismatch}; "
                                  f"use the same settings or another --run-dir")
        self.model.load_state_dict(model_from_checkpoint(ckpt, self.checkpoint_path).state_dict())
        self.load_optimizer(ckpt["optimizer"])
        # Changing settings on resume is allowed (e.g. a longer --step-limit), but a forgotten
        # flag such as --lr-final would silently change the recipe, so say what differs.
        saved = dict(ckpt.get("train", {}))
        if self.step_interval > 1:
            saved.setdefault("accumulate", "mean")  # states from before the setting averaged
        changed = [f"{name} {saved[name]!r} -> {value!r}"
                   for name, value in self._train_settings().items()
                   if name in saved and saved[name] != value]
        # The loss coefficients and stage weights live in the model config.
        saved_objective = objective_settings(ckpt["config"])
        changed += [f"{name} {saved_objective[name]!r} -> {value!r}"
                    for name, value in objective_settings(self.model.config).items()
                    if saved_objective[name] != value]
        if changed:
            self.log(f"{self.checkpoint_path} was trained with other settings; this run uses "
                      f"{', '.join(changed)}")
        self.step = int(ckpt["step"])
        self.prior_steps = int(ckpt.get("prior_steps", 0))
        saved_world = int(ckpt.get("world_size", 1))
        saved_batch = int(ckpt.get("train", {}).get("batch_size", self.batch_size))
        if saved_world != self.world_size:
            # A step is one micro-batch per process, so a step of this run holds another
            # number of images: continue after the same number of training images.
            images = self.step * saved_batch * saved_world
            self.step = images // (self.batch_size * self.world_size)
            self._log_scale = self.step / int(ckpt["step"]) if ckpt["step"] else 1.0
            self.log(f"{self.checkpoint_path} was written by {saved_world} process(es) of "
                      f"micro-batch {saved_batch} at step {ckpt['step']} ({images} images); with "
                      f"{self.world_size} x {self.batch_size} images per step this is step {self.step}")
        rng = ckpt.get("rng", {})
        states = rng.get("ranks", [rng] if "torch" in rng else [])  # older files: one state
        if saved_world == self.world_size and len(states) == self.world_size:
            torch.set_rng_state(states[self.rank]["torch"])
            if "cuda" in states[self.rank] and self.device.type == "cuda":
                torch.cuda.set_rng_state(states[self.rank]["cuda"], self.device)
        else:
            # Fresh, distinct streams per process and position, not a replay of step 0's.
            torch.manual_seed(self.seed + self.rank + self.world_size * self.step)
        self.log(f"resumed from {self.checkpoint_path} at step {self.step}")

    def load_optimizer(self, state):
        """Load an Adam state dict saved from a model of the same architecture."""
        self.optimizer.load_state_dict(state)
        # Adam statistics of a checkpoint with one output scale shared by all networks (see
        # VQDraw._load_from_state_dict): every network's scale starts from them.
        scale = self.model.output_scale
        moments = self.optimizer.state.get(scale, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in moments and moments[key].shape != scale.shape:
                moments[key] = moments[key].expand_as(scale).clone()

    def _rng_state(self):
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def state(self, rng_states=None):
        """Everything needed to continue: config, weights, optimizer, step and RNG states.

        :param rng_states: every process's RNG states (``save`` gathers them); default this one's.
        """
        rng = self._rng_state()
        rng["ranks"] = rng_states or [dict(rng)]
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "config": dict(self.model.config),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "rng": rng,
            "world_size": self.world_size,
            "prior_steps": self.prior_steps,
            "train": self._train_settings(),
        }

    def _train_settings(self):
        """The recipe settings a checkpoint records (and a resume compares against)."""
        # bf16 is here because it changes the numbers, so a run resumed in another precision
        # no longer repeats the uninterrupted one bit for bit.
        return dict(batch_size=self.batch_size, step_interval=self.step_interval,
                    accumulate=self.accumulate, lr=self.lr,
                    lr_final=self.lr_final, step_limit=self.step_limit, seed=self.seed,
                    bf16=self.bf16, objective=getattr(self.objective, "settings", None))

    def save(self):
        """Write the checkpoint, images and loss plot (rank 0); every process must call it."""
        # The weights are the same in every process, so every process stops here together.
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            raise FloatingPointError(f"the weights became non-finite before step {self.step}; the last "
                                     f"checkpoint is kept; lower --lr")
        rng_states = self._all_gather(self._rng_state()) if self.world_size > 1 else None

        def write():
            save_checkpoint(self.checkpoint_path, self.state(rng_states))
            from .images import plot_log, save_progress_images
            if self.test_data is not None:
                save_progress_images(self.model, fixed_images(self.test_data, 32), self.run_dir)
            plot_log(self.log_path, os.path.join(self.run_dir, "loss.png"))

        self._main_only(write, "write the checkpoint")
        self._saved_step = self.step

    def _claim_run_dir(self):
        """Check that the run folder and the checkpoint's folder can be written, and lock the run
        folder (``FolderLock``, rank 0) so that a second trainer stops at once; a collective call."""

        def claim():
            checkpoint_dir = os.path.dirname(os.path.abspath(self.checkpoint_path))
            for folder in dict.fromkeys([self.run_dir, checkpoint_dir]):
                if os.path.exists(folder) and not os.path.isdir(folder):
                    raise RunDirError(f"{folder} is a file, not a folder; choose another --run-dir "
                                      f"(or --checkpoint)")
                try:
                    os.makedirs(folder, exist_ok=True)
                except OSError as exc:
                    raise RunDirError(f"cannot create the folder {folder}: {exc.strerror or exc}; "
                                      f"choose another --run-dir (or --checkpoint)") from None
            try:
                lock = FolderLock(self.run_dir)  # also the test that the folder can be written
            except FolderInUse as exc:
                raise RunDirError(f"{self.run_dir} is in use by another training process (PID "
                                  f"{exc.holder or 'unknown'}, which holds {exc.path}); wait for it "
                                  f"to end or stop it, or choose another --run-dir") from None
            except OSError as exc:
                raise RunDirError(f"cannot write to the run folder {self.run_dir}: "
                                  f"{exc.strerror or exc}; choose a writable --run-dir") from None
            try:
                if checkpoint_dir != os.path.abspath(self.run_dir):
                    with tempfile.TemporaryFile(dir=checkpoint_dir):
                        pass
            except OSError as exc:
                lock.release()
                raise RunDirError(f"cannot write to {checkpoint_dir}, the folder of the checkpoint: "
                                  f"{exc.strerror or exc}; choose a writable --checkpoint") from None
            self._lock = lock

        self._main_only(claim, "use the run folder")
        self._claimed = True

    def _release_run_dir(self):
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        self._claimed = False

    def _main_only(self, fn, what):
        """Run ``fn`` on rank 0; if it fails, every process raises, so none waits forever.

        Under DDP this is also a barrier: the others wait until rank 0 is done.
        """
        error = None
        if self.is_main:
            try:
                fn()
            except Exception as exc:  # re-raised below, after telling the other processes
                error = exc
        failed = [error is not None]
        if self.world_size > 1:
            dist.broadcast_object_list(failed, src=0)
        if error is not None:
            raise error
        if failed[0]:
            raise SaveError(f"rank 0 could not {what}; see its error message")

    def _all_gather(self, obj):
        """A picklable object from every process, in rank order (a collective call)."""
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    # ------------------------------------------------------------------ the loop

    @property
    def log_path(self):
        return os.path.join(self.run_dir, "log.csv")

    def run(self):
        """Train until ``step_limit`` (forever without one) or ``stop_at``. Returns the last
        evaluation (None when ``stop_at`` comes first and no evaluation was due).

        SIGINT (Ctrl-C) or SIGTERM lets the update under way finish, saves a checkpoint there
        and raises ``Interrupted`` (the same run resumes from it exactly); a second one stops
        at once (``KeyboardInterrupt``). The previous handlers are restored on return. The run
        folder stays locked against other trainers until then.
        """
        if not self._claimed:  # released by an earlier run()
            self._claim_run_dir()
        self._signal, self._signal_pid = None, os.getpid()
        previous = _catch_signals(self._on_signal)
        try:
            return self._train()
        finally:
            _restore_signals(previous)
            self._release_run_dir()

    def _train(self):
        if self.is_main:
            os.makedirs(self.run_dir, exist_ok=True)
            _trim_log(self.log_path, self.step, self._log_scale)
        sampler = BatchSampler(len(self.train_data), self.batch_size, seed=self.seed, start=self.step,
                               rank=self.rank, world_size=self.world_size)
        self._on_device_data()
        batches = iterate_batches(self.train_data, sampler, self.num_workers)
        self.log(self._describe())
        self.model.train()
        totals, count = {}, 0
        final_done = False
        last_time, last_step = time.time(), self.step
        if self.progress:
            from tqdm import tqdm
            self._bar = tqdm(total=self.step_limit, initial=self.step, unit="step", file=sys.stderr,
                             dynamic_ncols=True, smoothing=0.05)
        interrupted = None
        while (self.step_limit is None or self.step < self.step_limit) and not self._stopped:
            interrupted = self._stop_signal()
            if interrupted:
                break
            terms = self._update(batches)
            if self._bar is not None:
                self._bar.update(self._last_update_size)
            for key, value in terms.items():
                totals[key] = totals.get(key, 0.0) + value
            count += 1
            done = self.step_limit is not None and self.step >= self.step_limit
            evaluated = False
            if self._crossed(self.eval_interval) or done:
                # At the step limit the whole test set is evaluated once, not a subset first.
                final = done and self.final_eval
                self.last_eval = self._evaluate(self._test_size if final else self.eval_size, final)
                evaluated = self.last_eval is not None
                final_done = final
            # Every evaluation gets its own log row, so the held-out columns are never stale.
            if self._crossed(self.log_interval) or done or evaluated:
                now = time.time()
                self._log_line(self._reduce(totals, count), (self.step - last_step) / (now - last_time),
                               evaluated)
                totals, count = {}, 0
                last_time, last_step = now, self.step
            if self._crossed(self.save_interval) or done or self._stopped:
                self.save()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if interrupted:
            raise self._interrupted(interrupted)
        if self._stopped:
            self.log(f"stopped at step {self.step} (stop_at {self.stop_at}); the same command "
                      f"without it, or with a later one, resumes")
        elif self.final_eval and self.step_limit is not None and not final_done:
            # A run resumed at its step limit: evaluate without training.
            self.last_eval = self._evaluate(self._test_size, final=True)
        return self.last_eval

    def _on_signal(self, signum, frame):
        """SIGINT/SIGTERM handler during ``run``: the first asks the loop to save and stop at the
        end of the update under way; a second one stops at once."""
        if os.getpid() != self._signal_pid:
            return  # a forked DataLoader worker: the main process stops it
        now = time.monotonic()
        if self._signal is None:
            self._signal, self._signal_time = signum, now
            if self.is_main and not self.quiet:
                _write_stderr(f"\n{signal.Signals(signum).name}: finishing this update, then saving "
                              f"a checkpoint; press Ctrl-C again to stop at once without saving\n")
            return
        if self.world_size > 1 and now - self._signal_time < 1.0:
            # torchrun passes on the signal it got, which a Ctrl-C also sent to every process
            # directly: the same request twice within a moment.
            return
        raise KeyboardInterrupt

    def _stop_signal(self):
        """The signal that stops the run at this update boundary, or 0; under DDP every process
        takes the largest of all processes' (a collective call), so all stop at the same step."""
        signum = self._signal or 0
        if self.world_size > 1:
            if self._flag_group is None:
                # A CPU tensor needs a gloo group; the default one is NCCL on GPUs.
                self._flag_group = (dist.group.WORLD if dist.get_backend() == "gloo"
                                    else dist.new_group(backend="gloo"))
            flag = torch.tensor([signum])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._flag_group)
            signum = int(flag)
        return signum

    def _interrupted(self, signum):
        """Save where the run stopped (unless the checkpoint already holds this step) and
        return the ``Interrupted`` exception that says where."""
        name = signal.Signals(signum).name
        if self._saved_step == self.step:
            where = f"at step {self.step}, which {self.checkpoint_path} already holds"
        elif self.step == 0:
            return Interrupted(signum, f"stopped by {name} before the first update; nothing was "
                                       f"saved, and the same command starts from the beginning")
        else:
            self.save()
            where = f"at step {self.step}, saved to {self.checkpoint_path}"
        return Interrupted(signum, f"stopped by {name} {where}; run the same command again to "
                                   f"resume from there")

    @property
    def _stopped(self):
        # Reaching the step limit is the end of the run, not a stop.
        return (self.stop_at is not None and self.step >= self.stop_at
                and (self.step_limit is None or self.step < self.step_limit))

    @property
    def _test_size(self):
        return 0 if self.test_data is None else len(self.test_data)

    def close(self):
        """Under torchrun, leave the process group; every process calls it after ``run``."""
        self._release_run_dir()
        if self.world_size > 1 and dist.is_initialized():
            # Every process first passes its last collective: gloo can abort a process whose
            # peer has already torn down the group.
            dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)
            dist.destroy_process_group()

    def _describe(self):
        """One line that states what a step and an update are in this run."""
        procs = f"{self.world_size} processes ({dist.get_backend()})" if self.world_size > 1 \
            else "1 process"
        text = (f"training on {procs}, {self.device}: micro-batch {self.batch_size} x step interval "
                f"{self.step_interval} x {self.world_size} = "
                f"{self.batch_size * self.step_interval * self.world_size} images per update")
        if self.step_limit:
            text += (f"; {self.step_limit} steps per process = "
                     f"{self.step_limit // self.step_interval} updates, "
                     f"{self.step_limit * self.batch_size * self.world_size} images")
        return text

    def _crossed(self, interval):
        """Whether the last update passed a multiple of ``interval`` steps."""
        before = self.step - self._last_update_size
        return self.step // interval > before // interval

    def _update(self, batches):
        """One optimizer update over up to ``step_interval`` micro-batches; returns metrics."""
        micro = self.step_interval
        if self.step_limit is not None:
            micro = min(micro, self.step_limit - self.step)
        lr = learning_rate(self.step, self.lr, self.lr_final, self.step_limit)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        sums = {}
        # Summed: each micro-batch's gradient counts whole; averaged: 1 / step_interval of it.
        loss_scale = 1.0 / self.step_interval if self.accumulate == "mean" else 1.0
        for i in range(micro):
            images = next(batches)
            images = images.to(self.device, non_blocking=True)
            x = self.model.normalize(images)
            # DDP: synchronize gradients only on the last micro-batch.
            sync = self.ddp_model is self.model or i == micro - 1
            with (nullcontext() if sync else self.ddp_model.no_sync()), self._autocast():
                terms = self.ddp_model(x)
                if self.objective is not None:
                    terms["loss"] = self.objective(self.model, terms)
                (terms["loss"] * loss_scale).backward()
            for key in ("loss", "chosen_loss", "aux_loss", "final_loss"):
                sums[key] = sums.get(key, 0.0) + terms[key].detach()
            sums["code_entropy"] = sums.get("code_entropy", 0.0) + terms["code_entropy"].mean()
            sums["options_used"] = sums.get("options_used", 0.0) + terms["options_used"].float().mean()
        if micro == self.step_interval:
            self.optimizer.step()
        # else: the micro-batches left before step_limit are fewer than an update's. As in the
        # original (CIFAR-10's 34,811 = 2,175 x 16 + 11), they are trained and logged, but
        # their gradients are not applied.
        self.step += micro
        self._last_update_size = micro
        # Metrics stay on the device: converting them here would wait for the GPU every step.
        return {key: value / micro for key, value in sums.items()} | {"lr": lr}

    def _autocast(self):
        if not self.bf16:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _on_device_data(self):
        """Small in-memory datasets live on the GPU as uint8 so that loading never waits."""
        from .data import ArrayDataset
        if self.device.type == "cuda" and isinstance(self.train_data, ArrayDataset):
            self.train_data = type(self.train_data)(self.train_data.images.to(self.device),
                                                    self.train_data.labels)

    def _reduce(self, totals, count):
        """Average the interval's metrics over updates and, under DDP, over processes."""
        keys = sorted(totals)
        values = torch.stack([torch.as_tensor(totals[k], dtype=torch.float64, device=self.device)
                              for k in keys]) / count
        if self.world_size > 1:
            dist.all_reduce(values)
            values /= self.world_size
        metrics = dict(zip(keys, values.tolist()))
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"the loss became {metrics['loss']} before step {self.step}; "
                                     f"lower --lr or check the data")
        return metrics

    def _evaluate(self, size, final=False):
        """Greedy-encode the first ``size`` test images (``evaluate``); a collective call.

        Every process encodes its own slice and the results are merged, so all processes
        do the same work (none waits on rank 0) and the final full-test pass is shared.
        """
        count = 0 if self.test_data is None else min(size, len(self.test_data))
        if count == 0:
            return None
        start, stop = count * self.rank // self.world_size, count * (self.rank + 1) // self.world_size
        part = None
        if stop > start:
            part = evaluate(self.model, _slice(self.test_data, start, stop), device=self.device)
        parts = self._all_gather(part) if self.world_size > 1 else [part]
        result = merge_results([p for p in parts if p is not None], self.model.options)
        result["options"] = self.model.options
        self.model.train()
        if final:
            self.log(f"held-out evaluation on all {result['count']} test images at step "
                      f"{self.step}:\n" + format_table(result))

            def write():
                import json
                with open(os.path.join(self.run_dir, "final_eval.json"), "w") as f:
                    json.dump({k: v for k, v in result.items() if k != "codes"} |
                              {"step": self.step, "config": self.model.config}, f, indent=2)

            self._main_only(write, "write final_eval.json")
        return result

    # ------------------------------------------------------------------ logging

    def log(self, message):
        if self.is_main and not self.quiet:
            if self._bar is not None:
                self._bar.write(message, file=sys.stdout)  # clears and redraws the bar
            else:
                print(message, flush=True)

    def _log_line(self, metrics, steps_per_sec, evaluated=False):
        """Append a row to log.csv and print the steady progress line (rank 0).

        The held-out columns are filled only on rows where an evaluation just ran.
        """
        if not self.is_main:
            return
        row = {"step": self.step, "time": round(time.time(), 1)}
        row.update({k: round(v, 6) for k, v in metrics.items()})
        if evaluated and self.last_eval is not None:
            row["test_mse"] = round(self.last_eval["final_mse"], 6)
            row["test_entropy"] = round(sum(self.last_eval["entropy"]) / len(self.last_eval["entropy"]), 4)
            row["test_used"] = min(self.last_eval["options_used"])
        row["steps_per_sec"] = round(steps_per_sec, 3)
        new_file = not os.path.exists(self.log_path)
        fields = ["step", "time", "loss", "chosen_loss", "aux_loss", "final_loss", "code_entropy",
                  "options_used", "lr", "test_mse", "test_entropy", "test_used", "steps_per_sec"]
        with open(self.log_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if new_file:
                writer.writeheader()
            writer.writerow(row)
        left = ""
        if self.step_limit is not None and steps_per_sec > 0:
            left = f" left {_duration((self.step_limit - self.step) / steps_per_sec)}"
        test = f" test {row['test_mse']:.5f}" if "test_mse" in row else ""
        limit = f"/{self.step_limit}" if self.step_limit else ""
        self.log(f"step {self.step}{limit} loss {metrics['loss']:.5f} final {metrics['final_loss']:.5f}"
                  f"{test} entropy {metrics['code_entropy']:.3f} used {metrics['options_used']:.1f}"
                  f" lr {metrics['lr']:.2e} {steps_per_sec:.2f} steps/s"
                  f" ({steps_per_sec * self.batch_size * self.world_size:.0f} img/s){left}")


def _duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def _catch_signals(handler):
    """Install ``handler`` for SIGINT and SIGTERM; returns the previous handlers, or None
    outside the main thread (where Python cannot install them)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}


def _restore_signals(previous):
    for sig, handler in (previous or {}).items():
        # None: a handler installed outside Python, which cannot be put back; the default instead.
        signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def _write_stderr(text):
    """Write from a signal handler: os.write, since a print interrupted by the signal would
    raise on re-entry."""
    try:
        os.write(sys.stderr.fileno(), text.encode())
    except (OSError, ValueError, AttributeError):
        pass  # no usable stderr (e.g. replaced by an object without a file descriptor)


def _distributed_env(device="cpu"):
    """(rank, world_size, local_rank), initializing the process group under torchrun.

    NCCL when training on CUDA, gloo otherwise (``--device cpu``, the CPU tests).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), local_rank


def _slice(data, start, stop):
    """Images ``start:stop`` of a tensor or dataset, without loading the others."""
    if torch.is_tensor(data):
        return data[start:stop]
    if isinstance(data, ArrayDataset):
        return ArrayDataset(data.images[start:stop])
    return torch.utils.data.Subset(data, range(start, stop))


def _trim_log(path, step, scale=1.0):
    """Keep the log.csv rows up to ``step``: a resumed run logs the later steps again.

    ``scale`` converts the logged steps when a resume under another number of processes
    rescaled the step count.
    """
    if not os.path.exists(path):
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    if not fields:
        return
    kept = []
    for row in rows:
        row["step"] = int(int(row["step"]) * scale)
        if row["step"] <= step:
            kept.append(row)
    if len(kept) == len(rows) and scale == 1.0:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(kept)
    os.replace(tmp, path)
