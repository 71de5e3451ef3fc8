"""``VQDraw.proposals``: the K options of a stage, for code prefixes, on tiny models of all
four architectures."""

import pytest
import torch

from conftest import DATASET_NAMES, random_images, tiny_model


def _mse(proposals, x):
    """[N x K x *shape], [N x *shape] -> the loss of every proposal, [N x K]."""
    return (proposals - x.unsqueeze(1)).pow(2).flatten(2).mean(2)


@pytest.mark.parametrize("dataset", DATASET_NAMES)
def test_each_proposal_is_the_decoding_of_its_option(dataset):
    model = tiny_model(dataset).eval()
    x = random_images(model, 3)
    codes = model.encode(x)
    for t in range(model.num_stages):
        proposals = model.proposals(codes[:, :t])
        assert proposals.shape == (3, model.options, *model.shape)
        for k in range(model.options):
            option_k = torch.full((3, 1), k, dtype=torch.long)
            assert torch.equal(proposals[:, k], model.decode(torch.cat([codes[:, :t], option_k], 1))), \
                f"stage {t}, option {k}"
        # The options differ (so the comparisons above are not of K copies).
        assert len(torch.unique(_mse(proposals, x)[0])) == model.options


@pytest.mark.parametrize("dataset", DATASET_NAMES)
def test_the_greedy_choice_is_the_closest_proposal(dataset):
    model = tiny_model(dataset).eval()
    x = random_images(model, 4, seed=1)
    codes, recons = model.encode(x, return_all=True)
    rows = torch.arange(len(x))
    for t in range(model.num_stages):
        prefix = model.encode(x, num_stages=t) if t else codes[:, :0]
        proposals = model.proposals(prefix)
        assert torch.equal(_mse(proposals, x).argmin(1), codes[:, t]), f"stage {t}"
        assert torch.equal(proposals[rows, codes[:, t]], recons[:, t])


def test_stage_0_proposals_are_shared_and_need_no_code():
    model = tiny_model("svhn").eval()
    first = model.proposals(torch.zeros(1, 0, dtype=torch.long))
    several = model.proposals(torch.zeros(5, 0, dtype=torch.int32))
    assert first.shape == (1, model.options, *model.shape)
    assert torch.equal(several, first.expand_as(several))
    assert torch.equal(first[0], model.decode(torch.arange(model.options).unsqueeze(1)))


def test_proposals_under_bf16_autocast_match_the_encoder():
    # The notebooks' fast CPU path: under the same autocast, the chosen proposal is the
    # encoder's reconstruction bit for bit.
    model = tiny_model("mnist").eval()
    x = random_images(model, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes, recons = model.encode(x, return_all=True)
        proposals = model.proposals(codes[:, :2])
    assert proposals.dtype == torch.float32
    assert torch.equal(proposals[torch.arange(4), codes[:, 2]], recons[:, 2])


@pytest.mark.parametrize("codes, error, words", [
    (torch.zeros(1, 3, dtype=torch.long), ValueError, r"0 <= t < 3"),  # a whole code (S = 3)
    (torch.zeros(2, dtype=torch.long), ValueError, r"shape \[2\]"),   # not [N x t]
    (torch.zeros(0, 1, dtype=torch.long), ValueError, "N >= 1"),
    (torch.tensor([[0, 4]]), ValueError, r"\[0, 4\)"),               # out of range (K = 4)
    (torch.zeros(1, 2), TypeError, "integers"),
    (torch.zeros(1, 0), TypeError, "integers"),                      # even when empty
])
def test_bad_prefixes_are_rejected(codes, error, words):
    model = tiny_model("mnist").eval()
    with pytest.raises(error, match=words):
        model.proposals(codes)
