"""Seconds per training micro-batch of one architecture, in float32 and bfloat16, and where
the time of one step goes.

``python -m vq_draw.tools.profile_step celeba [--stages 4 --segment 4] [--precision fp32 bf16]
[--steps 3] [--profile] [--device cuda] [--json OUT]``

A step here is what the training loop does per micro-batch: the forward pass through every
stage, the backward pass (with gradient checkpointing when the recipe uses it) and an Adam
update, on a batch of uniform noise at the published batch size. Each precision gets one
warm-up step (cuDNN picks its kernels there), then ``--steps`` timed steps; the mean is
reported. ``--profile`` runs one more step under ``torch.profiler`` and prints the operators
that took the most time (device time on a GPU, CPU time otherwise).

On the CPU a published 100-stage step takes minutes; ``--stages 4 --segment 4`` runs the same
per-stage network. Stages 0 and 1 are cheaper than the rest (the refiner runs on one image, then
once per distinct first choice), so estimate a longer run from the difference of two stage
counts, not by scaling one.

``--count-ops`` instead counts the kernels of one training micro-batch (``count_ops``): every
aten operator that reaches a kernel (views and bare allocations excluded; on a GPU each is a
launch), by phase: forward, recomputation (gradient checkpointing), backward and the optimizer.
It runs on the CPU, since the count does not depend on the device, for the setups of issue 32
(batch 8; MNIST published; CIFAR-10 and CelebA with 10 stages in one network and checkpointing),
and counts the step as a GPU runs it (``--plan cuda``, the default) or as the CPU does.
"""

import json
import sys
from collections import Counter
from contextlib import nullcontext

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..arguments import Parser, check_output, device, positive_int
from ..config import DATASETS
from ..train_step import StepPlan
from .bench import _images, build_models, describe_device, make_optimizer, timed, train_step

# The kernel counts of issue 32's setups in the original implementation (same counter, batch 8,
# the same weights and 8 real test images): forward, recomputation and backward, no optimizer.
ORIGINAL_OPS = {"mnist": 1265, "cifar10": 5191, "celeba": 5248}
# The setups: (stages, segment); the recipe says whether to checkpoint.
COUNT_SETUPS = {"mnist": (10, None), "svhn": (20, 5), "cifar10": (10, 10), "celeba": (10, 10)}
PHASES = ("forward", "recomputation", "backward", "optimizer")
# Operators that launch no kernel: allocations without initialization and ops that only make
# new tensor metadata (besides the ones the schema marks as views).
_NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
              "_unsafe_view", "_reshape_alias", "set_", "resize_", "lift_fresh",
              # host-side bookkeeping
              "promote_types", "_record_function_enter_new", "_record_function_exit"}


def launches_kernel(func):
    """Whether an aten operator reaches a kernel: not a view, not a bare allocation."""
    return not func.is_view and func._schema.name.split("::")[-1] not in _NO_KERNEL


class OpCounter(TorchDispatchMode):
    """Counts the aten operators that reach a kernel, per ``phase`` (set by the caller)."""

    def __init__(self):
        super().__init__()
        self.phase = "forward"
        self.counts = {phase: Counter() for phase in PHASES}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if launches_kernel(func):
            self.counts[self.phase][func._schema.name.split("::")[-1]] += 1
        return func(*args, **(kwargs or {}))

    def total(self, phases=PHASES):
        return sum(sum(self.counts[p].values()) for p in phases)


