"""The refiner networks (vq_draw/refiners.py) and their building blocks (vq_draw/nn.py)."""

import pytest
import torch
import torch.nn.functional as F

import vq_draw
from vq_draw.nn import MaskedConv, OptionConv
from vq_draw.refiners import build_refiner
from conftest import DATASET_NAMES, TINY

# Published parameter counts (K = 64, published stages and segments) and, for the
# segmented models, the count of one segment's network.
PUBLISHED = {
    "mnist": (0.54e6, None),
    "svhn": (7.2e6, 1.75e6),
    "cifar10": (88.9e6, 8.87e6),
    "celeba": (38.4e6, 3.76e6),
}


@pytest.mark.parametrize("dataset", DATASET_NAMES)
def test_parameter_counts_match_the_paper(dataset):
    # Built on the meta device: the same modules and parameter shapes, no memory or init time.
    with torch.device("meta"):
        model = vq_draw.create_model(dataset, options=64)
    total, per_segment = PUBLISHED[dataset]
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - total) / total < 0.01, f"{dataset}: {count:,} parameters, paper {total:,.0f}"
    if per_segment is not None:
        refiners = model.refiner.refiners
        assert len(refiners) == model.num_stages // model.config["segment"]
        one = sum(p.numel() for p in refiners[0].parameters())
        assert abs(one - per_segment) / per_segment < 0.01, f"{dataset}: {one:,} per segment"


# The original implementation's exact counts at K = 64 with the published stages and segments
# (every segment network there has its own output scale).
ORIGINAL_COUNTS = {"mnist": 537_793, "svhn": 7_200_260, "cifar10": 88_852_618, "celeba": 38_358_922}


@pytest.mark.parametrize("dataset", DATASET_NAMES)
def test_parameter_counts_equal_the_originals_exactly(dataset):
    with torch.device("meta"):
        model = vq_draw.create_model(dataset, options=64)
    assert sum(p.numel() for p in model.parameters()) == ORIGINAL_COUNTS[dataset]


def test_each_segment_network_has_its_own_output_scale():
    torch.manual_seed(0)
    model = vq_draw.create_model("svhn", options=4, stages=5, segment=2)  # networks of 2, 2, 1
    assert model.output_scale.shape == (3,) and torch.all(model.output_scale == 0.1)
    with torch.no_grad():
        model.output_scale.copy_(torch.tensor([0.1, 0.2, 0.3]))
    assert [model.scale(t).item() for t in range(5)] == pytest.approx([0.1, 0.1, 0.2, 0.2, 0.3])
    # Only the network that runs a stage gets a gradient through that stage's scale.
    model.train()
    x = model.normalize(torch.rand(2, *model.shape))
    model.training_losses(x)["loss"].backward()
    assert torch.all(model.output_scale.grad != 0)
    assert vq_draw.create_model("mnist", options=4, stages=2).output_scale.dim() == 0


def test_checkpoints_with_one_shared_scale_load_with_the_same_outputs():
    # Before each network had its own scale, one scalar was shared by all of them.
    torch.manual_seed(0)
    model = vq_draw.create_model("svhn", options=4, stages=4, segment=2).eval()
    with torch.no_grad():
        model.output_scale.fill_(0.37)
    old = dict(model.state_dict(), output_scale=torch.tensor(0.37))
    fresh = vq_draw.create_model("svhn", options=4, stages=4, segment=2).eval()
    fresh.load_state_dict(old)
    assert torch.equal(fresh.output_scale, torch.full((2,), 0.37))
    x = model.normalize(torch.rand(3, *model.shape))
    assert torch.equal(fresh.encode(x), model.encode(x))
    assert torch.equal(fresh.reconstruct(x), model.reconstruct(x))


def test_published_settings():
    expected = {"mnist": (10, None, 0.1), "svhn": (20, 5, 0.1), "cifar10": (100, 10, 0.01),
                "celeba": (100, 10, 0.01)}
    for dataset, (stages, segment, scale) in expected.items():
        with torch.device("meta"):
            model = vq_draw.create_model(dataset)
        assert (model.num_stages, model.config["segment"], model.options) == (stages, segment, 64)
        assert model.config["output_scale"] == scale
    assert vq_draw.create_model("celeba", options=2, stages=1, segment=1).shape == (3, 64, 64)


