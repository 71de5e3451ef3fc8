"""The modules around the training loop, each on its own: the settings (settings.py), the run
folder (run_folder.py), signals (signals.py), processes (distributed.py), the training state
(train_state.py) and the output (train_log.py). The loop itself is tested in test_train.py,
with real processes in test_faults.py and test_ddp.py."""

import os
import signal

import pytest
import torch

from vq_draw import train_log
from vq_draw.checkpoint import CheckpointError, save_checkpoint
from vq_draw.devices import check_device
from vq_draw.distributed import Processes, evaluate_shared
from vq_draw.evaluate import evaluate
from vq_draw.run_folder import RunDirError, RunFolder
from vq_draw.settings import RECIPE, TrainSettings
from vq_draw.signals import STOP_SIGNALS, StopSignals, StoppedAtOnce
from vq_draw.train_state import restore, training_state
from conftest import ForkedChild, state_equal, tiny_model


# ---------------------------------------------------------------------- settings


def test_settings_are_one_frozen_object_checked_in_one_place():
    settings = TrainSettings(batch_size=4, step_limit=22, step_interval=4, lr_final=0.0)
    with pytest.raises(Exception):
        settings.lr = 1.0  # frozen: a run's recipe cannot drift
    assert settings.replace(lr=2e-3).lr == 2e-3 and settings.lr == 1e-3
    assert settings.evaluate_every == settings.save_interval == 500
    assert set(settings.recipe()) == set(RECIPE) and settings.recipe()["batch_size"] == 4
    assert settings.learning_rate(4) == pytest.approx(1e-3 * 18 / 22)
    for bad, words in ((dict(batch_size=0), "batch_size must be an integer >= 1"),
                       (dict(step_interval=1.5), "step_interval must be an integer"),
                       (dict(eval_interval=-1), "eval_interval must be a positive integer"),
                       (dict(lr=float("nan")), "learning rates must be positive"),
                       (dict(accumulate="max"), "accumulate must be one of sum, mean")):
        with pytest.raises(ValueError, match=words):
            settings.replace(**bad)


# ---------------------------------------------------------------------- the run folder


def test_the_run_folder_locks_itself_and_its_checkpoint_file(tmp_path):
    first = RunFolder(tmp_path / "a")
    first.claim()
    with pytest.raises(RunDirError, match=f"is in use by another training process \\(PID {os.getpid()}"):
        RunFolder(tmp_path / "a").claim()
    # A checkpoint inside a running run's folder: refused.
    with pytest.raises(RunDirError, match="the folder of the checkpoint, is in use .* another --checkpoint"):
        RunFolder(tmp_path / "b", tmp_path / "a" / "mine.pt").claim()
    first.release()
    # Two run folders, one checkpoint file elsewhere: the second is refused by the file's lock.
    shared = tmp_path / "checkpoints" / "shared.pt"
    first = RunFolder(tmp_path / "a", shared)
    first.claim()
    second = RunFolder(tmp_path / "b", shared)
    with pytest.raises(RunDirError, match="shared.pt is in use .* choose another --checkpoint"):
        second.claim()
    assert not second.claimed  # a refused claim holds nothing
    first.release()
    second.claim()
    assert second.claimed and not os.path.exists(tmp_path / "checkpoints" / ".lock")
    second.release()


def test_the_log_is_trimmed_on_resume_and_a_malformed_one_is_named(tmp_path):
    folder = RunFolder(tmp_path)
    for step in (2, 4, 6):
        folder.append_log({"step": step, "loss": 0.5, "lr": 1e-3})
    folder.trim_log(4)
    rows = open(folder.log_path).read().splitlines()
    assert rows[0].startswith("step,time,loss") and [r.split(",")[0] for r in rows[1:]] == ["2", "4"]
    folder.trim_log(8, scale=0.5)  # a resume under twice the processes: steps halve
    assert [r.split(",")[0] for r in open(folder.log_path).read().splitlines()[1:]] == ["1", "2"]
    for text, words in (("when,loss\n1,0.5\n", "has no 'step' column"),
                        ("step,loss\n1,0.5\nx,0.4\n", "line 3 has step 'x', not a number")):
        with open(folder.log_path, "w") as f:
            f.write(text)
        with pytest.raises(RunDirError) as info:
            folder.trim_log(1)
        assert str(info.value) == (f"{folder.log_path} {words}, so the run cannot resume its log; "
                                   f"move it away (or delete it) and run the same command again")


# ---------------------------------------------------------------------- signals


def test_the_first_signal_is_recorded_and_a_second_stops_at_once():
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    with StopSignals(announce=False) as signals:
        assert all(signal.getsignal(sig) == signals.receive for sig in STOP_SIGNALS)
        os.kill(os.getpid(), signal.SIGHUP)  # a closed terminal: like SIGTERM, not an exit
        assert signals.first == signal.SIGHUP
        with pytest.raises(StoppedAtOnce) as info:
            os.kill(os.getpid(), signal.SIGTERM)
        assert info.value.signum == signal.SIGTERM
    assert {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} == previous


def test_under_ddp_the_same_request_twice_within_a_second_is_one():
    signals = StopSignals(announce=False, distributed=True)
    signals.receive(signal.SIGINT)
    signals.receive(signal.SIGINT)  # torchrun passing on the Ctrl-C that every process got
    assert signals.first == signal.SIGINT


