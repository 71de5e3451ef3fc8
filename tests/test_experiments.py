"""Fine-tuning experiments (vq_draw/experiments.py): stage-weighted loss, splitting a model into
finer segments, and starting a run from another checkpoint, through TrainLoop's hooks."""

import os

import pytest
import torch

import vq_draw
from vq_draw.checkpoint import export_model
from vq_draw.experiments import FineTuneFrom, StageWeightedLoss, split_segments
from conftest import random_images, script_env, state_equal, tiny_model
from test_train import make_loop


def test_stage_weights_weight_the_average_over_stages():
    """Equal weights give the published loss exactly; other weights give the weighted average,
    and the logged chosen_loss stays the plain mean."""
    model = tiny_model("mnist").double()
    x = random_images(model, count=3).double()
    terms = model.training_losses(x)
    equal = StageWeightedLoss([2.0, 2.0, 2.0], stages=3)(model, terms)
    assert torch.allclose(equal, terms["loss"], rtol=1e-12, atol=0)
    weights = [1.0, 0.0, 3.0]
    expected = (terms["stage_losses"] * torch.tensor(weights, dtype=torch.float64)).sum() / 4 \
        + model.aux_coeff * terms["aux_loss"]
    assert torch.allclose(StageWeightedLoss(weights, stages=3)(model, terms), expected, rtol=1e-12, atol=0)
    # It is differentiable: the loop backpropagates it instead of terms["loss"].
    StageWeightedLoss(weights, stages=3)(model, terms).backward()
    assert model.output_scale.grad is not None


@pytest.mark.parametrize("weights, words", [([1, 1], "one weight per stage"), ([1, -1, 1], ">= 0"),
                                            ([0, 0, 0], "not all zero")])
def test_bad_stage_weights_are_rejected(weights, words):
    with pytest.raises(ValueError, match=words):
        StageWeightedLoss(weights, stages=3)


def test_checkpoints_that_hold_stage_weights_in_their_config_still_load(tmp_path):
    # Before the stage weights moved to this module, runs with them saved them in the model
    # config (the fine-tuned MNIST model's export does); they never changed a code.
    model = tiny_model("mnist").eval()
    export_model(model, str(tmp_path / "m.pt"))
    ckpt = torch.load(tmp_path / "m.pt", weights_only=True)
    ckpt["config"]["stage_weights"] = [1.0, 2.0, 3.0]
    del ckpt["checksum"]  # files of that time had none
    torch.save(ckpt, tmp_path / "old.pt")
    loaded = vq_draw.load_model(str(tmp_path / "old.pt"))
    x = random_images(model, 2)
    assert torch.equal(loaded.encode(x), model.encode(x))


