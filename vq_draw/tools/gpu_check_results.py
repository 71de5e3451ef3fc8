"""The GPU check's results (vq_draw/tools/gpu_check.py): the comparison of each run with the
original's log, the timings of the published micro-batch, and the summary and files written
from them.
"""

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time

from .gpu_check_train import (FINAL_RESERVE, REPO, child_env, here, read_log_rows, say,
                              start_process, tail)

TOLERANCE = 0.15  # of the window mean of the original's log


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