def test_a_forked_worker_ignores_the_signals_of_its_parent(tmp_path):
    with StopSignals(announce=False) as signals:
        child = ForkedChild(lambda: (signals.receive(signal.SIGTERM), signals.receive(signal.SIGTERM)),
                            str(tmp_path / "child.txt"))
        assert child.wait() == 0, child.output()  # neither recorded nor raised in the worker
        assert signals.first is None


# ---------------------------------------------------------------------- processes and devices


def test_one_process_and_its_collectives():
    processes = Processes("cpu")
    assert (processes.rank, processes.world_size, processes.is_main) == (0, 1, True)
    assert processes.all_gather({"a": 1}) == [{"a": 1}]
    assert processes.mean({"loss": torch.tensor(3.0), "lr": 1e-3}, torch.device("cpu"), count=2) == \
        {"loss": 1.5, "lr": 5e-4}
    assert processes.max_flag(15) == 15
    done = []
    processes.main_only(lambda: done.append(1), "write")
    assert done == [1]
    with pytest.raises(OSError, match="full"):
        processes.main_only(lambda: (_ for _ in ()).throw(OSError("full")), "write")


@pytest.mark.parametrize("device,words", [("meta", "holds no data"), ("tpu", "unknown device"),
                                          ("cuda:7", "cuda")])
def test_devices_that_cannot_train_are_one_line(device, words):
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    with pytest.raises(ValueError, match=words) as info:
        check_device(device)
    assert "\n" not in str(info.value)


def test_the_evaluation_in_chunks_equals_one_pass():
    model = tiny_model("mnist", stages=2).double()
    images = torch.rand(7, 1, 28, 28, dtype=torch.float64)
    whole = evaluate(model, images)
    calls = []
    chunked = evaluate_shared(model, images, 7, Processes("cpu"), torch.device("cpu"),
                              between_chunks=lambda: calls.append(1), chunk=3)
    assert len(calls) == 2 and chunked["count"] == 7 and torch.equal(chunked["codes"], whole["codes"])
    assert chunked["mse"] == pytest.approx(whole["mse"], rel=1e-12)


# ---------------------------------------------------------------------- the training state


def test_a_state_restores_weights_adam_step_and_random_state(tmp_path):
    model = tiny_model("mnist", stages=2)
    optimizer = torch.optim.Adam(model.parameters())
    model(model.normalize(torch.rand(2, 1, 28, 28)))["loss"].backward()
    optimizer.step()
    settings = TrainSettings(batch_size=2, step_limit=10)
    torch.manual_seed(5)
    path = str(tmp_path / "state.pt")
    save_checkpoint(path, training_state(model, optimizer, 3, settings, device=torch.device("cpu")))
    expected = torch.rand(3)

    other = tiny_model("mnist", stages=2, seed=1)
    other_optimizer = torch.optim.Adam(other.parameters())
    resumed = restore(path, other, other_optimizer, settings.replace(lr=2e-3), device=torch.device("cpu"))
    assert resumed.step == 3 and resumed.log_scale == 1.0
    assert state_equal(other.state_dict(), model.state_dict())
    assert state_equal(other_optimizer.state_dict()["state"], optimizer.state_dict()["state"])
    assert torch.equal(torch.rand(3), expected)  # the random stream goes on where it was saved
    assert resumed.notes[0].endswith("this run uses lr 0.001 -> 0.002")
    # Saved by 1 process of 2 images a step, resumed by 2 of 2: the same images, step 3 -> 1.
    assert restore(path, other, other_optimizer, settings, device=torch.device("cpu"),
                   world_size=2).step == 1
    with pytest.raises(CheckpointError, match="another architecture"):
        restore(path, tiny_model("mnist", stages=3), other_optimizer, settings, device=torch.device("cpu"))


# ---------------------------------------------------------------------- output


def test_without_a_bar_progress_is_printed_by_time(tmp_path, monkeypatch, capsys):
    output = train_log.TrainLog(RunFolder(tmp_path), bar=False)
    output.start(0, TrainSettings(step_limit=100))
    output.between_rows(3, lambda: 0.25)
    assert capsys.readouterr().out == ""  # not yet: PROGRESS_SECONDS have not passed
    monkeypatch.setattr(train_log, "PROGRESS_SECONDS", 0.0)
    output.between_rows(5, lambda: 0.25)
    line = capsys.readouterr().out
    assert line.startswith("step 5/100 loss 0.25000 ") and "steps/s" in line and " left " in line
    quiet = train_log.TrainLog(RunFolder(tmp_path), show=False)
    quiet.start(0, TrainSettings())
    quiet.between_rows(5, lambda: pytest.fail("a quiet run computes no line"))


def test_a_closed_terminal_silences_the_output_instead_of_stopping_the_run(tmp_path, monkeypatch):
    output = train_log.TrainLog(RunFolder(tmp_path), bar=False)

    def gone(*args, **kwargs):
        raise OSError(5, "Input/output error")  # what a write to a hung-up terminal gets

    monkeypatch.setattr("builtins.print", gone)
    output.message("step 1")
    assert not output.show
    output.message("step 2")  # no second attempt
