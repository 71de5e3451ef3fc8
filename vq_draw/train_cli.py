"""The training command line, shared by train_mnist.py, train_svhn.py, train_cifar.py and
train_celeba.py.

The scripts differ only in the dataset name; published defaults come from
``config.DATASETS``. ``build_parser``, ``check_args`` and ``train`` are separate so that
vq_draw/experiments.py can add its flags and hooks to the same command.
"""

import argparse
import os
import signal
import sys

import torch

from .checkpoint import CheckpointError, SaveError
from .config import DATASETS, create_model
from .data import DataError, ImageReadError, load_dataset, skipped_images_note
from .devices import check_device
from .run_folder import RunDirError
from .settings import ACCUMULATE, TrainSettings
from .signals import Interrupted, StoppedAtOnce
from .train import TrainLoop


def build_parser(dataset, prog=None):
    """The argument parser of the training command for ``dataset``, with its published defaults."""
    spec = DATASETS[dataset]
    recipe = spec["train"]
    parser = argparse.ArgumentParser(prog=prog,
                                     description=f"Train VQ-DRAW on {dataset} (published defaults).")
    parser.add_argument("--batch", type=int, default=recipe["batch"], help="micro-batch per process")
    parser.add_argument("--step-limit", type=int, default=recipe["step_limit"],
                        help="steps (micro-batches) to train; 0 trains forever")
    parser.add_argument("--step-interval", type=int, default=recipe["step_interval"],
                        help="micro-batches per optimizer update")
    parser.add_argument("--accumulate", choices=ACCUMULATE, default="sum",
                        help="sum the micro-batches' gradients, as the original, or average them "
                             "(default: sum)")
    parser.add_argument("--stop-at", type=int, default=None,
                        help="save and stop at this step; the learning rate still follows "
                             "--step-limit, so a resume (with other settings, if wanted) continues "
                             "the same schedule")
    parser.add_argument("--save-interval", type=int, default=500, help="steps between checkpoints")
    parser.add_argument("--eval-interval", type=int, default=None,
                        help="steps between held-out evaluations (default: --save-interval)")
    parser.add_argument("--eval-size", type=int, default=1000, help="held-out images per evaluation")
    parser.add_argument("--log-interval", type=int, default=50, help="steps between log lines")
    parser.add_argument("--grad-checkpoint", action="store_true", default=recipe["grad_checkpoint"],
                        help="recompute stages in the backward pass (memory ~ sqrt(stages))")
    parser.add_argument("--no-grad-checkpoint", dest="grad_checkpoint", action="store_false")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lr-final", type=float, default=recipe["lr_final"],
                        help="learning rate at --step-limit, linear in between (default: "
                             + ("constant" if recipe["lr_final"] is None else str(recipe["lr_final"])) + ")")
    parser.add_argument("--stages", type=int, default=spec["stages"])
    parser.add_argument("--options", type=int, default=64)
    parser.add_argument("--segment", type=_segment, default=None,
                        help="stages per refiner network, or comma-separated stages of each network "
                             "for unequal blocks (e.g. 4,1,5) (default: "
                             + ("one network for all stages" if spec["segment"] is None else
                                f"{spec['segment']}, or --stages when fewer") + ")")
    parser.add_argument("--aux-coeff", type=float, default=0.01)
    parser.add_argument("--final-coeff", type=float, default=0.0)
    parser.add_argument("--epsilon", type=float, default=0.0)
    parser.add_argument("--grad-decay", type=float, default=0.0)
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint file (default RUN_DIR/checkpoint.pt); resumed when it exists")
    parser.add_argument("--run-dir", default=os.path.join("runs", dataset),
                        help="folder for the checkpoint, images and log.csv")
    parser.add_argument("--data-dir", default=None,
                        help="torchvision root (default ./data, downloaded), image folder or .npz")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="data-loading processes for image files")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="leave out image files that cannot be read, and say how many, instead "
                             "of stopping at the first (reads every image once before training)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (choices on fp32 losses)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each training stage into one graph per network "
                             "(minutes to compile; for GPUs)")
    parser.add_argument("--channels-last", dest="channels_last", action="store_true", default=None,
                        help="run the convolutions in channels_last (the default on the CPU)")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                        help="run them in NCHW (the default on CUDA, where the step folds all "
                             "stages' masks without layout conversions)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                        help="no tqdm bar (it is shown only when stderr is a terminal)")
    parser.set_defaults(dataset=dataset)
    return parser


