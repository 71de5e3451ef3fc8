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
"""

import json
import sys
from contextlib import nullcontext

import torch

from ..arguments import Parser, check_output, device, positive_int
from ..config import DATASETS
from .bench import build_models, describe_device, make_optimizer, timed, train_step


def step_seconds(dataset, precision="fp32", steps=3, stages=None, segment=None, batch=None,
                 device="cpu", profile_rows=0, seed=0, channels_last=True, by_shape=False):
    """Mean seconds of a training step of ``dataset``'s published model (or ``stages``,
    ``segment``), and, when ``profile_rows`` > 0, the profiler's table of its top operators
    (per input shape with ``by_shape``, which tells the layers apart).

    :return: dict with seconds (the mean), times (each step's), batch, stages, segment, table.
    """
    recipe = DATASETS[dataset]["train"]
    model, _ = build_models(dataset, stages=stages, segment=segment, device=device, seed=seed,
                            channels_last=channels_last, which=("optimized",))
    model.train()
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
    parser.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    stages = args.stages or DATASETS[args.dataset]["stages"]
    if args.segment is not None and args.segment > stages:
        parser.error(f"--segment {args.segment} is more than the {stages} stages; use 1 to {stages}")
    if args.json:
        try:
            check_output(args.json, "--json")  # before the timing, not after it
        except ValueError as exc:
            parser.error(str(exc))
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
                              channels_last=args.channels_last, by_shape=args.by_shape)
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
