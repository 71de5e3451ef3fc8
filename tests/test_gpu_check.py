"""The prepared GPU check (vq_draw/tools/gpu_check.py) run on the CPU with --tiny settings: its
data pack, training slices that resume across commands, the comparison and the timings."""

import csv
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from conftest import REPO, script_env
from vq_draw.tools import compare_log, gpu_check, step_probe

TINY = gpu_check.CHECKS["tiny"]


def write_sources(root):
    """A CIFAR-10 .npz folder, a CelebA folder of JPEGs and two fake original logs under ``root``."""
    from PIL import Image

    rng = np.random.default_rng(0)
    os.makedirs(root / "data" / "cifar10")
    np.savez(root / "data" / "cifar10" / "train.npz",
             images=rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8))
    np.savez(root / "data" / "cifar10" / "test.npz",
             images=rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
    faces = root / "data" / "celeba" / "img_align_celeba"
    os.makedirs(faces)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(faces / f"{i:06d}.jpg")
    os.makedirs(root / "logs")
    for spec in TINY.values():
        with open(root / "logs" / spec["log"], "w") as f:
            f.write("2020/02/26 14:07:26 Files already downloaded and verified\n")
            for i in range(spec["micro_batches"] + 3):  # more than the check compares
                f.write(f"2020/02/26 14:07:51 step {i}: train={0.3 - 0.01 * i:.6f} test=0.1 "
                        f"entropy=4.0 used=64\n")


def check(*args, timeout=240):
    done = subprocess.run([sys.executable, "-m", "vq_draw.tools.gpu_check", *args], cwd=REPO,
                          env=script_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def log_rows(path):
    with open(path, newline="") as f:
        return [(int(row["step"]), row["time"], row["final_loss"]) for row in csv.DictReader(f)]


def test_the_tiny_check_resumes_across_commands_and_writes_every_result(tmp_path):
    write_sources(tmp_path)
    data, work = tmp_path / "packed", tmp_path / "work"
    out = check("pack", "--tiny", "--data-dir", str(tmp_path / "data"), "--logs",
                str(tmp_path / "logs"), "--out", str(data))
    assert "cifar10: 8 training images" in out
    # The packed CelebA folder's own train/test split leaves the 4 faces the run needs.
    assert len([f for f in os.listdir(data / "celeba") if f.endswith(".jpg")]) == 5
    # Only the log lines up to the last compared micro-batch travel.
    assert open(data / "upstream" / "cifar_log.txt").read().splitlines()[-1].count("step 3:")

    common = ["run", "--tiny", "--data", str(data), "--work", str(work), "--budget", "600"]
    out = check(*common, "--out", str(tmp_path / "out1"), "--phases", "train", "--slice", "2")
    state = json.loads((work / "state.json").read_text())
    assert state["train"]["cifar10"]["done"] == 2 and state["train"]["celeba"]["done"] == 2
    assert "cifar10: no slice started (--slice reached" in out
    first_rows = log_rows(work / "cifar10" / "log.csv")
    assert [row[0] for row in first_rows] == [1, 2]

    out = check(*common, "--out", str(tmp_path / "out2"), "--time-modes", "eager",
                "--time-precisions", "fp32")
    # The second command continued the CIFAR-10 run from its checkpoint, not from the start.
    assert "resumed from" in (work / "cifar10.out").read_text()
    rows = log_rows(work / "cifar10" / "log.csv")
    assert [row[0] for row in rows] == [1, 2, 3, 4] and rows[:2] == first_rows
    state = json.loads((work / "state.json").read_text())
    slices = state["train"]["cifar10"]["slices"]
    assert [(s["from"], s["reached"], s["exit"]) for s in slices] == [(0, 2, 0), (2, 4, 0)]
    assert len(state["train"]["celeba"]["slices"]) == 1  # it was done; no slice in command 2

    # The comparison is compare_log's, on the copied log.csv.
    for name, spec in TINY.items():
        result = state["compare"][name]
        expected = compare_log.compare(compare_log.read_run_log(str(work / name / "log.csv")),
                                       compare_log.read_original_log(str(tmp_path / "logs" / spec["log"])),
                                       spec["window"])
        assert result["ratio"] == pytest.approx(expected["ratio"], abs=1e-3)
        assert result["original"] == pytest.approx(expected["window_original"], abs=1e-5)
        assert len(result["rows"]) == len(expected["steps"])

    # Timings: one probe per dataset, with the loop's own clock beside the probe's.
    for name in TINY:
        timing = state["timings"][f"{name}/eager/fp32"]
        assert timing["error"] is None and timing["seconds"] > 0 and len(timing["times"]) == 1
        assert timing["loop_seconds"] > 0 and timing["busy_fraction"] is None  # no CUDA here

    out2 = tmp_path / "out2"
    summary = (out2 / "gpu_check_summary.md").read_text()
    assert "| cifar10 | 4 of 4 | 3-4 |" in summary and "| celeba | eager | fp32 |" in summary
    assert json.loads((out2 / "gpu_check_summary.json").read_text())["compare"] == state["compare"]
    for spec in TINY.values():
        assert (out2 / spec["plot"]).stat().st_size > 0
    with tarfile.open(out2 / "repo_files.tar") as tar:
        names = set(tar.getnames())
    assert {spec[key] for spec in TINY.values() for key in ("plot", "csv")} <= names
    assert "docs/experiments/logs/gpu_check_summary.md" in names


def test_a_check_without_its_data_says_how_to_make_it(tmp_path):
    done = subprocess.run([sys.executable, "-m", "vq_draw.tools.gpu_check", "run", "--tiny",
                           "--data", str(tmp_path / "none"), "--work", str(tmp_path / "work")],
                          cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "is missing; make it with 'python -m vq_draw.tools.gpu_check pack" in done.stderr


def test_kernel_busy_time_is_the_union_of_the_kernels_intervals():
    # Overlapping kernels (two streams) count once; a gap counts nothing.
    assert step_probe.busy_seconds([(0, 10), (5, 20), (30, 40), (32, 35)]) == pytest.approx(30e-6)
    assert step_probe.busy_seconds([]) == 0


def test_the_gpu_activity_is_told_apart_from_annotations_and_host_events():
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    def event(name, start, end, device=DeviceType.CUDA, activity=None, annotation=False):
        return SimpleNamespace(name=name, device_type=device, activity_type=activity,
                               is_user_annotation=annotation,
                               time_range=SimpleNamespace(start=start, end=end))

    events = [event("void cudnn::conv_kernel", 0, 10, activity="kernel"),
              event("Memcpy HtoD (Pageable -> Device)", 10, 12),
              event("Memset (Device)", 12, 13, activity="gpu_memset"),
              event("## forward ##", 0, 100, activity="gpu_user_annotation"),
              event("ProfilerStep#1", 0, 100, annotation=True),
              event("aten::conv2d", 0, 100, device=DeviceType.CPU),
              event("ampere_sgemm", 20, 25)]  # an older torch: no activity type
    found = step_probe.device_activity(events)
    assert found == {"kernel": [(0, 10), (20, 25)], "memcpy": [(10, 12)], "memset": [(12, 13)]}


@pytest.mark.slow
def test_a_run_past_the_budget_is_stopped_by_sigterm_saved_and_resumed(tmp_path):
    """The budget, not --slice, ends the first command: SIGTERM in time, a checkpoint at an update
    boundary, and the next command goes on from it (a long tiny run; 75 s here)."""
    write_sources(tmp_path)
    data, work = tmp_path / "packed", tmp_path / "work"
    check("pack", "--tiny", "--datasets", "cifar10", "--data-dir", str(tmp_path / "data"), "--logs",
          str(tmp_path / "logs"), "--out", str(data))
    # 200 micro-batches: more than any CPU trains in the 80 s budget.
    longer = ("import sys; from vq_draw.tools import gpu_check; "
              "gpu_check.CHECKS['tiny']['cifar10'].update(micro_batches=200, window=(191, 200)); "
              "gpu_check.main(sys.argv[1:])")
    common = ["run", "--tiny", "--datasets", "cifar10", "--data", str(data), "--work", str(work),
              "--out", str(tmp_path / "out"), "--phases", "train"]
    for extra in (["--budget", "80"], ["--budget", "300", "--slice", "2"]):
        done = subprocess.run([sys.executable, "-c", longer, *common, *extra], cwd=REPO,
                              env=script_env(), capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        if extra[1] == "80":
            state = json.loads((work / "state.json").read_text())
            first = state["train"]["cifar10"]["slices"][0]
            assert first["exit"] == 143 and 0 < first["reached"] < 200  # SIGTERM, then saved
            assert first["seconds"] < 80 - gpu_check.FINAL_RESERVE + 10
            assert (work / "cifar10" / "checkpoint.pt").exists()
    assert f"resumed from {work / 'cifar10' / 'checkpoint.pt'} at step {first['reached']}" in \
        (work / "cifar10.out").read_text()
    steps = [row[0] for row in log_rows(work / "cifar10" / "log.csv")]
    assert steps == list(range(1, first["reached"] + 3))
