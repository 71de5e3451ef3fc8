"""The prepared GPU check (issue 32): the CIFAR-10 and CelebA training curves against the
original's logs, and the speed of the published step, in commands of a few minutes that resume
each other on a warm machine.

Before the machine (here, with the data and the original's logs at hand):

    python -m vq_draw.tools.gpu_check pack --data-dir ./data --logs /path/to/training_logs

writes ``data/gpu_check/`` (git-ignored): the 256 x 32 CIFAR-10 and 128 x 32 CelebA training images
that the runs use, 32 test images each (the runs' sample grids) and the first lines of the logs.
On the machine (``run`` repeated continues where the last command stopped):

    python -m vq_draw.tools.gpu_check run --budget 540

Phases, in order of value (``--phases``):

- ``train``: the published commands (``train_cifar.py``, ``train_celeba.py``) for 256 and 128
  micro-batches, side by side on the one GPU (their steps are bound by kernel launches, so each
  leaves the GPU mostly idle). Each process is a ``--stop-at`` slice that saves at its end: once
  the speed is measured, planned to end inside the budget; before that, aimed at the run's end.
  A slice that would overrun gets SIGTERM in time to finish the update under way and save. The
  next slice, in this command or the next, resumes from the checkpoint.
- ``compare``: ``compare_log`` on each run so far: the window means (CIFAR-10 micro-batches
  193-256 against the log's, CelebA 97-128) within 15 %, the plots and the logs' CSVs.
- ``time``: the published micro-batch of each dataset, eager and ``--compile``, fp32 and bf16
  (``step_probe``: seconds per micro-batch in the training loop and the fraction of a profiled
  step that the GPU's kernels are busy). Each is skipped when the budget left is too short.

Everything is written as it comes to ``--out`` (default ``$OUT``): ``gpu_check_summary.md`` and
``.json``, the two plots under ``images/``, and ``repo_files.tar`` holding the files at the paths
they take in the repository (``tar -xf repo_files.tar`` in a checkout). The state is kept in
``--work`` (``runs/gpu_check``), which a warm machine keeps between commands.
"""

import argparse
import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The two runs: the published commands and the original's windows (issue 24), or tiny stand-ins
# that a CPU trains in seconds (the tests). The logs are the original's, as the pack copies them.
CHECKS = {
    "published": {
        "cifar10": dict(script="train_cifar.py", label="CIFAR-10", micro_batches=256,
                        window=(193, 256), batch=32, step_interval=16, log="cifar_log.txt",
                        plot="images/cifar_vs_original.png",
                        csv="docs/experiments/logs/cifar_vs_original.csv", extra=[]),
        "celeba": dict(script="train_celeba.py", label="CelebA", micro_batches=128,
                       window=(97, 128), batch=32, step_interval=16, log="celeba_log.txt",
                       plot="images/celeba_vs_original.png",
                       csv="docs/experiments/logs/celeba_vs_original.csv", extra=[]),
    },
    "tiny": {
        "cifar10": dict(script="train_cifar.py", label="CIFAR-10 (tiny)", micro_batches=4,
                        window=(3, 4), batch=2, step_interval=1, log="cifar_log.txt",
                        plot="images/cifar_vs_original.png",
                        csv="docs/experiments/logs/cifar_vs_original.csv",
                        extra=["--stages", "2", "--segment", "1", "--options", "4"]),
        "celeba": dict(script="train_celeba.py", label="CelebA (tiny)", micro_batches=2,
                       window=(2, 2), batch=2, step_interval=1, log="celeba_log.txt",
                       plot="images/celeba_vs_original.png",
                       csv="docs/experiments/logs/celeba_vs_original.csv",
                       extra=["--stages", "2", "--segment", "1", "--options", "4"]),
    },
}
TOLERANCE = 0.15
PHASES = ("train", "compare", "time")
MODES = ("eager", "compile")
PRECISIONS = ("fp32", "bf16")

# Guesses until this check has measured its own (all seconds): published / tiny.
GUESSES = {
    "published": dict(rate=3.5, startup=40, save=20, compile=90, warmup=2, steps=3, workers=2),
    "tiny": dict(rate=2.0, startup=15, save=3, compile=120, warmup=1, steps=1, workers=0),
}
FINAL_RESERVE = 25  # seconds kept at the end of a command for compare_log and the summary
TERM_MARGIN = 15  # seconds between a slice's expected save and the end of training time


