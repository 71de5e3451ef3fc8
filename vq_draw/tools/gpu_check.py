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

This module holds the check's plan: its runs, its settings, the state kept between commands and
``run``, which takes the phases in turn. The training phase is in ``gpu_check_train.py``; the
comparison, the timings and the summary in ``gpu_check_results.py``.
"""

import argparse
import json
import os
import signal
import sys
import threading
import time

from .gpu_check_results import compare_phase, environment, time_phase, write_outputs
from .gpu_check_train import FINAL_RESERVE, CheckError, say, train_phase

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
PHASES = ("train", "compare", "time")
MODES = ("eager", "compile")
PRECISIONS = ("fp32", "bf16")

# Guesses until this check has measured its own (all seconds): published / tiny.
GUESSES = {
    "published": dict(rate=3.5, startup=40, save=20, compile=90, warmup=2, steps=3, workers=2),
    "tiny": dict(rate=2.0, startup=15, save=3, compile=120, warmup=1, steps=1, workers=0),
}


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