@pytest.mark.parametrize("dataset, overrides, segment", [
    ("mnist", dict(stages=4), 2),               # one network -> two
    ("mnist", dict(stages=4), 1),               # -> a network per stage
    ("svhn", dict(stages=4, segment=4), 2),     # SVHN's per-stage heads are split too
    ("svhn", dict(stages=4, segment=2), 1),     # already segmented -> finer
    ("svhn", dict(stages=4, segment=2), [2, 1, 1]),  # unequal blocks: stage 4 alone
    ("mnist", dict(stages=4), [1, 3]),          # one network -> unequal blocks
])
def test_split_segments_keeps_every_code_and_reconstruction(dataset, overrides, segment):
    model = tiny_model(dataset, **overrides).eval()
    torch.manual_seed(1)
    split = split_segments(model, segment).eval()
    after = torch.rand(4)
    torch.manual_seed(1)
    assert torch.equal(after, torch.rand(4))  # the global random stream did not move
    assert split.config == dict(model.config, segment=segment)
    blocks = [segment] * (model.config["stages"] // segment) if isinstance(segment, int) else segment
    assert len(split.refiner.refiners) == len(blocks)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(split) > count(model)
    # The copies are independent tensors: training one network leaves the others alone.
    pointers = [p.data_ptr() for p in split.parameters()]
    assert len(set(pointers)) == len(pointers)
    assert not set(pointers) & {p.data_ptr() for p in model.parameters()}

    x = random_images(model, 3)
    with torch.no_grad():
        codes, recons = model.encode(x, return_all=True)
        split_codes, split_recons = split.encode(x, return_all=True)
    assert torch.equal(codes, split_codes)
    assert torch.equal(recons, split_recons)


def test_split_segments_refuses_what_is_not_a_split():
    model = tiny_model("svhn", stages=4, segment=2)
    # Not a divisor of 2, a merge, no number at all, a block across the networks' boundary
    # (stages 2-3), or blocks that do not cover the 4 stages.
    for segment in (3, 4, 0, None, [1, 2, 1], [2, 1], [2, 2, 1], [2, 0, 2]):
        with pytest.raises(ValueError, match="choose a divisor of 2"):
            split_segments(model, segment)


def test_init_from_fine_tunes_from_step_zero_then_resumes_its_own_run(tmp_path, no_plots):
    source = tiny_model("mnist", stages=2)
    make_loop(source, tmp_path / "source", step_limit=3, save_interval=3).run()
    source_ckpt = torch.load(tmp_path / "source" / "checkpoint.pt", weights_only=True)

    # A new run starts at step 0 from the source's weights and Adam state, with its own
    # training-only settings (here stage weights).
    tuned = tiny_model("mnist", stages=2, seed=5)
    weighted = StageWeightedLoss([1.0, 3.0], stages=2)
    loop = make_loop(tuned, tmp_path / "tuned", step_limit=2, save_interval=1, objective=weighted,
                     start=FineTuneFrom(str(tmp_path / "source" / "checkpoint.pt")))
    assert loop.step == 0
    assert state_equal(tuned.state_dict(), source.state_dict())
    adam = loop.optimizer.state_dict()["state"]
    assert all(torch.equal(adam[i]["exp_avg"], source_ckpt["optimizer"]["state"][i]["exp_avg"])
               for i in adam)
    loop.run()
    saved = torch.load(tmp_path / "tuned" / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 2 and saved["train"]["objective"] == {"stage_weights": [1.0, 3.0]}
    assert saved["prior_steps"] == 3  # the source's training is remembered
    from vq_draw.export import main as export
    export([str(tmp_path / "tuned" / "checkpoint.pt"), str(tmp_path / "tuned.pt")])
    exported = torch.load(tmp_path / "tuned.pt", weights_only=True)
    assert exported["trained_steps"] == 5 and exported["prior_steps"] == 3

    # Once the run has its own checkpoint, it resumes from that, not from init_from.
    again = make_loop(tiny_model("mnist", stages=2), tmp_path / "tuned", objective=weighted,
                      step_limit=2, start=FineTuneFrom(str(tmp_path / "source" / "checkpoint.pt")))
    assert again.step == 2 and again.prior_steps == 3
    assert state_equal(again.model.state_dict(), saved["model"])
    # A fine-tune of the export counts all 5 steps behind it.
    assert make_loop(tiny_model("mnist", stages=2), tmp_path / "second",
                     start=FineTuneFrom(str(tmp_path / "tuned.pt"))).prior_steps == 5

    # Weights only (an export) also work; another architecture is refused.
    export_model(source, str(tmp_path / "weights.pt"))
    fresh = make_loop(tiny_model("mnist", stages=2, seed=7), tmp_path / "from_export",
                      start=FineTuneFrom(str(tmp_path / "weights.pt")))
    assert fresh.step == 0 and fresh.prior_steps == 0
    assert state_equal(fresh.model.state_dict(), source.state_dict())
    assert not fresh.optimizer.state_dict()["state"]
    with pytest.raises(vq_draw.CheckpointError, match="another architecture"):
        make_loop(tiny_model("mnist", stages=3), tmp_path / "other",
                  start=FineTuneFrom(str(tmp_path / "weights.pt")))


def test_init_from_splits_the_refiner_when_the_run_asks_for_a_finer_segment(tmp_path, no_plots, capsys):
    source = tiny_model("mnist", stages=4)
    make_loop(source, tmp_path / "source", step_limit=2, save_interval=2).run()
    # --segment 2 fine-tunes the one-network model as two networks, identical at step 0.
    loop = make_loop(tiny_model("mnist", stages=4, segment=2, seed=3), tmp_path / "split",
                     step_limit=1, quiet=False, start=FineTuneFrom(str(tmp_path / "source" / "checkpoint.pt")))
    assert "into 2 networks of 2 stages" in capsys.readouterr().out
    assert loop.step == 0 and loop.prior_steps == 2
    assert state_equal(loop.model.state_dict(), split_segments(source, 2).state_dict())
    assert not loop.optimizer.state_dict()["state"]  # the source's Adam state has other shapes
    loop.run()
    # Networks are split, never merged; other differences are still refused.
    with pytest.raises(vq_draw.CheckpointError, match="split, not merged"):
        make_loop(tiny_model("mnist", stages=4), tmp_path / "merge",
                  start=FineTuneFrom(str(tmp_path / "split" / "checkpoint.pt")))
    with pytest.raises(vq_draw.CheckpointError, match="choose a divisor of 4"):
        make_loop(tiny_model("mnist", stages=4, segment=3), tmp_path / "uneven",
                  start=FineTuneFrom(str(tmp_path / "source" / "checkpoint.pt")))
    with pytest.raises(vq_draw.CheckpointError, match="choose a divisor of 2"):  # crosses 2 | 3
        make_loop(tiny_model("mnist", stages=4, segment=[1, 2, 1]), tmp_path / "across",
                  start=FineTuneFrom(str(tmp_path / "split" / "checkpoint.pt")))
    with pytest.raises(vq_draw.CheckpointError, match="another architecture"):
        make_loop(tiny_model("mnist", stages=4, segment=2, options=3), tmp_path / "other",
                  start=FineTuneFrom(str(tmp_path / "source" / "checkpoint.pt")))


def test_a_run_with_unequal_segments_splits_resumes_and_exports(tmp_path, no_plots, capsys):
    """--segment 2,1,1 from a two-network run: stage 4 gets a network of its own, identical at
    step 0; the run resumes into the same steps as an uninterrupted one, and its export loads
    with weights_only and encodes like the trained model."""
    source = tiny_model("mnist", stages=4, segment=2)
    make_loop(source, tmp_path / "source", step_limit=2, save_interval=2).run()
    init = str(tmp_path / "source" / "checkpoint.pt")
    whole = make_loop(tiny_model("mnist", stages=4, segment=[2, 1, 1], seed=3), tmp_path / "whole",
                      step_limit=4, save_interval=2, quiet=False, start=FineTuneFrom(init))
    assert "into 3 networks of 2,1,1 stages" in capsys.readouterr().out
    assert state_equal(whole.model.state_dict(), split_segments(source, [2, 1, 1]).state_dict())
    whole.run()
    halves = make_loop(tiny_model("mnist", stages=4, segment=[2, 1, 1], seed=3), tmp_path / "halves",
                       step_limit=4, save_interval=2, stop_at=2, start=FineTuneFrom(init))
    halves.run()
    resumed = make_loop(tiny_model("mnist", stages=4, segment=[2, 1, 1], seed=5), tmp_path / "halves",
                        step_limit=4, save_interval=2, start=FineTuneFrom(init))
    assert resumed.step == 2
    resumed.run()
    assert state_equal(resumed.model.state_dict(), whole.model.state_dict())

    export_model(whole.model, str(tmp_path / "model.pt"))
    saved = torch.load(str(tmp_path / "model.pt"), map_location="cpu", weights_only=True)
    assert saved["config"]["segment"] == [2, 1, 1]
    loaded = vq_draw.load_model(str(tmp_path / "model.pt")).eval()
    x = random_images(loaded, 3)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), whole.model.eval().encode(x))