class CheckError(RuntimeError):
    """A setting or file that stops the check before it starts."""


# --------------------------------------------------------------------------- state


class State:
    """What earlier commands did, in ``work/state.json`` (rewritten after every change)."""

    def __init__(self, path, settings):
        self.path = path
        self.data = {"size": settings.size, "train": {}, "compare": {}, "timings": {}, "commands": []}
        if os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
            if saved.get("size") != settings.size:
                raise CheckError(f"{path} is from a {saved.get('size')} check, not {settings.size}; "
                                 f"use another --work or delete it")
            self.data = saved
        self.lock = threading.Lock()

    def save(self):
        with self.lock:
            temp = self.path + ".tmp"
            with open(temp, "w") as f:
                json.dump(self.data, f, indent=1)
            os.replace(temp, self.path)


class Settings:
    """The command's settings, paths made absolute."""

    def __init__(self, args):
        self.size = "tiny" if args.tiny else "published"
        self.runs = {name: CHECKS[self.size][name] for name in args.datasets}
        self.guess = dict(GUESSES[self.size])
        if args.rate_guess is not None:
            self.guess["rate"] = args.rate_guess
        self.data = os.path.abspath(args.data)
        self.logs = os.path.abspath(args.logs or os.path.join(args.data, "upstream"))
        self.work = os.path.abspath(args.work)
        self.out = os.path.abspath(args.out or os.environ.get("OUT") or os.path.join(args.work, "out"))
        self.budget = args.budget
        self.phases = args.phases
        self.parallel = not args.serial
        self.train_compile = args.train_compile
        self.slice = args.slice
        self.time_reserve = args.time_reserve
        self.modes = args.time_modes
        self.precisions = args.time_precisions
        self.profile = not args.no_profile


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


# --------------------------------------------------------------------------- compare

_ROW = re.compile(r"^\s*(\d+)-(\d+)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)\s*$")
_WINDOW = re.compile(r"window (\d+)-(\d+): this ([0-9.]+), original ([0-9.]+), ratio ([0-9.]+) "
                     r"\((within|OUTSIDE)")
_PARTIAL = re.compile(r"window (\d+)-(\d+): the run has not logged all of it yet \(original ([0-9.]+)\)")


def compare_phase(settings, state):
    """``compare_log`` on every run with a log: the window, the plot and the run's CSV."""
    for name, spec in settings.runs.items():
        log = os.path.join(settings.work, name, "log.csv")
        original = os.path.join(settings.logs, spec["log"])
        if not os.path.exists(log):
            continue
        plot = os.path.join(settings.work, "repo", spec["plot"])
        table = os.path.join(settings.work, "repo", spec["csv"])
        for path in (plot, table):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        shutil.copyfile(log, table)
        first, last = spec["window"]
        command = [sys.executable, "-m", "vq_draw.tools.compare_log", log, original,
                   "--window", str(first), str(last), "--tolerance", str(TOLERANCE),
                   "--plot", plot, "--label", spec["label"]]
        done = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True,
                              timeout=120)
        print(done.stdout + done.stderr, end="", flush=True)
        result = {"micro_batches": read_log_rows(log)[-1][0] if read_log_rows(log) else 0,
                  "target": spec["micro_batches"], "window": [first, last], "exit": done.returncode,
                  "rows": [], "command": "python -m vq_draw.tools.compare_log " + " ".join(
                      [spec["csv"], "ORIGINAL/training_logs/" + spec["log"], "--window", str(first),
                       str(last), "--plot", spec["plot"]])}
        for line in done.stdout.splitlines():
            row, window, partial = _ROW.match(line), _WINDOW.search(line), _PARTIAL.search(line)
            if row:
                result["rows"].append([int(row[1]), int(row[2]), float(row[3]), float(row[4]),
                                       float(row[5])])
            elif window:
                result.update(ours=float(window[3]), original=float(window[4]),
                              ratio=float(window[5]), within=window[6] == "within")
            elif partial:
                result.update(ours=None, original=float(partial[3]), ratio=None, within=None)
        if done.returncode not in (0, 1) or "original" not in result:
            result["error"] = (done.stderr.strip().splitlines() or ["no window line"])[-1]
        state.data["compare"][name] = result
        state.save()
        verdict = ("error: " + result["error"] if "error" in result else
                   f"ratio {result['ratio']:.3f} ({'within' if result['within'] else 'OUTSIDE'} "
                   f"{TOLERANCE:.0%})" if result.get("ratio") is not None else
                   f"window not reached ({result['micro_batches']} of {spec['micro_batches']})")
        say(f"{name}: {verdict}")


