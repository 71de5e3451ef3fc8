"""Benchmark: training, encoding and decoding against a straightforward reference.

``python -m vq_draw.tools.bench [--datasets mnist cifar10] [--repeats 3] [--json OUT] [--quick]``

For every architecture it times a training step (forward, backward and Adam) with
and without gradient checkpointing, and greedy encoding and decoding in images/s,
and measures peak memory (on the CPU the peak RSS of a fresh subprocess per
measurement; on a GPU ``torch.cuda.max_memory_allocated``). Each measure is made
twice, in the same process and alternately, on two copies of one model with the
same weights:

- **optimized**: the library as it is used (``VQDraw.training_losses``, ``encode``,
  ``decode``): channel masks folded into the convolution weights, the proposal losses
  without materializing the proposals (``losses.mse_options``), decoding that computes
  only the chosen option (``OptionConv.select``), channels_last activations;
- **reference**: the same math written straightforwardly (``vq_draw/reference.py``): all
  K proposals materialized, per-option MSE by broadcasting, the chosen proposal picked
  by advanced indexing, decoding through the full network, masks applied as a separate
  multiply (``MaskedConv.fold_mask = False``), default NCHW layout.

Ratios are reference time / optimized time (higher is better) and are robust to a
shared machine because both run interleaved; absolute times are the best of
``--repeats``. The big architectures default to fewer stages and smaller batches on
the CPU: the per-stage network is the same, so images/s scale with 1 / stages.

This module is the command line and the table; the measures live beside it, one module per
kind: bench_speed.py (the timings and FLOPs), bench_memory.py (peak memory) and
bench_loop.py (the training loop's work around the step).
"""

import argparse
import datetime
import json
import os
import platform
import sys

import torch

from ..checkpoint import CheckpointError
from ..data import DataError
from ..loading import read_model_file
from .bench_loop import loop_overhead
from .bench_memory import measure_memory, measure_memory_here, memory_table
# The measures, also for tools/profile_step.py and the tests (bench.build_models, ...).
from .bench_speed import (ARCHITECTURES, DATASET_IMAGES, MEASURES, SETTINGS, _images, _run_measure,
                          build_models, check_agreement, count_gflop, gemm_peak, make_optimizer,
                          settings_for, timed, train_step)

__all__ = ["ARCHITECTURES", "MEASURES", "SETTINGS", "bench_architecture", "build_models",
           "count_gflop", "describe_device", "gemm_peak", "loop_overhead", "main", "make_optimizer",
           "measure_memory", "memory_table", "settings_for", "timed", "train_step"]


def bench_architecture(dataset, device="cpu", repeats=3, quick=False, memory=True, stages=None,
                       options=None, batch=None, channels_last=True, measures=MEASURES, clock="wall",
                       log=print, checkpoint=None, data_dir=None, peak=None):
    """Time (and measure memory of) every measure for one architecture.

    :param checkpoint: start both implementations from these trained weights.
    :param data_dir: time on real test images instead of noise.
    :param peak: GEMM GFLOP/s (``gemm_peak``): also count each measure's FLOPs and report the
                 rate achieved and the time the same FLOPs would take at that peak.
    :return: (settings dict, list of result dicts, agreement dict).
    """
    if data_dir:
        try:
            _images(dataset, 1, "cpu", data_dir=data_dir)
        except DataError as exc:
            log(f"{dataset}: no test images in {data_dir}, timing on noise ({str(exc).splitlines()[0][:80]}...)")
            data_dir = None
    s = settings_for(dataset, device, quick, stages, options, batch, checkpoint, data_dir)
    model, reference = build_models(dataset, s["options"], s["stages"], s["segment"], device,
                                    channels_last=channels_last, checkpoint=checkpoint)
    x = model.normalize(_images(dataset, min(4, s["train_batch"]), device, data_dir=data_dir))
    agreement = check_agreement(model, reference, x)
    # The training step runs stage 1 once per distinct first choice (as the encoder does), so
    # its time depends on how spread the choices are: noise on a fresh model picks one option.
    train_x = model.normalize(_images(dataset, s["train_batch"], device, data_dir=data_dir))
    with torch.no_grad():
        first = model.eval().encode(train_x, 1)[:, 0]
    model.train()
    agreement["distinct_first_choices"] = f"{first.unique().numel()}/{len(first)}"
    log(f"{dataset}: agreement with the reference {agreement}")
    results = []
    for measure in measures:
        opt_fn, _ = _run_measure(measure, model, reference, s, device, False)
        ref_fn, _ = _run_measure(measure, model, reference, s, device, True)
        ref_times, opt_times = timed([ref_fn, opt_fn], repeats, device, clock)
        ref_time, opt_time = min(ref_times), min(opt_times)
        batch = s["train_batch"] if measure.startswith("train") else s["batch"]
        # The best times give "ratio". On a shared or virtual machine whole runs speed up and
        # slow down; the two implementations run back to back in each round, so the median
        # of the per-round ratios cancels such drift and is reported beside it.
        round_ratios = sorted(r / o for r, o in zip(ref_times, opt_times))
        row = {"dataset": dataset, "measure": measure, "batch": batch, "stages": s["stages_run"],
               "options": s["options"], "reference_s": ref_time, "optimized_s": opt_time,
               "ratio": ref_time / opt_time, "ratio_median": _median(round_ratios),
               "ratio_range": [round_ratios[0], round_ratios[-1]],
               "reference_times_s": ref_times, "optimized_times_s": opt_times}
        if not measure.startswith("train"):
            row["reference_images_per_s"] = batch / ref_time
            row["optimized_images_per_s"] = batch / opt_time
        if peak:
            for impl, fn, seconds in (("reference", ref_fn, ref_time), ("optimized", opt_fn, opt_time)):
                gflop = count_gflop(fn)
                row[f"{impl}_gflop"] = gflop
                row[f"{impl}_gflop_per_s"] = gflop / seconds
                row[f"{impl}_peak_fraction"] = gflop / seconds / peak
        if memory:
            for impl in ("reference", "optimized"):
                spec = dict(s, measure=measure, impl=impl, device=str(device),
                            channels_last=channels_last, threads=torch.get_num_threads())
                mem = measure_memory(spec)
                row[f"{impl}_peak_mb"] = mem["peak_mb"]
                row[f"{impl}_working_mb"] = mem["working_mb"]
        results.append(row)
        log(format_row(row))
        if peak:
            log(format_flops(row, peak))
    return s, results, agreement


