"""Time the micro-batches of a real training command, and profile one: seconds per step in
the training loop itself, and the fraction of a step that the GPU's kernels are busy.

``python -m vq_draw.tools.step_probe --json probe.json [--warmup 2 --steps 3 --no-profile] --
train_cifar.py --data-dir DIR --run-dir runs/probe --step-interval 1 [--compile] [--bf16]``

The training command runs inside this process, unchanged, so that every flag it has (``--compile``,
``--bf16``) is timed as training runs it. A global optimizer hook (``torch.optim``) marks the end of
each update, after waiting for the GPU; with ``--step-interval 1`` an update is one micro-batch
(forward, backward, Adam). The first ``--warmup`` updates are not timed (cuDNN's autotuning and
compilation happen there), the next ``--steps`` are, and one more runs under ``torch.profiler``.
Then the probe stops the command without its checkpoint; its ``--run-dir`` is left for the caller
to delete.

Kernel-busy fraction: the union of the intervals in which a CUDA kernel ran, over the wall time
of the profiled step (the profiler adds some time per launch, so this is a lower bound; also given
against the mean unprofiled step). Copies and memsets are counted apart; on a CPU both are null.
"""

import argparse
import json
import os
import runpy
import statistics
import sys
import time

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook


class ProbeDone(BaseException):
    """Raised from the optimizer hook to leave the training command (a BaseException, so that
    the command's own error handling lets it through)."""


def busy_seconds(intervals):
    """Seconds covered by the union of ``intervals``, [(start, end)] in microseconds."""
    total, reach = 0.0, None
    for start, end in sorted(intervals):
        if reach is None or start > reach:
            total += end - start
            reach = end
        elif end > reach:
            total += end - reach
            reach = end
    return total / 1e6


def device_activity(events):
    """{kind: [(start, end) us]} of the GPU activity in profiler ``events``: "kernel", "memcpy",
    "memset" (a GPU-side annotation spans other work and is left out)."""
    from torch.autograd import DeviceType

    found = {"kernel": [], "memcpy": [], "memset": []}
    for event in events:
        if event.device_type != DeviceType.CUDA or getattr(event, "is_user_annotation", False):
            continue
        activity = str(getattr(event, "activity_type", None) or "").lower()
        name = event.name.lower()
        if "annotation" in activity:
            continue
        kind = ("memcpy" if "memcpy" in activity or name.startswith("memcpy") else
                "memset" if "memset" in activity or name.startswith("memset") else "kernel")
        found[kind].append((event.time_range.start, event.time_range.end))
    return found


class Probe:
    """The optimizer hook: times updates ``warmup`` + 1 .. ``warmup`` + ``steps`` and profiles the
    next one, then raises ``ProbeDone``."""

    def __init__(self, warmup, steps, profile):
        self.warmup, self.steps, self.profile = warmup, steps, profile
        self.marks = []  # perf_counter() at the end of each update
        self.profiler = None
        self.result = {}
        self.device = None

    def __call__(self, optimizer, args, kwargs):
        if self.device is None:
            self.device = optimizer.param_groups[0]["params"][0].device
        self._wait()
        self.marks.append(time.perf_counter())
        updates = len(self.marks)
        timed_end = self.warmup + self.steps
        if updates == timed_end and self.profile:
            self._start_profiler()
        elif updates >= timed_end:
            self._finish()
            raise ProbeDone

    def _wait(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _start_profiler(self):
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities = [torch.profiler.ProfilerActivity.CUDA]  # only the GPU: less overhead
            torch.cuda.reset_peak_memory_stats(self.device)
        self.profiler = torch.profiler.profile(activities=activities)
        self.profiler.__enter__()
        self.marks.append(time.perf_counter())  # the profiled step starts after the set-up

    def _finish(self):
        times = [b - a for a, b in zip(self.marks[self.warmup - 1:], self.marks[self.warmup:])]
        times = times[:self.steps]
        self.result.update(times=times, seconds=statistics.mean(times),
                           median=statistics.median(times))
        if self.device.type == "cuda":
            self.result["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if self.profiler is None:
            return
        self.profiler.__exit__(None, None, None)
        wall = self.marks[-1] - self.marks[-2]
        self.result["profiled_step_seconds"] = wall
        if self.device.type != "cuda":
            self.result.update(kernel_seconds=None, busy_fraction=None, busy_vs_unprofiled=None)
            return
        activity = device_activity(self.profiler.events())
        kernels = busy_seconds(activity["kernel"])
        self.result.update(kernel_seconds=kernels, kernels=len(activity["kernel"]),
                           memcpy_seconds=busy_seconds(activity["memcpy"]),
                           memset_seconds=busy_seconds(activity["memset"]),
                           busy_fraction=kernels / wall,
                           busy_vs_unprofiled=kernels / self.result["seconds"])


def run_command(script, script_args, probe):
    """Run the training script ``script`` with ``script_args`` in this process under ``probe``.

    :return: None when the probe finished, else a one-line reason the command ended first.
    """
    handle = register_optimizer_step_post_hook(probe)
    argv, path = sys.argv, list(sys.path)
    sys.argv = [script, *script_args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        runpy.run_path(script, run_name="__main__")
    except ProbeDone:
        return None
    except SystemExit as exc:
        code = exc.code
        return (f"the command exited ({code}) after {len(probe.marks)} updates"
                if not isinstance(code, str) else f"the command failed: {code}")
    finally:
        handle.remove()
        sys.argv, sys.path[:] = argv, path
    return f"the command ended after {len(probe.marks)} updates, before the probe's " \
           f"{probe.warmup + probe.steps + int(probe.profile)}; raise its --stop-at"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        sys.exit("error: give the training command after '--', e.g. -- train_cifar.py --data-dir DIR "
                 "--step-interval 1")
    split = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="write the result here")
    parser.add_argument("--warmup", type=int, default=2, help="updates before the timed ones")
    parser.add_argument("--steps", type=int, default=3, help="timed updates")
    parser.add_argument("--no-profile", dest="profile", action="store_false",
                        help="no profiled step (no kernel-busy fraction)")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1:]
    if args.warmup < 1 or args.steps < 1:
        parser.error(f"--warmup and --steps must be at least 1, got {args.warmup} and {args.steps}")
    if not command or not os.path.isfile(command[0]):
        sys.exit(f"error: {command[0] if command else 'nothing'} after '--' is not a training "
                 f"script file")
    probe = Probe(args.warmup, args.steps, args.profile)
    started = time.time()
    failure = run_command(command[0], command[1:], probe)
    result = {"command": " ".join(command), "torch": torch.__version__,
              "device": (torch.cuda.get_device_name(probe.device)
                         if probe.device is not None and probe.device.type == "cuda" else
                         str(probe.device)),
              "warmup": args.warmup, "steps": args.steps, "wall_seconds": time.time() - started,
              "error": failure} | probe.result
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    if failure:
        sys.exit(f"error: {failure}")
    busy = result.get("busy_fraction")
    print(f"{result['seconds']:.3f} s per micro-batch (median {result['median']:.3f}, "
          f"{args.steps} timed)" + (f"; kernels busy {busy:.1%} of a profiled step "
                                    f"({result['kernel_seconds']:.3f} s of "
                                    f"{result['profiled_step_seconds']:.3f} s)" if busy else ""),
          flush=True)


if __name__ == "__main__":
    main()
