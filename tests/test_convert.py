"""The original implementation's checkpoints (unixpickle/vq-draw) load and convert.

The original's key layout is written out here independently of ``vq_draw.convert``: a table
of each refiner's ``layers`` entries as the original lists them (every entry numbered, ReLUs
included; a channel mask is an entry of its own after its convolution), from which the state
dict of a tiny original model is generated. A small functional forward pass over the same
table then checks that the converted model proposes exactly what the original would.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import vq_draw
from vq_draw.checkpoint import CheckpointError
from vq_draw.loading import load_model
from vq_draw.convert import convert_state_dict
from vq_draw.evaluate import evaluate
from vq_draw.reference import proposals

from conftest import REPO, script_env, state_equal

UPSTREAM_MODEL = os.path.join(REPO, "..", "shared", "upstream", "mnist_model.pt")
# ../shared/upstream/README.md: the original's own code on its released model, MSE after
# each stage on the first 1,000 MNIST test digits, and the final MSE on all 10,000.
UPSTREAM_STAGE_MSE = [0.40488, 0.28483, 0.22088, 0.1734, 0.14176, 0.12238, 0.09979, 0.09041,
                      0.08226, 0.07752]
UPSTREAM_FULL_FINAL_MSE = 0.07647


# The original's layer lists. ("conv", in, out, kernel, stride), ("convT", in, out) (k4 s2 p1),
# ("mask", channels), ("relu",), ("gn", groups, channels), ("res", [entries]) (adds its input),
# ("out", in, kernel) (K*C channels), ("heads", in) (one 1x1 K*C convolution per stage).
def _mask_conv(c_in, c_out, k, stride=1):
    return [("conv", c_in, c_out, k, stride), ("mask", c_out)]


def _res(channels, hidden, groups):
    g1, g2, g3 = groups
    return ("res", [("relu",), ("gn", g1, channels), *_mask_conv(channels, channels, 3),
                    ("relu",), ("gn", g2, channels), *_mask_conv(channels, hidden, 1),
                    ("relu",), ("gn", g3, hidden), *_mask_conv(hidden, channels, 1)])


ORIGINAL_LAYERS = {
    "mnist": [
        *_mask_conv(1, 32, 3, 2), ("relu",), *_mask_conv(32, 64, 3, 2), ("relu",),
        *_mask_conv(64, 128, 3), ("relu",), *_mask_conv(128, 128, 3), ("relu",),
        *_mask_conv(128, 64, 3), ("relu",),
        ("convT", 64, 64), ("mask", 64), ("relu",), ("convT", 64, 64), ("mask", 64), ("relu",),
        ("out", 64, 3),
    ],
    "svhn": [
        *_mask_conv(3, 64, 5, 2), ("relu",), ("gn", 4, 64),
        *_mask_conv(64, 128, 5, 2), ("relu",), ("gn", 8, 128),
        *_mask_conv(128, 128, 3), ("relu",), ("gn", 8, 128),
        *_mask_conv(128, 256, 3), ("relu",), ("gn", 8, 256),
        *_mask_conv(256, 128, 3), ("relu",), ("gn", 8, 128),
        ("convT", 128, 128), ("mask", 128), ("relu",), ("gn", 8, 128),
        ("convT", 128, 128), ("mask", 128), ("relu",), ("gn", 8, 128),
        *_mask_conv(128, 128, 3), ("relu",),
        ("heads", 128),
    ],
    "cifar10": [
        ("conv", 3, 64, 5, 2), ("relu",), ("gn", 8, 64),
        ("conv", 64, 128, 5, 2), ("relu",), ("gn", 8, 128),
        *_mask_conv(128, 256, 3),
        *[_res(256, 1024, (8, 8, 32)) for _ in range(6)],
        ("convT", 256, 128), ("mask", 128), ("relu",), ("gn", 8, 128),
        ("convT", 128, 128), ("mask", 128), ("relu",), ("gn", 8, 128),
        *_mask_conv(128, 128, 3), ("relu",),
        ("out", 128, 5),
    ],
    "celeba": [
        ("conv", 3, 64, 5, 2), ("relu",), ("gn", 4, 64),
        ("conv", 64, 128, 5, 2), ("relu",), ("gn", 8, 128),
        ("conv", 128, 128, 5, 2), ("relu",), ("gn", 8, 128),
        *[_res(128, 512, (8, 8, 16)) for _ in range(6)],
        *[entry for _ in range(3)
          for entry in [("convT", 128, 128), ("mask", 128), ("relu",), ("gn", 8, 128)]],
        ("out", 128, 5),
    ],
}


def _layer_shapes(layers, prefix, options, channels, rows):
    """{key: shape} of the original's ``layers`` entries under ``prefix``."""
    shapes = {}
    for index, entry in enumerate(layers):
        kind, p = entry[0], f"{prefix}{index}."
        if kind == "conv":
            _, c_in, c_out, k, _ = entry
            shapes |= {p + "weight": (c_out, c_in, k, k), p + "bias": (c_out,)}
        elif kind == "convT":  # ConvTranspose2d weights are [in, out, k, k]
            shapes |= {p + "weight": (entry[1], entry[2], 4, 4), p + "bias": (entry[2],)}
        elif kind == "mask":
            shapes[p + "embeddings"] = (rows, entry[1])
        elif kind == "gn":
            shapes |= {p + "weight": (entry[2],), p + "bias": (entry[2],)}
        elif kind == "res":
            shapes |= _layer_shapes(entry[1], p, options, channels, rows)
        elif kind == "out":
            _, c_in, k = entry
            shapes |= {p + "weight": (options * channels, c_in, k, k), p + "bias": (options * channels,)}
        elif kind == "heads":
            for s in range(rows):
                shapes |= {f"{p}module_list.{s}.weight": (options * channels, entry[1], 1, 1),
                           f"{p}module_list.{s}.bias": (options * channels,)}
    return shapes