# --------------------------------------------------------------------------- time


def timing_plan(settings):
    """(key, dataset, mode, precision) in the order of their value: fp32 first, then CIFAR-10."""
    return [(f"{name}/{mode}/{precision}", name, mode, precision)
            for precision in settings.precisions for name in settings.runs for mode in settings.modes]


def time_phase(settings, state, deadline, stopping):
    """``step_probe`` on each published micro-batch that fits in the budget left."""
    guess = settings.guess
    for key, name, mode, precision in timing_plan(settings):
        earlier = state.data["timings"].get(key)
        if earlier and not earlier.get("out_of_time"):
            continue
        if stopping.is_set():
            return
        spec = settings.runs[name]
        trained = state.data["train"].get(name, {})
        rate = trained.get("rate") or guess["rate"]
        rate *= 1.5 if precision == "bf16" else 1.0  # slower than fp32 on the H200 before
        steps = guess["warmup"] + guess["steps"] + int(settings.profile)
        needed = guess["startup"] + steps * rate + (guess["compile"] if mode == "compile" else 0)
        if earlier:  # stopped by the budget in an earlier command: give it more than it had
            needed = max(needed, earlier["process_seconds"] + 30)
        left = deadline - FINAL_RESERVE - time.time()
        if needed > left:
            say(f"{key}: skipped for now (needs about {needed:.0f} s, {left:.0f} s left)")
            continue
        run_dir = os.path.join(settings.work, "probes", key.replace("/", "_"))
        shutil.rmtree(run_dir, ignore_errors=True)
        os.makedirs(run_dir)
        result_path = os.path.join(run_dir, "probe.json")
        command = [sys.executable, "-m", "vq_draw.tools.step_probe", "--json", here(result_path),
                   "--warmup", str(guess["warmup"]), "--steps", str(guess["steps"])]
        command += [] if settings.profile else ["--no-profile"]
        command += ["--", spec["script"], "--data-dir", here(os.path.join(settings.data, name)),
                    "--run-dir", here(run_dir),
                    "--batch", str(spec["batch"]), "--step-interval", "1", "--stop-at",
                    str(steps + 2), "--log-interval", "1", "--save-interval", "1000000",
                    "--eval-interval", "1000000", "--workers", str(guess["workers"]), "--no-progress",
                    *spec["extra"]]
        command += (["--compile"] if mode == "compile" else []) + \
                   (["--bf16"] if precision == "bf16" else [])
        say(f"{key}: timing {steps} micro-batches (limit {left:.0f} s)")
        started = time.time()
        process, thread = start_process(command, os.path.join(run_dir, "output.txt"), key)
        while process.poll() is None:
            if time.time() - started > left or stopping.is_set():
                process.kill()
            time.sleep(0.5)
        thread.join(timeout=10)
        result = {"dataset": name, "mode": mode, "precision": precision,
                  "process_seconds": round(time.time() - started, 1)}
        if os.path.exists(result_path):
            with open(result_path) as f:
                result.update(json.load(f))
            result["loop_seconds"] = _loop_seconds(os.path.join(run_dir, "log.csv"), guess["warmup"])
        elif process.returncode == -signal.SIGKILL:
            result.update(error=f"stopped after {result['process_seconds']} s, the time left",
                          out_of_time=True)
        if not result.get("out_of_time") and (result.get("error") or not os.path.exists(result_path)):
            result["output"] = tail(os.path.join(run_dir, "output.txt"), 6)
            result["error"] = (result.get("error") or " | ".join(result["output"][-2:]) or
                               f"exit {process.returncode}")
        state.data["timings"][key] = result
        state.save()
        say(f"{key}: " + (f"error: {result['error']}" if result.get("error") else
                          f"{result['seconds']:.3f} s per micro-batch"))


