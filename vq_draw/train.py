"""The training loop: draw micro-batches, accumulate, step with the scheduled rate, evaluate,
log, save, stop.

A *step* is one micro-batch (forward and backward), as in the original's flags; the optimizer
updates once every ``step_interval`` steps with the gradients of those micro-batches summed, as
in the original (``accumulate="mean"`` averages them instead). The limits, intervals and the
learning-rate schedule all count steps (``TrainSettings``), so the published commands mean what
they meant in the original.

Under ``torchrun`` every process runs a micro-batch of ``batch_size`` per step; one update then
covers ``batch_size * step_interval * world_size`` images (DDP averages the processes'
gradients). Steps are counted per process. A checkpoint resumed by a different number of
processes continues after the same number of images (its step is rescaled). Every process runs
the same evaluations and collectives; only rank 0 writes files.

Around the loop: settings.py (the recipe), run_folder.py and train_log.py (files and output),
signals.py, distributed.py (processes and devices) and train_state.py (resume).
"""

import math
import os
import sys
from contextlib import nullcontext

import torch

from . import train_state
from .checkpoint import CheckpointError, SaveError, save_checkpoint
from .data import ArrayDataset, BatchSampler, fixed_images, iterate_batches
from .devices import check_device
from .distributed import Processes, compile_refiners, evaluate_shared
from .evaluate import format_table
from .run_folder import ImageWriteError, RunDirError, RunFolder
from .settings import ACCUMULATE, ADAM_BETAS, ADAM_EPS, TrainSettings, check_settings, learning_rate
from .signals import Interrupted, StopSignals
from .train_log import TrainLog, describe_run

__all__ = ["TrainLoop", "TrainSettings", "Interrupted", "RunDirError", "check_device", "check_settings",
           "learning_rate", "compile_refiners", "make_adam", "ACCUMULATE", "ADAM_BETAS", "ADAM_EPS"]

# Test images encoded between checks for a stop signal: the whole test set at the step
# limit can take minutes, longer than a scheduler waits after its SIGTERM.
EVAL_CHUNK = 1000


def make_adam(model, lr=1e-3):
    """The original's Adam for ``model``, foreach on every device: one kernel per operation for
    all parameters instead of one per parameter (the same update, to float rounding)."""
    return torch.optim.Adam(model.parameters(), lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, foreach=True)


