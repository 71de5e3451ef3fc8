"""The training loop (vq_draw/train.py): schedule, accumulation, checkpoints, exact resume
(also after kill -9), a full disk, and a few training steps on every dataset."""

import errno
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import vq_draw
from vq_draw.checkpoint import SaveError, export_model, save_checkpoint
from vq_draw.data import ArrayDataset, ImageFileDataset, fixed_images, load_dataset
from vq_draw.train import TrainLoop, learning_rate
from conftest import REPO, ForkedChild, random_images, script_env, state_equal, tiny_model, write_npz


def random_dataset(count, shape=(1, 28, 28), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return ArrayDataset(torch.randint(0, 256, (count, *shape), dtype=torch.uint8, generator=generator))


def make_loop(model, run_dir, **kwargs):
    settings = dict(train_data=random_dataset(16), run_dir=str(run_dir), batch_size=2,
                    save_interval=1000, log_interval=1000, quiet=True)
    return TrainLoop(model=model, **(settings | kwargs))


def test_learning_rate_schedule():
    assert learning_rate(0, 1e-3, 0.0, 100) == 1e-3
    assert learning_rate(25, 1e-3, 0.0, 100) == pytest.approx(7.5e-4)
    assert learning_rate(100, 1e-3, 1e-4, 100) == pytest.approx(1e-4)
    assert learning_rate(150, 1e-3, 1e-4, 100) == pytest.approx(1e-4)
    assert learning_rate(50, 1e-3, None, 100) == 1e-3  # constant without a final rate
    assert learning_rate(50, 1e-3, 0.0, None) == 1e-3  # constant without a limit


def test_each_update_uses_the_rate_at_the_step_after_its_micro_batches(tmp_path, no_plots):
    """As the original (update_lr(i) then optimizer.step(), i the micro-batches done): 22
    micro-batches, interval 4, lr 1e-3 -> 0 apply these five rates, not one interval early;
    the last 2 micro-batches are not applied."""
    model = tiny_model("mnist", stages=2)
    loop = make_loop(model, tmp_path, step_interval=4, step_limit=22, lr=1e-3, lr_final=0.0,
                     log_interval=4)
    applied = []
    loop.optimizer.register_step_pre_hook(
        lambda optimizer, args, kwargs: applied.append(optimizer.param_groups[0]["lr"]))
    loop.run()
    expected = [8.181818181818182e-4, 6.363636363636364e-4, 4.545454545454545e-4,
                2.727272727272727e-4, 9.090909090909091e-5]
    assert applied == pytest.approx(expected, rel=1e-12)
    with open(loop.log_path) as f:  # the log shows the rate each update applied
        logged = [float(row.split(",")[8]) for row in f.read().splitlines()[1:6]]
    assert logged == pytest.approx(expected, rel=1e-5)


def test_accumulated_micro_batches_equal_one_big_batch(tmp_path, no_plots):
    """With accumulate="mean", k micro-batches of b per update equal one batch of k * b: same
    weights, same gradients.

    16 images are a whole number of batches of 2 and of 8, so with the same seed both runs
    draw the same images for each update (test_data checks this property of BatchSampler).
    float64 makes the comparison tight.
    """
    data = random_dataset(16, seed=1)
    runs = {}
    for name, batch, interval, limit in (("micro", 2, 4, 12), ("big", 8, 1, 3)):
        model = tiny_model("mnist", stages=2).double()
        loop = make_loop(model, tmp_path / name, train_data=data, batch_size=batch,
                         step_interval=interval, accumulate="mean", step_limit=limit, lr_final=0.0)
        loop.run()
        assert loop.step == limit
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        runs[name] = (model.state_dict(), grads)
    initial = tiny_model("mnist", stages=2).double().state_dict()
    (micro, micro_grads), (big, big_grads) = runs["micro"], runs["big"]
    assert not torch.allclose(micro["output_scale"], initial["output_scale"])  # it trained
    for name in big:
        torch.testing.assert_close(micro[name], big[name], rtol=1e-9, atol=1e-12, msg=name)
    # The last update's gradient: averaged, not summed, over the micro-batches.
    assert micro_grads.keys() == big_grads.keys() and len(big_grads) > 10
    for name in big_grads:
        torch.testing.assert_close(micro_grads[name], big_grads[name], rtol=1e-9, atol=1e-12, msg=name)


def test_accumulation_sums_the_micro_batches_gradients_by_default(tmp_path, no_plots):
    """As in the original: an update's gradient is the sum of its micro-batches' gradients
    (each of the mean loss over its images), so k micro-batches of b give k times the gradient
    of one batch of k * b. Adam's eps makes the difference matter (docs/experiments/cifar_celeba.md)."""
    data = random_dataset(16, seed=1)
    grads = {}
    for name, batch, interval, accumulate in (("sum", 2, 4, None), ("mean", 2, 4, "mean"),
                                              ("big", 8, 1, None)):
        model = tiny_model("mnist", stages=2).double()
        settings = {} if accumulate is None else {"accumulate": accumulate}
        loop = make_loop(model, tmp_path / name, train_data=data, batch_size=batch,
                         step_interval=interval, step_limit=interval, **settings)
        loop.run()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(grads["big"]) > 10
    for name, big in grads["big"].items():
        torch.testing.assert_close(grads["sum"][name], 4 * big, rtol=1e-9, atol=1e-12, msg=name)
        torch.testing.assert_close(grads["mean"][name], big, rtol=1e-9, atol=1e-12, msg=name)


def test_a_state_from_before_the_accumulate_setting_says_it_averaged(tmp_path, no_plots, capsys):
    data = random_dataset(16, seed=1)
    loop = make_loop(tiny_model("mnist", stages=2), tmp_path, train_data=data, step_interval=2,
                     step_limit=2, quiet=False)
    loop.run()
    state = torch.load(loop.checkpoint_path, weights_only=True)
    del state["train"]["accumulate"]  # as saved before the setting existed
    from vq_draw.checkpoint import save_checkpoint
    save_checkpoint(loop.checkpoint_path, state)
    capsys.readouterr()
    make_loop(tiny_model("mnist", stages=2), tmp_path, train_data=data, step_interval=2,
              step_limit=4, quiet=False).run()
    assert "accumulate 'mean' -> 'sum'" in capsys.readouterr().out


def test_a_training_state_with_one_shared_scale_resumes(tmp_path, no_plots):
    """Training states written when all segment networks shared one output scale resume: the
    scalar and its Adam moments become one per network, and training goes on."""
    run = tmp_path / "run"
    make_loop(tiny_model("svhn", stages=4, segment=2), run, train_data=random_dataset(8, (3, 32, 32)),
              step_limit=2, save_interval=2).run()
    path = run / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"]["output_scale"] = ckpt["model"]["output_scale"][0].clone()
    index = [name for name, _ in tiny_model("svhn", stages=4, segment=2).named_parameters()].index("output_scale")
    for key in ("exp_avg", "exp_avg_sq"):
        ckpt["optimizer"]["state"][index][key] = ckpt["optimizer"]["state"][index][key][0].clone()
    ckpt.pop("checksum", None)  # the file is edited on purpose; older files had none
    torch.save(ckpt, path)
    loop = make_loop(tiny_model("svhn", stages=4, segment=2, seed=3), run,
                     train_data=random_dataset(8, (3, 32, 32)), step_limit=4, save_interval=2)
    assert loop.step == 2 and loop.model.output_scale.shape == (2,)
    assert loop.model.output_scale[0] == loop.model.output_scale[1] == ckpt["model"]["output_scale"]
    loop.run()
    assert loop.step == 4 and torch.isfinite(loop.model.output_scale).all()


def test_an_incomplete_last_interval_is_trained_but_not_applied(tmp_path, no_plots):
    """As in the original: at a step limit that is not a multiple of step_interval (CIFAR-10's
    34,811 = 2,175 x 16 + 11), the last micro-batches run but their gradients are not applied."""
    data = random_dataset(16, seed=1)
    weights = {}
    for limit in (8, 11):
        model = tiny_model("mnist", stages=2)
        loop = make_loop(model, tmp_path / str(limit), train_data=data, step_interval=4,
                         step_limit=limit)
        loop.run()
        assert loop.step == limit
        weights[limit] = model.state_dict()
        if limit == 11:
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert state_equal(weights[8], weights[11])


def test_published_svhn_recipe_decays_the_learning_rate_to_zero():
    # The original's --lr-final defaults to 0 and its SVHN command does not set it; CIFAR-10
    # and CelebA pass --lr-final 0.001, a constant rate.
    recipes = {name: vq_draw.DATASETS[name]["train"] for name in vq_draw.DATASETS}
    assert recipes["svhn"]["lr_final"] == 0.0 and recipes["mnist"]["lr_final"] == 0.0
    assert recipes["cifar10"]["lr_final"] is None and recipes["celeba"]["lr_final"] is None


def test_exploration_trains_on_the_best_options_loss():
    """With epsilon > 0 a stage may continue from a random option, but its loss term is the
    best option's, as in the original."""
    model = tiny_model("mnist", stages=3, epsilon=1.0).train()  # every choice random
    x = random_images(model, 8)
    torch.manual_seed(0)
    terms = model.training_losses(x)
    torch.manual_seed(0)
    codes, _, losses = model.run(x)
    assert torch.equal(terms["codes"], codes)
    best = losses.min(2).values.mean(0)  # [S]
    taken = losses.gather(2, codes.unsqueeze(2)).squeeze(2).mean(0)
    assert not torch.allclose(best, taken)  # random choices are not the best ones
    torch.testing.assert_close(terms["stage_losses"], best.detach())
    torch.testing.assert_close(terms["loss"], best.mean() + model.aux_coeff * losses.mean())


class Interrupted(Exception):
    pass


def write_png_digits(folder, count, seed=0):
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(f"{folder}/{i:03d}.png")
    return load_dataset("mnist", "train", folder)


@pytest.mark.parametrize("source", ["arrays", "image files"])
def test_resume_equals_an_uninterrupted_run_bitwise(tmp_path, source, no_plots):
    """Exploration (epsilon), the learning-rate schedule and accumulation all
    depend on state that must survive the restart."""
    if source != "image files":
        train = random_dataset(12, seed=2)
    else:
        train = write_png_digits(str(tmp_path / "pngs"), 13)  # 12 train + 1 test
    test = random_dataset(3, seed=3)
    settings = dict(train_data=train, test_data=test, step_interval=2, step_limit=8,
                    save_interval=2, eval_interval=4, eval_size=2, lr_final=0.0)

    reference = make_loop(tiny_model("mnist", stages=2, epsilon=0.3), tmp_path / "ref", **settings)
    reference.run()

    first = make_loop(tiny_model("mnist", stages=2, epsilon=0.3), tmp_path / "run", **settings)
    save = first.save

    def save_then_stop():
        save()
        if first.step == 4:
            raise Interrupted

    first.save = save_then_stop
    with pytest.raises(Interrupted):
        first.run()
    # Another initialization: everything must come from the checkpoint.
    second = make_loop(tiny_model("mnist", stages=2, epsilon=0.3, seed=9), tmp_path / "run", **settings)
    assert second.step == 4
    second.run()
    assert second.step == 8
    assert state_equal(second.model.state_dict(), reference.model.state_dict())
    assert state_equal(second.optimizer.state_dict(), reference.optimizer.state_dict())
    assert state_equal(torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"],
                       torch.load(tmp_path / "ref" / "checkpoint.pt", weights_only=True)["model"])


def test_stop_at_then_resume_equals_an_uninterrupted_run(tmp_path, no_plots):
    """stop_at saves and returns on an update boundary without touching the schedule, so the
    run continued without it is the uninterrupted run; it stops at once when already there."""
    settings = dict(train_data=random_dataset(12, seed=2), step_interval=2, step_limit=8,
                    save_interval=1000, lr_final=0.0)
    reference = make_loop(tiny_model("mnist", stages=2, epsilon=0.3), tmp_path / "ref", **settings)
    reference.run()

    first = make_loop(tiny_model("mnist", stages=2, epsilon=0.3), tmp_path / "run", stop_at=3,
                      **settings)
    assert first.run() is None
    assert first.step == 4  # the update that crosses step 3 is finished, never split
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 4
    again = make_loop(tiny_model("mnist", stages=2, epsilon=0.3), tmp_path / "run", stop_at=3,
                      **settings)
    again.run()
    assert again.step == 4
    rest = make_loop(tiny_model("mnist", stages=2, epsilon=0.3, seed=9), tmp_path / "run", **settings)
    rest.run()
    assert rest.step == 8
    assert state_equal(rest.model.state_dict(), reference.model.state_dict())
    assert state_equal(rest.optimizer.state_dict(), reference.optimizer.state_dict())
    with pytest.raises(ValueError, match="stop_at must be a positive integer"):
        make_loop(tiny_model("mnist", stages=2), tmp_path / "bad", stop_at=0)


def test_the_step_limit_evaluates_the_whole_test_set_once(tmp_path, monkeypatch, no_plots):
    import vq_draw.evaluate

    sizes = []
    evaluate = vq_draw.evaluate.evaluate

    def counting_evaluate(model, images, **kwargs):
        sizes.append(len(images))
        return evaluate(model, images, **kwargs)

    monkeypatch.setattr(vq_draw.evaluate, "evaluate", counting_evaluate)
    settings = dict(test_data=random_dataset(5, seed=3), step_limit=4, eval_interval=2, eval_size=2,
                    save_interval=2)
    loop = make_loop(tiny_model("mnist", stages=1), tmp_path, **settings)
    result = loop.run()
    assert sizes == [2, 5]  # a subset at step 2, then all 5 at the limit (not a subset, then all)
    assert result["count"] == 5 and (tmp_path / "final_eval.json").exists()
    rows = open(tmp_path / "log.csv").read().splitlines()
    assert rows[-1].startswith("4,") and rows[-1].split(",")[9]  # the last row has the test MSE
    # Resumed at its limit, a run trains no more and evaluates the whole test set once.
    sizes.clear()
    again = make_loop(tiny_model("mnist", stages=1), tmp_path, **settings)
    assert again.run()["count"] == 5 and sizes == [5] and again.step == 4


def test_checkpoint_contents_and_load_model(tmp_path):
    model = tiny_model("svhn", stages=2, segment=1)
    loop = make_loop(model, tmp_path, train_data=random_dataset(4, (3, 32, 32)),
                     test_data=random_dataset(2, (3, 32, 32)), step_limit=2, save_interval=2)
    loop.run()
    path = tmp_path / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)  # plain tensors and containers only
    assert ckpt["step"] == 2 and ckpt["config"]["dataset"] == "svhn" and ckpt["config"]["stages"] == 2
    assert {"model", "optimizer", "rng"} <= ckpt.keys()
    for name in ("reconstructions.png", "samples.png", "log.csv", "loss.png"):
        assert (tmp_path / name).exists(), name
    loaded = vq_draw.load_model(str(path))
    assert not loaded.training and state_equal(loaded.state_dict(), model.state_dict())
    x = loaded.normalize(torch.rand(2, 3, 32, 32))
    assert torch.equal(loaded.reconstruct(x), model.eval().reconstruct(x))

    export_model(model, str(tmp_path / "weights.pt"))
    exported = torch.load(tmp_path / "weights.pt", weights_only=True)
    assert "optimizer" not in exported
    assert state_equal(vq_draw.load_model(str(tmp_path / "weights.pt")).state_dict(), model.state_dict())
    # A weights-only file cannot be resumed from.
    with pytest.raises(vq_draw.CheckpointError, match="weights only"):
        make_loop(tiny_model("svhn", stages=2, segment=1), tmp_path,
                  checkpoint_path=str(tmp_path / "weights.pt"))


