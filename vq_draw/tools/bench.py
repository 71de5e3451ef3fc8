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
"""

import argparse
import copy
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import torch

from ..checkpoint import CheckpointError, load_model, read_checkpoint
from ..config import DATASETS, create_model, default_segment
from ..data import DataError, load_dataset
from ..nn import MaskedConv
from ..train import ADAM_BETAS, ADAM_EPS
# The plain implementation (reference.py); "reference" below names the model copy it runs on.
from .. import reference as plain

ARCHITECTURES = ("mnist", "svhn", "cifar10", "celeba")

# Settings per architecture: (device kind, quick) -> stages, segment, train batch, coding batch.
# None means the published value. On the CPU the big models run one segment of a few stages
# (a 100-stage CIFAR step at batch 32 takes minutes here); the network per stage is unchanged.
SETTINGS = {
    "cpu": {
        "mnist": dict(stages=None, segment=None, train_batch=32, batch=1000),
        "svhn": dict(stages=5, segment=5, train_batch=32, batch=200),
        "cifar10": dict(stages=4, segment=4, train_batch=32, batch=100),
        "celeba": dict(stages=4, segment=4, train_batch=32, batch=50),
    },
    "cuda": {
        "mnist": dict(stages=None, segment=None, train_batch=32, batch=1000),
        "svhn": dict(stages=None, segment=None, train_batch=32, batch=1000),
        "cifar10": dict(stages=None, segment=None, train_batch=32, batch=250),
        "celeba": dict(stages=None, segment=None, train_batch=32, batch=100),
    },
    "quick": {name: dict(stages=2, segment=1 if name != "mnist" else None, train_batch=2, batch=4)
              for name in ARCHITECTURES},
}
MEASURES = ("train", "train_ckpt", "encode", "decode")


# ---------------------------------------------------------------------- models and steps


def build_models(dataset, options=64, stages=None, segment=None, device="cpu", seed=0,
                 channels_last=True, which=("optimized", "reference"), checkpoint=None):
    """(optimized, reference): two copies of one freshly initialized model, same weights.

    With ``checkpoint`` (a path) both start from its trained weights instead; its
    architecture wins over ``options``, ``stages`` and ``segment``.

    The reference applies its masks unfolded and runs in the default NCHW layout; the
    optimized copy runs its activations in channels_last when ``channels_last``. A copy
    not named in ``which`` is None.
    """
    torch.manual_seed(seed)
    if checkpoint:
        model = load_model(checkpoint).train()
        if model.config.get("dataset") != dataset:
            raise ValueError(f"{checkpoint} is a {model.config.get('dataset')} model, not {dataset}")
    else:
        model = create_model(dataset, options=options, stages=stages, segment=segment)
    reference = None
    if "reference" in which:
        reference = model if "optimized" not in which else copy.deepcopy(model)
        for m in reference.modules():
            if isinstance(m, MaskedConv):
                m.fold_mask = False
        reference.channels_last = False
        reference.to(device)
    if "optimized" not in which:
        return None, reference
    model.channels_last = channels_last
    return model.to(device), reference


def make_optimizer(model):
    return torch.optim.Adam(model.parameters(), lr=1e-3, betas=ADAM_BETAS, eps=ADAM_EPS)


def train_step(model, optimizer, x, reference=False, grad_checkpoint=False):
    """One training step (forward, backward, Adam); returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    if reference:
        loss = plain.training_loss(model, x, grad_checkpoint)[0]
    else:
        model.grad_checkpoint = grad_checkpoint
        loss = model(x)["loss"]
    loss.backward()
    optimizer.step()
    return loss.detach()