def parse_args(dataset, argv=None):
    parser = build_parser(dataset)
    return check_args(parser, parser.parse_args(argv))


def check_args(parser, args):
    """``args`` with the meanings only the command line has (``parser.error`` on failure); the
    values themselves are checked by ``create_model`` and ``TrainSettings``."""
    if args.step_limit < 0:
        parser.error(f"--step-limit must be >= 0 (0 trains forever), got {args.step_limit}")
    return args


def _segment(text):
    """--segment: "5" (networks of 5 stages) or "4,1,5" (one network per listed block)."""
    try:
        sizes = [int(n) for n in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int or comma-separated ints, got {text!r}") from None
    if any(n < 1 for n in sizes):
        raise argparse.ArgumentTypeError(f"stage counts must be >= 1, got {text!r}")
    return sizes[0] if len(sizes) == 1 else sizes


def main(dataset, argv=None):
    train(parse_args(dataset, argv))


def settings_from_args(args):
    """The ``TrainSettings`` of parsed ``args``; raises ValueError (one line) for a bad value."""
    return TrainSettings(batch_size=args.batch, step_interval=args.step_interval,
                         accumulate=args.accumulate, lr=args.lr, lr_final=args.lr_final,
                         step_limit=args.step_limit or None, stop_at=args.stop_at,
                         save_interval=args.save_interval, eval_interval=args.eval_interval or None,
                         eval_size=args.eval_size, log_interval=args.log_interval, seed=args.seed,
                         bf16=args.bf16)


def train(args, objective=None, start=None):
    """Build the settings, model, data and ``TrainLoop`` from parsed ``args`` and run it; errors
    end the process with one line. ``objective`` and ``start`` are TrainLoop's experiment hooks."""
    loop = None
    try:
        settings = settings_from_args(args)
        check_device(args.device)  # before the data, which may be a long download
        torch.manual_seed(args.seed)
        dataset = args.dataset
        model = create_model(dataset, options=args.options, stages=args.stages, segment=args.segment,
                             aux_coeff=args.aux_coeff, final_coeff=args.final_coeff,
                             epsilon=args.epsilon, grad_decay=args.grad_decay,
                             grad_checkpoint=args.grad_checkpoint)
        model.channels_last = (args.channels_last if args.channels_last is not None
                               else not str(args.device).startswith("cuda"))
        train_data, test_data = (load_dataset(dataset, split, args.data_dir, shape=model.shape,
                                              skip_bad_images=args.skip_bad_images)
                                 for split in ("train", "test"))
        note = skipped_images_note(train_data, test_data)
        if note:
            print(f"warning: {note}", file=sys.stderr)
        loop = TrainLoop(model=model, train_data=train_data, test_data=test_data, settings=settings,
                         run_dir=args.run_dir, checkpoint_path=args.checkpoint, device=args.device,
                         num_workers=args.workers, progress=args.progress, compile=args.compile,
                         objective=objective, start=start)
        loop.run()
        loop.close()
    except (DataError, CheckpointError, SaveError, RunDirError, ValueError, FloatingPointError,
            OSError) as exc:
        hint = "; --skip-bad-images leaves such files out" if isinstance(exc, ImageReadError) else ""
        sys.exit(f"error: {exc}{hint}")
    except Interrupted as exc:  # a signal: saved at the end of the update under way
        loop.close()
        print(exc, file=sys.stderr)
        sys.exit(128 + exc.signum)  # as a shell reports a process ended by the signal
    except KeyboardInterrupt as exc:  # a second signal, or a Ctrl-C before training started
        path = args.checkpoint or os.path.join(args.run_dir, "checkpoint.pt")
        if os.path.exists(path):
            print(f"stopped at once; run the same command again to resume from the last "
                  f"checkpoint, {path}", file=sys.stderr)
        else:
            print("stopped at once, before any checkpoint was saved; the same command starts "
                  "from the beginning", file=sys.stderr)
        sys.exit(128 + (exc.signum if isinstance(exc, StoppedAtOnce) else signal.SIGINT))
