"""The GPU check's training phase (vq_draw/tools/gpu_check.py): each dataset's published run in
``--stop-at`` slices that end inside the command's budget, and the process helpers that the
check's other phases share (a child's environment, its output, its log rows).
"""

import csv
import math
import os
import signal
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FINAL_RESERVE = 25  # seconds kept at the end of a command for compare_log and the summary
TERM_MARGIN = 15  # seconds between a slice's expected save and the end of training time


class CheckError(RuntimeError):
    """A setting or file that stops the check before it starts."""


# --------------------------------------------------------------------------- helpers


def say(message):
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def here(path):
    """``path`` relative to the repository when inside it (commands run from there), so that the
    recorded commands name no folder of one machine."""
    relative = os.path.relpath(path, REPO)
    return path if relative.startswith("..") else relative


def child_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def read_log_rows(path):
    """[(step, time)] of a run's log.csv training rows ([] when there is none yet)."""
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                rows.append((int(row["step"]), float(row["time"])))
            except (KeyError, TypeError, ValueError):
                continue  # a row being written
    return rows


def start_process(command, output_path, prefix):
    """Popen ``command`` from the repository, its output appended to ``output_path`` and echoed
    line by line with ``prefix``. Returns (process, thread that ends with the output)."""
    process = subprocess.Popen(command, cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, bufsize=1)

    def pump():
        with open(output_path, "a") as out:
            for line in process.stdout:
                out.write(line)
                out.flush()
                print(f"[{prefix}] {line.rstrip()}", flush=True)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return process, thread


def tail(path, lines=6):
    try:
        with open(path) as f:
            return [line.rstrip() for line in f.readlines()[-lines:]]
    except OSError:
        return []


# --------------------------------------------------------------------------- train