def test_bad_training_settings():
    model = tiny_model("mnist", stages=1)
    for kwargs in (dict(batch_size=0), dict(step_interval=0), dict(save_interval=0),
                   dict(step_limit=0), dict(lr=0.0), dict(lr=float("nan")), dict(batch_size=2.0),
                   dict(accumulate="average")):
        with pytest.raises(ValueError):
            make_loop(model, "unused", **kwargs)


# ---------------------------------------------------------------------- a full disk


def failing_save(written=1000):
    """A torch.save that writes part of the file and then finds the disk full."""
    def save(obj, f, *args, **kwargs):
        f.write(b"\0" * written)
        raise OSError(errno.ENOSPC, "No space left on device")
    return save


def test_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    save_checkpoint(path, {"step": 1, "weights": torch.arange(5)})
    before = open(path, "rb").read()
    monkeypatch.setattr(torch, "save", failing_save())
    with pytest.raises(SaveError, match="No space left on device") as info:
        save_checkpoint(path, {"step": 2, "weights": torch.arange(6)})
    assert "previous checkpoint is intact" in str(info.value)
    assert open(path, "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]  # no partial temporary file left
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1


def test_disk_full_in_training_stops_with_save_error(tmp_path, monkeypatch, no_plots):
    loop = make_loop(tiny_model("mnist", stages=1), tmp_path, step_limit=4, save_interval=2)
    save = loop.save
    calls = []

    def save_then_fill_disk():
        calls.append(loop.step)
        if len(calls) == 2:
            monkeypatch.setattr(torch, "save", failing_save())
        save()

    loop.save = save_then_fill_disk
    with pytest.raises(SaveError):
        loop.run()
    monkeypatch.undo()
    assert calls == [2, 4]
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 2
    # The same command resumes from the intact checkpoint.
    assert make_loop(tiny_model("mnist", stages=1), tmp_path, step_limit=4).step == 2


# ---------------------------------------------------------------------- kill -9


def kill_restart_and_compare(tmp_path, modes, seed, fork=True):
    """Start a tiny MNIST training command and SIGKILL it once per mode ("anywhere": a random
    moment after its first checkpoint; "save": as soon as it starts writing a checkpoint),
    restarting the same command each time; then let it finish. Its final checkpoint must be
    bitwise that of the same command run without interruption.

    :param fork: run the command in forked processes rather than fresh ``python train_mnist.py``.
    """
    data = str(tmp_path / "digits.npz")
    write_npz(data, 40, (1, 28, 28))
    log = str(tmp_path / "stderr.txt")

    def arguments(run_dir):
        return ["--data-dir", data, "--stages", "2", "--options", "4", "--batch", "2",
                "--step-limit", "8", "--step-interval", "2", "--save-interval", "2",
                "--eval-interval", "1000", "--log-interval", "1000", "--epsilon", "0.3",
                "--lr-final", "0", "--workers", "0", "--device", "cpu", "--run-dir", str(run_dir)]

    def start(run_dir):
        if fork:
            from vq_draw.train_cli import main
            return ForkedChild(lambda: main("mnist", arguments(run_dir)), log)
        with open(log, "a") as err:
            return subprocess.Popen([sys.executable, os.path.join(REPO, "train_mnist.py"),
                                     *arguments(run_dir)], env=script_env(),
                                    stdout=subprocess.DEVNULL, stderr=err)

    def errors():
        return open(log).read() if os.path.exists(log) else ""

    # The uninterrupted run, here (the same code, and one thread as in the subprocesses).
    from vq_draw.train_cli import main
    begin = time.time()
    main("mnist", arguments(tmp_path / "ref"))
    duration = time.time() - begin

    rng = random.Random(seed)
    run_dir = tmp_path / "run"
    checkpoint = run_dir / "checkpoint.pt"
    deadline = time.time() + 300
    killed = []
    for mode in modes + ["finish"]:
        proc = start(run_dir)
        tmp = f"checkpoint.pt.tmp.{proc.pid}"
        if mode == "anywhere":
            while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.5) * duration)  # within the rest of the run
        elif mode == "save":
            started = checkpoint.exists()  # a save that starts after this moment
            while proc.poll() is None and time.time() < deadline:
                if started and tmp in os.listdir(run_dir):
                    break
                started = started or checkpoint.exists()
                time.sleep(0.001)
        else:
            while proc.poll() is None and time.time() < deadline:
                time.sleep(0.01)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed.append(mode)
        proc.wait()
        if proc.returncode not in (0, -signal.SIGKILL):
            pytest.fail(f"the restarted run failed: {errors()}")
    assert proc.returncode == 0, f"the last run did not finish: {errors()}"
    assert killed and "finish" not in killed, f"killed {killed} (seed {seed})"
    print(f"killed: {killed} (seed {seed})")

    final = torch.load(checkpoint, weights_only=True)
    expected = torch.load(tmp_path / "ref" / "checkpoint.pt", weights_only=True)
    assert final["step"] == expected["step"] == 8
    assert state_equal(final["model"], expected["model"]), f"killed {killed}, seed {seed}"
    assert state_equal(final["optimizer"], expected["optimizer"]), f"killed {killed}, seed {seed}"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_kill_9_then_restart_ends_bitwise_equal(tmp_path):
    """Killed at a random moment during training, restarted, killed while writing a checkpoint,
    restarted again: the same weights, bit for bit, as a run that never stopped."""
    kill_restart_and_compare(tmp_path, ["anywhere", "save"], random.randrange(10 ** 6))