def _loop_seconds(log, warmup):
    """Mean seconds per micro-batch by the training loop's own clock (its log rows' steps_per_sec,
    one row per update with ``--log-interval 1``) after ``warmup``: a check on the probe's clock;
    None without such a row."""
    if not os.path.exists(log):
        return None
    with open(log, newline="") as f:
        rates = [float(row["steps_per_sec"]) for row in csv.DictReader(f)
                 if int(row["step"]) > warmup and float(row.get("steps_per_sec") or 0) > 0]
    return sum(1 / rate for rate in rates) / len(rates) if rates else None


# --------------------------------------------------------------------------- outputs


def environment():
    import torch

    env = {"torch": torch.__version__, "python": sys.version.split()[0],
           "cuda": torch.version.cuda, "device": "cpu"}
    if torch.cuda.is_available():
        env.update(device=torch.cuda.get_device_name(0),
                   cudnn=torch.backends.cudnn.version())
    return env


def summary_markdown(data):
    """The summary as markdown: the comparison, the training speed and the timings."""
    lines = [f"# GPU check ({data['size']})", "",
             f"Device: {data['environment'].get('device')}; torch {data['environment'].get('torch')}"
             f" (CUDA build {data['environment'].get('cuda')}). Commands so far: "
             f"{len(data['commands'])}, of " + ", ".join(f"{c.get('seconds', '?')} s"
                                                         for c in data["commands"]) + ".", "",
             "## Training curves against the original's logs", "",
             "| run | micro-batches | window | this | original | ratio | verdict |",
             "| --- | ---: | --- | ---: | ---: | ---: | --- |"]
    for name, result in data["compare"].items():
        ratio = result.get("ratio")
        verdict = ("error: " + result["error"] if "error" in result else
                   "not reached" if ratio is None else
                   f"{'within' if result['within'] else 'OUTSIDE'} {TOLERANCE:.0%}")
        number = (lambda x: "" if x is None else f"{x:.5f}")
        lines.append(f"| {name} | {result['micro_batches']} of {result['target']} | "
                     f"{result['window'][0]}-{result['window'][1]} | {number(result.get('ours'))} | "
                     f"{number(result.get('original'))} | {'' if ratio is None else f'{ratio:.3f}'} | "
                     f"{verdict} |")
    lines += ["", "Per update (micro-batches, this, original, ratio):", ""]
    for name, result in data["compare"].items():
        rows = "; ".join(f"{a}-{b} {x:.5f} {y:.5f} {r:.3f}" for a, b, x, y, r in result["rows"])
        lines.append(f"- {name}: {rows}")
    lines += ["", "## Training runs", "", "| run | slices (from-reached, s, exit) | s per micro-batch "
              "| start-up s | save s | still to train |", "| --- | --- | ---: | ---: | ---: | --- |"]
    for name, record in data["train"].items():
        slices = ", ".join(f"{s['from']}-{s['reached']} ({s['seconds']} s, {s['exit']})"
                           for s in record["slices"])
        number = (lambda x: "" if x is None else f"{x:.2f}")
        left = record["target"] - record["done"]
        if left and record["rate"] is not None:
            # What one more command needs for the rest, with its start and save.
            seconds = left * record["rate"] + (record["startup"] or 0) + (record["save"] or 0)
            todo = f"{left} micro-batches, about {seconds:.0f} s"
        else:
            todo = f"{left} micro-batches" if left else "nothing"
        lines.append(f"| {name}{' (compiled)' if record['compile'] else ''} | {slices} | "
                     f"{number(record['rate'])} | {number(record['startup'])} | "
                     f"{number(record['save'])} | {todo} |")
    lines += ["", "## Seconds per published micro-batch (step_probe)", "",
              "| dataset | mode | precision | s per micro-batch | speed vs eager fp32 | loop's clock | "
              "kernels busy (profiled step) | kernel s / step s | peak GiB | note |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for key, result in data["timings"].items():
        base = data["timings"].get(f"{result['dataset']}/eager/fp32", {}).get("seconds")
        seconds = result.get("seconds")
        cells = [result["dataset"], result["mode"], result["precision"],
                 "" if seconds is None else f"{seconds:.3f}",
                 "" if not (seconds and base) else f"{base / seconds:.2f}x",
                 "" if result.get("loop_seconds") is None else f"{result['loop_seconds']:.3f}",
                 "" if result.get("busy_fraction") is None else f"{result['busy_fraction']:.1%}",
                 "" if result.get("busy_vs_unprofiled") is None else
                 f"{result['busy_vs_unprofiled']:.1%}",
                 "" if result.get("peak_memory_gib") is None else f"{result['peak_memory_gib']:.1f}",
                 result.get("error") or ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(settings, state):
    """The summary and the repository's files, into --out (rewritten whole each time)."""
    data = dict(state.data)
    data["environment"] = state.data.get("environment") or {}
    os.makedirs(settings.out, exist_ok=True)
    repo = os.path.join(settings.work, "repo")
    logs = os.path.join(repo, "docs", "experiments", "logs")
    os.makedirs(logs, exist_ok=True)
    text = summary_markdown(data)
    for folder in (settings.out, logs):
        with open(os.path.join(folder, "gpu_check_summary.md"), "w") as f:
            f.write(text)
        with open(os.path.join(folder, "gpu_check_summary.json"), "w") as f:
            json.dump(data, f, indent=1)
    with tarfile.open(os.path.join(settings.out, "repo_files.tar"), "w") as tar:
        for folder, _, files in os.walk(repo):
            for file in sorted(files):
                path = os.path.join(folder, file)
                tar.add(path, arcname=os.path.relpath(path, repo))
    for spec in settings.runs.values():
        plot = os.path.join(repo, spec["plot"])
        if os.path.exists(plot):
            os.makedirs(os.path.join(settings.out, "images"), exist_ok=True)
            shutil.copyfile(plot, os.path.join(settings.out, spec["plot"]))


# --------------------------------------------------------------------------- commands


def run(settings):
    started = time.time()
    deadline = started + settings.budget
    for name, spec in settings.runs.items():
        for path in (os.path.join(settings.data, name), os.path.join(settings.logs, spec["log"])):
            if not os.path.exists(path):
                raise CheckError(f"{path} is missing; make it with 'python -m vq_draw.tools.gpu_check "
                                 f"pack --data-dir ./data --logs /path/to/training_logs' and carry "
                                 f"it to the machine")
    os.makedirs(settings.work, exist_ok=True)
    state = State(os.path.join(settings.work, "state.json"), settings)
    state.data["environment"] = environment()
    state.data["commands"].append({"started": round(started, 1), "budget": settings.budget,
                                   "phases": settings.phases})
    state.save()
    say(f"device {state.data['environment']['device']}, budget {settings.budget} s, phases "
        f"{','.join(settings.phases)}, out {settings.out}")
    stopping = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stopping.set())
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        write_outputs(settings, state)
        for phase in settings.phases:
            if stopping.is_set():
                break
            say(f"phase {phase}")
            if phase == "train":
                train_phase(settings, state, deadline, stopping)
            elif phase == "compare":
                compare_phase(settings, state)
            else:
                time_phase(settings, state, deadline, stopping)
            write_outputs(settings, state)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        state.data["commands"][-1]["seconds"] = round(time.time() - started, 1)
        state.save()
        write_outputs(settings, state)
    say(f"done in {time.time() - started:.0f} s; summary in "
        f"{os.path.join(settings.out, 'gpu_check_summary.md')}")


def pack_command(args):
    """Pack the images and the logs' first lines that the check needs, into args.out."""
    from ..data import DataError
    from .pack_data import pack

    size = "tiny" if args.tiny else "published"
    total = 0
    try:
        for name in args.datasets:
            spec = CHECKS[size][name]
            result = pack(name, args.data_dir, spec["micro_batches"] * spec["batch"],
                          os.path.join(args.out, name))
            total += result["bytes"]
            print(f"{name}: {result['train']} training images, {result['files']} files, "
                  f"{result['bytes'] / 2**20:.1f} MiB")
            logs = os.path.join(args.out, "upstream")
            os.makedirs(logs, exist_ok=True)
            lines = copy_log_head(os.path.join(args.logs, spec["log"]),
                                  os.path.join(logs, spec["log"]), spec["micro_batches"])
            total += os.path.getsize(os.path.join(logs, spec["log"]))
            print(f"{name}: the first {lines} lines of {spec['log']}")
    except (DataError, ValueError, OSError) as exc:
        sys.exit(f"error: {exc}")
    print(f"{args.out}: {total / 2**20:.1f} MiB in all (name it in the run's carry; the working "
          f"tree and carry together must stay under 64 MiB)")


def copy_log_head(source, destination, micro_batches):
    """Copy the lines of an original's log up to its micro-batch ``micro_batches`` (``step N-1``)."""
    last = f"step {micro_batches - 1}:"
    if not os.path.isfile(source):
        raise ValueError(f"{source} is missing; --logs is the folder of the original's training "
                         f"logs (cifar_log.txt, celeba_log.txt)")
    with open(source) as f, open(destination, "w") as out:
        for count, line in enumerate(f, 1):
            out.write(line)
            if last in line:
                return count
    raise ValueError(f"{source} has no line for micro-batch {micro_batches} ('{last}'); is it the "
                     f"original's training log?")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    pack_parser = commands.add_parser("pack", help="write the data the check needs (before the machine)")
    pack_parser.add_argument("--data-dir", required=True, help="where CIFAR-10 and CelebA are (./data)")
    pack_parser.add_argument("--logs", required=True, help="the original's training_logs folder")
    pack_parser.add_argument("--out", default=os.path.join("data", "gpu_check"))
    run_parser = commands.add_parser("run", help="run the check (on the machine)")
    run_parser.add_argument("--budget", type=float, default=540,
                            help="seconds this command may take; leave the run's limit a margin")
    run_parser.add_argument("--phases", default="train,compare,time",
                            help="comma-separated, in order: " + ", ".join(PHASES))
    run_parser.add_argument("--data", default=os.path.join("data", "gpu_check"), help="what pack wrote")
    run_parser.add_argument("--logs", default=None, help="the original's logs (default DATA/upstream)")
    run_parser.add_argument("--work", default=os.path.join("runs", "gpu_check"),
                            help="state and runs, kept between commands")
    run_parser.add_argument("--out", default=None, help="results (default $OUT, else WORK/out)")
    run_parser.add_argument("--serial", action="store_true",
                            help="train one dataset after the other instead of side by side")
    run_parser.add_argument("--train-compile", action="store_true",
                            help="train with --compile (keep it for the whole run)")
    run_parser.add_argument("--slice", type=int, default=None,
                            help="at most this many micro-batches per training process and command")
    run_parser.add_argument("--time-reserve", type=float, default=0,
                            help="seconds of the budget that training leaves for timing")
    run_parser.add_argument("--rate-guess", type=float, default=None,
                            help="seconds per micro-batch to plan with until one is measured")
    run_parser.add_argument("--time-modes", nargs="+", choices=MODES, default=list(MODES))
    run_parser.add_argument("--time-precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    run_parser.add_argument("--no-profile", action="store_true", help="time only; no kernel-busy fraction")
    for sub in (pack_parser, run_parser):
        sub.add_argument("--tiny", action="store_true", help="tiny runs and models, for a CPU test")
        sub.add_argument("--datasets", nargs="+", choices=tuple(CHECKS["published"]),
                         default=list(CHECKS["published"]))
    args = parser.parse_args(argv)
    if args.command == "pack":
        return pack_command(args)
    args.phases = [p for p in args.phases.split(",") if p]
    unknown = [p for p in args.phases if p not in PHASES]
    if unknown or not args.phases:
        parser.error(f"--phases takes {', '.join(PHASES)}, got {','.join(unknown) or 'none'}")
    if args.budget <= FINAL_RESERVE:
        parser.error(f"--budget must be more than {FINAL_RESERVE} s, got {args.budget}")
    if args.slice is not None and args.slice < 1:
        parser.error(f"--slice must be at least 1, got {args.slice}")
    try:
        run(Settings(args))
    except CheckError as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