@pytest.mark.parametrize("dataset", DATASET_NAMES)
def test_refiner_output_shapes_and_chosen_options(dataset):
    settings = TINY[dataset]
    shape = vq_draw.DATASETS[dataset]["shape"]
    k, stages = settings["options"], settings["stages"]
    torch.manual_seed(0)
    refiner = build_refiner(dataset, k, stages, settings.get("segment"))
    x = torch.randn(2, *shape)
    choices = torch.tensor([k - 1, 1])
    with torch.no_grad():
        for stage in (0, stages - 1):
            features = refiner.features(x, stage)
            assert features.dim() == 4 and features.shape[0] == 2
            out = refiner.options(features, stage)
            assert out.shape == (2, k, *shape)
            assert torch.equal(refiner(x, stage), out)
            chosen = refiner.options(features, stage, choices)
            assert chosen.shape == (2, *shape)
            # Computing only the chosen option gives that option of the full output.
            torch.testing.assert_close(chosen, out[torch.arange(2), choices], rtol=1e-5, atol=1e-5)
        # Stages are conditioned: the same input gives different proposals at another stage.
        assert not torch.allclose(refiner(x, 0), refiner(x, stages - 1))


def test_segment_refiner_uses_one_network_per_block_of_stages():
    torch.manual_seed(0)
    refiner = build_refiner("svhn", 4, 4, 2)
    assert len(refiner.refiners) == 2
    # SVHN: a 1x1 head per stage of the segment.
    assert refiner.refiners[0].head.weight.shape == (2, 4 * 3, 128, 1, 1)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = [refiner(x, t) for t in range(4)]
        for p in refiner.refiners[1].parameters():
            p.add_(torch.randn_like(p))
        after = [refiner(x, t) for t in range(4)]
        # Stages 0, 1 run network 0; stages 2, 3 run network 1 (at local stages 0, 1).
        assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
        assert not torch.allclose(before[2], after[2]) and not torch.allclose(before[3], after[3])
        # Changing the head of local stage 0 leaves local stage 1 alone.
        before = [refiner(x, t) for t in range(2)]
        refiner.refiners[0].head.weight[0].add_(1.0)
        after = [refiner(x, t) for t in range(2)]
        assert not torch.allclose(before[0], after[0]) and torch.equal(before[1], after[1])


def test_segment_refiner_with_unequal_blocks():
    """segment=[1, 2, 1]: stage 0 runs network 0, stages 1-2 network 1 (local 0, 1), stage 3
    network 2; each network is built for its own number of stages."""
    torch.manual_seed(0)
    refiner = build_refiner("svhn", 4, 4, [1, 2, 1])
    assert [net.head.weight.shape[0] for net in refiner.refiners] == [1, 2, 1]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(refiner(x, 2), refiner.refiners[1](x, 1))
        assert torch.equal(refiner(x, 3), refiner.refiners[2](x, 0))
        before = [refiner(x, t) for t in range(4)]
        for p in refiner.refiners[1].parameters():
            p.add_(torch.randn_like(p))
        after = [refiner(x, t) for t in range(4)]
    changed = [not torch.equal(b, a) for b, a in zip(before, after)]
    assert changed == [False, True, True, False]


@pytest.mark.parametrize("transpose, kernel, stride", [(False, 3, 1), (False, 5, 2), (True, 4, 2)])
def test_masked_conv_folding_equals_conv_then_mask(transpose, kernel, stride):
    torch.manual_seed(0)
    conv = MaskedConv(6, 8, kernel, num_stages=3, stride=stride, transpose=transpose)
    x = torch.randn(2, 6, 10, 10)
    for stage in range(3):
        folded = conv(x, stage)
        conv.fold_mask = False
        reference = conv(x, stage)
        conv.fold_mask = True
        by_hand = conv.conv(x) * conv.mask[stage].view(1, -1, 1, 1)
        torch.testing.assert_close(folded, reference, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(folded, by_hand, rtol=1e-5, atol=1e-5)
        size = 20 if transpose else 10 // stride
        assert folded.shape == (2, 8, size, size)  # "same" padding; k4 s2 transposed doubles


def test_option_conv_channel_layout():
    # Output channel k * C + c of the last layer is channel c of option k.
    torch.manual_seed(0)
    head = OptionConv(5, 3, 4, 3)
    h = torch.randn(2, 5, 6, 6)
    out = head(h, 0)
    flat = F.conv2d(h, head.weight[0], head.bias[0], padding=1)
    for k in range(4):
        for c in range(3):
            assert torch.equal(out[:, k, c], flat[:, k * 3 + c])


