"""The benchmark (vq_draw/tools/bench.py) and the fused loss and head kernels it times, each
against its broadcast or full-layer equivalent (the whole encoder against the plain
implementation is in test_reference.py)."""

import json
import os

import pytest
import torch

from conftest import tiny_model
from vq_draw.tools import bench
from vq_draw import reference as plain
from vq_draw.config import DATASETS
from vq_draw.losses import mse_loss, mse_options, mse_options_pick, mse_shared_options
from vq_draw.nn import OptionConv

TINY = dict(options=4, stages=3)


def tiny_models(dataset, dtype=torch.float32, seed=0, **kwargs):
    settings = dict(TINY, **kwargs)
    segment = None if dataset == "mnist" else 1
    model, reference = bench.build_models(dataset, settings["options"], settings["stages"], segment,
                                          seed=seed)
    return model.to(dtype), reference.to(dtype)


def images(model, n, dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return model.normalize(torch.rand(n, *model.shape, generator=gen)).to(dtype)


@pytest.mark.parametrize("channels,channels_last,n", [(1, False, 3), (2, False, 3), (3, True, 3),
                                                      (1, True, 70)])
def test_mse_options_matches_broadcast_mse_and_gradcheck(channels, channels_last, n):
    torch.manual_seed(0)
    shape = (n, channels, 5, 4)
    residual = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    out = torch.randn(n, 4 * channels, 5, 4, dtype=torch.float64)  # a conv output, K = 4
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    deltas = out.view(n, 4, channels, 5, 4).detach().requires_grad_(True)
    scale = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    expected = mse_loss(residual.unsqueeze(1) + scale * deltas, torch.zeros(shape, dtype=torch.float64))
    torch.testing.assert_close(mse_options(residual, deltas, scale), expected, rtol=1e-12, atol=1e-12)
    if n <= 3:  # gradcheck is slow on big inputs
        assert torch.autograd.gradcheck(mse_options, (residual, deltas, scale))
    grad = torch.autograd.grad(mse_options(residual, deltas, scale).sum(), deltas)[0]
    assert grad.stride() == deltas.stride()  # the last convolution gets its own layout back


def test_mse_shared_options_matches_broadcast_mse_and_gradcheck():
    torch.manual_seed(2)
    residual = torch.randn(5, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    shared = torch.randn(6, 2, 3, 4, dtype=torch.float64, requires_grad=True)  # K = 6
    expected = mse_loss(residual.unsqueeze(1) + shared, torch.zeros_like(residual))
    torch.testing.assert_close(mse_shared_options(residual, shared), expected, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(mse_shared_options, (residual, shared))


@pytest.mark.parametrize("channels_last", [False, True])
def test_mse_options_pick_equals_losses_then_indexing(channels_last):
    """The fused node gives the values and gradients of mse_options followed by indexing."""
    torch.manual_seed(1)
    n, k, shape = 5, 4, (2, 3, 4)
    residual = torch.randn(n, *shape, dtype=torch.float64, requires_grad=True)
    out = torch.randn(n, k * shape[0], *shape[1:], dtype=torch.float64)
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    deltas = out.view(n, k, *shape).detach().requires_grad_(True)
    scale = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(n, *shape, dtype=torch.float64)  # a downstream use of the chosen deltas

    def choose(losses):
        return (losses.argmin(1) + torch.arange(len(losses))) % k  # not only the best

    losses, choices, chosen = mse_options_pick(residual, deltas, scale, choose)
    ref_losses = mse_options(residual, deltas, scale)
    ref_choices = choose(ref_losses.detach())
    ref_chosen = deltas[torch.arange(n), ref_choices]
    assert torch.equal(choices, ref_choices) and torch.equal(chosen, ref_chosen)
    torch.testing.assert_close(losses, ref_losses, rtol=0, atol=0)
    inputs = (residual, deltas, scale)
    grads = torch.autograd.grad(losses.sum() + 0.7 * losses[:, 1].sum() + (chosen * weights).sum(), inputs)
    ref = torch.autograd.grad(ref_losses.sum() + 0.7 * ref_losses[:, 1].sum() + (ref_chosen * weights).sum(),
                              inputs)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert grads[1].stride() == deltas.stride()
    # Only the chosen deltas used (no gradient reaches the losses):
    grad = torch.autograd.grad((mse_options_pick(residual, deltas, scale, choose)[2] * weights).sum(),
                               deltas)[0]
    ref_chosen = deltas[torch.arange(n), ref_choices]
    torch.testing.assert_close(grad, torch.autograd.grad((ref_chosen * weights).sum(), deltas)[0])


@pytest.mark.parametrize("kernel,channels,per_stage,size", [(3, 1, False, (28, 28)), (5, 3, False, (9, 7)),
                                                            (1, 3, True, (8, 8)), (3, 2, False, (5, 6))])
@pytest.mark.parametrize("channels_last", [False, True])
def test_select_equals_full_layer(kernel, channels, per_stage, size, channels_last):
    torch.manual_seed(0)
    head = OptionConv(16, channels, 5, kernel, num_stages=3, per_stage=per_stage).double()
    h = torch.randn(6, 16, *size, dtype=torch.float64)
    if channels_last:
        h = h.contiguous(memory_format=torch.channels_last)
    choices = torch.tensor([0, 4, 2, 2, 1, 3])
    for stage in (0, 2):
        full = head(h, stage)[torch.arange(6), choices]
        torch.testing.assert_close(head.select(h, stage, choices), full, rtol=1e-12, atol=1e-12)


def test_channels_last_changes_no_codes():
    model, _ = tiny_models("cifar10", stages=2)
    model.eval()
    x = images(model, 5)
    codes, recon = model.encode(x, return_all=True)
    model.channels_last = False
    codes2, recon2 = model.encode(x, return_all=True)
    assert torch.equal(codes, codes2)
    torch.testing.assert_close(recon, recon2, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_chooses_on_float32_losses():
    model, _ = tiny_models("mnist")
    x = images(model, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes, _, losses = model.run(x)
        terms = model(x)
    assert losses.dtype == torch.float32
    assert torch.equal(codes, losses.argmin(2))
    terms["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_bench_quick_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--quick", "--datasets", "mnist", "--repeats", "1", "--no-memory", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "ratio" in printed and "mnist" in printed
    data = json.loads(out.read_text())
    rows = {row["measure"]: row for row in data["results"]}
    assert set(rows) == set(bench.MEASURES)
    for row in rows.values():
        assert row["reference_s"] > 0 and row["optimized_s"] > 0
        assert row["ratio"] == pytest.approx(row["reference_s"] / row["optimized_s"])
    assert rows["encode"]["optimized_images_per_s"] > 0
    assert data["agreement"]["mnist"]["codes_equal"]


def test_flop_counts_match_the_layer_arithmetic():
    conv = torch.nn.Conv2d(64, 16, 3, padding=1)
    x = torch.randn(2, 64, 28, 28, requires_grad=True)
    forward = 2 * 2 * 28 * 28 * 16 * 64 * 9  # 2 FLOP per multiply-add
    assert bench.count_gflop(lambda: conv(x)) * 1e9 == forward
    # Backward: the input gradient and the weight gradient cost one forward each.
    assert bench.count_gflop(lambda: conv(x).sum().backward()) * 1e9 == 3 * forward
    model = tiny_model("mnist", options=4, stages=2).eval()
    # Decoding runs stage 0 once for the whole batch: fewer FLOPs per image than the reference.
    codes = torch.tensor([[0, 1], [2, 3], [1, 1]])
    assert bench.count_gflop(lambda: model.decode(codes)) < bench.count_gflop(
        lambda: plain.decode(model, codes))
    assert bench.gemm_peak("cpu", repeats=1, size=256) > 0


def test_bench_flops_reports_rates_and_time_at_the_peak(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--quick", "--datasets", "mnist", "--measures", "train", "encode", "--repeats", "1",
                "--no-memory", "--flops", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "GEMM peak" in printed and "at the peak the optimized step would take" in printed
    assert "all 70,000 mnist images" in printed
    data = json.loads(out.read_text())
    assert data["info"]["gemm_peak_gflop_per_s"] > 0
    for row in data["results"]:
        for impl in ("reference", "optimized"):
            assert row[f"{impl}_gflop"] > 0
            assert row[f"{impl}_gflop_per_s"] == pytest.approx(row[f"{impl}_gflop"] / row[f"{impl}_s"])


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS reset needs Linux")
def test_memory_measurement_in_subprocess():
    spec = dict(bench.settings_for("mnist", "cpu", quick=True), measure="train", impl="optimized",
                device="cpu", channels_last=True, threads=1)
    result = bench.measure_memory(spec)
    assert result["peak_mb"] > 50  # at least the Python process with torch
    assert 0 <= result["working_mb"] < result["peak_mb"]


def test_bench_rejects_bad_flags(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--repeats", "0"])
    assert "--repeats must be at least 1" in capsys.readouterr().err


def test_loop_overhead_times_every_part():
    result = bench.loop_overhead("mnist", steps=3, batch_size=4, options=4, stages=2, log_interval=2,
                                 save_interval=3, eval_interval=3, eval_size=8)
    for key in ("step", "data", "log", "eval", "save"):
        assert result[key] > 0, key
    # log every 2, eval and save every 3 steps: the amortized loop time over the step time
    expected = (result["data"] + result["log"] / 2 + result["eval"] / 3 + result["save"] / 3
                + result["other"]) / result["step"]
    assert result["overhead"] == pytest.approx(expected)


@pytest.mark.parametrize("dataset", ["mnist", "cifar10", "celeba"])
def test_bench_images_from_real_data(shared_data, dataset):
    """--data-dir times on the first test images, whatever the storage (arrays or image files)."""
    images = bench._images(dataset, 3, "cpu", data_dir=shared_data)
    assert images.shape == (3, *DATASETS[dataset]["shape"])
    assert 0 <= images.min() and images.max() <= 1 and images.std() > 0


def test_bench_falls_back_to_noise_without_data(tmp_path):
    lines = []
    settings, rows, agreement = bench.bench_architecture(
        "svhn", quick=True, memory=False, measures=("decode",), repeats=1,
        data_dir=str(tmp_path), log=lines.append)
    assert any("timing on noise" in line for line in lines) and settings["data_dir"] is None
    assert agreement["codes_equal"] and rows[0]["ratio"] > 0


def test_profile_step_times_both_precisions_and_profiles(tmp_path, capsys):
    from vq_draw.tools import profile_step

    out = tmp_path / "step.json"
    profile_step.main(["svhn", "--stages", "2", "--batch", "2", "--steps", "2", "--profile",
                       "--by-shape", "--rows", "5", "--device", "cpu", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "fp32:" in printed and "bf16:" in printed and "Self CPU" in printed
    assert "Input Shapes" in printed
    data = json.loads(out.read_text())
    assert [r["precision"] for r in data["results"]] == ["fp32", "bf16"]
    for result in data["results"]:
        assert (result["stages"], result["segment"], result["batch"]) == (2, 2, 2)
        assert len(result["times"]) == 2 and result["seconds"] == pytest.approx(sum(result["times"]) / 2)


def test_grad_scale_compares_the_gradient_with_adams_eps(capsys):
    from vq_draw.tools import grad_scale

    magnitudes = torch.tensor([1e-7, 1e-6, 1e-5, 1e-4])
    rows = grad_scale.adam_step_table(magnitudes, [("mean", 1), ("sum", 16)])
    (_, _, median, below, step), (_, _, median16, below16, step16) = rows
    assert below == 0.5 and below16 == 0.25  # 1.6e-5 is no longer below eps
    assert median16 == pytest.approx(16 * median)
    expected = sum(g / (g + 1e-5) for g in magnitudes.tolist()) / 4
    assert step == pytest.approx(expected, rel=1e-5) and step16 > step
    grad_scale.main(["svhn", "--stages", "2", "--segment", "2", "--batch", "2"])
    printed = capsys.readouterr().out
    assert "uniform noise" in printed and "x 16 (sum, agreeing)" in printed