def format_flops(row, peak):
    """The FLOP line under a result row: work, rate, share of the GEMM peak, time at the peak."""
    per = "step" if row["measure"].startswith("train") else "image"
    scale = 1 if per == "step" else 1 / row["batch"]
    parts = []
    for impl in ("reference", "optimized"):
        gflop = row[f"{impl}_gflop"]
        parts.append(f"{impl} {gflop * scale:.3f} GFLOP/{per} at {row[f'{impl}_gflop_per_s']:.1f} "
                     f"GFLOP/s ({100 * row[f'{impl}_peak_fraction']:.0f} % of the peak)")
    text = "    " + "; ".join(parts)
    optimized = row["optimized_gflop"]
    if per == "step":
        text += f"; at the peak the optimized step would take {optimized / peak:.3f} s"
    else:
        count = DATASET_IMAGES[row["dataset"]]
        rate = row["batch"] / row["optimized_s"]
        text += (f"; all {count:,} {row['dataset']} images: {count / rate:.0f} s at this rate, "
                 f"{optimized * scale * count / peak:.0f} s at the peak")
    return text


def _median(values):
    values = sorted(values)
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def format_row(row):
    unit = "s/step" if row["measure"].startswith("train") else "img/s"
    if unit == "img/s":
        ref, opt = f"{row['reference_images_per_s']:.1f}", f"{row['optimized_images_per_s']:.1f}"
    else:
        ref, opt = f"{row['reference_s']:.3f}", f"{row['optimized_s']:.3f}"
    text = (f"{row['dataset']:8s} {row['measure']:10s} {row['stages']:6d} {row['batch']:6d} "
            f"{ref:>10s} {opt:>10s} {unit:6s} {row['ratio']:6.2f}x {row['ratio_median']:7.2f}x")
    if "reference_peak_mb" in row:
        text += (f" {row['reference_peak_mb']:9.0f} {row['optimized_peak_mb']:9.0f}"
                 f" {row['reference_working_mb']:9.0f} {row['optimized_working_mb']:9.0f}")
    return text


HEADER = (f"{'dataset':8s} {'measure':10s} {'stages':>6s} {'batch':>6s} {'reference':>10s} "
          f"{'optimized':>10s} {'unit':6s} {'ratio':>7s} {'median':>8s}")
MEMORY_HEADER = f" {'ref peak':>9s} {'opt peak':>9s} {'ref work':>9s} {'opt work':>9s} (MB)"