@pytest.mark.slow
def test_kill_9_real_commands_repeatedly(tmp_path):
    """The same with fresh ``python train_mnist.py`` processes and four kills."""
    kill_restart_and_compare(tmp_path, ["anywhere", "save", "anywhere", "save"],
                             random.randrange(10 ** 6), fork=False)


# ---------------------------------------------------------------------- every dataset


def first(dataset, count):
    """The first ``count`` images of a dataset, as a dataset of the same kind."""
    if isinstance(dataset, ArrayDataset):
        return ArrayDataset(dataset.images[:count])
    if isinstance(dataset, ImageFileDataset):
        return ImageFileDataset(dataset.paths[:count], dataset.shape)
    raise TypeError(type(dataset))


def assert_loss_falls(dataset, train, tmp_path, steps):
    """Train a tiny model on one fixed batch of real images; its loss on them must fall by 1 %.

    The training set is that batch, so every step sees the same four images, and the loss is
    measured on them exactly (no exploration, the code path of training) before and after.
    """
    train = first(train, 4)
    model = tiny_model(dataset, stages=2, **({} if dataset == "mnist" else {"segment": 1}))
    x = model.normalize(fixed_images(train, 4))
    with torch.no_grad():
        before = model.training_losses(x)["loss"].item()
    # No test data: its sample grid (64 decodings) would cost more than the training here.
    loop = make_loop(model, tmp_path / dataset, train_data=train, batch_size=4,
                     step_limit=steps, save_interval=steps)
    loop.run()
    with torch.no_grad():
        after = model.training_losses(x)["loss"].item()
    assert loop.step == steps and (tmp_path / dataset / "checkpoint.pt").exists()
    print(f"{dataset}: loss {before:.5f} before, {after:.5f} after {steps} steps")
    assert after < 0.99 * before, f"{dataset}: loss {before:.5f} before, {after:.5f} after {steps} steps"