class TrainJob:
    """One dataset's published run, trained in ``--stop-at`` slices. A slice is one process of the
    training script; it saves at its stop (or at SIGTERM, at the end of the update under way), and
    the next one, in this command or a later one, resumes from the checkpoint."""

    def __init__(self, name, spec, settings, state):
        self.name, self.spec, self.settings = name, spec, settings
        self.state = state
        self.run_dir = os.path.join(settings.work, name)
        self.record = state.data["train"].setdefault(name, {
            "target": spec["micro_batches"], "done": 0, "slices": [], "rate": None,
            "startup": None, "save": None, "compile": settings.train_compile})
        if self.record["compile"] != settings.train_compile:
            raise CheckError(f"the {name} run was started with{'' if self.record['compile'] else 'out'}"
                             f" --train-compile; give the same setting to resume it")
        self.process = self.thread = None
        self.finished = False  # nothing more for this command
        self.trained_here = 0  # micro-batches trained in this command (for --slice)
        self.record["done"] = self.done()

    @property
    def interval(self):
        return self.spec["step_interval"]

    def done(self):
        rows = read_log_rows(os.path.join(self.run_dir, "log.csv"))
        return rows[-1][0] if rows else 0

    def estimate(self, key):
        measured = self.record.get(key)
        return measured if measured is not None else self.settings.guess[key]

    def command(self, stop_at):
        spec = self.spec
        command = [sys.executable, spec["script"], "--data-dir",
                   here(os.path.join(self.settings.data, self.name)), "--run-dir", here(self.run_dir),
                   "--batch", str(spec["batch"]), "--step-interval", str(spec["step_interval"]),
                   "--stop-at", str(stop_at), "--save-interval", str(spec["micro_batches"]),
                   "--log-interval", str(spec["step_interval"]), "--eval-interval", "1000000",
                   "--workers", str(self.settings.guess["workers"]), "--no-progress", *spec["extra"]]
        return command + (["--compile"] if self.settings.train_compile else [])

    def plan(self, now, train_end):
        """The ``--stop-at`` of a slice that starts now and saves before ``train_end``, or None."""
        done, target = self.done(), self.spec["micro_batches"]
        if done >= target:
            return None
        update = self.estimate("rate") * self.interval
        available = train_end - now - self.estimate("startup") - self.estimate("save") - TERM_MARGIN
        updates = math.floor(available / update)
        if updates >= 1 and self.record["rate"] is None:
            # Unmeasured: aim at the end, since a start and a save cost more than the SIGTERM
            # that stops a slow run in time, at an update boundary.
            updates = math.ceil((target - done) / self.interval)
        if self.settings.slice:
            allowed = max(1, self.settings.slice // self.interval) * self.interval - self.trained_here
            updates = min(updates, allowed // self.interval)
        if updates < 1:
            return None
        return min(target, done + updates * self.interval)

    def start(self, now, train_end):
        stop_at = self.plan(now, train_end)
        if stop_at is None:
            self.finished = True
            reason = ("done" if self.done() >= self.spec["micro_batches"] else
                      "--slice reached" if self.settings.slice and self.trained_here else
                      "no time for an update")
            say(f"{self.name}: no slice started ({reason}; {self.done()} of "
                f"{self.spec['micro_batches']} micro-batches)")
            return
        self.slice = {"from": self.done(), "stop_at": stop_at, "started": time.time(),
                      "compile": self.settings.train_compile}
        self.term_sent = self.killed = False
        say(f"{self.name}: training micro-batches {self.slice['from'] + 1}-{stop_at} "
            f"(expect {self.estimate('rate'):.2f} s each)")
        self.process, self.thread = start_process(self.command(stop_at), self.run_dir + ".out",
                                                  self.name)

    def measure(self):
        """Seconds per micro-batch and start-up seconds of the slice under way, from its log rows."""
        rows = [r for r in read_log_rows(os.path.join(self.run_dir, "log.csv"))
                if r[0] > self.slice["from"] and r[1] >= self.slice["started"] - 1]
        if len(rows) >= 2:
            (s0, t0), (s1, t1) = rows[0], rows[-1]
            self.record["rate"] = (t1 - t0) / (s1 - s0)
        if rows and self.record["rate"] is not None:
            first_step, first_time = rows[0]
            steps = first_step - self.slice["from"]
            startup = first_time - self.slice["started"] - steps * self.record["rate"]
            self.record["startup"] = max(startup, self.record["startup"] or 0.0)
        return rows

    def poll(self, now, train_end, hard_end):
        """Watch the slice under way; start the next one when it ends. Returns whether busy."""
        if self.finished:
            return False
        if self.process is None:
            self.start(now, train_end)
            return not self.finished
        rows = self.measure()
        if self.process.poll() is None:
            update = self.estimate("rate") * self.interval
            saving = bool(rows) and rows[-1][0] >= self.slice["stop_at"]  # its last update is done
            if not (self.term_sent or saving) and \
                    now + update + self.estimate("save") + TERM_MARGIN >= train_end:
                say(f"{self.name}: SIGTERM, so that it saves at the end of this update, before the "
                    f"budget ends")
                self.process.send_signal(signal.SIGTERM)
                self.term_sent = True
            elif now >= hard_end and not self.killed:
                say(f"{self.name}: still running at the end of the budget; killed (the last "
                    f"checkpoint stays)")
                self.process.kill()
                self.killed = True
            return True
        self.thread.join(timeout=10)
        self.end_slice()
        self.process = None
        if self.finished:
            return False
        self.start(time.time(), train_end)
        return not self.finished

    def end_slice(self):
        code = self.process.returncode
        rows = self.measure()
        ended = time.time()
        reached = self.done()
        if rows and code == 0:
            # After the last row: the save (checkpoint, sample grid, plot) and the exit.
            self.record["save"] = max(ended - rows[-1][1], self.record["save"] or 0.0)
        self.slice.update(reached=reached, exit=code, seconds=round(ended - self.slice["started"], 1))
        self.record["slices"].append(self.slice)
        self.record["done"] = reached
        self.trained_here += reached - self.slice["from"]
        how = {0: "stopped at its --stop-at", 128 + signal.SIGTERM: "stopped by SIGTERM and saved",
               -signal.SIGTERM: "stopped by SIGTERM while starting",
               -signal.SIGKILL: "killed; the checkpoint before it stays"}
        if code in how:
            say(f"{self.name}: slice {how[code]}, at micro-batch {reached} after "
                f"{self.slice['seconds']} s; {self.record['rate'] or float('nan'):.3f} s per "
                f"micro-batch")
            if code != 0:
                self.finished = True  # stopped for the time limit: the next command goes on
        else:
            self.slice["output"] = tail(self.run_dir + ".out")
            say(f"{self.name}: the training command failed (exit {code}); its output ends: "
                + " | ".join(self.slice["output"][-3:]))
            self.finished = True
        self.state.save()


def train_phase(settings, state, deadline, stopping):
    jobs = [TrainJob(name, spec, settings, state) for name, spec in settings.runs.items()]
    state.save()
    train_end = deadline - FINAL_RESERVE - settings.time_reserve
    hard_end = deadline - 10
    waiting = list(jobs)
    running = []
    while waiting or running:
        now = time.time()
        if stopping.is_set():
            train_end = now  # SIGTERM to the check: every run saves at its update's end and stops
        while waiting and (settings.parallel or not running):
            job = waiting.pop(0)
            if job.poll(now, train_end, hard_end):
                running.append(job)
        running = [job for job in running if job.poll(time.time(), train_end, hard_end)]
        if running:
            time.sleep(1)
    return jobs
