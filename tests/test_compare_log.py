"""Comparing a run's log.csv with an original training log (vq_draw/tools/compare_log.py)."""

import csv

import pytest

from vq_draw.tools import compare_log


def write_logs(tmp_path, ours, theirs, interval=4):
    """An original log with one line per micro-batch and a log.csv with one row per interval."""
    original = tmp_path / "original.txt"
    with open(original, "w") as f:
        f.write("2020/02/26 14:07:26 Files already downloaded and verified\n")
        for i, loss in enumerate(theirs):
            f.write(f"2020/02/26 14:07:51 step {i}: train={loss:.6f} test=0.1 entropy=4.0 used=64\n")
    run = tmp_path / "log.csv"
    with open(run, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "final_loss", "test_mse"])
        for end in range(interval, len(ours) + 1, interval):
            writer.writerow([end, sum(ours[end - interval:end]) / interval, ""])
        writer.writerow([len(ours), "", 0.5])  # an evaluation-only row adds no training point
    return str(run), str(original)


def test_the_original_is_averaged_over_the_same_micro_batches(tmp_path):
    theirs = [float(i + 1) for i in range(16)]
    ours = [1.1 * x for x in theirs[:12]]
    run, original = write_logs(tmp_path, ours, theirs)
    result = compare_log.compare(compare_log.read_run_log(run), compare_log.read_original_log(original),
                                 (5, 12))
    assert result["steps"] == [4, 8, 12]
    assert result["original"] == pytest.approx([2.5, 6.5, 10.5])
    assert result["ours"] == pytest.approx([2.75, 7.15, 11.55])
    assert result["window_original"] == pytest.approx(8.5)
    assert result["ratio"] == pytest.approx(1.1)
    # A window the run has not finished has no ratio.
    assert compare_log.compare(compare_log.read_run_log(run), compare_log.read_original_log(original),
                               (9, 16))["ratio"] is None


def test_the_command_passes_within_the_tolerance_and_fails_outside(tmp_path, capsys):
    theirs = [0.05] * 32
    run, original = write_logs(tmp_path, [0.055] * 32, theirs)
    compare_log.main([run, original, "--window", "17", "32", "--plot", str(tmp_path / "c.png")])
    assert "ratio 1.100 (within 15%)" in capsys.readouterr().out
    assert (tmp_path / "c.png").stat().st_size > 0
    run, original = write_logs(tmp_path, [0.07] * 32, theirs)
    with pytest.raises(SystemExit) as failed:
        compare_log.main([run, original, "--window", "17", "32"])
    assert failed.value.code == 1 and "OUTSIDE" in capsys.readouterr().out
    with pytest.raises(SystemExit) as bad:
        compare_log.main([run, run, "--window", "1", "4"])
    assert "no 'step N: train=...' lines" in str(bad.value.code)


def test_bad_logs_and_flags_are_one_line(tmp_path, capsys):
    """Issue 30: each of these used to end in a traceback."""
    run, original = write_logs(tmp_path, [0.055] * 32, [0.05] * 32)

    def message(*args):
        with pytest.raises(SystemExit) as failed:
            compare_log.main(list(args))
        text = str(failed.value.code) if isinstance(failed.value.code, str) else capsys.readouterr().err
        assert text.startswith("error: ") and "\n" not in text.strip(), text
        return text

    no_step = tmp_path / "no_step.csv"
    no_step.write_text("final_loss,test_mse\n0.1,\n")
    assert "has no 'step' column" in message(str(no_step), original, "--window", "1", "4")
    assert "FIRST must not exceed LAST" in message(run, original, "--window", "3", "2")
    assert "covers micro-batches 1-32" in message(run, original, "--window", "17", "40")
    assert "positive integer" in message(run, original, "--window", "0", "4")
    nan_log = tmp_path / "nan.txt"
    nan_log.write_text(open(original).read().replace("step 5: train=0.050000", "step 5: train=nan"))
    assert "line 7 of" in message(run, str(nan_log), "--window", "1", "4")
    plot = str(tmp_path / "missing" / "c.png")
    assert "does not exist" in message(run, original, "--window", "17", "32", "--plot", plot)