def original_state_dict(dataset, options, stages, segment=None, seed=0):
    """A random state dict in the original's key layout: ``Encoder(shape, options, refiner)``
    with ``refiner`` one network (``segment`` None) or ``SegmentRefiner(segment, ...)``."""
    shape = vq_draw.DATASETS[dataset]["shape"]
    generator = torch.Generator().manual_seed(seed)
    networks = ["refiner."] if segment is None else \
        [f"refiner.segments.{j}." for j in range(-(-stages // segment))]
    rows = stages if segment is None else segment
    shapes = {"bias": (options, *shape)}
    for prefix in networks:
        shapes[prefix + "output_scale"] = ()
        shapes |= _layer_shapes(ORIGINAL_LAYERS[dataset], prefix + "layers.", options, shape[0], rows)
    state = {}
    for key, size in shapes.items():
        # Small values keep the activations of the deep refiners in range.
        state[key] = torch.randn(size, generator=generator) * (0.3 if key.endswith("embeddings") or
                                                               key.endswith("output_scale") else 0.05)
    state["_stages"] = torch.tensor(stages)
    state["_grad_decay"] = torch.tensor(0.0)
    return state


def _original_forward(state, prefix, layers, x, stage):
    """The original's ``layers(x, stage)``, computed from its state dict alone."""
    for index, entry in enumerate(layers):
        kind, p = entry[0], f"{prefix}{index}."
        if kind == "conv":
            k, stride = entry[3], entry[4]
            x = F.conv2d(x, state[p + "weight"], state[p + "bias"], stride, k // 2)
        elif kind == "convT":
            x = F.conv_transpose2d(x, state[p + "weight"], state[p + "bias"], 2, 1)
        elif kind == "mask":
            x = x * state[p + "embeddings"][stage].view(1, -1, 1, 1)
        elif kind == "relu":
            x = F.relu(x)
        elif kind == "gn":
            x = F.group_norm(x, entry[1], state[p + "weight"], state[p + "bias"])
        elif kind == "res":
            x = x + _original_forward(state, p, entry[1], x, stage)
        elif kind == "out":
            x = F.conv2d(x, state[p + "weight"], state[p + "bias"], 1, entry[2] // 2)
        elif kind == "heads":
            head = f"{p}module_list.{stage}."
            x = F.conv2d(x, state[head + "weight"], state[head + "bias"])
    return x


def original_proposals(state, dataset, segment, recon, stage):
    """The original's K proposals at ``stage``: [N x *shape] -> [N x K x *shape]."""
    prefix, local = "refiner.", stage
    if segment is not None:
        prefix, local = f"refiner.segments.{stage // segment}.", stage % segment
    out = _original_forward(state, prefix + "layers.", ORIGINAL_LAYERS[dataset], recon, local)
    out = out * state[prefix + "output_scale"]
    out = recon[:, None] + out.view(len(recon), -1, *recon.shape[1:])  # channel k*C + c
    return out + state["bias"] if stage == 0 else out


# (dataset, K, stages, segment of the original, or None for one network)
ARCHITECTURES = [
    ("mnist", 4, 3, None),
    ("svhn", 4, 4, 2),
    ("svhn", 3, 2, None),  # an original SVHNRefiner used without a SegmentRefiner
    ("cifar10", 4, 2, 1),
    ("celeba", 4, 2, 1),
]


@pytest.mark.parametrize("dataset,options,stages,segment", ARCHITECTURES)
def test_original_layout_converts_exactly(dataset, options, stages, segment):
    state = original_state_dict(dataset, options, stages, segment)
    ckpt = convert_state_dict(state, name="tiny.pt")  # dataset, K, stages, segment inferred
    config = ckpt["config"]
    assert (config["dataset"], config["options"], config["stages"]) == (dataset, options, stages)
    expected_segment = segment if segment is not None else (None if dataset == "mnist" else stages)
    assert config["segment"] == expected_segment
    assert ckpt["converted_from"].endswith("tiny.pt")
    # Every original weight lands in the model: the same number of values.
    model = vq_draw.create_model(**config)
    model.load_state_dict(ckpt["model"])
    weights = sum(v.numel() for k, v in state.items() if k not in ("_stages", "_grad_decay"))
    assert sum(p.numel() for p in model.parameters()) == weights
    # ... and in the right place: the same proposals as the original at every stage, along
    # the original's greedy path.
    torch.manual_seed(1)
    target = model.normalize(torch.rand(2, *model.shape))
    recon = torch.zeros_like(target)
    with torch.no_grad():
        for stage in range(stages):
            theirs = original_proposals(state, dataset, segment, recon, stage)
            ours = proposals(model, recon, stage)
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
            losses = ((theirs - target[:, None]) ** 2).flatten(2).mean(2)
            recon = theirs[torch.arange(len(target)), losses.argmin(1)]
        codes, recons = model.eval().encode(target, return_all=True)
        torch.testing.assert_close(recons[:, -1], recon, rtol=1e-5, atol=1e-6)


def test_original_settings_carried_over():
    state = original_state_dict("svhn", 5, 6, 3)
    state["_grad_decay"] = torch.tensor(0.25)
    config = convert_state_dict(state)["config"]
    assert (config["options"], config["stages"], config["segment"], config["grad_decay"]) == \
        (5, 6, 3, 0.25)
    # A last segment network with unused stages, as the original builds ceil(stages / segment).
    config = convert_state_dict(original_state_dict("svhn", 4, 5, 2))["config"]
    assert (config["stages"], config["segment"]) == (5, 2)


def _error(state, **kwargs):
    with pytest.raises(CheckpointError) as info:
        convert_state_dict(state, name="orig.pt", **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_and_unexpected_keys_are_named():
    state = original_state_dict("mnist", 4, 3)
    del state["refiner.layers.4.embeddings"]
    assert "missing refiner.layers.4.embeddings" in _error(state)
    state = original_state_dict("mnist", 4, 3)
    state["refiner.layers.99.weight"] = torch.zeros(1)
    assert "unexpected refiner.layers.99.weight" in _error(state)
    state = original_state_dict("mnist", 4, 3)
    del state["_grad_decay"]
    assert "missing _grad_decay" in _error(state)
    state = original_state_dict("mnist", 4, 3)
    state["refiner.layers.21.weight"] = torch.zeros(4, 64, 5, 5)
    assert "'refiner.layers.21.weight' has shape [4, 64, 5, 5] where [4, 64, 3, 3]" in _error(state)


def test_ambiguous_dataset_asks_for_it():
    state = original_state_dict("svhn", 4, 4, 2)
    del state["refiner.segments.1.layers.31.module_list.0.bias"]
    message = _error(state)  # 3x32x32 is SVHN or CIFAR-10, and the keys now match neither
    assert "svhn and cifar10" in message and "dataset=" in message
    assert "missing refiner.segments.1.layers.31.module_list.0.bias" in _error(state, dataset="svhn")
    assert "unexpected" in _error(original_state_dict("svhn", 4, 4, 2), dataset="cifar10")
    assert "but svhn has 3x32x32 images" in _error(original_state_dict("mnist", 4, 3), dataset="svhn")


def test_settings_that_cannot_convert_name_the_difference():
    state = original_state_dict("mnist", 4, 3)
    state["_stages"] = torch.tensor(2)  # the original's --active-stages
    assert "runs 2 stages ('_stages') but its network is built for 3" in _error(state)
    state = original_state_dict("svhn", 4, 4, 2)
    state["_stages"] = torch.tensor(8)
    assert "take 4 networks, but it has 2" in _error(state)


def test_load_model_reads_an_original_state_dict(tmp_path):
    state = original_state_dict("celeba", 4, 2, 1)
    path = str(tmp_path / "celeba_model.pt")
    torch.save(state, path)
    model = load_model(path)
    assert not model.training and model.config["dataset"] == "celeba"
    assert state_equal(model.state_dict(), vq_draw.load_model(path).state_dict())
    # A damaged SVHN / CIFAR-10 file needs dataset= to say what is wrong.
    state = original_state_dict("svhn", 4, 2, 1)
    del state["refiner.segments.0.output_scale"]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="pass dataset="):
        load_model(path)
    with pytest.raises(CheckpointError, match="missing refiner.segments.0.output_scale"):
        load_model(path, dataset="svhn")
    torch.save({"weights": torch.zeros(2)}, path)  # neither format: refused as before
    with pytest.raises(CheckpointError, match="not a VQ-DRAW checkpoint"):
        load_model(path)


# ---------------------------------------------------------------------- the released MNIST model

@pytest.fixture(scope="module")
def upstream_model():
    if not os.path.exists(UPSTREAM_MODEL):
        pytest.skip("no ../shared/upstream/mnist_model.pt on this machine")
    return os.path.abspath(UPSTREAM_MODEL)


@pytest.fixture(scope="module")
def converted_upstream(upstream_model, tmp_path_factory):
    """The released model converted with the command line, once for this module."""
    path = str(tmp_path_factory.mktemp("convert") / "mnist_converted.pt")
    result = subprocess.run([sys.executable, "-m", "vq_draw.convert", upstream_model, path],
                            cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "mnist, K=64, 10 stages" in result.stdout and "537,793 parameters" in result.stdout
    return path


def _mnist_test(data_dir, count=None):
    from vq_draw.data import load_dataset
    images = load_dataset("mnist", "test", data_dir, download=False).images
    return (images if count is None else images[:count]).float() / 255


def test_converted_file_is_self_describing(upstream_model, converted_upstream):
    ckpt = torch.load(converted_upstream, weights_only=True)
    assert ckpt["format"] == "vq-draw-checkpoint" and "mnist_model.pt" in ckpt["converted_from"]
    assert ckpt["config"]["dataset"] == "mnist" and ckpt["config"]["segment"] is None
    direct, converted = load_model(upstream_model), load_model(converted_upstream)
    assert state_equal(direct.state_dict(), converted.state_dict())
    assert direct.output_scale.item() == pytest.approx(0.0177848)


def test_released_mnist_model_reproduces_the_original(upstream_model, converted_upstream, shared_data):
    images = _mnist_test(shared_data, 1000)
    direct, converted = load_model(upstream_model), load_model(converted_upstream)
    result = evaluate(direct, images)
    assert result["mse"] == pytest.approx(UPSTREAM_STAGE_MSE, abs=1e-4)
    # The converted file gives the same codes (its weights are equal: see above).
    assert torch.equal(converted.encode(converted.normalize(images[:100])), result["codes"][:100])


@pytest.mark.slow
def test_released_mnist_model_full_test_set(upstream_model, shared_data):
    result = evaluate(load_model(upstream_model), _mnist_test(shared_data))
    assert result["count"] == 10000
    assert result["final_mse"] == pytest.approx(UPSTREAM_FULL_FINAL_MSE, abs=1e-4)


def test_cli_refuses_bad_input_in_one_line(tmp_path):
    state = original_state_dict("mnist", 4, 3)
    del state["refiner.layers.1.embeddings"], state["refiner.layers.0.weight"]
    source = str(tmp_path / "broken.pt")
    torch.save(state, source)
    out = str(tmp_path / "out.pt")
    result = subprocess.run([sys.executable, "-m", "vq_draw.convert", source, out], cwd=REPO,
                            env=script_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and not os.path.exists(out)
    assert result.stderr.strip().count("\n") == 0
    assert "missing refiner.layers.0.weight, refiner.layers.1.embeddings" in result.stderr


def test_damaged_state_dicts_are_one_line_errors(tmp_path, capsys):
    """An int key or a NaN '_stages' (issue 30): one line from convert and from load_model."""
    from vq_draw import convert

    int_key = original_state_dict("mnist", 4, 3)
    int_key[3] = torch.zeros(1)
    nan = original_state_dict("mnist", 4, 3)
    nan["_stages"] = torch.tensor(float("nan"))
    half = original_state_dict("mnist", 4, 3)
    half["_stages"] = torch.tensor(2.5)
    for name, state, words in [("int.pt", int_key, "has the key 3 (int)"),
                               ("nan.pt", nan, "'_stages' is nan"),
                               ("half.pt", half, "'_stages' is 2.5, not a positive whole number")]:
        assert words in _error(state)
        path = str(tmp_path / name)
        torch.save(state, path)
        with pytest.raises(CheckpointError) as info:
            load_model(path)
        assert words in str(info.value)
        with pytest.raises(SystemExit) as failed:
            convert.main([path, str(tmp_path / "out.pt")])
        assert words in str(failed.value.code) and "\n" not in str(failed.value.code)
    assert not os.path.exists(tmp_path / "out.pt")


class _Sneaky:
    """An object whose unpickling would call print (as a hostile file would call os.system)."""

    def __reduce__(self):
        return print, ("this ran",)


def test_a_pickle_that_would_run_code_is_not_loaded_for_safety(tmp_path):
    from vq_draw import convert

    path = str(tmp_path / "sneaky.pt")
    torch.save({"bias": _Sneaky()}, path)
    with pytest.raises(SystemExit) as failed:
        convert.main([path, str(tmp_path / "out.pt")])
    message = str(failed.value.code)
    assert "not loaded, for safety" in message and "\n" not in message
    assert "weights_only" not in message and "Re-running" not in message
    assert not os.path.exists(tmp_path / "out.pt")
