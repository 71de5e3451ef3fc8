"""The benchmark's memory measures (vq_draw/tools/bench.py): the peak of one measure in a
fresh process (RSS on the CPU, allocated memory on a GPU), and the table of a training step's
peak over stage counts, with and without gradient checkpointing.
"""

import json
import os
import subprocess
import sys
import time

import torch

from .bench_speed import _run_measure, build_models, settings_for

def _rss_mb(field="VmRSS"):
    """The current (VmRSS) or peak (VmHWM) resident set size in MB, from Linux /proc."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise OSError(f"no {field} in /proc/self/status")


def _reset_peak_rss():
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0); False if impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_memory_here(spec):
    """Peak memory of one measure run once in this process (call in a fresh process).

    :param spec: dict with dataset, options, stages, segment, measure, impl ("reference" or
                 "optimized"), train_batch, batch, device, channels_last, threads.
    :return: dict with "peak_mb" (the process's peak RSS, or CUDA max allocated) and
             "working_mb" (the peak above what was held before the run: the model, its
             gradients, Adam's state and the inputs, and on the CPU the Python runtime).
    """
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = spec["device"]
    is_ref = spec["impl"] == "reference"
    model, reference = build_models(spec["dataset"], spec["options"], spec["stages"], spec["segment"],
                                    device, channels_last=spec["channels_last"],
                                    checkpoint=spec.get("checkpoint"),
                                    which=(spec["impl"],))
    fn, optimizer = _run_measure(spec["measure"], model, reference, spec, device, is_ref)
    if optimizer is not None:
        # Allocate gradients and Adam's state up front (a zero step leaves the weights as
        # they are), so that "working" memory is what the step itself needs.
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        optimizer.step()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"peak_mb": peak / 2 ** 20, "working_mb": (peak - before) / 2 ** 20}
    if not _reset_peak_rss():
        raise OSError("cannot reset the peak RSS (/proc/self/clear_refs); memory is measured on Linux")
    before = _rss_mb()
    fn()
    peak = _rss_mb("VmHWM")
    return {"peak_mb": peak, "working_mb": peak - before}


def measure_memory(spec, timeout=3600):
    """``measure_memory_here(spec)`` in a fresh subprocess, so that its peak RSS is clean."""
    cmd = [sys.executable, "-m", "vq_draw.tools.bench", "--memory-child", json.dumps(spec)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if out.returncode != 0:
        lines = (out.stderr.strip() or "no output").splitlines()
        raise RuntimeError(f"memory measurement {spec['measure']}/{spec['impl']} failed: {lines[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_table(dataset="cifar10", stages_list=(10, 25, 100), batch_size=32, device="cpu",
                 threads=None, options=64, checkpointing=(False, True), log=print):
    """Peak memory of one optimized training step at each stage count, with and without
    gradient checkpointing (a fresh subprocess per measurement on the CPU).

    :return: list of dicts with stages, grad_checkpoint, peak_mb, working_mb and seconds.
    """
    rows = []
    for stages in stages_list:
        for ckpt in checkpointing:
            measure = "train_ckpt" if ckpt else "train"
            s = settings_for(dataset, device, stages=stages, options=options)
            spec = dict(s, train_batch=batch_size, measure=measure, impl="optimized", device=str(device),
                        channels_last=True, threads=threads or torch.get_num_threads())
            start = time.perf_counter()
            mem = measure_memory(spec, timeout=24 * 3600)
            row = {"dataset": dataset, "stages": stages, "segment": s["segment"], "batch": batch_size,
                   "grad_checkpoint": measure == "train_ckpt", **mem,
                   "seconds": time.perf_counter() - start}
            log(f"{dataset} stages {stages:4d} batch {batch_size} checkpointing "
                f"{'on ' if row['grad_checkpoint'] else 'off'} peak {mem['peak_mb']:8.0f} MB "
                f"working {mem['working_mb']:8.0f} MB ({row['seconds']:.0f} s)")
            rows.append(row)
    return rows