class TrainLoop:
    """Train a ``VQDraw`` model; everything is a keyword argument, nothing reads argv.

    :param model: the model (``create_model``); moved to ``device``.
    :param train_data: dataset of images in [0, 1] (``data.load_dataset``).
    :param test_data: held-out dataset; its first ``eval_size`` images are evaluated every
                      ``eval_interval`` steps, and all of it when the run reaches ``step_limit``.
    :param settings: the ``TrainSettings`` of the run. Its fields may also be given as keywords
                     (``batch_size=..., lr=...``), which replace those of ``settings``.
    :param run_dir: folder for the checkpoint, images and the CSV log (``RunFolder``).
    :param checkpoint_path: checkpoint file (default ``run_dir/checkpoint.pt``); resumed from
                            when it exists.
    :param device: "cpu", "cuda" or "cuda:N" (``check_device``).
    :param num_workers: data-loading processes for image files.
    :param quiet: print nothing; ``progress``: a tqdm bar on stderr (rank 0), None shows it
                  when stderr is a terminal.
    :param compile: ``torch.compile`` the refiner networks (``compile_refiners``).
    :param objective: experiment hook (vq_draw/experiments.py): ``objective(model, terms)`` ->
                      the scalar to minimize from ``VQDraw.training_losses``'s terms, instead
                      of ``terms["loss"]``; its ``settings`` dict, if any, is recorded in
                      checkpoints and compared on resume.
    :param start: experiment hook: ``start(loop)`` is called once for a run that has no
                  checkpoint yet, to set its starting weights (e.g. ``experiments.FineTuneFrom``).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is initialized here (NCCL for
    CUDA devices, gloo otherwise) and every process must construct and run the loop.
    """

    def __init__(self, *, model, train_data, test_data=None, settings=None, run_dir="runs/run",
                 checkpoint_path=None, device="cpu", num_workers=0, quiet=False, progress=None,
                 compile=False, objective=None, start=None, **fields):
        self.settings = (settings or TrainSettings()).replace(**fields)
        check_device(device)  # before the process group, whose NCCL setup would fail less clearly
        self.processes = Processes(device)
        self.device = check_device(self.processes.device)
        self.model = model.to(self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # the same shapes come back every step
        if compile:
            compile_refiners(self.model)
        self.train_data, self.test_data = train_data, test_data
        self.folder = RunFolder(run_dir, checkpoint_path)
        self.num_workers = num_workers
        self.objective = objective
        self.quiet = quiet
        self.is_main = self.processes.is_main
        self.output = TrainLog(self.folder, self.world_size, write=self.is_main,
                               show=not quiet, bar=sys.stderr.isatty() if progress is None else progress)
        self.step = 0
        self.prior_steps = 0  # training steps behind the weights this run started from (start)
        self._log_scale = 1.0  # rescales log.csv steps when a resume rescales the step
        self._saved_step = None  # the step the checkpoint file holds, when this loop knows it
        self.last_eval = None
        self.signals = StopSignals(announce=False)  # replaced by run()
        self._claimed = False
        self.optimizer = make_adam(model, self.settings.lr)
        # Each process draws its own exploration randomness (epsilon); the weights still
        # start equal everywhere, since DDP copies rank 0's when it wraps the model.
        torch.manual_seed(self.settings.seed + self.rank)
        self._claim()  # before reading the checkpoint: a second trainer on this folder stops here
        try:
            if os.path.exists(self.checkpoint_path):
                self._resume()
            elif start is not None:
                start(self)
            steps = self.processes.all_gather(self.step)
            if len(set(steps)) > 1:
                raise CheckpointError(f"the processes start at different steps {steps}: every "
                                      f"node must read the same {self.checkpoint_path}; put "
                                      f"--run-dir on a filesystem shared by all nodes")
        except BaseException:
            self._release()
            raise
        self.ddp_model = self.processes.wrap(self.model, self.device)

    rank = property(lambda self: self.processes.rank)
    world_size = property(lambda self: self.processes.world_size)
    run_dir = property(lambda self: self.folder.run_dir)
    checkpoint_path = property(lambda self: self.folder.checkpoint_path)
    log_path = property(lambda self: self.folder.log_path)

    # ------------------------------------------------------------------ the loop

    def run(self):
        """Train until ``step_limit`` (forever without one) or ``stop_at``. Returns the last
        evaluation (None when ``stop_at`` comes first and no evaluation was due).

        SIGINT (Ctrl-C), SIGTERM or SIGHUP lets the update under way finish, saves a checkpoint
        there and raises ``Interrupted`` (the same run resumes from it exactly); a second one
        stops at once (``signals.StoppedAtOnce``). The previous handlers are restored on
        return. The run folder and the checkpoint stay locked against other trainers until then.
        """
        if not self._claimed:  # released by an earlier run()
            self._claim()
        try:
            with StopSignals(announce=self.is_main and not self.quiet,
                             distributed=self.world_size > 1) as self.signals:
                return self._train()
        finally:
            self._release()

    def _train(self):
        settings = self.settings
        if self.is_main:
            self.folder.trim_log(self.step, self._log_scale)
        batches = self._batches()
        self.log(describe_run(settings, self.device, self.processes))
        self.model.train()
        self.output.start(self.step, settings)
        totals, count = {}, 0
        final_done = False
        while (settings.step_limit is None or self.step < settings.step_limit) and not self._stopped:
            stop = self._stop_signal()
            if stop:
                raise self._interrupted(stop)
            metrics = self._update(batches)
            self.output.advanced(self._last_update_size)
            totals = {key: totals.get(key, 0.0) + value for key, value in metrics.items()}
            count += 1
            done = settings.step_limit is not None and self.step >= settings.step_limit
            final = done and settings.final_eval
            if final:
                self.save()  # first: a stop during the long evaluation then loses nothing
            evaluated = False
            if self._crossed(settings.evaluate_every) or done:
                # At the step limit the whole test set is evaluated once, not a subset first.
                self.last_eval = self._evaluate(self._test_size if final else settings.eval_size, final)
                evaluated = self.last_eval is not None
                final_done = final
            # Every evaluation gets its own log row, so the held-out columns are never stale.
            if self._crossed(settings.log_interval) or done or evaluated:
                self._log_line(self._reduce(totals, count), evaluated)
                totals, count = {}, 0
            else:
                self.output.between_rows(self.step, lambda: float(totals["loss"]) / count)
            if self._crossed(settings.save_interval) or done or self._stopped:
                self.save()
        self.output.close()
        if self._stopped:
            self.log(f"stopped at step {self.step} (stop_at {settings.stop_at}); the same command "
                     f"without it, or with a later one, resumes")
        elif settings.final_eval and settings.step_limit is not None and not final_done:
            # A run resumed at its step limit: evaluate without training.
            self.last_eval = self._evaluate(self._test_size, final=True)
        return self.last_eval

    def _update(self, batches):
        """One optimizer update over up to ``step_interval`` micro-batches; returns metrics."""
        settings = self.settings
        micro = settings.step_interval
        if settings.step_limit is not None:
            micro = min(micro, settings.step_limit - self.step)
        self.optimizer.zero_grad(set_to_none=True)
        sums = {}
        # Summed: each micro-batch's gradient counts whole; averaged: 1 / step_interval of it.
        loss_scale = 1.0 / settings.step_interval if settings.accumulate == "mean" else 1.0
        for i in range(micro):
            x = self.model.normalize(next(batches).to(self.device, non_blocking=True))
            # DDP: synchronize gradients only on the last micro-batch.
            sync = self.ddp_model is self.model or i == micro - 1
            with (nullcontext() if sync else self.ddp_model.no_sync()), \
                    torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=settings.bf16):
                terms = self.ddp_model(x)
                if self.objective is not None:
                    terms["loss"] = self.objective(self.model, terms)
                (terms["loss"] * loss_scale).backward()
            for key in ("loss", "chosen_loss", "aux_loss", "final_loss"):
                sums[key] = sums.get(key, 0.0) + terms[key].detach()
            sums["code_entropy"] = sums.get("code_entropy", 0.0) + terms["code_entropy"].mean()
            sums["options_used"] = sums.get("options_used", 0.0) + terms["options_used"].float().mean()
        # As the original: the rate of an update is the schedule's at the step count after its
        # micro-batches (update_lr(i) with i micro-batches done, then optimizer.step()).
        lr = settings.learning_rate(self.step + micro)
        if micro == settings.step_interval:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
        # else: the micro-batches left before step_limit are fewer than an update's. As in the
        # original (CIFAR-10's 34,811 = 2,175 x 16 + 11), they are trained and logged, but
        # their gradients are not applied.
        self.step += micro
        self._last_update_size = micro
        # Metrics stay on the device: converting them here would wait for the GPU every step.
        return {key: value / micro for key, value in sums.items()} | {"lr": lr}

    def _evaluate(self, size, final=False):
        """Greedy-encode the first ``size`` test images (``evaluate_shared``); a collective call.

        Between chunks of ``EVAL_CHUNK`` images the processes agree on a stop signal, and the
        run stops there (the loop saved before the final evaluation).
        """
        count = min(size, self._test_size)
        if count == 0:
            return None

        def stop_between_chunks():
            stop = self._stop_signal()
            if stop:
                self.model.train()
                raise self._interrupted(stop, during="the held-out evaluation")

        result = evaluate_shared(self.model, self.test_data, count, self.processes, self.device,
                                 stop_between_chunks, EVAL_CHUNK)
        result["options"] = self.model.options
        self.model.train()
        if final:
            self.log(f"held-out evaluation on all {result['count']} test images at step "
                     f"{self.step}:\n" + format_table(result))
            summary = {k: v for k, v in result.items() if k != "codes"} | \
                {"step": self.step, "config": self.model.config}
            self.processes.main_only(lambda: self.folder.write_final_eval(summary),
                                     "write final_eval.json", SaveError)
        return result

    def save(self):
        """Write the checkpoint, then the images and loss plot (rank 0); every process calls it.

        A checkpoint this loop already wrote at this step is not written again (the images are).
        """
        # The weights are the same in every process, so every process stops here together.
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            raise FloatingPointError(f"the weights became non-finite before step {self.step}; the last "
                                     f"checkpoint is kept; lower --lr")
        rng_states = self.processes.all_gather(train_state.rng_state(self.device))
        written = self._saved_step == self.step

        def write():
            if not written:
                save_checkpoint(self.checkpoint_path, self.state(rng_states))
            try:
                shown = None if self.test_data is None else fixed_images(self.test_data, 32)
                self.folder.write_images(self.model, shown)
            except ImageWriteError as exc:
                raise SaveError(f"{exc.strerror}; the checkpoint {self.checkpoint_path} was saved "
                                f"at step {self.step}, so the same command resumes from it") from None

        self.processes.main_only(write, "write the checkpoint", SaveError)
        self._saved_step = self.step

    def close(self):
        """Under torchrun, leave the process group; every process calls it after ``run``."""
        self._release()
        self.processes.close(self.device)

    # ------------------------------------------------------------------ resume and stop

    def _claim(self):
        """Lock the run folder and the checkpoint (rank 0); a collective call."""
        self.processes.main_only(self.folder.claim, "use the run folder", SaveError)
        self._claimed = True  # on every process, unlike the locks

    def _release(self):
        self.folder.release()
        self._claimed = False

    def _resume(self):
        resumed = train_state.restore(self.checkpoint_path, self.model, self.optimizer, self.settings,
                                      device=self.device, rank=self.rank, world_size=self.world_size,
                                      objective=self.objective)
        self.step, self.prior_steps, self._log_scale = resumed.step, resumed.prior_steps, resumed.log_scale
        self._saved_step = self.step
        for note in resumed.notes:
            self.log(note)

    def load_optimizer(self, state):
        """Load an Adam state dict saved from a model of the same architecture."""
        train_state.load_optimizer(self.optimizer, self.model, state)

    def state(self, rng_states=None):
        """The checkpoint dict of this run now; ``rng_states``: every process's (``save``)."""
        return train_state.training_state(
            self.model, self.optimizer, self.step, self.settings, device=self.device,
            world_size=self.world_size, prior_steps=self.prior_steps, rng_states=rng_states,
            objective=self.objective)

    def _stop_signal(self):
        """The signal that stops the run here, or 0; under DDP every process takes the largest
        of all processes' (a collective call), so all stop at the same step."""
        return self.processes.max_flag(self.signals.first or 0)

    def _interrupted(self, signum, during=None):
        """Save where the run stopped (unless the checkpoint holds this step or there is
        nothing to save) and return the ``Interrupted`` exception that says where."""
        self.output.close()
        held = self._saved_step == self.step
        if not held and self.step > 0:
            self.save()
        return Interrupted.at(signum, self.step, self.checkpoint_path, held=held, during=during)

    @property
    def _stopped(self):
        # Reaching the step limit is the end of the run, not a stop.
        stop_at, limit = self.settings.stop_at, self.settings.step_limit
        return stop_at is not None and self.step >= stop_at and (limit is None or self.step < limit)

    def _crossed(self, interval):
        """Whether the last update passed a multiple of ``interval`` steps."""
        before = self.step - self._last_update_size
        return self.step // interval > before // interval

    # ------------------------------------------------------------------ data and devices

    @property
    def _test_size(self):
        return 0 if self.test_data is None else len(self.test_data)

    def _batches(self):
        """The endless micro-batches of this process, from this run's position on."""
        if self.device.type == "cuda" and isinstance(self.train_data, ArrayDataset):
            # Small in-memory datasets live on the GPU as uint8 so that loading never waits.
            self.train_data = type(self.train_data)(self.train_data.images.to(self.device),
                                                    self.train_data.labels)
        sampler = BatchSampler(len(self.train_data), self.settings.batch_size, seed=self.settings.seed,
                               start=self.step, rank=self.rank, world_size=self.world_size)
        return iterate_batches(self.train_data, sampler, self.num_workers)

    def _reduce(self, totals, count):
        """Average the interval's metrics over updates and, under DDP, over processes."""
        metrics = self.processes.mean(totals, self.device, count)
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"the loss became {metrics['loss']} before step {self.step}; "
                                     f"lower --lr or check the data")
        return metrics

    # ------------------------------------------------------------------ logging

    def log(self, message):
        self.output.message(message)

    def _log_line(self, metrics, evaluated=False):
        self.output.row(self.step, metrics, self.last_eval if evaluated else None)
