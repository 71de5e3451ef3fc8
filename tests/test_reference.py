"""The fast encoder (vq_draw/encoder.py) against the plain implementation (vq_draw/reference.py).

Tiny models (K = 4, a few stages, batches of 2 to 10): codes must be equal; losses,
reconstructions and gradients equal within float tolerance (gradients in float64, where a
ReLU input rounding to the other side of zero is too rare to matter). The plain copy of each
model applies its channel masks unfolded and runs in NCHW (``bench.build_models``).
"""

import math

import pytest
import torch

from conftest import DATASET_NAMES, random_images, tiny_model
from vq_draw import reference
from vq_draw.encoder import StepPlan
from vq_draw.tools import bench


def tiny_models(dataset, dtype=torch.float32, seed=0, options=4, stages=3):
    """(fast, plain): two copies of one tiny model with the same weights."""
    segment = None if dataset == "mnist" else 1
    model, plain = bench.build_models(dataset, options, stages, segment, seed=seed)
    return model.to(dtype), plain.to(dtype)


def images(model, n, dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return model.normalize(torch.rand(n, *model.shape, generator=gen)).to(dtype)


# MNIST (one network) and SVHN (segments, a head per stage) cover the encoder's paths;
# the larger networks plug into the same code and would only make this slower.
@pytest.mark.parametrize("dataset", ["mnist", "svhn"])
def test_batched_greedy_choice_equals_a_naive_loop_over_options(dataset):
    # float64 so that the comparison of losses can be tight and argmins cannot flip.
    stages = dict(mnist=3, svhn=3)[dataset]  # SVHN: segments of 2, so stage 2 starts the second
    model = tiny_model(dataset, stages=stages, final_coeff=0.5).double().eval()
    x = random_images(model, 2, seed=2).double()
    with torch.no_grad():
        codes, recon, losses = reference.naive_encode(model, x)
        run_codes, run_recon, run_losses = model.run(x)
        terms = model.training_losses(x)
    # All options actually compete: the naive loop does not pick one option everywhere.
    assert len(set(codes.flatten().tolist())) > 1
    assert torch.equal(run_codes, codes)
    assert torch.equal(model.encode(x), codes)
    torch.testing.assert_close(run_losses, losses, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(run_recon, recon, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model.reconstruct(x), recon, rtol=1e-10, atol=1e-12)

    # The loss terms of the spec, from the naive losses.
    chosen = losses.gather(2, codes.unsqueeze(2)).squeeze(2)  # [N x S]
    stage_losses = chosen.mean(0)
    expected = stage_losses.mean() + model.aux_coeff * losses.mean() + 0.5 * stage_losses[-1]
    torch.testing.assert_close(terms["loss"], expected)
    torch.testing.assert_close(terms["chosen_loss"], stage_losses.mean())
    torch.testing.assert_close(terms["aux_loss"], losses.mean())
    torch.testing.assert_close(terms["final_loss"], stage_losses[-1])
    torch.testing.assert_close(terms["stage_losses"], stage_losses)
    assert torch.equal(terms["codes"], codes)
    # Code-usage statistics per stage, counted by hand.
    for t in range(model.num_stages):
        column = codes[:, t].tolist()
        counts = [column.count(k) for k in set(column)]
        entropy = -sum(c / len(column) * math.log(c / len(column)) for c in counts)
        assert terms["options_used"][t].item() == len(counts)
        assert terms["code_entropy"][t].item() == pytest.approx(entropy, abs=1e-6)


# The CPU's plan, and the GPU's (masks folded once for all stages, stage 1 on all rows) in
# both layouts: all give the reference's codes, losses and gradients.
PLANS = {"cpu": (StepPlan(), True),
         "gpu": (StepPlan(fold_all_stages=True, distinct_stage1=False), False),
         "gpu-channels-last": (StepPlan(fold_all_stages=True, distinct_stage1=False), True)}


@pytest.mark.parametrize("plan", sorted(PLANS))
@pytest.mark.parametrize("dataset", ["mnist", "svhn", "cifar10"])
def test_gradients_equal_reference_in_float64(dataset, plan):
    model, plain = tiny_models(dataset, torch.float64)
    model.step_plan, model.channels_last = PLANS[plan]
    # 5 images and K = 4: some share a first choice, so stage 1's once-per-input path runs.
    x = images(model, 5, torch.float64)
    terms = model(x)
    terms["loss"].backward()
    loss, codes, losses = reference.training_loss(plain, x)
    loss.backward()
    assert torch.equal(terms["codes"], codes)
    torch.testing.assert_close(terms["loss"], loss, rtol=1e-10, atol=1e-12)
    for (name, a), b in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-7, atol=1e-10, msg=name)
    # With gradient checkpointing too.
    model.zero_grad()
    model.grad_checkpoint = True
    model(x)["loss"].backward()
    for (name, a), b in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-7, atol=1e-10, msg=name)


@pytest.mark.parametrize("dataset", DATASET_NAMES)
def test_optimized_paths_agree_with_reference(dataset):
    model, plain = tiny_models(dataset)
    # 9 images and K = 4: stage 1 sees repeated inputs, so its once-per-input path runs.
    x = images(model, 9)
    result = bench.check_agreement(model, plain, x)
    assert result["codes_equal"], result
    assert result["decode_is_reconstruct"], result
    for key in ("loss", "losses", "encode_recon", "decode"):
        assert result[key] < 1e-5, (key, result)


def test_decode_of_other_codes_and_prefixes():
    model, plain = tiny_models("mnist", stages=4)
    model.eval()
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 4, (10, 4), generator=gen)
    torch.testing.assert_close(model.decode(codes), reference.decode(plain, codes),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.decode(codes[:, :2]), reference.decode(plain, codes[:, :2]),
                               rtol=1e-5, atol=1e-5)
    x = images(model, 10)
    codes, recons = model.encode(x, return_all=True)
    assert torch.equal(model.decode(codes, return_all=True), recons)