def test_smoke_mnist(shared_data, tmp_path, no_plots):
    train = load_dataset("mnist", "train", shared_data, download=False)
    test = load_dataset("mnist", "test", shared_data, download=False)
    assert (len(train), len(test)) == (60000, 10000)
    assert_loss_falls("mnist", train, tmp_path, steps=16)


def test_smoke_cifar10(shared_data, tmp_path, no_plots):
    folder = os.path.join(shared_data, "cifar10")
    if not os.path.isdir(folder):
        pytest.skip("no CIFAR-10 npz folder")
    train = load_dataset("cifar10", "train", folder, download=False)
    test = load_dataset("cifar10", "test", folder, download=False)
    assert (len(train), len(test)) == (10000, 10000)
    assert_loss_falls("cifar10", train, tmp_path, steps=3)


def test_smoke_celeba(shared_data, tmp_path, no_plots):
    folder = os.path.join(shared_data, "celeba")
    if not os.path.isdir(folder):
        pytest.skip("no CelebA image folder")
    train = load_dataset("celeba", "train", folder, download=False)
    test = load_dataset("celeba", "test", folder, download=False)
    assert (len(train), len(test)) == (9000, 1000)  # the last tenth of the folder is held out
    assert isinstance(train, ImageFileDataset)  # read through the DataLoader path
    assert_loss_falls("celeba", train, tmp_path, steps=3)


