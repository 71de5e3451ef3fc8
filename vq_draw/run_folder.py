"""The folder of a training run: its paths, the locks that keep a second trainer out, the CSV
log (trimmed on resume), the final evaluation's JSON and the images written at each save.

A run folder holds ``checkpoint.pt`` (or the checkpoint lives where ``--checkpoint`` says),
``log.csv``, ``loss.png``, ``reconstructions.png``, ``samples.png`` and ``final_eval.json``.
Only rank 0 touches it.
"""

import csv
import json
import os
import tempfile

from .files import FolderInUse, FolderLock

LOG_FIELDS = ("step", "time", "loss", "chosen_loss", "aux_loss", "final_loss", "code_entropy",
              "options_used", "lr", "test_mse", "test_entropy", "test_used", "steps_per_sec")


class RunDirError(RuntimeError):
    """The run folder cannot be used: not a folder, not writable, locked by another trainer,
    or holding a log this program cannot read."""


class ImageWriteError(OSError):
    """An image or plot of a save could not be written; the checkpoint before it was."""


class RunFolder:
    """The files of one run: ``run_dir`` and the checkpoint (default ``run_dir/checkpoint.pt``)."""

    def __init__(self, run_dir, checkpoint_path=None):
        self.run_dir = os.fspath(run_dir)
        self.checkpoint_path = os.fspath(checkpoint_path or os.path.join(self.run_dir, "checkpoint.pt"))
        self._locks = []

    @property
    def log_path(self):
        return os.path.join(self.run_dir, "log.csv")

    def path(self, name):
        return os.path.join(self.run_dir, name)

    # ------------------------------------------------------------------ locks

    @property
    def claimed(self):
        return bool(self._locks)

    def claim(self):
        """Check that the run folder and the checkpoint's folder can be written, and lock both
        the run folder and the checkpoint file, so that a second trainer on either stops at once.

        Two runs with different run folders but one checkpoint file would overwrite each other's
        checkpoint, hence the second lock (beside the file: ``.<name>.lock``). Raises
        ``RunDirError`` with one line.
        """
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
            self._locks.append(FolderLock(self.run_dir))  # also the test that it can be written
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
                self._check_not_a_running_run(checkpoint_dir)
            lock_name = f".{os.path.basename(self.checkpoint_path)}.lock"
            self._locks.append(FolderLock(checkpoint_dir, lock_name))
        except FolderInUse as exc:
            self.release()
            what = (self.checkpoint_path if exc.path.endswith(f".{os.path.basename(self.checkpoint_path)}.lock")
                    else f"{checkpoint_dir}, the folder of the checkpoint,")
            raise RunDirError(f"{what} is in use by another training process (PID "
                              f"{exc.holder or 'unknown'}, which holds {exc.path}); wait for it to "
                              f"end or stop it, or choose another --checkpoint") from None
        except OSError as exc:
            self.release()
            raise RunDirError(f"cannot write to {checkpoint_dir}, the folder of the checkpoint: "
                              f"{exc.strerror or exc}; choose a writable --checkpoint") from None

    @staticmethod
    def _check_not_a_running_run(folder):
        """Raise ``FolderInUse`` when ``folder`` is the run folder of a trainer that is running
        (its ``.lock`` is held); take nothing otherwise."""
        if os.path.exists(os.path.join(folder, ".lock")):
            FolderLock(folder).release()

    def release(self):
        for lock in reversed(self._locks):
            lock.release()
        self._locks = []

    # ------------------------------------------------------------------ the log

    def append_log(self, row):
        """Append ``row`` ({field: value}, fields of ``LOG_FIELDS``) to log.csv."""
        new_file = not os.path.exists(self.log_path)
        with open(self.log_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=LOG_FIELDS, extrasaction="ignore")
            if new_file:
                writer.writeheader()
            writer.writerow(row)

    def trim_log(self, step, scale=1.0):
        """Keep the log.csv rows up to ``step``: a resumed run logs the later steps again.

        ``scale`` converts the logged steps when a resume under another number of processes
        rescaled the step count. A log without readable steps raises ``RunDirError``.
        """
        path = self.log_path
        if not os.path.exists(path):
            return
        try:
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                fields, rows = reader.fieldnames, list(reader)
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise self._bad_log(f"cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
        if not fields:
            return
        if "step" not in fields:
            raise self._bad_log("has no 'step' column")
        kept = []
        for number, row in enumerate(rows, start=2):
            try:
                row["step"] = int(int(row["step"]) * scale)
            except (TypeError, ValueError):
                raise self._bad_log(f"line {number} has step {row['step']!r}, not a number") from None
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

    def _bad_log(self, problem):
        return RunDirError(f"{self.log_path} {problem}, so the run cannot resume its log; move it "
                           f"away (or delete it) and run the same command again")

    # ------------------------------------------------------------------ results and images

    def write_final_eval(self, result):
        with open(self.path("final_eval.json"), "w") as f:
            json.dump(result, f, indent=2)

    def write_images(self, model, images=None):
        """reconstructions.png of ``images`` (when given), samples.png and loss.png from log.csv.

        Raises ``ImageWriteError`` naming the file that could not be written.
        """
        from . import images as figures  # matplotlib and torchvision: only when saving
        was_training = model.training
        model.eval()
        try:
            if images is not None:
                self._write(self.path("reconstructions.png"),
                            lambda path: figures.save_image(figures.reconstruction_grid(model, images), path))
                self._write(self.path("samples.png"),
                            lambda path: figures.save_image(figures.sample_grid(model), path))
        finally:
            model.train(was_training)
        self._write(self.path("loss.png"), lambda path: figures.plot_log(self.log_path, path))

    @staticmethod
    def _write(path, write):
        try:
            write(path)
        except OSError as exc:
            raise ImageWriteError(exc.errno, f"could not write {path}: {exc.strerror or exc}") from None