def count_ops(dataset, batch=8, stages=None, segment=None, data_dir=None, seed=0, device="cuda",
              model_setup=None, optimizer=None):
    """Kernel operators of one training micro-batch of ``dataset``: dict phase -> Counter of
    operator names, for the phases in ``PHASES``.

    :param stages, segment: default ``COUNT_SETUPS[dataset]``.
    :param data_dir: count on the first ``batch`` real test images from here (default noise).
    :param device: count the step as it runs there (``vq_draw.train_step.StepPlan.for_device``;
                   NCHW activations except on the CPU); the count itself runs on the CPU.
    :param model_setup: optional function called on the model before the count (e.g. to pick
                        a code path).
    :param optimizer: function model -> optimizer (default: the training loop's Adam).
    """
    default_stages, default_segment = COUNT_SETUPS[dataset]
    stages = stages or default_stages
    segment = segment if segment is not None else (default_segment if stages == default_stages
                                                   else None)
    model, _ = build_models(dataset, stages=stages, segment=segment, seed=seed, which=("optimized",))
    model.train()
    model.step_plan = StepPlan.for_device(device)
    model.channels_last = torch.device(device).type == "cpu"
    if model_setup is not None:
        model_setup(model)
    model.grad_checkpoint = DATASETS[dataset]["train"]["grad_checkpoint"]
    if optimizer is None:
        from ..train import make_adam
        optimizer = make_adam
    opt = optimizer(model)
    x = model.normalize(_images(dataset, batch, "cpu", data_dir=data_dir))
    counter = OpCounter()
    run_chunk = model._train_chunk

    def chunk(*args, **kwargs):
        # Called in the backward pass, this is gradient checkpointing's recomputation.
        if counter.phase != "backward":
            return run_chunk(*args, **kwargs)
        counter.phase = "recomputation"
        try:
            return run_chunk(*args, **kwargs)
        finally:
            counter.phase = "backward"

    model._train_chunk = chunk
    try:
        with counter:
            loss = model(x)["loss"]
            counter.phase = "backward"
            loss.backward()
        # The first step makes Adam's state; count a step like every later one.
        opt.step()
        with counter:
            counter.phase = "optimizer"
            opt.step()
    finally:
        del model._train_chunk
    return counter.counts


def format_counts(dataset, counts, top=0, plan="cuda"):
    """A table of one ``count_ops`` result against the original's count."""
    lines = [f"{dataset}: kernel operators of one training micro-batch ({plan} plan)"]
    for phase in PHASES:
        lines.append(f"  {phase:<14} {sum(counts[phase].values()):>7,}")
        for name, n in counts[phase].most_common(top):
            lines.append(f"      {name:<28} {n:>7,}")
    step = sum(sum(counts[p].values()) for p in PHASES[:3])
    line = f"  {'step (no opt.)':<14} {step:>7,}"
    if dataset in ORIGINAL_OPS:
        line += f"   original {ORIGINAL_OPS[dataset]:,}: {step / ORIGINAL_OPS[dataset]:.2f}x"
    lines.append(line)
    return "\n".join(lines)


def step_seconds(dataset, precision="fp32", steps=3, stages=None, segment=None, batch=None,
                 device="cpu", profile_rows=0, seed=0, channels_last=True, by_shape=False,
                 compile=False):
    """Mean seconds of a training step of ``dataset``'s published model (or ``stages``,
    ``segment``), and, when ``profile_rows`` > 0, the profiler's table of its top operators
    (per input shape with ``by_shape``, which tells the layers apart). With ``compile`` the
    stages run compiled (``VQDraw.compile_step``, as ``--compile`` trains); the warm-up step
    compiles them.

    :return: dict with seconds (the mean), times (each step's), batch, stages, segment, table.
    """
    recipe = DATASETS[dataset]["train"]
    model, _ = build_models(dataset, stages=stages, segment=segment, device=device, seed=seed,
                            channels_last=channels_last, which=("optimized",))
    model.train()
    if compile:
        model.compile_step()
    batch = batch or recipe["batch"]
    optimizer = make_optimizer(model)
    generator = torch.Generator().manual_seed(seed)
    x = model.normalize(torch.rand(batch, *model.shape, generator=generator).to(device))
    autocast = (torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
                if precision == "bf16" else nullcontext())

    def step():
        with autocast:
            train_step(model, optimizer, x, grad_checkpoint=recipe["grad_checkpoint"])

    (times,) = timed([step], steps, device)
    table = None
    if profile_rows:
        cuda = torch.device(device).type == "cuda"
        activities = [torch.profiler.ProfilerActivity.CPU]
        if cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities, record_shapes=by_shape) as prof:
            step()
            if cuda:
                torch.cuda.synchronize()
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        table = prof.key_averages(group_by_input_shape=by_shape).table(sort_by=sort,
                                                                       row_limit=profile_rows)
    return {"dataset": dataset, "precision": precision, "seconds": sum(times) / len(times),
            "times": times, "batch": batch, "stages": model.config["stages"],
            "segment": model.config.get("segment"), "table": table}