def check_agreement(model, reference, x, codes=None):
    """Run both implementations once on the same inputs and compare them.

    Compares the training loss, the per-option losses, the gradients, the encoder's codes
    and reconstruction and the decoding of ``codes`` (default: the encoder's).
    :return: dict of max abs differences and ``codes_equal`` (bool).
    """
    model.train()
    reference.train()
    terms = model(x)
    model.zero_grad(set_to_none=True)
    terms["loss"].backward()
    loss, ref_codes, ref_losses = plain.training_loss(reference, x)
    reference.zero_grad(set_to_none=True)
    loss.backward()
    _, _, losses = model.run(x)
    grads = [(a.grad, b.grad) for a, b in zip(model.parameters(), reference.parameters())
             if a is not None and b is not None]
    # Relative to the whole gradient: a per-parameter ratio blows up for parameters whose
    # exact gradient is zero (a bias right before a GroupNorm), where only rounding remains.
    grad_diff = (sum((a - b).pow(2).sum() for a, b in grads).sqrt()
                 / sum(b.pow(2).sum() for _, b in grads).sqrt().clamp_min(1e-30)).item()
    model.eval()
    reference.eval()
    enc_codes, enc_recons = model.encode(x, return_all=True)
    ref_enc_codes, ref_recon = plain.encode(reference, x)
    codes = enc_codes if codes is None else codes
    decoded = model.decode(codes)
    ref_decoded = plain.decode(reference, codes)
    model.train()
    reference.train()
    return {
        "codes_equal": bool(torch.equal(terms["codes"], ref_codes) and torch.equal(enc_codes, ref_enc_codes)),
        "loss": (terms["loss"] - loss).abs().item(),
        "losses": (losses - ref_losses).abs().max().item(),
        "grad_rel": grad_diff,
        "encode_recon": (enc_recons[:, -1] - ref_recon).abs().max().item(),
        "decode": (decoded - ref_decoded).abs().max().item(),
        "decode_is_reconstruct": bool(torch.equal(model.decode(enc_codes), enc_recons[:, -1])),
    }


# ---------------------------------------------------------------------- timing


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fns, repeats, device, clock="wall"):
    """The time of each function in each of ``repeats`` interleaved rounds (after one warm-up):
    a list of ``repeats`` seconds per function.

    :param clock: "wall", or "cpu" for this process's CPU time, which on a machine shared
                  with other jobs counts only the time the work itself ran (use it with one
                  thread: with more, threads waiting for each other count too).
    """
    now = time.process_time if clock == "cpu" else time.perf_counter
    times = [[] for _ in fns]
    for fn in fns:
        fn()
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            _sync(device)
            start = now()
            fn()
            _sync(device)
            times[i].append(now() - start)
    return times


def count_gflop(fn):
    """GFLOP of the convolutions and matrix products that one call of ``fn`` runs, forward
    and backward (``torch.utils.flop_counter``; elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def gemm_peak(device, repeats=3, clock="wall", size=2048):
    """GFLOP/s of a large float32 matrix product: what this device sustains at best."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=gen).to(device) for _ in range(2))
    times = timed([lambda: torch.mm(a, b)], repeats, device, clock)[0]
    return 2 * size ** 3 / min(times) / 1e9


# Train + test images of each dataset, for "how long would encoding all of them take".
DATASET_IMAGES = {"mnist": 70000, "svhn": 99289, "cifar10": 60000, "celeba": 202599}


_TEST_SETS = {}


def _images(dataset, n, device, seed=1, data_dir=None):
    """n images [n x C x H x W] in [0, 1]: uniform noise, or the first n test images of
    ``data_dir`` (repeated when the test set is smaller)."""
    if data_dir:
        key = (dataset, data_dir)
        if key not in _TEST_SETS:
            _TEST_SETS[key] = load_dataset(dataset, "test", data_dir, download=False)
        images = _TEST_SETS[key]
        index = torch.arange(n) % len(images)
        if hasattr(images, "batch"):
            batch = images.batch(index)
        else:  # a dataset of image files: items are images or (image, label)
            items = [images[int(i)] for i in index]
            batch = torch.stack([item[0] if isinstance(item, (tuple, list)) else item
                                 for item in items])
        return batch.to(device)
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, *DATASETS[dataset]["shape"], generator=gen).to(device)


def _codes(model, n, device, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.options, (n, model.num_stages), generator=gen).to(device)


def _run_measure(measure, model, reference, settings, device, impl_is_reference):
    """A callable running one measure with one implementation (for timing and memory)."""
    target = reference if impl_is_reference else model
    if measure in ("train", "train_ckpt"):
        x = target.normalize(_images(settings["dataset"], settings["train_batch"], device,
                                     data_dir=settings.get("data_dir")))
        optimizer = make_optimizer(target)
        target.train()
        ckpt = measure == "train_ckpt"
        return lambda: train_step(target, optimizer, x, impl_is_reference, ckpt), optimizer
    target.eval()
    if measure == "encode":
        x = target.normalize(_images(settings["dataset"], settings["batch"], device,
                                     data_dir=settings.get("data_dir")))
        if impl_is_reference:
            return lambda: plain.encode(target, x), None
        return lambda: target.encode(x), None
    codes = _codes(target, settings["batch"], device)
    if impl_is_reference:
        return lambda: plain.decode(target, codes), None
    return lambda: target.decode(codes), None


# ---------------------------------------------------------------------- memory


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


# ---------------------------------------------------------------------- the benchmark