def test_the_experiments_command_fine_tunes_with_stage_weights(tmp_path):
    """``python -m vq_draw.experiments``: the training flags plus --init-from and
    --stage-weights; a resume with other weights says so; bad weights are one line."""
    import subprocess
    import sys

    from conftest import REPO, write_npz

    write_npz(str(tmp_path / "train.npz"), 16, (1, 28, 28))
    flags = ["--data-dir", str(tmp_path / "train.npz"), "--stages", "2", "--options", "4",
             "--batch", "2", "--save-interval", "2", "--log-interval", "1000", "--workers", "0",
             "--device", "cpu", "--eval-size", "2"]

    def run(*args):
        return subprocess.run([sys.executable, *args], cwd=REPO, env=script_env(),
                              capture_output=True, text=True, timeout=120)

    source = str(tmp_path / "source")
    assert run("train_mnist.py", *flags, "--step-limit", "2", "--run-dir", source).returncode == 0
    tuned = str(tmp_path / "tuned")
    command = ["-m", "vq_draw.experiments", "mnist", *flags, "--run-dir", tuned,
               "--init-from", os.path.join(source, "checkpoint.pt")]
    done = run(*command, "--step-limit", "2", "--stage-weights", "1,3")
    assert done.returncode == 0, done.stderr
    assert "started from the weights and optimizer state" in done.stdout
    saved = torch.load(os.path.join(tuned, "checkpoint.pt"), weights_only=True)
    assert saved["train"]["objective"] == {"stage_weights": [1.0, 3.0]} and saved["prior_steps"] == 2
    again = run(*command, "--step-limit", "4", "--stage-weights", "1,5")
    assert again.returncode == 0, again.stderr
    assert "objective {'stage_weights': [1.0, 3.0]} -> {'stage_weights': [1.0, 5.0]}" in again.stdout
    for weights, words in (("1,2,3", "one weight per stage"), ("1,x", "--stage-weights")):
        bad = run(*command, "--stage-weights", weights)
        assert bad.returncode != 0 and words in bad.stderr and "Traceback" not in bad.stderr