def describe_device(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, " \
           f"{torch.get_num_threads()} torch threads"


def main(argv=None):
    parser = argparse.ArgumentParser(description="Time training, encoding and decoding against a "
                                                 "straightforward reference of the same math.")
    parser.add_argument("--datasets", nargs="+", default=list(ARCHITECTURES), choices=ARCHITECTURES)
    parser.add_argument("--measures", nargs="+", default=list(MEASURES), choices=MEASURES)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (best is kept)")
    parser.add_argument("--stages", type=int, default=None,
                        help="stages for every architecture (default: per device, see SETTINGS)")
    parser.add_argument("--options", type=int, default=None, help="K (default 64; 4 with --quick)")
    parser.add_argument("--batch", type=int, default=None,
                        help="encode/decode batch for every architecture (default: per device)")
    parser.add_argument("--quick", action="store_true", help="tiny settings: a smoke test in seconds")
    parser.add_argument("--no-memory", dest="memory", action="store_false",
                        help="skip the peak-memory measurements (one subprocess each on the CPU)")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: time by this process's CPU time, robust on a CPU shared with other "
                             "jobs (use with --threads 1); always wall on a GPU")
    parser.add_argument("--json", default=None, help="write the results to this file")
    parser.add_argument("--loop", action="store_true",
                        help="instead: time the training loop around the step (MNIST-style run)")
    parser.add_argument("--loop-steps", type=int, default=20)
    parser.add_argument("--data-dir", default=None,
                        help="time on real test images from here (default: uniform noise)")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="PATH",
                        help="start the benchmark of this checkpoint's dataset from its trained "
                             "weights (repeatable; e.g. pretrained/mnist_model.pt)")
    parser.add_argument("--memory-table", nargs="+", type=int, default=None, metavar="STAGES",
                        help="instead: peak memory of one training step of the first --datasets "
                             "entry at these stage counts, with and without checkpointing")
    parser.add_argument("--train-batch", type=int, default=32, help="batch for --memory-table")
    parser.add_argument("--checkpointing", choices=("both", "on", "off"), default="both",
                        help="--memory-table with, without or with and without checkpointing")
    parser.add_argument("--flops", action="store_true",
                        help="also count each measure's FLOPs and compare the rate with this "
                             "device's float32 GEMM peak (measured first)")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        print(json.dumps(measure_memory_here(json.loads(args.memory_child))))
        return
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.stages is not None and args.stages < 1:
        parser.error(f"--stages must be at least 1, got {args.stages}")
    if args.batch is not None and args.batch < 1:
        parser.error(f"--batch must be at least 1, got {args.batch}")
    if args.options is not None and args.options < 2:
        parser.error(f"--options must be at least 2, got {args.options}")
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            sys.exit("error: --device cuda but no CUDA GPU is available; use --device cpu")
        torch.backends.cudnn.benchmark = True
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = "wall" if args.device.startswith("cuda") else args.clock
    checkpoints = {}
    for path in args.checkpoint:
        try:
            checkpoints[read_model_file(path)["config"]["dataset"]] = path
        except CheckpointError as exc:  # a missing or foreign file: one line, as everywhere else
            sys.exit(f"error: --checkpoint {path}: {exc}")
    info = {"clock": clock, "date": datetime.date.today().isoformat(), "device": describe_device(args.device),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": args.repeats,
            "quick": args.quick, "channels_last": args.channels_last, "command": " ".join(sys.argv)}
    if hasattr(os, "getloadavg"):
        info["load_average_start"] = os.getloadavg()
    if args.loop:
        dataset = args.datasets[0]
        result = loop_overhead(dataset, args.data_dir, args.loop_steps, options=args.options or 64,
                               stages=args.stages, device=args.device)
        print(f"training loop around the step, {dataset}, batch {result['batch_size']}, "
              f"{result['steps']} steps on {info['device']}:")
        print(f"  step {result['step']:.3f} s; per step: data {result['data'] * 1e3:.2f} ms, other "
              f"{result['other'] * 1e3:.2f} ms; per event: log {result['log'] * 1e3:.1f} ms, eval "
              f"({result['intervals']['eval_size']} images) {result['eval']:.2f} s, save "
              f"{result['save']:.2f} s")
        iv = result["intervals"]
        print(f"  amortized (log every {iv['log']}, eval every {iv['eval']}, save every {iv['save']} "
              f"steps): {100 * result['overhead']:.2f} % of the step time")
        _write_json(args.json, {"info": info, "loop": result})
        return
    if args.memory_table:
        dataset = args.datasets[0]
        modes = {"both": (False, True), "on": (True,), "off": (False,)}[args.checkpointing]
        rows = memory_table(dataset, args.memory_table, args.train_batch, args.device, args.threads,
                            args.options or 64, modes, log=lambda line: print(line, flush=True))
        _write_json(args.json, {"info": info, "memory_table": rows})
        return
    print(f"vq_draw.tools.bench on {info['device']}, torch {info['torch']}; ratio = reference time / "
          f"optimized time, best of {args.repeats} each; median = median over the {args.repeats} "
          f"back-to-back rounds of their ratio; {clock} clock")
    peak = None
    if args.flops:
        peak = gemm_peak(args.device, args.repeats, clock)
        info["gemm_peak_gflop_per_s"] = peak
        print(f"float32 GEMM peak (2048 x 2048 x 2048 matrix product, best of {args.repeats}): "
              f"{peak:.1f} GFLOP/s")
    print(HEADER + (MEMORY_HEADER if args.memory else ""))
    results, settings, agreement = [], {}, {}
    for dataset in args.datasets:
        s, rows, agree = bench_architecture(dataset, args.device, args.repeats, args.quick, args.memory,
                                            args.stages, args.options, args.batch, args.channels_last,
                                            args.measures, clock,
                                            log=lambda line: print(line, flush=True),
                                            checkpoint=checkpoints.get(dataset),
                                            data_dir=args.data_dir, peak=peak)
        settings[dataset], agreement[dataset] = s, agree
        results.extend(rows)
    if hasattr(os, "getloadavg"):
        info["load_average_end"] = os.getloadavg()
    _write_json(args.json, {"info": info, "settings": settings, "agreement": agreement,
                            "results": results})


def _write_json(path, data):
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=2)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