def settings_for(dataset, device, quick=False, stages=None, options=None, batch=None,
                 checkpoint=None, data_dir=None):
    kind = "quick" if quick else ("cuda" if torch.device(device).type == "cuda" else "cpu")
    s = dict(SETTINGS[kind][dataset], dataset=dataset, options=4 if quick else 64,
             checkpoint=checkpoint, data_dir=data_dir)
    if checkpoint:  # its architecture wins, as in build_models
        config = read_checkpoint(checkpoint)["config"]
        s.update(stages=config["stages"], segment=config.get("segment"), options=config["options"])
    else:
        if stages is not None:
            s["stages"], s["segment"] = stages, default_segment(dataset, stages)
        if options is not None:
            s["options"] = options
    if batch is not None:
        s["batch"] = batch
    s["stages_run"] = s["stages"] or DATASETS[dataset]["stages"]
    return s


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


# ---------------------------------------------------------------------- the loop and memory tables


def loop_overhead(dataset="mnist", data_dir=None, steps=20, batch_size=32, log_interval=50,
                  save_interval=250, eval_interval=1000, eval_size=1000, options=64, stages=None,
                  device="cpu", seed=0):
    """The training loop's work around the step, amortized at the given intervals.

    Runs ``TrainLoop`` for ``steps`` steps (the last one logs, evaluates ``eval_size`` test
    images and saves, as the end of a run does) and times each part: fetching the batch,
    the step itself, a log line, an evaluation and a save (checkpoint, images, loss plot).
    Data from ``data_dir`` (``data.load_dataset``), or random uint8 images when None.

    :return: dict of seconds ("step", "data" per step; "log", "eval", "save" per event;
             "other" per step) and "overhead", the loop's amortized time per step over the
             step time.
    """
    import tempfile

    from ..data import ArrayDataset, load_dataset
    from ..train import TrainLoop

    if data_dir is None:
        gen = torch.Generator().manual_seed(seed)
        shape = DATASETS[dataset]["shape"]
        train = ArrayDataset(torch.randint(0, 256, (4096, *shape), dtype=torch.uint8, generator=gen))
        test = ArrayDataset(torch.randint(0, 256, (max(eval_size, 1), *shape), dtype=torch.uint8,
                                          generator=gen))
    else:
        train, test = load_dataset(dataset, "train", data_dir), load_dataset(dataset, "test", data_dir)
    torch.manual_seed(seed)
    model = create_model(dataset, options=options, stages=stages)  # the default segment
    spent = {"data": 0.0, "update": 0.0, "log": 0.0, "eval": 0.0, "save": 0.0}
    counts = dict.fromkeys(spent, 0)

    def timer(name, fn):
        def wrapped(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - start
                counts[name] += 1
        return wrapped

    class TimedBatches:
        def __init__(self, batches):
            self.batches = batches

        def __next__(self):
            start = time.perf_counter()
            try:
                return next(self.batches)
            finally:
                spent["data"] += time.perf_counter() - start
                counts["data"] += 1

    with tempfile.TemporaryDirectory() as run_dir:
        loop = TrainLoop(model=model, train_data=train, test_data=test, run_dir=run_dir,
                         batch_size=batch_size, step_limit=steps, save_interval=save_interval,
                         eval_interval=eval_interval, eval_size=eval_size, log_interval=log_interval,
                         device=device, seed=seed, final_eval=False, quiet=True, progress=False)
        update = timer("update", loop._update)
        loop._update = lambda batches: update(TimedBatches(batches))
        loop._log_line = timer("log", loop._log_line)
        loop._evaluate = timer("eval", loop._evaluate)
        loop.save = timer("save", loop.save)
        start = time.perf_counter()
        loop.run()
        total = time.perf_counter() - start
    step = (spent["update"] - spent["data"]) / steps
    per_event = {k: spent[k] / max(counts[k], 1) for k in ("log", "eval", "save")}
    other = (total - sum(spent[k] for k in ("update", "log", "eval", "save"))) / steps
    amortized = (spent["data"] / steps + per_event["log"] / log_interval + per_event["eval"] / eval_interval
                 + per_event["save"] / save_interval + other)
    return {"step": step, "data": spent["data"] / steps, **per_event, "other": other,
            "overhead": amortized / step, "steps": steps, "batch_size": batch_size,
            "intervals": dict(log=log_interval, save=save_interval, eval=eval_interval,
                              eval_size=eval_size), "data_dir": data_dir}


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
            checkpoints[read_checkpoint(path)["config"]["dataset"]] = path
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