def test_smoke_svhn_synthetic_mat(tmp_path, no_plots):
    pytest.importorskip("scipy")
    import scipy.io

    # Smooth synthetic "house numbers" (random low-frequency color fields), not noise,
    # so that a few steps can make progress as on real photographs.
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 4)):
        coarse = rng.uniform(0, 255, (4, 4, 3, n))
        x = np.kron(coarse, np.ones((8, 8, 1, 1))).astype(np.uint8)  # 32 x 32 x 3 x n
        y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
        scipy.io.savemat(str(tmp_path / f"{split}_32x32.mat"), {"X": x, "y": y})
    train = load_dataset("svhn", "train", str(tmp_path), download=False)
    test = load_dataset("svhn", "test", str(tmp_path), download=False)
    assert (len(train), len(test)) == (8, 4)
    assert_loss_falls("svhn", train, tmp_path, steps=4)


def test_without_a_terminal_progress_is_printed_by_time_between_log_rows(tmp_path, monkeypatch,
                                                                          capsys, no_plots):
    from vq_draw import train_log
    monkeypatch.setattr(train_log, "PROGRESS_SECONDS", 0.0)  # every update is "30 s later"
    make_loop(tiny_model("mnist", stages=1), tmp_path, step_limit=3, log_interval=1000, quiet=False,
              progress=False).run()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split(" loss ")[0] for line in lines] == ["step 1/3", "step 2/3", "step 3/3"]
    assert "final" not in lines[0] and "final" in lines[-1]  # timed lines, then the log row