def main(argv=None):
    parser = Parser(description="Seconds per training micro-batch (fp32, bf16) "
                                "and a profile of one step.")
    parser.add_argument("dataset", choices=sorted(DATASETS))
    parser.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    parser.add_argument("--steps", type=positive_int, default=3, help="timed steps per precision")
    parser.add_argument("--stages", type=positive_int, default=None, help="default: the published number")
    parser.add_argument("--segment", type=positive_int, default=None,
                        help="stages per network (default: the published value, or --stages)")
    parser.add_argument("--batch", type=positive_int, default=None,
                        help="default: the published micro-batch")
    parser.add_argument("--profile", action="store_true",
                        help="print the top operators of one more step, per precision")
    parser.add_argument("--rows", type=positive_int, default=20, help="operators in the --profile table")
    parser.add_argument("--by-shape", action="store_true",
                        help="--profile per operator and input shape (which layer)")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--compile", action="store_true",
                        help="time the compiled step (as train_*.py --compile; NCHW)")
    parser.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--count-ops", action="store_true",
                        help="instead: count the kernel operators of one micro-batch at batch 8 "
                             "(issue 32's setups), by phase")
    parser.add_argument("--top", type=int, default=0,
                        help="--count-ops: also list the most frequent operators of each phase")
    parser.add_argument("--plan", choices=("cuda", "cpu"), default="cuda",
                        help="--count-ops: count the step as it runs on this device (default cuda)")
    parser.add_argument("--data-dir", default=None,
                        help="--count-ops on the first test images from here (default: noise)")
    args = parser.parse_args(argv)
    stages = args.stages or DATASETS[args.dataset]["stages"]
    if args.segment is not None and args.segment > stages:
        parser.error(f"--segment {args.segment} is more than the {stages} stages; use 1 to {stages}")
    if args.json:
        try:
            check_output(args.json, "--json")  # before the work, not after it
        except ValueError as exc:
            parser.error(str(exc))
    if args.count_ops:
        counts = count_ops(args.dataset, batch=args.batch or 8, stages=args.stages,
                           segment=args.segment, data_dir=args.data_dir, device=args.plan)
        print(format_counts(args.dataset, counts, args.top, args.plan), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"command": " ".join(sys.argv), "torch": torch.__version__,
                           "counts": {p: dict(c) for p, c in counts.items()}}, f, indent=2)
        return
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            sys.exit("error: --device cuda but no CUDA GPU is available; use --device cpu")
        torch.backends.cudnn.benchmark = True  # as in training
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{args.dataset} training step on {describe_device(args.device)}, torch {torch.__version__}",
          flush=True)
    results = []
    for precision in args.precision:
        result = step_seconds(args.dataset, precision, args.steps, args.stages, args.segment, args.batch,
                              args.device, args.rows if args.profile else 0,
                              channels_last=args.channels_last, by_shape=args.by_shape,
                              compile=args.compile)
        print(f"{precision}: {result['seconds']:.3f} s per micro-batch of {result['batch']} "
              f"({result['stages']} stages, segment {result['segment']}; mean of {args.steps}: "
              + ", ".join(f"{t:.3f}" for t in result["times"]) + ")", flush=True)
        if result["table"]:
            print(result["table"], flush=True)
        results.append(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": describe_device(args.device), "torch": torch.__version__,
                       "command": " ".join(sys.argv), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
