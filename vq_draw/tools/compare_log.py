"""Compare a run's training curve with a training log of the original implementation.

``python -m vq_draw.tools.compare_log runs/cifar_check/log.csv ORIGINAL_LOG --window 193 256
--plot images/cifar_vs_original.png --label "CIFAR-10"``

The original logs one line per micro-batch, ``step N: train=<final-stage MSE> ...`` (N from 0).
A run's log.csv has one row per logging interval with the mean ``final_loss`` of its
micro-batches (``--log-interval 16`` gives one row per update of 16 micro-batches). The original
is averaged over the same micro-batches as each row, so the two curves are compared point by
point, and both are averaged over the micro-batches of ``--window`` (counted from 1).
"""

import csv
import math
import re

from ..arguments import Parser, check_output, fail, positive_int

_LINE = re.compile(r"step (\d+): train=(\S+)")


def read_original_log(path):
    """{micro-batch number from 1: final-stage training MSE} from an original training log."""
    losses = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            match = _LINE.search(line)
            if match:
                try:
                    loss = float(match.group(2))
                except ValueError:
                    loss = math.nan
                if not math.isfinite(loss):
                    raise ValueError(f"line {number} of {path}: train={match.group(2)} is not a "
                                     f"finite MSE, so no mean over it means anything; compare a "
                                     f"window before it")
                losses[int(match.group(1)) + 1] = loss
    if not losses:
        raise ValueError(f"{path} has no 'step N: train=...' lines; is it a log of the original?")
    return losses


def read_run_log(path):
    """[(last micro-batch of the row, micro-batches in it, mean final-stage MSE)] from log.csv."""
    rows, previous = [], 0
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if "step" not in (reader.fieldnames or ()):
            raise ValueError(f"{path} has no 'step' column (its header is "
                             f"{','.join(reader.fieldnames or []) or 'empty'}); give a run's log.csv")
        for number, row in enumerate(reader, 2):
            try:
                step = int(row["step"])
                loss = None if row.get("final_loss") in (None, "") else float(row["final_loss"])
            except (TypeError, ValueError):
                raise ValueError(f"line {number} of {path}: step {row.get('step')!r}, final_loss "
                                 f"{row.get('final_loss')!r} are not numbers") from None
            if step > previous and loss is not None:
                rows.append((step, step - previous, loss))
            previous = step
    if not rows:
        raise ValueError(f"{path} has no training rows (step, final_loss)")
    return rows


def compare(run_rows, original, window):
    """Per-row means of both and the two means over ``window`` = (first, last) micro-batch.

    :return: dict with "steps", "ours", "original" (one value per row the original covers),
             and "window_ours", "window_original", "ratio" (None when the run has not reached
             the end of the window or its rows do not start at its first micro-batch).
    """
    first, last = window
    if not 1 <= first <= last:
        raise ValueError(f"window {first}-{last}: give FIRST <= LAST, counted from 1")
    if any(i not in original for i in range(first, last + 1)):
        end = max(original)
        raise ValueError(f"window {first}-{last}: the original's log covers micro-batches 1-{end} "
                         f"(with gaps where lines are missing); give a window inside it")
    steps, ours, theirs = [], [], []
    window_sum, window_count = 0.0, 0
    for step, size, loss in run_rows:
        span = range(step - size + 1, step + 1)
        if not all(i in original for i in span):
            break
        steps.append(step)
        ours.append(loss)
        theirs.append(sum(original[i] for i in span) / size)
        if span.start >= first and span.stop - 1 <= last:
            window_sum += loss * size
            window_count += size
    result = {"steps": steps, "ours": ours, "original": theirs, "window_ours": None,
              "window_original": sum(original[i] for i in range(first, last + 1)) / (last - first + 1),
              "ratio": None}
    if window_count == last - first + 1:
        result["window_ours"] = window_sum / window_count
        result["ratio"] = result["window_ours"] / result["window_original"]
    return result


def plot(result, path, label, window):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(result["steps"], result["original"], marker=".", label="original (its published log)")
    ax.plot(result["steps"], result["ours"], marker=".", label="this implementation")
    ax.axvspan(window[0] - 1, window[1], color="0.9", zorder=0, label=f"window {window[0]}-{window[1]}")
    ax.set_yscale("log")
    ax.set_xlabel("micro-batch (16 per Adam update)")
    ax.set_ylabel("final-stage training MSE")
    ax.set_title(f"{label}: mean per update, step {result['steps'][-1]}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = Parser(prog="python -m vq_draw.tools.compare_log", description=__doc__.splitlines()[0])
    parser.add_argument("run_log", help="a run's log.csv")
    parser.add_argument("original_log", help="the original's training log (one line per micro-batch)")
    parser.add_argument("--window", type=positive_int, nargs=2, metavar=("FIRST", "LAST"), required=True,
                        help="micro-batches (from 1) whose mean final-stage MSE is compared")
    parser.add_argument("--tolerance", type=float, default=0.15,
                        help="largest relative difference of the window means that passes")
    parser.add_argument("--plot", default=None, help="write the two curves to this PNG")
    parser.add_argument("--label", default="run")
    args = parser.parse_args(argv)
    if args.window[0] > args.window[1]:
        parser.error(f"--window {args.window[0]} {args.window[1]}: FIRST must not exceed LAST")
    try:
        if args.plot:  # before the work, whose plot would otherwise fail at the end
            check_output(args.plot, "--plot")
        result = compare(read_run_log(args.run_log), read_original_log(args.original_log),
                         tuple(args.window))
    except (OSError, ValueError) as exc:
        fail(exc)
    print(f"{'micro-batches':>15} {'this':>9} {'original':>9} {'ratio':>6}")
    previous = 0
    for step, ours, theirs in zip(result["steps"], result["ours"], result["original"]):
        print(f"{previous + 1:>7}-{step:<7} {ours:9.5f} {theirs:9.5f} {ours / theirs:6.3f}")
        previous = step
    if args.plot and result["steps"]:
        plot(result, args.plot, args.label, args.window)
    elif args.plot:
        print("no plot: the run's first row is not covered by the original's log")
    first, last = args.window
    if result["ratio"] is None:
        print(f"window {first}-{last}: the run has not logged all of it yet "
              f"(original {result['window_original']:.5f})")
        return
    verdict = "within" if abs(result["ratio"] - 1) <= args.tolerance else "OUTSIDE"
    print(f"window {first}-{last}: this {result['window_ours']:.5f}, original "
          f"{result['window_original']:.5f}, ratio {result['ratio']:.3f} ({verdict} "
          f"{args.tolerance:.0%})")
    if verdict != "within":
        raise SystemExit(1)


if __name__ == "__main__":
    main()
