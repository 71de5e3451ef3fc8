"""What a training run tells: messages, the progress bar, the log.csv rows and their lines,
and, without a bar (stderr not a terminal), a line by time between rows. Rank 0 only.
"""

import sys
import time

# Without a progress bar, a line at least this often besides the log rows, so that a slow run
# is not silent for minutes.
PROGRESS_SECONDS = 30.0


class TrainLog:
    """The output of a run into ``folder`` (``RunFolder``).

    :param write: whether this process writes log.csv (rank 0).
    :param show: whether it prints (rank 0, not quiet); ``bar``: as a tqdm bar on stderr.
    """

    def __init__(self, folder, world_size=1, *, write=True, show=True, bar=False):
        self.folder, self.world_size, self.settings = folder, world_size, None
        self.write, self.show, self.use_bar = write, show and write, bar and show and write
        self._bar = None
        self._row_time = self._row_step = self._line_time = None

    def message(self, text):
        if not self.show:
            return
        try:
            if self._bar is not None:
                self._bar.write(text, file=sys.stdout)  # clears and redraws the bar
            else:
                print(text, flush=True)
        except OSError:
            # The terminal is gone (SIGHUP: writes fail with EIO): the run goes on to its
            # save, silently, rather than dying on a progress line.
            self.show = self.use_bar = False
            self._bar = None

    def start(self, step, settings):
        """Training with ``settings`` (``TrainSettings``) starts (again) at ``step``: open the
        bar and the timers."""
        self.settings = settings
        self._row_time, self._row_step, self._line_time = time.time(), step, time.monotonic()
        if self.use_bar:
            from tqdm import tqdm
            self._bar = tqdm(total=self.settings.step_limit, initial=step, unit="step",
                             file=sys.stderr, dynamic_ncols=True, smoothing=0.05)

    def advanced(self, steps):
        if self._bar is not None:
            self._bar.update(steps)

    def close(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def row(self, step, metrics, last_eval=None):
        """Append the row of ``step`` to log.csv and print its line; ``metrics`` are the
        interval's means, ``last_eval`` an evaluation that just ran (its held-out columns)."""
        now = time.time()
        steps_per_sec = (step - self._row_step) / max(now - self._row_time, 1e-9)
        self._row_time, self._row_step, self._line_time = now, step, time.monotonic()
        if not self.write:
            return
        row = {"step": step, "time": round(now, 1)}
        row.update({k: round(v, 6) for k, v in metrics.items()})
        row["lr"] = float(f"{metrics['lr']:.6g}")  # small rates keep their digits
        if last_eval is not None:
            row["test_mse"] = round(last_eval["final_mse"], 6)
            row["test_entropy"] = round(sum(last_eval["entropy"]) / len(last_eval["entropy"]), 4)
            row["test_used"] = min(last_eval["options_used"])
        row["steps_per_sec"] = round(steps_per_sec, 3)
        self.folder.append_log(row)
        test = f" test {row['test_mse']:.5f}" if "test_mse" in row else ""
        self.message(f"{self._position(step)} loss {metrics['loss']:.5f} final "
                     f"{metrics['final_loss']:.5f}{test} entropy {metrics['code_entropy']:.3f} used "
                     f"{metrics['options_used']:.1f} lr {metrics['lr']:.2e} "
                     f"{self._speed(step, steps_per_sec)}")

    def between_rows(self, step, loss=None):
        """Without a bar, print a line when ``PROGRESS_SECONDS`` passed since the last line;
        ``loss()``: this process's running mean loss (no collective, since the time of the line
        differs between processes; called only then, as it waits for the GPU)."""
        if self.use_bar or not self.show or time.monotonic() - self._line_time < PROGRESS_SECONDS:
            return
        self._line_time = time.monotonic()
        steps_per_sec = (step - self._row_step) / max(time.time() - self._row_time, 1e-9)
        text = "" if loss is None else f" loss {loss():.5f}"
        self.message(f"{self._position(step)}{text} {self._speed(step, steps_per_sec)}")

    def _position(self, step):
        limit = self.settings.step_limit
        return f"step {step}" + (f"/{limit}" if limit else "")

    def _speed(self, step, steps_per_sec):
        images = steps_per_sec * self.settings.batch_size * self.world_size
        text = f"{steps_per_sec:.2f} steps/s ({images:.0f} img/s)"
        if self.settings.step_limit is not None and steps_per_sec > 0:
            text += f" left {duration((self.settings.step_limit - step) / steps_per_sec)}"
        return text


def duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def describe_run(settings, device, processes):
    """One line that states what a step and an update are in this run."""
    s, world = settings, processes.world_size
    text = (f"training on {processes.describe()}, {device}: micro-batch {s.batch_size} x step "
            f"interval {s.step_interval} x {world} = {s.batch_size * s.step_interval * world} "
            f"images per update")
    if s.step_limit:
        text += (f"; {s.step_limit} steps per process = {s.step_limit // s.step_interval} updates, "
                 f"{s.step_limit * s.batch_size * world} images")
    return text
