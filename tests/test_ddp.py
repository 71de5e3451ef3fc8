"""DDP on the CPU: 2 processes (gloo) against 1, and resuming across process counts.

One module-scoped fixture trains every run once: the 1-process references in this
process, then all 2-process runs inside a single ``torch.multiprocessing.spawn`` (starting
processes is the slow part here). The tests then compare the files the runs wrote.
"""

import csv
import errno
import json
import os
import shutil
import signal
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import vq_draw
from vq_draw import checkpoint
from vq_draw.data import ArrayDataset
from vq_draw.evaluate import evaluate
from vq_draw.train import TrainLoop
from conftest import REPO, run_script, script_env, state_equal, write_npz

B = 2  # micro-batch per process; the 1-process reference uses 2 * B


def _images(count, seed):
    return torch.randint(0, 256, (count, 1, 28, 28), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


TRAIN, TEST = _images(40, 0), _images(10, 1)


def _train(run_dir, batch, step_interval, steps, checkpoint_path=None, test=True, signal_rank=None,
           full_disk=False):
    """Train the tiny MNIST model; every process builds the same initial weights.

    :param signal_rank: this process sends itself SIGTERM after its first update, when it has
                        this rank (the others get no signal).
    :param full_disk: rank 0's torch.save finds the disk full.
    """
    torch.manual_seed(0)
    model = vq_draw.create_model("mnist", stages=2, options=4)
    loop = TrainLoop(model=model, train_data=ArrayDataset(TRAIN),
                     test_data=ArrayDataset(TEST) if test else None,
                     run_dir=run_dir, checkpoint_path=checkpoint_path, batch_size=batch,
                     step_interval=step_interval, step_limit=steps, save_interval=steps,
                     log_interval=1, eval_size=6, device="cpu", quiet=True, progress=False)
    if signal_rank is not None and loop.rank == signal_rank:
        update = loop._update

        def update_then_signal(batches):
            terms = update(batches)
            if loop.step == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            return terms

        loop._update = update_then_signal
    write = checkpoint.atomic_write
    if full_disk and loop.rank == 0:
        def full(path, write):  # not torch.save, which torch.distributed also uses
            raise OSError(errno.ENOSPC, "No space left on device")
        checkpoint.atomic_write = full
    try:
        loop.run()
    finally:
        checkpoint.atomic_write = write
    return loop


def _worker(rank, world_size, port, jobs, out_dir):
    """One process of the 2-process runs: the environment torchrun would set, then the jobs."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    outcomes = []
    for job in jobs:
        try:
            _train(**job)
            outcomes.append("ok")
        except (Exception, KeyboardInterrupt) as exc:  # recorded: the tests check what each raised
            outcomes.append(f"{type(exc).__name__}: {exc}")
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(outcomes, f)
    dist.barrier()  # as TrainLoop.close: both processes done before the group goes
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    d = {name: str(root / name) for name in ("one_si1", "one_si2", "two_si1", "two_si2",
                                             "one_to_two", "two_to_one", "broken", "broken_save",
                                             "interrupted", "uninterrupted")}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        assert key not in os.environ, "run the tests outside torchrun"
    # 1 process, micro-batch 2B: one update (step interval 1), and one of 2 micro-batches.
    _train(d["one_si1"], 2 * B, 1, 1, test=False)  # no evaluation or images: faster
    _train(d["one_si2"], 2 * B, 2, 2)
    # A 1-process checkpoint (2B images per step) that 2 processes of 2B resume: step 2 -> 1.
    shutil.copytree(d["one_si2"], d["one_to_two"])
    with open(root / "not_a_folder", "w"):
        pass
    jobs = [dict(run_dir=d["two_si1"], batch=B, step_interval=1, steps=1, test=False),
            dict(run_dir=d["two_si2"], batch=B, step_interval=2, steps=2),
            dict(run_dir=d["one_to_two"], batch=2 * B, step_interval=1, steps=3),
            # Rank 0 cannot write here; rank 1 must fail too instead of waiting forever.
            dict(run_dir=d["broken"], batch=B, step_interval=1, steps=1,
                 checkpoint_path=str(root / "not_a_folder" / "checkpoint.pt")),
            # The same when the folders pass the checks but the save itself fails.
            dict(run_dir=d["broken_save"], batch=B, step_interval=1, steps=1, test=False,
                 full_disk=True),
            # Only rank 1 gets SIGTERM: both stop after the same update, save, then resume.
            dict(run_dir=d["interrupted"], batch=B, step_interval=1, steps=3, test=False, signal_rank=1),
            dict(run_dir=d["interrupted"], batch=B, step_interval=1, steps=3, test=False),
            dict(run_dir=d["uninterrupted"], batch=B, step_interval=1, steps=3, test=False)]
    mp.spawn(_worker, args=(2, _free_port(), jobs, str(root)), nprocs=2, join=True)
    outcomes = [json.load(open(root / f"rank{r}.json")) for r in range(2)]
    # A 2-process checkpoint (2B images per step) resumed by 1 process of B: step 2 -> 4.
    shutil.copytree(d["two_si2"], d["two_to_one"])
    _train(d["two_to_one"], B, 2, 6)
    return d, outcomes


def _checkpoint(run_dir):
    return torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)


@pytest.mark.parametrize("interval", [1, 2])
def test_two_processes_take_the_same_step_as_one_with_twice_the_batch(runs, interval):
    d, outcomes = runs
    assert outcomes[0][:2] == ["ok", "ok"] and outcomes[1][:2] == ["ok", "ok"]
    one, two = _checkpoint(d[f"one_si{interval}"]), _checkpoint(d[f"two_si{interval}"])
    assert one["step"] == two["step"] == interval and two["world_size"] == 2
    worst = max((a - two["model"][name]).abs().max().item() for name, a in one["model"].items())
    print(f"step interval {interval}: max |1 process - 2 processes| = {worst:.3g}")
    for name, a in one["model"].items():
        torch.testing.assert_close(two["model"][name], a, rtol=1e-5, atol=1e-6, msg=name)
    # Not trivially equal: the update moved the weights by about the learning rate.
    torch.manual_seed(0)
    initial = vq_draw.create_model("mnist", stages=2, options=4).state_dict()
    assert max((one["model"][k] - initial[k]).abs().max().item() for k in initial) > 1e-4
    # Adam's moments agree too, so the next updates would as well.
    # (The first Adam step hardly depends on the gradient's scale; the moments do, so they
    # catch a sum where a mean belongs.)
    for a, b in zip(one["optimizer"]["state"].values(), two["optimizer"]["state"].values()):
        torch.testing.assert_close(b["exp_avg"], a["exp_avg"], rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(b["exp_avg_sq"], a["exp_avg_sq"], rtol=1e-4, atol=1e-12)
    if interval == 1:
        return
    # The held-out evaluation split over 2 processes matches the 1-process one.
    e1 = json.load(open(os.path.join(d[f"one_si{interval}"], "final_eval.json")))
    e2 = json.load(open(os.path.join(d[f"two_si{interval}"], "final_eval.json")))
    assert e1["count"] == e2["count"] == len(TEST)
    assert e1["mse"] == pytest.approx(e2["mse"], rel=1e-5)


def test_each_process_keeps_its_own_random_state(runs):
    d, _ = runs
    states = _checkpoint(d["two_si2"])["rng"]["ranks"]
    assert len(states) == 2 and not torch.equal(states[0]["torch"], states[1]["torch"])


def test_two_process_checkpoint_resumes_in_one_process(runs):
    d, _ = runs
    ckpt = _checkpoint(d["two_to_one"])
    assert ckpt["step"] == 6 and ckpt["world_size"] == 1
    with open(os.path.join(d["two_to_one"], "log.csv")) as f:
        steps = [int(row["step"]) for row in csv.DictReader(f)]
    # 2 steps of 2 x B images = 4 steps of B images: the old row is rescaled, then one update.
    assert steps == [4, 6]
    final = json.load(open(os.path.join(d["two_to_one"], "final_eval.json")))
    assert final["step"] == 6 and final["count"] == len(TEST)
    assert os.path.exists(os.path.join(d["two_to_one"], "loss.png"))


def test_one_process_checkpoint_resumes_in_two_processes(runs):
    d, outcomes = runs
    assert outcomes[0][2] == outcomes[1][2] == "ok"
    ckpt = _checkpoint(d["one_to_two"])
    assert ckpt["step"] == 3 and ckpt["world_size"] == 2
    with open(os.path.join(d["one_to_two"], "log.csv")) as f:
        steps = [int(row["step"]) for row in csv.DictReader(f)]
    assert steps == [1, 2, 3]  # the 1-process row at step 2 became step 1 (2 x 2B = 1 x 2 x 2B)
    # The final evaluation, split over the 2 processes, equals a 1-process evaluation.
    final = json.load(open(os.path.join(d["one_to_two"], "final_eval.json")))
    model = vq_draw.load_model(os.path.join(d["one_to_two"], "checkpoint.pt"))
    result = evaluate(model, ArrayDataset(TEST))
    assert final["count"] == result["count"] == len(TEST)
    assert final["mse"] == pytest.approx(result["mse"], rel=1e-6)
    assert final["options_used"] == result["options_used"]
    assert final["entropy"] == pytest.approx(result["entropy"], abs=1e-6)


def test_a_failed_save_on_rank_0_stops_every_process(runs):
    _, outcomes = runs
    # A checkpoint folder that is a file is found before training; a failing save during it.
    assert outcomes[0][3].startswith("RunDirError: ") and "is a file, not a folder" in outcomes[0][3]
    assert outcomes[1][3] == "SaveError: rank 0 could not use the run folder; see its error message"
    assert outcomes[0][4].startswith("SaveError: could not write checkpoint")
    assert "No space left on device" in outcomes[0][4]
    assert outcomes[1][4] == "SaveError: rank 0 could not write the checkpoint; see its error message"


def test_a_signal_to_one_process_stops_all_at_the_same_step_and_resumes_exactly(runs):
    d, outcomes = runs
    for rank in range(2):
        assert outcomes[rank][5].startswith("Interrupted: stopped by SIGTERM at step 1, saved to")
        assert outcomes[rank][6:8] == ["ok", "ok"]
    resumed, expected = _checkpoint(d["interrupted"]), _checkpoint(d["uninterrupted"])
    assert resumed["step"] == expected["step"] == 3
    for key in ("model", "optimizer", "rng"):
        assert state_equal(resumed[key], expected[key]), key


@pytest.mark.slow
def test_training_script_under_torchrun_then_resumed_alone(tmp_path):
    """The unchanged script under torchrun (2 processes), then the same command in 1 process."""
    import subprocess
    import sys

    write_npz(tmp_path / "mnist.npz", 100, (1, 28, 28))
    args = ["--data-dir", str(tmp_path / "mnist.npz"), "--stages", "2", "--options", "4",
            "--batch", "2", "--save-interval", "2", "--eval-size", "8", "--log-interval", "1",
            "--device", "cpu", "--workers", "0", "--run-dir", str(tmp_path / "run")]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", os.path.join(REPO, "train_mnist.py"),
                           "--step-limit", "4", *args], env=script_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "training on 2 processes (gloo)" in done.stdout
    assert "held-out evaluation on all 10 test images at step 4" in done.stdout
    alone = run_script("train_mnist.py", ["--step-limit", "12", *args], timeout=300)
    assert alone.returncode == 0, alone.stderr[-2000:]
    assert "resumed from" in alone.stdout and "at step 8" in alone.stdout
    final = json.load(open(tmp_path / "run" / "final_eval.json"))
    assert final["step"] == 12 and final["count"] == 10
